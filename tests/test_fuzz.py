"""Property-based fuzz: random compositions of layers against the dense float64 oracle.

For every model the call must either return the exact direction (relative error < 1e-6 against
tests/oracle.py) or refuse with a ValueError/TypeError/NotImplementedError raised by egn_fast
whose one-line message names the module; a model that mixes samples must be refused. The model
must be left as one plain forward leaves it (parameters, buffers, .grad, modes). One test per
layer family (tests/fuzz_models.py), derandomized, no shrinking (the first failing architecture
is reported as drawn), bounded in time: EXAMPLES per family.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from fuzz_check import check
from fuzz_models import FAMILIES, MIXING, Case, HypothesisDraw, MixingNet, RandomDraw, build_case, find_case

EXAMPLES = 30  # per family: 330 architectures, ~10–40 s on 2 shared CPU cores when all pass

fuzz_settings = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time, the drawn model is reported
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)


def assert_property(family: str, data: st.DataObject) -> None:
    case = build_case(family, HypothesisDraw(data))
    note(case.description)
    outcome = check(case)
    expected = "refused (it mixes samples)" if case.must_refuse else "exact or refused clearly"
    assert outcome.ok(case.must_refuse), (
        f"{outcome.kind} (expected {expected}): {outcome.message}\n  model: {case.description}"
    )


def _family_test(family: str):
    @fuzz_settings
    @given(data=st.data())
    def test(data: st.DataObject) -> None:
        assert_property(family, data)

    test.__name__ = f"test_fuzz_{family}"
    test.__doc__ = f"Random {family} models: exact or clearly refused" + (", never accepted (they mix samples)." if family in MIXING else ".")
    return test


# One named test per family, so a failure report says which family broke.
test_fuzz_mlp = _family_test("mlp")
test_fuzz_sequence = _family_test("sequence")
test_fuzz_conv = _family_test("conv")
test_fuzz_embedding = _family_test("embedding")
test_fuzz_norms = _family_test("norms")
test_fuzz_tied_functional = _family_test("tied_functional")
test_fuzz_attention = _family_test("attention")
test_fuzz_rnn = _family_test("rnn")
test_fuzz_parametrize = _family_test("parametrize")
test_fuzz_awkward = _family_test("awkward")
test_fuzz_mixing = _family_test("mixing")


def test_every_family_has_a_test():
    assert {name[len("test_fuzz_"):] for name in globals() if name.startswith("test_fuzz_")} == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builders_give_valid_models_with_b_c_outputs(family):
    """The generators themselves: every drawn model runs a plain forward with (b, c) outputs."""
    for seed in range(25):
        case = build_case(family, RandomDraw(seed))
        with torch.no_grad():
            out = case.model(case.inputs)
        assert out.dim() == 2 and out.shape[0] == case.targets.shape[0], case.description
        assert torch.isfinite(out).all() and out.std() > 0, case.description


def test_the_check_catches_a_wrong_direction_and_a_changed_model(monkeypatch):
    """The property can fail: a perturbed direction is 'wrong', a model edited in the call is 'changed'."""
    import egn_fast

    case = build_case("norms", RandomDraw(0))
    real = egn_fast.direction
    monkeypatch.setattr(egn_fast, "direction", lambda *a, **k: [1.01 * t for t in real(*a, **k)])
    assert check(case).kind == "wrong"

    def editing(model, *a, **k):
        d = real(model, *a, **k)
        with torch.no_grad():
            next(model.parameters()).add_(1e-12)
        return d

    monkeypatch.setattr(egn_fast, "direction", editing)
    assert check(build_case("norms", RandomDraw(0))).kind == "changed"

    def raising(error: Exception):
        def direction(*a, **k):
            raise error

        return direction

    # an error from deep inside torch, or one raised outside egn_fast, or without a module name
    for error in [RuntimeError("module 'inp' failed"), ValueError("module 'inp' (Linear) is not supported"),
                  IndexError("index 3 is out of bounds")]:
        monkeypatch.setattr(egn_fast, "direction", raising(error))
        assert check(build_case("norms", RandomDraw(0))).kind == "crash"


def _has(kind: type) -> Callable[[Case], bool]:
    return lambda case: any(isinstance(m, kind) for m in case.model.modules())


def _attr(**want) -> Callable[[Case], bool]:
    return lambda case: all(getattr(case.model, k, None) == v for k, v in want.items())


def _both(*preds) -> Callable[[Case], bool]:
    return lambda case: all(p(case) for p in preds)


_b_eq_T = lambda case: case.sizes.b == case.sizes.T  # noqa: E731
_b_eq_s = lambda case: case.sizes.b == case.sizes.s  # noqa: E731

# Patterns the issue names as per-sample, so exactness (not a refusal) is the target.
MUST_BE_EXACT = {
    "prelu": ("mlp", _has(torch.nn.PReLU)),
    "reshape(-1,D) into a Linear": ("sequence", _attr(variant="reshape")),
    "seq-first transpose around a Linear": ("sequence", _attr(variant="seq_first")),
    "(T,d) buffer through a Linear, b == T": ("sequence", _both(_attr(variant="buffer"), _b_eq_T)),
    "(T,d) buffer through a Linear, b != T": ("sequence", _both(_attr(variant="buffer"), lambda c: c.sizes.b != c.sizes.T)),
    "broadcast (1,T) position ids, b == T": ("embedding", _both(_attr(positions="broadcast"), _b_eq_T)),
    "broadcast (1,T) position ids, b == s": ("embedding", _both(_attr(positions="broadcast"), _b_eq_s)),
    "tied embedding/head": ("embedding", _attr(tied=True)),
    "conv transpose": ("conv", _has(torch.nn.modules.conv._ConvTransposeNd)),
    "mha batch_first=False": ("attention", _attr(kind="mha", batch_first=False)),
    "mha causal mask, b == T": ("attention", _both(_attr(kind="mha"), lambda c: c.model.mask is not None, _b_eq_T)),
    "encoder layer batch_first=True": ("attention", _attr(kind="encoder", batch_first=True)),
    "encoder layer batch_first=False": ("attention", _attr(kind="encoder", batch_first=False)),
    **{f"{k} batch_first={bf}": ("rnn", _attr(kind=k, batch_first=bf)) for k in ("RNN", "GRU", "LSTM") for bf in (True, False)},
    **{f"parametrization {k}": ("parametrize", _attr(kind=k)) for k in ("weight_norm", "spectral_eval", "spectral_train", "orthogonal")},
}


@pytest.mark.parametrize("pattern", sorted(MUST_BE_EXACT))
def test_named_pattern_is_exact(pattern):
    family, wanted = MUST_BE_EXACT[pattern]
    case = find_case(family, wanted)
    outcome = check(case)
    assert outcome.kind == "exact", f"{outcome.kind}: {outcome.message}\n  model: {case.description}"


@pytest.mark.parametrize("kind", MixingNet.KINDS)
def test_sample_mixing_is_refused(kind):
    case = find_case("mixing", _attr(kind=kind))
    outcome = check(case)
    assert outcome.kind == "refused", f"{outcome.kind}: {outcome.message}\n  model: {case.description}"
