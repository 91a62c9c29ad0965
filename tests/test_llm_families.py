"""Hugging Face model families from tiny configs (no download), stock forwards, against the dense
float64 oracle: causal LMs per token (exact and Monte-Carlo rows), encoder classifiers with a
padding mask, peft LoRA adapters, gradient checkpointing; and the tied scaled embedding of Gemma.

Tolerance. Llama, Qwen2, Mistral, Phi-3, OLMo and Gemma normalize in float32 even in a float64
model (their RMSNorm/LayerNorm forward casts the hidden states to float32 and back), so the model
function itself is float32-accurate there and the oracle's J and egn_fast's rows, computed by
different sums of the same float32-rounded values, agree to ~2e-7 (a float64 RMSNorm gives
~2e-14, checked below). We use 1e-5 for those families and 1e-8 where the forward is float64
throughout (GPT-NeoX, GPT-2, BERT): any real error in a row (a missed use, a wrong scale) is
O(1e-2) or more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import egn_fast
from oracle import dense_direction, dense_direction_wide, rel_err
from test_third_party import LastTokenLogits, SequenceLogits, assert_exact, randomize, tiny_gpt2, tokens
from token_models import causal_lm_logits, exact_token_oracle, mc_token_oracle, token_data

transformers = pytest.importorskip("transformers")

V, T, LAM = 32, 6, 0.2
FLOAT32_NORMS = 1e-5  # see the module docstring
FLOAT64 = 1e-8

# family: (config class, model class, config options beyond the common ones, tolerance)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1}, FLOAT32_NORMS),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}, FLOAT32_NORMS),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1}, FLOAT32_NORMS),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 1}, FLOAT32_NORMS),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {"num_key_value_heads": 1}, FLOAT32_NORMS),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, FLOAT64),
    # scaled word embedding (an nn.Embedding subclass overriding forward) tied to the lm_head Linear
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": 8}, FLOAT32_NORMS),
}


def causal_lm(family: str, seed: int) -> nn.Module:
    """The family's CausalLM (1 layer, 16 wide, 2 heads, vocab V) as a float64 logits model."""
    config_cls, model_cls, extra, _ = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, **extra)
    torch.manual_seed(seed)
    return causal_lm_logits(getattr(transformers, model_cls)(cfg), seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_per_token_exact(family):
    model = causal_lm(family, seed=1)
    ids, y = token_data(2, T, V, seed=2, ignored=2)
    d = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=LAM)
    err = rel_err(d, exact_token_oracle(model, ids, y, LAM))
    assert err < FAMILIES[family][3], err


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_causal_lm_batch_equal_to_length(family):
    """b == T: the (1, T) position ids and the rotary tables have a dimension of size b that holds
    no samples (docs/design.md §2.1)."""
    model = causal_lm(family, seed=7)
    ids, y = token_data(4, 4, V, seed=8, ignored=2)
    d = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=LAM)
    err = rel_err(d, exact_token_oracle(model, ids, y, LAM))
    assert err < FAMILIES[family][3], err


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_per_token_mc(family):
    model = causal_lm(family, seed=3)
    ids, y = token_data(3, T, V, seed=4, ignored=3)
    info = egn_fast.direction_with_info(model, ids, y, loss="cross_entropy", damping=LAM, curvature="mc", mc_samples=2,
                                        generator=torch.Generator().manual_seed(5))
    err = rel_err(info.direction, mc_token_oracle(model, ids, y, info.samples, LAM))
    assert err < FAMILIES[family][3], err


def test_the_tolerance_is_the_float32_norm():
    """Llama with its RMSNorm computed in float64 (the same formula without the float32 cast) is
    exact to float64 rounding: the float32 norm alone is why FLOAT32_NORMS is looser."""
    from transformers.models.llama import modeling_llama

    def float64_rms_norm(self, h: Tensor) -> Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    model = causal_lm("llama", seed=1)
    ids, y = token_data(2, T, V, seed=2, ignored=2)
    patch = pytest.MonkeyPatch()
    patch.setattr(modeling_llama.LlamaRMSNorm, "forward", float64_rms_norm)
    try:
        d = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=LAM)
        assert rel_err(d, exact_token_oracle(model, ids, y, LAM)) < 1e-11
    finally:
        patch.undo()


# --------------------------------------------------------------------------- the Gemma pattern


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: an nn.Embedding subclass whose forward multiplies by √d."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.embedding_dim**0.5


class TiedScaled(nn.Module):
    """ScaledEmbedding tied to a Linear head; functional=True also uses the weight in this forward."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.emb, self.mix, self.head = ScaledEmbedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.functional = functional

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)
        out = self.head(h)
        return out + nn.functional.linear(h, self.emb.weight) if self.functional else out


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_tied_weight_used_in_its_owners_overridden_forward_is_exact(loss):
    model = TiedScaled().double()
    ids = torch.randint(0, 7, (4, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 7, (4,)) if loss == "cross_entropy" else torch.randn(4, 7, dtype=torch.float64)
    d = egn_fast.direction(model, ids, y, loss=loss, damping=LAM)
    assert rel_err(d, dense_direction(model, ids, y, egn_fast.resolve_loss(loss), LAM)) < 1e-10


def test_tied_weight_also_used_functionally_is_still_refused():
    model = TiedScaled(functional=True).double()
    ids = torch.randint(0, 7, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="'emb.weight' is used outside the forward of its module 'emb'"):
        egn_fast.direction(model, ids, torch.randn(4, 7, dtype=torch.float64), damping=LAM)


# --------------------------------------------------------------------------- encoders, LoRA, checkpointing


def encoder_classifier(family: str) -> nn.Module:
    """DistilBERT or RoBERTa for sequence classification (2 layers, 16 wide, 3 labels, no dropout)."""
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                                            max_position_embeddings=16, num_labels=3, dropout=0.0,
                                            attention_dropout=0.0, seq_classif_dropout=0.0)
        return SequenceLogits(transformers.DistilBertForSequenceClassification(cfg))
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3, pad_token_id=1,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SequenceLogits(transformers.RobertaForSequenceClassification(cfg))


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_encoder_classifier_with_padding(family):
    """Sequence classification with trailing padding on some samples (BERT: test_third_party)."""
    model = randomize(encoder_classifier(family), seed=10)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 4:] = 0
    ids = tokens(3, 5, seed=11) % 48 + 2  # ids 0 and 1 are RoBERTa's bos and pad
    assert_exact(model, {"input_ids": ids, "attention_mask": mask}, "cross_entropy", 3, seed=12)


def test_peft_lora_on_gpt2_only_adapters_trainable():
    peft = pytest.importorskip("peft")
    lm = peft.get_peft_model(tiny_gpt2().lm, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                              lora_dropout=0.0, fan_in_fan_out=True))
    model = randomize(LastTokenLogits(lm), seed=1)  # lora_B starts at zero: randomize moves it
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert_exact(model, tokens(3, 5, seed=2), "cross_entropy", 50, seed=3)


def checkpointed_gpt2(reentrant: bool) -> tuple[nn.Module, nn.Module]:
    """GPT-2 with gradient checkpointing, and a copy without it (the oracle's torch.func transforms
    cannot run the input hook HF's checkpointing adds)."""
    model = randomize(tiny_gpt2(), seed=4).train()  # HF checkpoints only in train mode (no dropout here)
    plain = copy.deepcopy(model)
    model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model, plain


def test_gradient_checkpointing_non_reentrant_is_exact():
    model, plain = checkpointed_gpt2(reentrant=False)
    ids = tokens(3, 5, seed=5)
    layer = model.lm.transformer.h[0].mlp.c_fc
    runs = []
    handle = layer.register_forward_hook(lambda *_: runs.append(1))
    model(ids).sum().backward()  # checkpointing is on: the backward runs the block's layers again
    handle.remove()
    model.zero_grad(set_to_none=True)
    assert len(runs) == 2
    y = torch.randint(0, 50, (3,), generator=torch.Generator().manual_seed(6))
    d = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=LAM)
    want = dense_direction_wide(plain, ids, y, egn_fast.resolve_loss("cross_entropy"), LAM)
    assert rel_err(d, want) < FLOAT64


def test_gradient_checkpointing_reentrant_is_refused_in_one_line():
    model, _ = checkpointed_gpt2(reentrant=True)
    y = torch.randint(0, 50, (3,))
    with pytest.raises(ValueError, match=r"^the model uses torch.utils.checkpoint with use_reentrant=True[^\n]*"
                                         r"use_reentrant': False\}\)\)$"):
        egn_fast.direction(model, tokens(3, 5, seed=5), y, loss="cross_entropy", damping=LAM)
