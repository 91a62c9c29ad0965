"""The capture stage (docs/design.md §2–§3): run the model once with forward hooks, find where the
samples lie in every recorded tensor, decide which rule covers which parameter, and give the later
stages the recorded calls and one batched backward for their output-gradients.

| file               | what it owns                                                                    |
|--------------------|---------------------------------------------------------------------------------|
| model_capture.py   | `capture_model`, the one entry, and `ModelCapture`, what the later stages use    |
| forward.py         | the captured forward, re-run when the plan asks; buffers and RNG restored         |
| plan.py            | model checks, the trainable parameters, the plan (rule per module) and its cache  |
| layout.py          | batch layouts (`BatchDim`), the two-sample probe, shared-tensor expansion         |
| hooks.py           | running the model (`forward_of`), the hooks (`ModuleCall`), the batched backward   |
| compiled.py        | compiled models: the capture runs their eager forwards (`running_eager`)          |
"""

from .compiled import running_eager
from .hooks import Closure, Inputs, ModuleCall, forward_of
from .model_capture import ModelCapture, capture_model

__all__ = ["capture_model", "ModelCapture", "ModuleCall", "forward_of", "Inputs", "Closure", "running_eager"]
