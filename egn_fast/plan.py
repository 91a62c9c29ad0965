"""Plan: the checks a model must pass before it runs, and which rule covers which parameter.

`collect_trainable` lists the parameters J is taken with respect to and the modules to hook. After the
first captured forward, `plan_for` assigns every such parameter that reaches the loss to a rule:
the registered rule of the called module that owns it (egn_fast.rules), else the generic
torch.func rule of the innermost called module that contains it. Plans are cached per model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .capture import Capture, Inputs, params_reached_outside
from .checks import check_model
from .rules import Rule, registry_version
from .rules.parametrized import parametrization_modules, planned_rule

__all__ = ["Plan", "collect_trainable", "check_inputs", "plan_for"]


def collect_trainable(model: nn.Module, only: set[int] | None = None) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """The trainable parameters (model.parameters() order; restricted to the ids in `only` when
    given), the modules that contain any (the ones to hook, tied holders included), and the checks
    that must pass before the model runs."""
    modules = list(check_model(model).named_modules())  # one traversal serves everything below
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    holders: set[str] = set()
    for name, m in modules:
        for p in m._parameters.values():
            if p is not None and p.requires_grad and (only is None or id(p) in only):
                holders.add(name)
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}) normalizes with batch "
                "statistics, which mixes samples, so per-sample Jacobians are undefined: call "
                "model.eval() for that module (running statistics) or use GroupNorm/LayerNorm"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            raise ValueError(
                f"module {name!r} ({type(m).__name__} with max_norm) rescales its weight in place during "
                "forward; egn_fast leaves the model untouched, so max_norm is not supported"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq and m.weight.requires_grad:
            raise ValueError(
                f"module {name!r} ({type(m).__name__} with scale_grad_by_freq=True) scales its gradient by "
                "token counts over the whole batch, which mixes samples: set scale_grad_by_freq=False"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
            raise ValueError(
                f"module {name!r} ({type(m).__name__}) updates its running statistics in train mode; "
                "egn_fast leaves the model untouched: call .eval() on it or set track_running_stats=False"
            )
    if only is not None:
        missing = only - {id(p) for _, m in modules for p in m._parameters.values() if p is not None}
        if missing:
            raise ValueError(f"{len(missing)} of the given parameters are not parameters of the model")
    if not params:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters (requires_grad=True)")
    prefixes = {h[:i] for h in holders for i in [len(h)] + [j for j, ch in enumerate(h) if ch == "."]}
    return params, [m for name, m in modules if not name or name in prefixes]


def check_inputs(inputs: Inputs, device: torch.device) -> None:
    """ValueError unless every tensor among the inputs is on the parameters' device."""
    for x in tree_flatten(inputs)[0]:
        if isinstance(x, Tensor) and x.device != device:
            raise ValueError(f"inputs are on {x.device} but the model's parameters are on {device}")


@dataclass
class Plan:
    """Which rule handles which module, decided after a forward pass.

    specific: (qualified name, module, its registered rule); generic: (qualified name, module,
    {name relative to the module: parameter}) for the torch.func rule.
    """

    specific: list[tuple[str, nn.Module, Rule]]
    generic: list[tuple[str, nn.Module, dict[str, nn.Parameter]]]

    def modules(self) -> list[nn.Module]:
        return [m for _, m, _ in self.specific] + [m for _, m, _ in self.generic]

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m, _ in self.specific] + [(n, m) for n, m, _ in self.generic]


# Plans per model. The key holds everything a plan is made from: which modules were called how
# often, which parameters J is taken with respect to, and the rule registry's state.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Plan]]" = weakref.WeakKeyDictionary()


def plan_for(model: nn.Module, capture: Capture, f: Tensor, trainable: set[int]) -> Plan:
    """The cached plan for this call pattern, or a new one (one walk of f's autograd graph)."""
    key = (tuple((id(m), len(c)) for m, c in capture.calls.items()), tuple(sorted(trainable)), registry_version())
    cache = _PLANS.setdefault(model, {})
    plan = cache.get(key)
    # ids can be reused by a module that replaced a freed one: the plan must name these modules
    if plan is None or not all(m in capture.calls for m in plan.modules()):
        plan = cache[key] = _make_plan(model, capture, f, trainable)
    return plan


def _make_plan(model: nn.Module, capture: Capture, f: Tensor, trainable: set[int]) -> Plan:
    """Assign every trainable parameter that reaches the loss to a rule.

    A called module with a registered rule covers its own parameters. Every other parameter the
    autograd graph reaches (custom modules, modules used functionally by a parent, parameters
    of modules that were never called themselves) goes to the generic rule of the innermost
    called module that contains its owner.
    """
    names = {m: n for n, m in model.named_modules()}
    parents: dict[nn.Module, nn.Module] = {}
    for m in model.modules():
        for child in m.children():
            parents.setdefault(child, m)
    specific, covered = [], set()
    for m in capture.calls:
        rule, own = planned_rule(m, trainable)  # a parametrized module's rule covers its originals too
        if rule is not None and own:
            specific.append((names[m], m, rule))
            covered.update(id(p) for p in own)
    regions = [c for _, m, _ in specific for c in capture.calls[m]]
    reached = params_reached_outside(f, regions)
    parametrizing = parametrization_modules(model)
    generic: dict[nn.Module, dict[str, nn.Parameter]] = {}
    for owner in model.modules():
        for pname, p in owner.named_parameters(recurse=False):
            if id(p) not in trainable or id(p) not in reached:
                continue
            if id(p) in covered:
                raise ValueError(
                    f"parameter {(names[owner] + '.' if names[owner] else '') + pname!r} is used outside "
                    f"the forward of its module {names[owner]!r} (e.g. a functional call on a tied "
                    "weight); egn_fast cannot attribute that use to a layer rule"
                )
            host, path = owner, [pname]
            while host not in capture.calls or host in parametrizing:  # W = P(original): its parametrized module decides
                path.insert(0, names[host].rsplit(".", 1)[-1])
                host = parents[host]
            generic.setdefault(host, {})[".".join(path)] = p
    return Plan(specific, [(names[m], m, ps) for m, ps in generic.items()])
