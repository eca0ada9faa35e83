"""DALI pipelines over cvtcl shards: clip sampling, local segments and clip-consistent augmentation."""
