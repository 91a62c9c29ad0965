"""Plan: the checks a model must pass before it runs, which rule covers which parameter, and
where the samples lie in every recorded tensor.

`collect_trainable` lists the parameters J is taken with respect to and the modules to hook.
After a captured forward (forward.py), for a call pattern it has not seen, `plan_for`
assigns every such parameter that reaches the loss to a rule (the registered rule of the called
module that owns it, egn_fast.rules, else the generic torch.func rule of the innermost called
module that contains it) and probes the batch layout of every recorded output
(layout.py). Plans are cached per model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..checks import check_model
from ..dtensors import fsdp_aliases
# the rules' modules, not their package: the rules read this stage's records (a package-level cycle)
from ..rules.generic import generic_in_dims
from ..rules.parametrized import parametrization_modules, parametrizations_in_eval, planned_rule
from ..rules.registry import Rule, registry_version
from .hooks import Capture, Inputs, params_reached_outside
from .layout import BatchDim, probe_layouts

__all__ = ["Plan", "OutputKey", "collect_trainable", "check_inputs", "plan_for", "mixing_error", "module_names"]


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
        # before the forward, which would rescale the weight (a parameter) in place
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            raise ValueError(
                f"module {name!r} ({type(m).__name__} with max_norm) rescales its weight in place during "
                "forward; egn_fast leaves the model untouched, so max_norm is not supported"
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
    for x in [inputs] if isinstance(inputs, Tensor) else tree_flatten(inputs)[0]:
        if isinstance(x, Tensor) and x.device != device:
            raise ValueError(f"inputs are on {x.device} but the model's parameters are on {device}")


# A recorded output is named by (module, call number, output number among its recorded outputs).
OutputKey = tuple[nn.Module, int, int]


@dataclass
class Plan:
    """Which rule handles which module, and where the samples lie, decided after a forward pass.

    specific: (qualified name, module, its registered rule); generic: (qualified name, module,
    {name relative to the module: parameter}) for the torch.func rule. layouts: per planned
    module, per call, the batch layout of each recorded output; in_dims: per generic module, per
    call, the batch layout of each tensor among its arguments (None: the same for every sample).
    shared: outputs found shared by all samples in this capture, to be expanded (then the plan is
    made again from a capture that expands them). guessed: some output did not move either probed
    sample's output (its layout is a guess), so the plan is not cached.
    """

    specific: list[tuple[str, nn.Module, Rule]]
    generic: list[tuple[str, nn.Module, dict[str, nn.Parameter]]]
    layouts: dict[nn.Module, list[list[BatchDim]]] = field(default_factory=dict)
    in_dims: dict[nn.Module, list[tuple[BatchDim | None, ...] | None]] = field(default_factory=dict)
    shared: dict[OutputKey, tuple] = field(default_factory=dict)
    guessed: bool = False  # some layout could not be read (a dead path): probe again next time

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m, _ in self.specific] + [(n, m) for n, m, _ in self.generic]

    def modules(self) -> list[nn.Module]:
        return [m for _, m in self.named_modules()]

    def apply(self, capture: Capture) -> None:
        """Give every planned call its outputs' batch layouts."""
        for m, per_call in self.layouts.items():
            for call, layouts in zip(capture.calls[m], per_call):
                call.layouts = list(layouts)


# Plans per model. The keys hold everything a plan is made from: which modules (of which type)
# were called how often with which shapes (and which outputs were expanded), which parameters J
# is taken with respect to and the rule registry; then which of those parameters the graph reaches
# outside the rules' modules.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _PatternPlans]]" = weakref.WeakKeyDictionary()


def _call_pattern(capture: Capture) -> tuple:
    return tuple(
        (id(m), type(m), tuple((tuple(t.shape for t in c.inputs + c.outputs), c.expanded, c.rowwise) for c in calls))
        for m, calls in capture.calls.items()
    )


def _check_called(capture: Capture, model: nn.Module) -> None:
    """Refuse the modules that ran in this forward in a way no rule can follow (checked every step:
    a module's mode or options can change between steps with the same calls)."""
    for m in capture.calls:
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq and m.weight.requires_grad:
            name = module_names(model).get(m, "")
            raise ValueError(
                f"module {name!r} ({type(m).__name__} with scale_grad_by_freq=True) scales its gradient by "
                "token counts over the whole batch, which mixes samples: set scale_grad_by_freq=False"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
            name = module_names(model).get(m, "")
            raise ValueError(
                f"module {name!r} ({type(m).__name__}) updates its running statistics in train mode; "
                "egn_fast leaves the model untouched: call .eval() on it or set track_running_stats=False"
            )


@dataclass
class _PatternPlans:
    """What a call pattern decides (which called modules a registered rule covers), and its
    plans per set of parameters the graph reaches outside those modules."""

    specific: list[tuple[str, nn.Module, Rule]]
    covered: set[int]
    plans: dict[frozenset[int], Plan] = field(default_factory=dict)


def plan_for(model: nn.Module, capture: Capture, f_flat: Tensor, trainable: set[int]) -> Plan:
    """The cached plan for this call pattern, or a new one (one walk of the autograd graph, one
    probe backward and, for generic modules with ambiguous arguments, trial per-sample forwards).
    A known pattern costs the checks of `_check_called`, the key and the graph walk: a forward can
    reach a parameter outside its module on one step and not on another."""
    _check_called(capture, model)
    key = (_call_pattern(capture), tuple(sorted(trainable)), registry_version())
    cache = _PLANS.setdefault(model, {})
    names = None
    pattern = cache.get(key)
    # ids can be reused by a module that replaced a freed one: the plan must name these modules
    if pattern is None or not all(m in capture.calls for _, m, _ in pattern.specific):
        names = module_names(model)
        pattern = cache[key] = _PatternPlans(*_specific_modules(capture, trainable, names))
    regions = [c for _, m, _ in pattern.specific for c in capture.calls[m]]
    aliases = fsdp_aliases(model)  # the graph holds FSDP's unsharded tensors
    reached = frozenset(aliases.get(i, i) for i in params_reached_outside(f_flat, regions))
    own_uses: dict[int, tuple[nn.Module, str]] = {}
    if pattern.covered & reached:  # checked on every step: a forward may add a functional use with the same calls
        names = names or module_names(model)
        own_uses = _uses_in_own_forward(capture, pattern.specific, pattern.covered & reached, names, f_flat, regions)
    plan = pattern.plans.get(reached)
    if plan is None or not all(m in capture.calls for m in plan.modules()):
        names = names or module_names(model)
        plan = _make_plan(model, capture, f_flat, trainable, names, pattern.specific, pattern.covered, reached, own_uses)
        if not plan.shared and not plan.guessed:
            pattern.plans[reached] = plan
    return plan


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Every module of `model` → its qualified name (for messages and plans)."""
    return {m: n for n, m in model.named_modules()}


def _specific_modules(
    capture: Capture, trainable: set[int], names: dict[nn.Module, str]
) -> tuple[list[tuple[str, nn.Module, Rule]], set[int]]:
    """(name, module, rule) for the called modules a registered rule covers, and the ids of the
    trainable parameters those rules cover."""
    specific, covered = [], set()
    for m in capture.calls:
        rule, own = planned_rule(m, trainable)  # a parametrized module's rule covers its originals too
        if rule is not None and own:
            specific.append((names[m], m, rule))
            covered.update(id(p) for p in own)
    return specific, covered


def mixing_error(names: dict[nn.Module, str], key: OutputKey) -> ValueError:
    module, n, q = key
    return ValueError(
        f"module {names.get(module, '')!r} ({type(module).__name__}): each sample's output depends on "
        f"other samples' values of this module's output (call {n}, output {q}) — the model mixes samples "
        "after it (e.g. x - x.mean(0), F.batch_norm(training=True), attention or pooling over the batch "
        "dimension), so per-sample Jacobian rows do not exist; compute that step per sample (eval-mode "
        "statistics, a per-sample norm such as LayerNorm/GroupNorm)"
    )


def _make_plan(
    model: nn.Module,
    capture: Capture,
    f_flat: Tensor,
    trainable: set[int],
    names: dict[nn.Module, str],
    specific: list[tuple[str, nn.Module, Rule]],
    covered: set[int],
    reached: set[int],
    own_uses: dict[int, tuple[nn.Module, str]],
) -> Plan:
    """Assign every trainable parameter that reaches the loss to a rule, then probe the layouts.

    A called module with a registered rule covers its own parameters. Every other parameter the
    autograd graph reaches (custom modules, modules used functionally by a parent, parameters
    of modules that were never called themselves) goes to the generic rule of the innermost
    called module that contains its owner. A parameter a rule covers in another module that its
    owner also uses in its own forward (own_uses: id -> (owner, name), `_uses_in_own_forward`)
    gets the owner's generic rows too; merge_shared sums the two.
    """
    parents: dict[nn.Module, nn.Module] = {}
    for m in model.modules():
        for child in m.children():
            parents.setdefault(child, m)
    parametrizing = parametrization_modules(model)
    generic: dict[nn.Module, dict[str, nn.Parameter]] = {}
    for owner in model.modules():
        for pname, p in owner.named_parameters(recurse=False):
            if id(p) not in trainable or id(p) not in reached:
                continue
            if id(p) in covered:  # reached outside its rule: only its owner's own forward may use it
                host, own_name = own_uses[id(p)]
                generic.setdefault(host, {})[own_name] = p
                continue
            host, path = owner, [pname]
            while host not in capture.calls or host in parametrizing:  # W = P(original): its parametrized module decides
                path.insert(0, names[host].rsplit(".", 1)[-1])
                host = parents[host]
            generic.setdefault(host, {})[".".join(path)] = p
    plan = Plan(specific, [(names[m], m, ps) for m, ps in generic.items()])
    _probe(plan, capture, f_flat, names)
    return plan


def _uses_in_own_forward(
    capture: Capture,
    specific: list[tuple[str, nn.Module, Rule]],
    outside: set[int],
    names: dict[nn.Module, str],
    f_flat: Tensor,
    regions: list,
) -> dict[int, tuple[nn.Module, str]]:
    """For parameters a rule covers that the autograd graph also reaches outside the rules'
    modules (`outside`): {id: (owner, its name there)} where that use is inside the forward of
    their owner module, which no rule covers (Gemma's scaled word embedding, an nn.Embedding
    subclass overriding forward, tied to a Linear head). The owner's generic rule gives that
    use's rows.
    The owner must have run and must not contain a rule's module that uses the parameter too
    (its generic rows would count that use twice); a walk that also jumps over the owners' calls
    must no longer reach the parameter. Any other use (a functional call in a parent module) is
    refused, naming the parameter."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}  # a tied parameter has several holders
    for m in names:
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in outside:
                owners.setdefault(id(p), []).append((m, pname))
    rule_modules = {m for _, m, _ in specific}
    inside: dict[int, tuple[nn.Module, str]] = {}
    for pid, holders in owners.items():
        for owner, pname in holders:
            nested = [m for m in owner.modules() if m in rule_modules and any(id(q) == pid for q in m.parameters())]
            if owner in capture.calls and not nested:
                inside[pid] = (owner, pname)
                break
    hosts = {owner for owner, _ in inside.values()}
    still = params_reached_outside(f_flat, regions + [c for m in hosts for c in capture.calls[m]])
    for pid in outside:
        if pid not in inside or pid in still:
            owner, pname = owners[pid][0]
            where = names[owner]
            full = (where + "." if where else "") + pname
            raise ValueError(
                f"parameter {full!r} is used outside the forward of its module {where!r} (e.g. a functional call "
                "on a tied weight); egn_fast cannot attribute that use to a layer rule. Tie it through a module "
                "instead, e.g. head = nn.Linear(d, V, bias=False); head.weight = wte.weight; logits = head(h)"
            )
    return inside


def _probe(plan: Plan, capture: Capture, f_flat: Tensor, names: dict[nn.Module, str]) -> None:
    """Fill plan.layouts (or plan.shared) from the probe backwards, then plan.in_dims."""
    b = f_flat.shape[0]
    calls = [(m, n, c) for m in plan.modules() for n, c in enumerate(capture.calls[m])]
    generic = {m for _, m, _ in plan.generic}
    # the generic rule also needs its differentiable arguments' layouts
    args = [x for m, _, c in calls if m in generic for x in c.inputs if x.requires_grad]
    # a row-wise output is shared by construction: its rows come from a backward of its own
    zs = [z for _, _, c in calls for q, z in enumerate(c.outputs) if q not in c.rowwise]
    found, reaching, dead = probe_layouts(f_flat, zs + args)
    layout_of = {id(x): d for x, d in zip(zs + args, found)}
    plan.guessed = any(id(z) in dead for z in zs)
    for m, n, c in calls:
        per_call = plan.layouts.setdefault(m, [])
        per_call.append([layout_of.get(id(z)) or BatchDim(0) for z in c.outputs])
        for q, z in enumerate(c.outputs):
            if q not in c.rowwise and layout_of[id(z)] is None:
                if q in c.expanded:  # an expanded output is (b, …) with sample i at i by construction
                    raise mixing_error(names, (m, n, q))
                plan.shared[(m, n, q)] = tuple(z.shape)
    if plan.shared:
        return
    for _, m, ps in plan.generic:
        plan.in_dims[m] = []
        for n, c in enumerate(capture.calls[m]):
            c.layouts = list(plan.layouts[m][n])
            if not c.rowwise and not any(id(z) in reaching for z in c.outputs):  # no output moves any sample's output
                plan.in_dims[m].append(None)
                continue
            probed = [layout_of.get(id(x)) for x in c.inputs]
            with parametrizations_in_eval([m]):  # its trial forwards must not iterate spectral_norm again
                plan.in_dims[m].append(generic_in_dims(m, c, ps, b, names[m], probed))
