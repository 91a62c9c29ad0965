"""Language models for the per-token tests: a nanoGPT-style char model built from standard modules,
random per-token targets with ignored tokens, the oracle's Ĥ rebuilt from drawn labels, and the
per-token oracles for models too wide for a d×d solve (exact H by the push-through identity, the
drawn labels' Ĥ by Woodbury), both on the dense float64 J."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oracle import dense_jacobian, unflat


class Block(nn.Module):
    """Pre-norm transformer block: causal F.scaled_dot_product_attention (qkv one Linear) + GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, T, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings (positions (T,), broadcast over the batch), blocks, final
    LayerNorm, a Linear head tied to the token embedding. ids (b, T) -> logits (b, T, V)."""

    def __init__(self, vocab: int = 5, d: int = 8, layers: int = 1, heads: int = 2, T: int = 6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in nanoGPT

    def forward(self, ids: Tensor) -> Tensor:
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random parameters of a scale that gives non-trivial softmaxes (no zeros, no identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def token_data(b: int, T: int, vocab: int, seed: int, ignored: int = 2) -> tuple[Tensor, Tensor]:
    """ids (b, T) and next-token targets (b, T) with `ignored` tokens set to −100 (never a whole
    sequence)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (b, T + 1), generator=g)
    y = ids[:, 1:].clone()
    flat = torch.randperm(b * T, generator=g)[:ignored]
    y.view(-1)[flat] = -100
    return ids[:, :-1], y


def sampled_hessian(model: nn.Module, ids: Tensor, samples: Tensor, per_sample_loss, norm: float) -> Tensor:
    """Ĥ = (1/norm) Σ_{j,i} J_iᵀ u_ij u_ijᵀ J_i with u_ij = ∇_f per_sample_loss(f_i, ŷ_ij) (autograd)."""
    out, J = dense_jacobian(model, ids)
    b, c = out.shape
    Ji = J.view(b, c, -1)
    H = torch.zeros(J.shape[1], J.shape[1], dtype=torch.float64)
    for y in samples:
        for i in range(b):
            u = torch.func.grad(per_sample_loss)(out[i], y[i])
            gi = Ji[i].T @ u
            H += torch.outer(gi, gi)
    return H / norm


def seq_ce_sum(f: Tensor, y: Tensor) -> Tensor:
    """One sequence's summed token losses: f (T·V,), y (T,) with −100 ignored."""
    return F.cross_entropy(f.view(y.shape[0], -1), y, reduction="sum", ignore_index=-100)


class Logits(nn.Module):
    """A Hugging Face causal LM's stock forward, its logits (b, T, V)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits


def causal_lm_logits(lm: nn.Module, seed: int, scale: float = 0.3) -> Logits:
    """The LM's logits as a float64 eval-mode model, every parameter moved by scale·N(0, 1) away
    from its init (HF inits are small: near-uniform softmaxes would hide errors)."""
    model = Logits(lm).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def token_ce(f: Tensor, y: Tensor) -> Tensor:
    """The per-token batch loss: mean cross-entropy over the counted tokens, f (b, T, V), y (b, T)."""
    return F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1))


def exact_token_oracle(model: nn.Module, ids: Tensor, y: Tensor, lam: float) -> list[Tensor]:
    """d = −Jᵀ(QJJᵀ + λI)⁻¹∇L, Q = ∇²L and ∇L of the batch loss in the outputs (autograd)."""
    out, J = dense_jacobian(model, ids)
    b, T = y.shape
    value = lambda v: token_ce(v.view(b, T, -1), y)
    grad, Q = torch.func.grad(value)(out.reshape(-1)), torch.func.hessian(value)(out.reshape(-1))
    M = Q @ (J @ J.T) + lam * torch.eye(J.shape[0], dtype=J.dtype)
    return unflat(model, -(J.T @ torch.linalg.solve(M, grad)))


def mc_token_oracle(model: nn.Module, ids: Tensor, y: Tensor, samples: Tensor, lam: float) -> list[Tensor]:
    """d = −(UᵀU + λI)⁻¹g, U's rows u_ijᵀJ_i/√(N·k), u_ij the gradient of sequence i's summed
    token losses at the drawn labels ŷ_ij (F.cross_entropy, ignore_index), by Woodbury."""
    out, J = dense_jacobian(model, ids)
    b, c = out.shape
    T = y.shape[1]
    k, N = samples.shape[0], int((y != -100).sum())
    seq = lambda f, t: F.cross_entropy(f.view(T, -1), t, reduction="sum", ignore_index=-100)
    U = torch.stack([J.view(b, c, -1)[i].T @ torch.func.grad(seq)(out[i], s[i]) for s in samples for i in range(b)])
    U = U / (N * k) ** 0.5
    g = J.T @ torch.func.grad(lambda v: token_ce(v.view(b, T, -1), y))(out.reshape(-1))
    inner = torch.linalg.solve(U @ U.T + lam * torch.eye(U.shape[0], dtype=U.dtype), U @ g)
    return unflat(model, -(g - U.T @ inner) / lam)
