"""Layer rules (docs/design.md §2): how each module type's share of the rows J̃ is formed from its
recorded inputs and output-gradients, without materializing J.

| module                                      | file           | factors                          | Gram op                      |
|---------------------------------------------|----------------|----------------------------------|------------------------------|
| Linear on (b, in)                           | linear.py      | A (b, in), G (b, s, out)         | gram_dense                   |
| Linear on (b, *, in), Conv1d/2d             | linear.py      | A (b, T, in), G (b, s, T, out)   | gram_seq (ghost) or per-sample |
| Hugging Face Conv1D (GPT-2; W is (in, out)) | linear.py      | A (b, T, in), G (b, s, T, out)   | as Linear (registered by name) |
| Embedding                                   | embedding.py   | tokens (b, T), G                 | gram_embedding or per-sample |
| LayerNorm/RMSNorm/GroupNorm/BatchNorm(eval) | norms.py       | per-sample rows P (b, s, n)      | gram_per_sample              |
| InstanceNorm (affine)                       | instance_norm.py | per-sample rows P (b, s, C)    | gram_per_sample              |
| PReLU                                       | activation.py  | per-sample rows P (b, s, 1 or C) | gram_per_sample              |
| EmbeddingBag                                | embedding_bag.py | bag tokens (b, L), G_i ∘ c_ij  | gram_embedding               |
| RNN/GRU/LSTM and their cells                | recurrent.py   | per-sample rows by torch.func    | gram_per_sample              |
| parametrized modules (W = P(original))      | parametrized.py | the module's rows for W, chained by vjp | gram_per_sample     |
| any other module owning parameters          | generic.py     | per-sample rows by torch.func    | gram_per_sample              |

`layer_factors` (apply.py) runs the planned rules on a capture (egn_fast.capture).
A module called several times (tied weights) concatenates its calls along T; parameters shared
by different modules are merged into one PerSampleFactors (`merge_shared`). A user adds or
overrides a rule with `egn_fast.register_rule(ModuleType)` (see registry.py and the README).
"""

from . import activation, embedding, embedding_bag, factors, instance_norm, linear, norms, parametrized, recurrent, registry  # the built-in rules register themselves on import
from .factors import *  # noqa: F403
from .apply import layer_factors
from .generic import generic_factors, generic_in_dims
from .registry import *  # noqa: F403

__all__ = [*factors.__all__, *registry.__all__, "layer_factors", "generic_factors", "generic_in_dims"]
