"""`EGNTrainer`: Hugging Face's `transformers.Trainer` with EGN as its optimizer.

The Trainer's loop calls `training_step(model, batch)` (forward + `loss.backward()`), then
`optimizer.step()` with no arguments. EGN cannot step from gradients alone: it needs the batch, to
form the rows of the Jacobian. So `training_step` runs the whole EGN step on the batch (EGN does its
own forward, through `outputs_and_targets`) and returns the batch loss EGN measured before moving
the parameters; the Trainer's `optimizer.step()` that follows only checks that this step happened.
Everything else (the dataloader, lr schedulers, logging, evaluation, checkpoints, resuming) is the
Trainer's own.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..optim import EGN, StepInfo
from .targets import OVERRIDE_HINT, loss_of, outputs_and_targets

__all__ = ["EGNTrainer"]

# EGN options that come from TrainingArguments (or from the Trainer) instead of `egn=`
FROM_ARGS = {"lr": "args.learning_rate", "weight_decay": "args.weight_decay", "params": "the Trainer's param groups",
             "model": "the Trainer's model", "process_group": "one process only"}
DEFAULT_LR = 5e-5  # TrainingArguments' default learning_rate, meant for AdamW


class TrainerEGN(EGN):
    """EGN as the Trainer holds it. `EGNTrainer.training_step` steps it on the batch; the Trainer's
    own `optimizer.step()` right after, which has no batch, then does nothing. A call with no batch
    that follows no step (anything but the Trainer's loop) is refused: it would silently not train."""

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.stepped_on_batch = False

    def step(  # type: ignore[override]
        self, inputs: Any = None, targets: Tensor | None = None, *, closure: Any = None
    ) -> StepInfo | None:
        if inputs is None and targets is None and closure is None:
            if not self.stepped_on_batch:
                raise RuntimeError("EGN's step needs the batch: step(inputs, targets) or step(closure=...) -> "
                                   "(outputs, targets); in a Trainer, EGNTrainer.training_step makes that call")
            self.stepped_on_batch = False
            return None
        info = super().step(inputs, targets, closure=closure)
        self.stepped_on_batch = True
        return info


class EGNTrainer(Trainer):
    """A `transformers.Trainer` whose every training step is one EGN step on the batch.

        trainer = EGNTrainer(model=model, args=TrainingArguments(..., learning_rate=1.0),
                             train_dataset=ds, egn=dict(damping=1.0, curvature="mc", line_search="armijo"))

    Args:
        egn: `egn_fast.EGN` options (loss, damping, curvature, mc_samples, momentum, metric,
            line_search, adaptive_damping, max_step_norm, ...). Taken from `args` instead:
            `lr` = args.learning_rate (the step multiplier, 1.0 is the full LM step; args'
            scheduler and warmup scale it; the Trainer's default 5e-5, an AdamW lr, warns),
            `weight_decay` = args.weight_decay (decoupled, on the parameters the Trainer
            decays). `loss` defaults to the model type's
            (egn_fast.integrations.targets: causal LM, sequence and token classification);
            `generator` (curvature="mc") defaults to one seeded with args.seed. Other
            `Trainer` arguments are the Trainer's.

    What EGN minimizes per batch comes from `outputs_and_targets(model, inputs)`; for another model
    type, override that one method (and give egn={"loss": ...}). The logged training loss is the
    batch loss before each step (EGN's StepInfo.loss, equal to the model's own loss on the batch);
    `self.last_step` holds the last StepInfo and the logs add λ (`egn_damping`). Evaluation uses the
    model's own loss (the Trainer's `compute_loss`), the same quantity for the supported types.

    Refused, with the reason: gradient_accumulation_steps > 1 (EGN's step is the exact LM step of
    the batch it sees; the Gram of several micro-batches has cross terms between them, which no
    per-micro-batch step sees: use a larger per_device_train_batch_size), fp16 (its GradScaler scales a backward EGN does not use:
    bf16 autocast works), DeepSpeed, FSDP and more than one process or GPU (EGN's data parallelism
    is `EGN(process_group=...)`, not the Trainer's wrappers), `optimizers=` /
    `optimizer_cls_and_kwargs=` (the optimizer is EGN), label_smoothing_factor and
    compute_loss_func (the loss is EGN's). `args.max_grad_norm` clips `.grad`, which EGN does not
    use: it has no effect on the step (bound the step with egn={"max_step_norm": ...}). With
    dropout on, every forward of the step (line search, adaptive damping) draws its own mask.
    EGN runs `self.model`, so with `torch_compile=True` it steps the uncompiled module.
    """

    def __init__(self, *args: Any, egn: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.egn_options = _check_egn_options(egn)
        self.last_step: StepInfo | None = None
        super().__init__(*args, **kwargs)
        _refuse_unsupported(self)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """EGN on the Trainer's model, with the Trainer's two param groups (decayed, not decayed)."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        options = dict(self.egn_options)
        options.setdefault("loss", loss_of(model))
        if options["loss"] is None:
            raise TypeError(f"EGNTrainer does not know the loss of a {type(model).__name__}: {OVERRIDE_HINT}")
        if options.get("curvature") == "mc" and options.get("generator") is None:
            device = next(model.parameters()).device
            # seeded, so a run is reproducible; checkpoints carry its state, so a resumed run draws the same
            options["generator"] = torch.Generator(device).manual_seed(self.args.seed)
        decay = set(self.get_decay_parameter_names(model))
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            dict(params=[p for n, p in trainable if n in decay], weight_decay=self.args.weight_decay),
            dict(params=[p for n, p in trainable if n not in decay], weight_decay=0.0),
        ]
        self.optimizer = TrainerEGN(model, params=[g for g in groups if g["params"]], lr=self.args.learning_rate, **options)
        return self.optimizer

    @property
    def egn(self) -> TrainerEGN:
        """The EGN optimizer (the Trainer holds it wrapped in Accelerate's AcceleratedOptimizer)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def outputs_and_targets(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(outputs, targets) of `model` on the batch, EGN's closure: run the forward and return what
        the loss compares. Override it for a model type egn_fast.integrations.targets does not know."""
        return outputs_and_targets(model, inputs)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """One EGN step on the batch; returns the batch loss before the step (what the Trainer logs).
        EGN runs `self.model` (the model Accelerate prepared in place: its forward carries bf16
        autocast), not a wrapper: distributed wrappers are refused."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            info = self.egn.step(closure=lambda: self.outputs_and_targets(self.model, inputs))
        self.last_step = info
        return torch.tensor(info.loss, device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log with λ added; its grad_norm (of the `.grad` EGN leaves empty) is dropped."""
        if "loss" in logs:
            logs.pop("grad_norm", None)
            logs["egn_damping"] = self.egn.damping
        super().log(logs, start_time)


def _check_egn_options(egn: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(egn or {})
    taken = {k: FROM_ARGS[k] for k in options if k in FROM_ARGS}
    if taken:
        raise ValueError(f"egn= must not set {sorted(taken)}: they come from {taken}")
    return options


def _refuse_unsupported(trainer: EGNTrainer) -> None:
    """Raise for the Trainer features EGN's step cannot honour (EGNTrainer's docstring says why)."""
    args = trainer.args
    refused = {
        "gradient_accumulation_steps > 1 (EGN's step is the exact LM step of one batch: use a larger "
        "per_device_train_batch_size)": args.gradient_accumulation_steps > 1,
        "fp16 (its GradScaler scales a backward EGN does not use; bf16=True works)": args.fp16,
        "DeepSpeed": trainer.is_deepspeed_enabled,
        "FSDP": trainer.is_fsdp_enabled or bool(args.fsdp),
        "more than one process or GPU (use EGN(process_group=...) in your own loop)": args.world_size > 1 or args.n_gpu > 1,
        "optimizers= / optimizer_cls_and_kwargs= (the optimizer is EGN)": trainer.optimizer is not None
        or trainer.optimizer_cls_and_kwargs is not None,
        "label_smoothing_factor (EGN's loss has none)": args.label_smoothing_factor != 0,
        "compute_loss_func (the training loss is EGN's: override outputs_and_targets)": trainer.compute_loss_func is not None,
    }
    names = [name for name, on in refused.items() if on]
    if names:
        raise ValueError("EGNTrainer does not support " + "; ".join(names))
    if args.learning_rate == DEFAULT_LR:
        warnings.warn(f"args.learning_rate is EGN's step multiplier (1.0 is the full LM step); the default {DEFAULT_LR} "
                      "is an AdamW learning rate and makes EGN's steps almost nothing", UserWarning, stacklevel=3)
    if args.max_grad_norm not in (0, 1.0):  # 1.0 is TrainingArguments' default: only a deliberate setting warns
        warnings.warn("max_grad_norm has no effect on EGN's step (it clips .grad); use egn={'max_step_norm': ...}",
                      UserWarning, stacklevel=3)
