"""Small nanoGPT-style transformers for the text benchmarks, built from standard torch modules only
(nn.Embedding, nn.LayerNorm, nn.Linear, nn.GELU) and F.scaled_dot_product_attention, which has no
parameters; no dropout.

* `CharGPT(vocab, d, layers, heads, T)`: causal character language model. Token + position
  embeddings (positions: an arange(T) buffer, sliced to the input length, (t,) broadcast over
  the batch), pre-LN blocks (qkv as one Linear d → 3d, causal attention, output projection; GELU
  MLP d → 4d → d), a final LayerNorm and a head tied to the token embedding: an
  nn.Linear(d, vocab, bias=False) whose weight *is* wte.weight, so logits = h @ wte.weightᵀ
  (egn_fast refuses the functional form F.linear(h, wte.weight): a use of a parameter outside
  its module's forward); ids (b, t) → logits (b, t, vocab). `tie=False`: a separate head weight.
* `ReviewClassifier(vocab, classes, pad_id, d, layers, heads, T)`: the same blocks with
  bidirectional attention; padding (ids == pad_id) is masked out of the attention keys and of the
  mean-pool over tokens; a Linear head to the classes; ids (b, t) → logits (b, classes).
  Its embedding has vocab + 1 rows when pad_id == vocab (the padding id of text_data).

Initialization as nanoGPT: normal(0, 0.02) weights, zero biases, the residual projections with
std 0.02 / sqrt(2 · layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "CharGPT", "ReviewClassifier"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: qkv = Linear(d, 3d), SDPA, proj = Linear(d, d)."""

    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d = {d} is not a multiple of heads = {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x (b, t, d), key_mask (b, t) bool (True = attend to this key) → (b, t, d)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (b, 1, 1, t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x)) with a GELU MLP d → 4d → d."""

    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x (b, t, d) → (b, t, d)."""
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


def _init(model: nn.Module, layers: int) -> None:
    """nanoGPT's initialization (see the module docstring)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)


class _Trunk(nn.Module):
    """Embeddings (token + position) and the blocks, shared by both models."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, T: int, causal: bool) -> None:
        super().__init__()
        self.T = T
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)
        self.register_buffer("pos", torch.arange(T), persistent=False)
        self.blocks = nn.ModuleList(Block(d, heads, causal) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def features(self, ids: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """ids (b, t) long, t ≤ T → final-LayerNorm features (b, t, d)."""
        t = ids.shape[1]
        if t > self.T:
            raise ValueError(f"sequence length {t} exceeds the model's T = {self.T}")
        x = self.wte(ids) + self.wpe(self.pos[:t])  # (b, t, d) + (t, d)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_f(x)


class CharGPT(_Trunk):
    """Causal character LM: ids (b, t) → logits (b, t, vocab); see the module docstring."""

    def __init__(self, vocab: int, d: int = 128, layers: int = 2, heads: int = 4, T: int = 64, tie: bool = True) -> None:
        super().__init__(vocab, d, layers, heads, T, causal=True)
        self.tie = tie
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:  # tied through a module: egn_fast refuses a functional F.linear(h, wte.weight)
            self.head.weight = self.wte.weight
        _init(self, layers)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.features(ids))


class ReviewClassifier(_Trunk):
    """Bidirectional encoder + masked mean-pool + Linear head: ids (b, t) → logits (b, classes).
    Tokens equal to `pad_id` are padding: no query attends to them and they are left out of the
    pool (a padded review gives the same logits as the unpadded one)."""

    def __init__(self, vocab: int, classes: int, pad_id: int, d: int = 64, layers: int = 1, heads: int = 4,
                 T: int = 128) -> None:
        super().__init__(max(vocab, pad_id + 1), d, layers, heads, T, causal=False)
        self.pad_id = pad_id
        self.head = nn.Linear(d, classes)
        _init(self, layers)

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id  # (b, t)
        h = self.features(ids, mask)  # (b, t, d)
        keep = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (b, d)
        return self.head(pooled)
