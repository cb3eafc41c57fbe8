"""Data: sources -> prepared uint8 shards -> per-rank index batches. No framework imports."""

from pipeline.data.prepare import ensure_prepared, local_prepared_dir, prepare
from pipeline.data.sharding import DataPosition, EpochSharder
from pipeline.data.shards import ShardedImages
from pipeline.data.sources import DataError

__all__ = ["DataError", "DataPosition", "EpochSharder", "ShardedImages", "ensure_prepared", "local_prepared_dir", "prepare"]
