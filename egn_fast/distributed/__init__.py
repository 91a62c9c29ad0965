"""Data-parallel EGN over torch.distributed (docs/design.md §6): each rank holds a shard of the
batch and a replica of the parameters (or, under FSDP2/HSDP, a shard of them); "exact" gives
every rank the direction of the concatenated batch, "local" the mean of the per-rank directions.

| file              | what it owns                                                                   |
|-------------------|--------------------------------------------------------------------------------|
| data_parallel.py  | `DataParallel` (error sync, row all-gather, the two modes), `DataParallelSystem` |
| sendable.py       | which form of a layer's rows travels (factors or per-sample rows), byte counts  |
| shard.py          | `ShardedRows`: per-sample rows sharded by column across ranks, `shard_pays`     |
| sharded.py        | the mode and group of a step; sharded parameters (FSDP2/HSDP): what is served   |
| global_batch.py   | a rank's `BatchShare` of the global batch, the generator check, local refusals  |
"""

from .data_parallel import DataParallel, DataParallelSystem, parameter_checksum, unwrap
from .sendable import factor_bytes, rebuilt, row_bytes, sendable, tensors_of
from .shard import ShardedRows, shard_pays
from .sharded import MODES, check_mode, check_sharding, resolve_distributed

__all__ = [
    "MODES", "DataParallel", "DataParallelSystem", "check_mode", "unwrap", "parameter_checksum", "sendable",
    "factor_bytes", "row_bytes", "tensors_of", "rebuilt", "ShardedRows", "shard_pays", "resolve_distributed",
    "check_sharding",
]
