"""Train a Hugging Face GPT-2 (built from a small config, no download) with EGN's Monte-Carlo rows,
using its stock forward, and time its step against AdamW's on the same batches.

    .venv/bin/python examples/gpt2_egn.py                     # 30 steps each, b 8, T 32
    .venv/bin/python examples/gpt2_egn.py --steps 5 --layers 1

The data are token sequences with a rule to learn (each sequence counts up by a random stride,
mod the vocabulary), so the example needs no files. The loss is the next-token cross-entropy,
mean over tokens; EGN takes (logits (b, T, V), targets (b, T)) from a closure over the model's
ModelOutput. Printed: the loss every few steps for both optimizers and the median step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import egn_fast


def batch(b: int, T: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """(b, T + 1) sequences start + stride·t mod vocab."""
    start = torch.randint(vocab, (b, 1), generator=g)
    stride = torch.randint(1, 4, (b, 1), generator=g)
    return (start + stride * torch.arange(T + 1)) % vocab


def model_of(args: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=args.vocab, n_positions=args.T,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    for name in ("egn_mc", "adamw"):
        model = model_of(args)  # the same initial weights for both
        g = torch.Generator().manual_seed(args.seed + 1)
        if name == "egn_mc":
            opt = egn_fast.EGN(model, loss="cross_entropy", curvature="mc", mc_samples=1, lr=1.0, damping=1.0,
                               line_search="armijo")
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        times, losses = [], []
        for step in range(args.steps):
            ids = batch(args.b, args.T, args.vocab, g)
            t0 = time.perf_counter()
            if name == "egn_mc":
                loss = opt.step(closure=lambda: (model(input_ids=ids[:, :-1]).logits, ids[:, 1:])).loss
            else:
                opt.zero_grad()
                out = model(input_ids=ids[:, :-1]).logits
                value = F.cross_entropy(out.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
                value.backward()
                opt.step()
                loss = float(value.detach())
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                print(f"{name:7s} step {step:3d}  loss {loss:.3f}")
        results[name] = (statistics.median(times[1:] or times), losses)
    egn, adam = results["egn_mc"][0], results["adamw"][0]
    print(f"median step: EGN(curvature='mc') {egn * 1e3:.1f} ms, AdamW {adam * 1e3:.1f} ms, ratio {egn / adam:.2f}")


if __name__ == "__main__":
    main()
