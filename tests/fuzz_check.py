"""The fuzz property, shared by tests/test_fuzz.py and benchmarks/fuzz_report.py.

`check(case)` runs egn_fast.direction on a `fuzz_models.Case` and classifies the outcome:

- "exact": the direction matches the dense float64 oracle (relative error < TOL);
- "refused": a ValueError/TypeError/NotImplementedError raised by egn_fast itself, whose message
  is one line naming a module or parameter of the model (its qualified name in quotes, or a
  module class name);
- "wrong": a direction that differs from the oracle (or has the wrong shapes/dtypes);
- "crash": any other exception, or a refusal without a clear one-line message;
- "changed": the call left the model's parameters, buffers, .grad or modes different from what
  one plain forward leaves (a plain forward may itself update buffers: spectral_norm's u/v).

For a model that mixes samples (case.must_refuse) "refused" is expected; "exact" is correct too
when the mixing does not reach the Jacobian (e.g. it acts on frozen features, or the mixing
embedding is frozen): the dense oracle, which differentiates the mixing model as it is, agrees.
"""

from __future__ import annotations

import copy
import os
import re
import traceback
from dataclasses import dataclass

import torch
from torch import nn

import egn_fast
from egn_fast import resolve_loss
from fuzz_models import Case
from oracle import dense_direction, flat, rel_err

TOL = 1e-6
CLEAR_ERRORS = (ValueError, TypeError, NotImplementedError)
EGN_DIR = os.path.dirname(os.path.abspath(egn_fast.__file__))
KINDS = ("exact", "refused", "wrong", "crash", "changed")


@dataclass
class Outcome:
    kind: str  # one of KINDS
    error: float | None = None  # relative error against the oracle, when a direction came back
    message: str = ""  # the exception (type: message, raising frame) or what differs

    def ok(self, must_refuse: bool) -> bool:
        # must_refuse only decides what a failure report says it expected (see the module docstring)
        return self.kind in ("exact", "refused")


def state_of(model: nn.Module) -> dict[str, object]:
    """Everything the call must leave alone: state_dict entries, .grad fields, modes, requires_grad."""
    state: dict[str, object] = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for n, p in model.named_parameters():
        state[f"{n}.grad"] = None if p.grad is None else p.grad.clone()
        state[f"{n}.requires_grad"] = p.requires_grad
    for n, m in model.named_modules():
        state[f"{n}.training"] = m.training
    return state


def state_diff(got: dict[str, object], want: dict[str, object]) -> list[str]:
    """The keys whose values are not bit-identical."""
    def same(a: object, b: object) -> bool:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return type(a) is type(b) and a == b

    return sorted(k for k in set(got) | set(want) if k not in got or k not in want or not same(got[k], want[k]))


def names_in(model: nn.Module) -> set[str]:
    """What a clear message may name: qualified module/parameter names, module class names."""
    names = {n for n, _ in model.named_modules() if n} | {n for n, _ in model.named_parameters()}
    return {f"'{n}'" for n in names} | {f'"{n}"' for n in names} | {type(m).__name__ for m in model.modules()}


def is_clear(err: BaseException, model: nn.Module) -> tuple[bool, str]:
    """(whether `err` is a clear refusal, a one-line summary of it)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    text = str(err)
    summary = f"{type(err).__name__} at {where}: {text.splitlines()[0] if text else ''}"[:300]
    by_egn = bool(frames) and os.path.abspath(frames[-1].filename).startswith(EGN_DIR)
    named = any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text) for n in names_in(model))
    one_line = bool(text) and "\n" not in text.strip()
    return isinstance(err, CLEAR_ERRORS) and by_egn and named and one_line, summary


def plain_forward_state(model: nn.Module, inputs) -> dict[str, object]:
    """The state one plain forward leaves (on a copy): what egn_fast's forward may change."""
    twin = copy.deepcopy(model)  # deepcopy drops .grad: carry it over
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    with torch.no_grad():
        twin(**inputs) if isinstance(inputs, dict) else twin(*inputs) if isinstance(inputs, tuple) else twin(inputs)
    return state_of(twin)


def check(case: Case) -> Outcome:
    """Run egn_fast.direction on the case and classify the outcome (see the module docstring)."""
    model = case.model
    pristine = copy.deepcopy(model)  # for the oracle, built from the state before the call
    before, after_forward = state_of(model), plain_forward_state(model, case.inputs)
    try:
        d = egn_fast.direction(model, case.inputs, case.targets, loss=case.loss, damping=case.damping)
    except Exception as err:  # noqa: BLE001 - classifying every failure is the point
        clear, summary = is_clear(err, model)
        now = state_of(model)
        if state_diff(now, before) and state_diff(now, after_forward):
            return Outcome("changed", None, f"after a refusal ({summary}): {state_diff(now, before)[:4]}")
        return Outcome("refused" if clear else "crash", None, summary)
    diff = state_diff(state_of(model), after_forward)
    if diff:
        return Outcome("changed", None, f"differs from one plain forward: {diff[:4]}")
    trainable = [p for p in pristine.parameters() if p.requires_grad]
    if [t.shape for t in d] != [p.shape for p in trainable] or any(t.dtype != torch.float64 for t in d):
        return Outcome("wrong", None, "the direction's shapes/dtypes differ from the trainable parameters'")
    want = dense_direction(pristine, case.inputs, case.targets, resolve_loss(case.loss), case.damping)
    # relative error; absolute when the exact direction is 0 (e.g. every ReLU inactive: g = 0)
    err = rel_err(d, want) if flat(want).norm() > 0 else float(flat(d).norm())
    kind = "exact" if err < TOL else "wrong"
    return Outcome(kind, err, "" if kind == "exact" else f"relative error {err:.2e} against the dense oracle")
