"""Data access: the shard reader written by ``fvlm preprocess`` and HU windowing."""
from .shards import CaseRecord, ShardDataset, ShardLayout, window

__all__ = ["ShardDataset", "CaseRecord", "ShardLayout", "window"]
