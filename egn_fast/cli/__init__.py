"""The `egn-fast` command (`main`, command.py) and the small training runs it drives (training.py):
real tabular data, an MLP, EGN against Adam and SGD on one budget."""

from .command import main

__all__ = ["main"]
