"""Train a classifier with EGN in PyTorch Lightning: scikit-learn's handwritten digits (8×8 images,
10 classes), an MLP, exact EGN steps (cross-entropy, 9 rows per sample) with Armijo line search.

    .venv/bin/python examples/lightning_egn.py                # 4 epochs, b 64
    .venv/bin/python examples/lightning_egn.py --epochs 1

The recipe: Lightning's automatic optimization calls `optimizer.step()` after `loss.backward()`,
with a closure that returns a loss; EGN needs the batch, as a closure returning (outputs, targets).
So the module turns automatic optimization off and calls `opt.step(closure=...)` itself:

    self.automatic_optimization = False                          # in __init__
    info = self.optimizers().step(closure=lambda: (self(x), y))  # in training_step: one EGN step
    return egn_fast.EGN(self, loss="cross_entropy", ...)         # configure_optimizers

Lightning still counts the steps, logs and runs validation. Printed: the validation accuracy
before and after.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import egn_fast


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, validation) from scikit-learn's bundled digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    as_set = lambda a, b: TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b))
    return as_set(x_train, y_train), as_set(x_val, y_val)


class DigitsEGN(L.LightningModule):
    """An MLP whose training step is one EGN step (manual optimization)."""

    def __init__(self, damping: float = 1.0) -> None:
        super().__init__()
        self.automatic_optimization = False  # EGN's step needs the batch: the module calls it
        self.damping = damping
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        # one EGN step; the closure is called again for the line search's trial points
        info = self.optimizers().step(closure=lambda: (self(x), y))
        self.log("train_loss", info.loss, prog_bar=True)  # the batch loss before the step

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> egn_fast.EGN:
        return egn_fast.EGN(self, loss="cross_entropy", damping=self.damping, line_search="armijo")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--b", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, help="train on only this many batches per epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train, val = digits(args.seed)
    module = DigitsEGN()
    trainer = L.Trainer(max_epochs=args.epochs, limit_train_batches=args.batches, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    val_loader = DataLoader(val, batch_size=512)
    before = trainer.validate(module, val_loader, verbose=False)[0]["val_accuracy"]
    trainer.fit(module, DataLoader(train, batch_size=args.b, shuffle=True), val_loader)
    after = trainer.validate(module, val_loader, verbose=False)[0]["val_accuracy"]
    print(f"validation accuracy: {before:.3f} before, {after:.3f} after {trainer.global_step} EGN steps")
    return {"before": before, "after": after, "steps": trainer.global_step}


if __name__ == "__main__":
    main()
