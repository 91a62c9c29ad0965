"""The layer-rule registry, the context a rule gets, and small helpers for writing rules.

A rule turns the recorded calls of one module into `Factors` (egn_fast.rules.factors), that
module's share of the rows J̃ kept as activations and output-gradients:

    rule(module, calls: list[ModuleCall], ctx: RuleContext) -> Factors | None

`calls` holds every call of the module during the forward (a module called twice, e.g. a tied
layer, has two); `call.args`/`call.kwargs` are its inputs, `call.grads[q]` the output-gradients
(b, s, *z.shape[1:]) of its q-th differentiable output z, or None when that output does not
reach the loss. Return None when no call reaches the loss. Only the parameters J is taken
with respect to belong in the factors: `ctx.trainable(module.weight)` is the weight or None.

    @egn_fast.register_rule(MyModule)
    def my_rule(module, calls, ctx): ...

registers `my_rule` for MyModule and for its subclasses that keep its forward. Registering a
type again overrides the earlier rule (also a built-in one) until `unregister_rule` removes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from ..capture.hooks import ModuleCall

if TYPE_CHECKING:
    from .factors import Factors

__all__ = [
    "RuleContext",
    "Rule",
    "register_rule",
    "register_rule_by_name",
    "unregister_rule",
    "rule_for",
    "registry_version",
    "used_calls",
    "first_input",
]


@dataclass
class RuleContext:
    """What every rule needs besides the module and its calls."""

    name: str  # the module's qualified name in the model, for error messages
    b: int  # batch size
    s: int  # rows per sample (cotangent columns of the loss factor S)
    dtype: torch.dtype  # accumulation dtype of the Gram (fp32 or fp64)
    # ids of the parameters J is taken with respect to: requires_grad, and in the optimizer's
    # param groups when it was given a subset
    trainable_ids: frozenset[int]
    seq_method: str = "auto"  # "auto" | "ghost" | "per_sample" for sequence layers

    def trainable(self, p: nn.Parameter | None) -> nn.Parameter | None:
        """p when J is taken with respect to it, else None (held fixed: it gets no rows)."""
        return p if p is not None and id(p) in self.trainable_ids else None


Rule = Callable[[nn.Module, list[ModuleCall], RuleContext], "Factors | None"]

# module type -> its rules, latest last: the latest one is in force, the earlier ones come
# back when it is unregistered.
_RULES: dict[type[nn.Module], list[Rule]] = {}
# Bumped on every change, so cached plans (egn_fast.capture.plan) made with other rules are not reused.
_VERSION = [0]


def register_rule(*module_types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Decorator: use the decorated rule for modules of these types (and of subclasses that do
    not override forward). Overrides an earlier rule for the same type."""
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError(f"register_rule takes torch.nn.Module subclasses, got {module_types!r}")

    def decorator(rule: Rule) -> Rule:
        if not callable(rule):
            raise TypeError(f"a rule must be callable, got {type(rule).__name__}")
        for t in module_types:
            _RULES.setdefault(t, []).append(rule)
        _VERSION[0] += 1
        return rule

    return decorator


# (module path, class name) -> rule, for classes of optional packages (Hugging Face's Conv1D):
# registered on first sight of the class, so egn_fast never imports those packages itself.
_BY_NAME: dict[tuple[str, str], Rule] = {}


def register_rule_by_name(module: str, qualname: str) -> Callable[[Rule], Rule]:
    """Decorator: like `register_rule`, for the class `qualname` of module `module` (e.g.
    "transformers.pytorch_utils", "Conv1D"), without importing it. The rule takes effect the
    first time a module of that class is planned, below any rule registered for it by type."""

    def decorator(rule: Rule) -> Rule:
        _BY_NAME[(module, qualname)] = rule
        return rule

    return decorator


def _resolve_by_name(cls: type) -> None:
    rule = _BY_NAME.pop((cls.__module__, cls.__qualname__), None)
    if rule is not None:  # first in the list: a rule the user registered for the type stays in force
        _RULES.setdefault(cls, []).insert(0, rule)


def unregister_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Remove `rule` for `module_type`; the rule registered before it (if any) is in force again."""
    rules = _RULES.get(module_type, [])
    if rule not in rules:
        raise ValueError(f"{getattr(rule, '__name__', rule)!r} is not a registered rule for {module_type.__name__}")
    rules.remove(rule)
    if not rules:
        del _RULES[module_type]
    _VERSION[0] += 1


def rule_for(module: nn.Module) -> Rule | None:
    """The rule in force for `module`, or None (then the generic torch.func rule covers it).

    The most specific registered class in the module's MRO decides; a subclass that overrides
    that class's forward (LoRA layers, custom convolutions, …) gets None: the rule describes the
    registered forward, not the override.
    """
    for cls in type(module).__mro__:
        if _BY_NAME:
            _resolve_by_name(cls)
        rules = _RULES.get(cls)
        if rules:
            return rules[-1] if type(module).forward is cls.forward else None
    return None


def registry_version() -> int:
    """A counter that changes whenever a rule is registered or unregistered."""
    return _VERSION[0]


# --------------------------------------------------------------------------- helpers for rules


def used_calls(calls: list[ModuleCall]) -> list[tuple[ModuleCall, Tensor]]:
    """(call, G) for the calls whose first output reaches the loss; G: (b, s, *z.shape[1:])."""
    return [(c, c.grads[0]) for c in calls if c.grads and c.grads[0] is not None]


def first_input(call: ModuleCall, ctx: RuleContext, name: str = "input", position_wise: bool = True) -> Tensor:
    """The call's first positional argument (or keyword argument `name`), detached, with its
    samples on dimension 0: (b, *rest). A position-wise module (one that treats every leading
    position alike: Linear, Embedding, LayerNorm) may get its samples along any dimension, folded
    or not (egn_fast.capture.layout); any other (convolutions, channel norms) must get them on dimension 0.
    """
    x = call.args[0] if call.args else call.kwargs[name]
    layout = call.layouts[0] if call.layouts else None
    if not position_wise and layout is not None and (layout.dim, layout.fold) != (0, 1) and 0 not in call.expanded:
        raise ValueError(
            f"module {ctx.name!r} receives its samples along dimension {layout.dim} of an input of shape "
            f"{tuple(x.shape)}; it needs them along dimension 0 (b, C, …): move the batch dimension first"
        )
    x = call.batch_first(x.detach(), ctx.b)
    if x.dim() == 0 or x.shape[0] != ctx.b:
        raise ValueError(
            f"module {ctx.name!r} received an input of shape {tuple(x.shape)} that does not hold the "
            f"{ctx.b} samples; egn_fast needs per-sample inputs"
        )
    return x
