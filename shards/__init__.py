"""Shard format shared by `preprocess` (writes) and `sat_train` (reads); also the default output root.

Built shard sets live in sub-folders here (git-ignored), e.g. shards/fashion-mnist/train/."""
from shards.format import *  # noqa: F401,F403
from shards.format import (  # noqa: F401  (explicit re-exports for readers)
    Manifest, ShardFormatError, ShardInfo, ShardWriter, check_shard_files, read_manifest,
)
