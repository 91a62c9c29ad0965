"""Train a classifier with EGN in a Hugging Face Accelerate loop: scikit-learn's handwritten digits,
an MLP, exact EGN steps (cross-entropy) with Armijo line search.

    .venv/bin/python examples/accelerate_egn.py               # 4 epochs, b 64
    .venv/bin/python examples/accelerate_egn.py --epochs 1 --bf16

The recipe: build EGN on the model, `accelerator.prepare` the model, the optimizer and the
dataloader as for any optimizer, then step with a closure over the batch instead of
`accelerator.backward(loss); optimizer.step()` (Accelerate's optimizer wrapper hands the closure to
EGN positionally, as torch's `Optimizer.step(closure)`, and drops the returned StepInfo: call the
EGN object itself, `egn.step(closure=...)`, where you want it):

    model, opt, loader = accelerator.prepare(model, egn_fast.EGN(model, loss="cross_entropy"), loader)
    for x, y in loader:
        opt.step(closure=lambda: (model(x), y))   # one EGN step

The prepared model's forward carries Accelerate's mixed precision (`--bf16`: bf16 autocast; EGN's
loss head and Gram stay fp32); `accelerator.save_state` / `load_state` carry EGN's state_dict. This
is one process: with several, EGN splits the batch itself (`EGN(model, process_group=...)`, README
"Several processes"), so do not let a DistributedDataParallel wrapper reduce gradients as well.
Printed: the validation accuracy before and after.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import egn_fast


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, validation) from scikit-learn's bundled digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    as_set = lambda a, b: TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b))
    return as_set(x_train, y_train), as_set(x_val, y_val)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    hits = [(model(x).argmax(-1) == y).float() for x, y in loader]
    return float(torch.cat(hits).mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--b", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, help="train on only this many batches per epoch")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.bf16 else "no")
    set_seed(args.seed)
    train, val = digits(args.seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    egn = egn_fast.EGN(model, loss="cross_entropy", damping=1.0, line_search="armijo")
    model, opt, loader, val_loader = accelerator.prepare(
        model, egn, DataLoader(train, batch_size=args.b, shuffle=True), DataLoader(val, batch_size=512)
    )
    before = accuracy(model, val_loader)
    steps = 0
    for epoch in range(args.epochs):
        for i, (x, y) in enumerate(loader):
            if i == args.batches:
                break
            opt.step(closure=lambda: (model(x), y))  # the closure is called again for trial points
            steps += 1
        accelerator.print(f"epoch {epoch}  validation accuracy {accuracy(model, val_loader):.3f}  damping {egn.damping:.3g}")
    after = accuracy(model, val_loader)
    accelerator.print(f"validation accuracy: {before:.3f} before, {after:.3f} after {steps} EGN steps")
    return {"before": before, "after": after, "steps": steps}


if __name__ == "__main__":
    main()
