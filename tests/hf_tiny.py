"""Tiny Hugging Face models built from configs (no download) and batches with something to learn,
for the EGNTrainer tests. Dropout is off: EGN's forwards of one step must see the same network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

V, T, C = 16, 8, 3  # vocabulary, sequence length, classes
PAD = 0


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg).to(dtype)


def bert(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64, **config: object) -> nn.Module:
    """kind: "sequence" | "token"; config: BertConfig overrides (num_labels, problem_type)."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     pad_token_id=PAD, **{"num_labels": C, **config})
    cls = BertForSequenceClassification if kind == "sequence" else BertForTokenClassification
    return cls(cfg).to(dtype)


def counting(n: int, seed: int) -> Tensor:
    """(n, T) token sequences that count up by a random stride (mod V, avoiding the pad id)."""
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(V - 1, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return 1 + (start + stride * torch.arange(T)) % (V - 1)


def padded(ids: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(ids with right padding, attention mask): sample i keeps a random length ≥ T/2."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (ids.shape[0], 1), generator=g)
    mask = (torch.arange(T) < lengths).long()
    return torch.where(mask.bool(), ids, PAD), mask


def lm_dataset(n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """Padded counting sequences; labels = ids with −100 on the padding (as a padding collator sets)."""
    ids, mask = padded(counting(n, seed), seed + 1)
    labels = torch.where(mask.bool(), ids, -100)
    return [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(n)]


def classification_dataset(n: int, task: str, seed: int = 0) -> list[dict[str, Tensor]]:
    """task: "sequence" (label = the first token mod C), "regression" (label = the stride as a float),
    "multi_label" (label k = whether token k + 1 occurs, as floats), "token" (label per token = its
    value mod C, −100 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(V - 1, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids, mask = padded(1 + (start + stride * torch.arange(T)) % (V - 1), seed + 1)
    if task == "sequence":
        labels = ids[:, 0] % C
    elif task == "regression":
        labels = stride.view(-1).float()
    elif task == "multi_label":
        labels = torch.stack([((ids == k + 1) & mask.bool()).any(1) for k in range(C)], 1).float()
    else:
        labels = torch.where(mask.bool(), ids % C, -100)
    return [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(n)]


def collate(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
