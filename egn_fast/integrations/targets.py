"""What EGN minimizes for a Hugging Face model, from the model's type: the loss and, per batch, the
(outputs, targets) pair EGN's closure returns. Each pair's batch loss (`Loss.batch_mean`) is the
loss the model itself computes from `labels`, so the Trainer logs and evaluates the same quantity:

| model type (transformers' auto mappings)      | outputs          | targets             | loss             |
|-----------------------------------------------|------------------|---------------------|------------------|
| causal LM (`…ForCausalLM`, GPT-2's LMHead…)   | logits[:, :-1]   | labels[:, 1:]       | per-token CE     |
| sequence classification, single label         | logits (b, C)    | labels (b,)         | cross-entropy    |
| sequence classification, regression (a)       | logits (b, C)    | labels as (b, C)    | nn.MSELoss() (b) |
| sequence classification, multi-label (c)      | logits (b, C)    | labels (b, C) float | nn.BCEWithLogitsLoss() |
| token classification                          | logits (b, T, C) | labels (b, T)       | per-token CE     |

Per-token cross-entropy ignores the −100 labels (padding). (a) `num_labels == 1` or
`problem_type="regression"`; (b) the mean over b·C entries, as transformers computes it (2/C ×
EGN's "mse"); (c) `problem_type="multi_label_classification"`.

transformers is imported only when a model is looked up, so `import egn_fast` does not need it.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from ..losses import LossSpec

__all__ = ["CAUSAL_LM", "SEQUENCE_CLASSIFICATION", "TOKEN_CLASSIFICATION", "model_kind", "loss_of", "outputs_and_targets"]

CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION = "causal_lm", "sequence_classification", "token_classification"

OVERRIDE_HINT = (
    "subclass EGNTrainer and override outputs_and_targets(model, inputs) -> (outputs, targets), "
    "and give the loss as egn={'loss': ...}"
)


def model_kind(model: nn.Module) -> str | None:
    """CAUSAL_LM | SEQUENCE_CLASSIFICATION | TOKEN_CLASSIFICATION by the model's class name in
    transformers' auto mappings (so every family the Auto classes know is covered), else None."""
    from transformers.models.auto import modeling_auto as auto

    mappings = {
        CAUSAL_LM: auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        SEQUENCE_CLASSIFICATION: auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        TOKEN_CLASSIFICATION: auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    }
    name = type(model).__name__
    for kind, names in mappings.items():
        if any(name == v or (isinstance(v, (tuple, list)) and name in v) for v in names.values()):
            return kind
    return None


def _problem_type(model: nn.Module) -> str:
    """The sequence classifier's problem as transformers decides it from its config; an unset
    problem_type with num_labels > 1 is single-label (the labels' dtype decides in transformers:
    EGN needs the loss before the first batch, so float labels there need problem_type set)."""
    config = model.config
    if config.problem_type is not None:
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


def loss_of(model: nn.Module) -> LossSpec | None:
    """EGN's loss for a causal LM, sequence or token classifier (the table above), else None."""
    kind = model_kind(model)
    if kind == SEQUENCE_CLASSIFICATION:
        problem = _problem_type(model)
        if problem == "regression":
            return nn.MSELoss()  # transformers' MSELoss(): mean over b·C entries, 2/C × EGN's "mse"
        if problem == "multi_label_classification":
            return nn.BCEWithLogitsLoss()
    return None if kind is None else "cross_entropy"


def outputs_and_targets(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Run `model` on the batch without its labels (so it does not compute its own loss a second
    time) and return EGN's (outputs, targets) for the model's kind (the table above)."""
    kind = model_kind(model)
    if kind is None:
        raise TypeError(f"EGN does not know the outputs and targets of a {type(model).__name__}: {OVERRIDE_HINT}")
    if "labels" not in inputs:
        raise ValueError(f"the batch has no 'labels' (keys {sorted(inputs)}); EGN needs the targets of a {kind} model")
    features = {k: v for k, v in inputs.items() if k != "labels"}
    labels = inputs["labels"]
    logits = model(**features).logits
    if kind == CAUSAL_LM:
        # position t predicts token t+1: transformers' shift (its padded last label is ignored anyway)
        return logits[:, :-1], labels[:, 1:].long()
    if kind == TOKEN_CLASSIFICATION:
        return logits, labels.long()
    problem = _problem_type(model)
    if problem == "single_label_classification":
        if labels.is_floating_point():  # transformers would switch to multi-label; EGN chose its loss already
            raise ValueError("float labels for a single-label classifier: set config.problem_type to "
                             "'multi_label_classification' (or 'regression') before building the trainer")
        return logits, labels.view(-1)
    return logits, labels.to(logits.dtype).view_as(logits)
