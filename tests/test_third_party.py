"""Named third-party models, built from a config (no download), against the dense float64 oracle.

torchvision's ResNet-18 (eval: BatchNorm with running statistics) and a tiny VisionTransformer;
Hugging Face GPT-2 and BERT with their stock forwards (learned position ids of shape (1, T)
broadcast over the batch, GPT-2's head tied to its token embedding, BERT's token-type buffer and
attention mask). The only wrapper picks a per-sample output: GPT-2's last-token logits (b, vocab),
BERT's sequence-classification logits (b, labels). torchvision and transformers are imported
inside the tests, so collecting this file stays cheap.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import egn_fast
from egn_fast import resolve_loss
from oracle import dense_direction, dense_direction_wide, rel_err

LOSSES = ["mse", "cross_entropy"]
DAMPING = 0.1
DENSE_MAX_D = 3000  # above this the oracle solves in row space on the dense J (d×d would not fit)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode, every parameter and norm statistic perturbed away from its init."""
    torch.manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def make_targets(loss: str, b: int, c: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss == "cross_entropy":
        return torch.randint(0, c, (b,), generator=g)
    return torch.randn(b, c, generator=g, dtype=torch.float64)


def assert_exact(model: nn.Module, inputs, loss: str, c: int, seed: int, tol: float = 1e-8) -> None:
    """egn_fast.direction matches the float64 oracle and leaves the model as it was."""
    b = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]
    y = make_targets(loss, b, c, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = egn_fast.direction(model, inputs, y, loss=loss, damping=DAMPING)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    oracle = dense_direction if n <= DENSE_MAX_D else dense_direction_wide
    want = oracle(model, inputs, y, resolve_loss(loss), DAMPING)
    assert [t.shape for t in d] == [w.shape for w in want]
    err = rel_err(d, want)
    assert err < tol, f"relative error {err:.2e} against the dense oracle (d = {n})"


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("loss", LOSSES)
def test_resnet18_eval(loss):
    """Full ResNet-18 (11.2M parameters, all trainable), 3 classes, 2 images of 3×32×32.
    The oracle's J is 2·3 × 11.2M float64 (≈ 540 MB); H (d×d) is never formed."""
    from torchvision.models import resnet18

    model = randomize(resnet18(num_classes=3), seed=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_exact(model, x, loss, 3, seed=3)


def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12, num_classes=3)


@pytest.mark.parametrize("b", [2, 5])  # 5 == the sequence length (4 patches + class token)
@pytest.mark.parametrize("loss", LOSSES)
def test_tiny_vision_transformer(loss, b):
    """torchvision's VisionTransformer: conv patchify, class token and position embedding
    (parameters used functionally, broadcast over the batch), MultiheadAttention, LayerNorm."""
    model = randomize(tiny_vit(), seed=4)
    x = torch.randn(b, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_exact(model, x, loss, 3, seed=6)


@pytest.mark.parametrize("loss", LOSSES)
def test_wide_oracle_agrees_with_the_dense_oracle(loss):
    """The row-space oracle used for the wide models equals the d×d solve where both fit."""
    model = randomize(tiny_vit(), seed=13)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    y = make_targets(loss, 4, 3, seed=15)
    wide = dense_direction_wide(model, x, y, resolve_loss(loss), DAMPING)
    assert rel_err(wide, dense_direction(model, x, y, resolve_loss(loss), DAMPING)) < 1e-10


# --------------------------------------------------------------------------- Hugging Face

VOCAB = 50


class LastTokenLogits(nn.Module):
    """GPT-2's stock forward; the per-sample output is the last position's logits (b, vocab)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids).logits[:, -1]


class SequenceLogits(nn.Module):
    """BertForSequenceClassification's stock forward; its logits (b, labels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return LastTokenLogits(GPT2LMHeadModel(cfg))


def tiny_bert(labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SequenceLogits(BertForSequenceClassification(cfg))


def tokens(b: int, T: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (b, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b,T", [(2, 5), (3, 3)], ids=["T!=b", "T==b"])
@pytest.mark.parametrize("loss", LOSSES)
def test_gpt2_stock_forward(loss, b, T):
    """GPT-2 (2 layers, 32 wide, ≈ 27k parameters): HF Conv1D, position ids (1, T) broadcast
    over the batch, causal attention, LM head tied to the token embedding."""
    model = randomize(tiny_gpt2(), seed=7)
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight  # the tie is exercised
    assert_exact(model, tokens(b, T, seed=8), loss, VOCAB, seed=9)


@pytest.mark.parametrize("padding", [False, True], ids=["no_mask", "padded_mask"])
@pytest.mark.parametrize("loss", LOSSES)
def test_bert_stock_forward(loss, padding):
    """BERT for sequence classification: position and token-type ids broadcast from (1, T)
    buffers, pooler, and (padded) an attention_mask with trailing padding on some samples."""
    model = randomize(tiny_bert(), seed=10)
    b, T = 3, 5
    ids = tokens(b, T, seed=11)
    inputs: dict[str, Tensor] = {"input_ids": ids}
    if padding:
        mask = torch.ones(b, T, dtype=torch.long)
        mask[0, 3:] = 0
        mask[2, 4:] = 0
        inputs["attention_mask"] = mask
    assert_exact(model, inputs, loss, 3, seed=12)


class PerSamplePositions(nn.Module):
    """The same HF model given explicit (b, T) position (and token-type) ids instead of the
    (1, T) ones its stock forward broadcasts: isolates the broadcast from the rest of the model.
    GPT-2 (last_token=True): the last position's logits; BERT: the classification logits."""

    def __init__(self, model: nn.Module, last_token: bool):
        super().__init__()
        self.model, self.last_token = model, last_token

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        b, T = input_ids.shape
        extra = {"position_ids": torch.arange(T, device=input_ids.device).expand(b, T)}
        if not self.last_token:
            extra["token_type_ids"] = torch.zeros_like(input_ids)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        return logits[:, -1] if self.last_token else logits


@pytest.mark.parametrize("loss", LOSSES)
def test_gpt2_with_per_sample_position_ids(loss):
    model = randomize(PerSamplePositions(tiny_gpt2().lm, last_token=True), seed=7)
    assert_exact(model, tokens(3, 3, seed=8), loss, VOCAB, seed=9)


@pytest.mark.parametrize("loss", LOSSES)
def test_bert_with_per_sample_position_ids_and_padding(loss):
    model = randomize(PerSamplePositions(tiny_bert().model, last_token=False), seed=10)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    assert_exact(model, {"input_ids": tokens(3, 5, seed=11), "attention_mask": mask}, loss, 3, seed=12)
