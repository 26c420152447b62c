"""The shard format shared by `preprocess` (writes) and `sat_train` (reads); also the default output root.

Modules: format (names, encodings, keys), storage (atomic writes, URLs), writer (ShardWriter),
manifest (reading and checking a manifest), reading (tars, indexes, decoding), provenance.
Built shard sets live in sub-folders here (git-ignored), e.g. shards/fashion-mnist/train/."""
