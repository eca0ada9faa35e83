"""DALI pipelines over cvtcl shards: clip sampling, local segments and clip-consistent augmentation.

Only `cvtcl/data.py` imports this package (docs/contributing.md rule 1). Modules, in data-flow order:

- `sampling.py`  (numpy) every sample's video, frames and augmentation parameters as a pure
                 function of (seed, epoch, rank, index); evaluation windows and crops.
- `source.py`    (numpy, h5py via ShardReader) picklable batch sources for DALI's parallel
                 external source: encoded frames (one contiguous read per window) + per-frame args.
- `frames.py`    the DALI operators per frame: decode, crop+resize, colour, blur, flip+normalise.
- `pretrain.py`, `evaluation.py`  the `@pipeline_def` graphs and the loaders that assemble
                 [B, V, C, T, H, W] torch batches; `iterate.py` runs a pipeline from torch.
- `baseline.py`  the PyTorch DataLoader + OpenCV loader on the same plans (benchmark baseline,
                 fallback without DALI); `toy_shards.py` tiny synthetic datasets for tests/benchmarks.

Documented choices (docs/algorithm.md leaves them open or asks to say so):
- videos shorter than a clip are padded by repeating their FIRST frame at the front (CoCLR);
- the flow of frames i..i+T-1 is flow frames i..i+T-1; the last frame's index (n-1) is clamped
  to the last flow frame n-2;
- colour jitter is one affine map per clip copy (contrast pivots at mid-grey, hue rotates YIQ
  chroma, one clamp at the end), identical in DALI and the baseline;
- evaluation crops a centre square of 224/240 of the short side (the paper's 224 of 240) and
  resizes it to crop_size; ten crops follow torchvision's TenCrop order;
- a frame whose crc32 differs from the shard's (layout version 2) or that is not a complete JPEG
  raises CorruptFrameError naming video, modality and frame; a damaged shard index is a
  LayoutError naming the shard; a DALI decode error is re-raised naming the first frame of the
  batches in flight that OpenCV cannot decode. There is no skip policy: a damaged shard stops
  training with a message saying what to do.
"""
