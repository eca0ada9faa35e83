"""Random dihedral (D4) element per clip copy, applied to the batch on the training device.

`data.dihedral=true` (off by default; the paper flips horizontally only) replaces every clip copy by
its image under an independent random element of D4, the 8 symmetries of the square crop: an
optional transpose (swap H and W), then an optional flip of W, then an optional flip of H. Flow
vectors follow the frame: the transpose swaps the (x, y) channels, a W flip negates x and an H
flip negates y, so the flow still describes the transformed RGB frames.

Why it exists: when a dataset's classes do not depend on direction (the synthetic dataset draws
each video's direction uniformly), direction is the easiest instance cue left, and instance
discrimination learns it instead of the motion profile. Measured on the demo data (README "Demo
results"): stage-1 flow mined-positive precision 0.24 -> 0.31 (chance 0.167, mean of 3 seeds). On real
footage, vertical flips and transposes make unnatural video; leave it off there.

Why here and not in the DALI graph: a per-sample transpose would need a per-sample permutation,
which DALI's transpose does not take, and the flow channel swap a per-sample channel mix. On the
batch tensor it is three masked copies (microseconds on a GPU), identical for both loader backends
(no DALI/baseline parity to keep), and seeded by (run.seed, step, rank), so a resumed run draws
the same elements. The same element is used for both modalities and for the local segments of one
(sample, copy): the two-stream loader's "same frames, same crop" promise holds.
"""

from __future__ import annotations

import torch

from cvtcl.moco import to_device_async

CLIP_KEYS = ("rgb", "flow", "rgb_segments", "flow_segments")


def draw_elements(batch_size: int, copies: int, generator: torch.Generator) -> torch.Tensor:
    """[B, V, 3] bool: (transpose, flip W, flip H) per clip copy."""
    return torch.randint(0, 2, (batch_size, copies, 3), generator=generator).bool()


def apply_dihedral(x: torch.Tensor, elements: torch.Tensor, flow: bool) -> torch.Tensor:
    """x [B, V, ..., C, T, H, W] with H == W; elements [B, V, 3] from `draw_elements`."""
    b, v = x.shape[:2]
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"data.dihedral needs square clips (H == W), got H x W = {x.shape[-2]} x {x.shape[-1]}")
    if flow and x.shape[-4] != 2:
        raise ValueError(f"data.dihedral: flow clips need 2 channels (x, y) at dim -4, got shape {tuple(x.shape)}")
    masks = elements.to(x.device).view(b, v, 3, *([1] * (x.dim() - 2)))
    transpose, flip_w, flip_h = masks[:, :, 0], masks[:, :, 1], masks[:, :, 2]

    def negate(y: torch.Tensor, channel: int) -> torch.Tensor:  # one flow channel (dim -4), no host tensor
        planes = list(y.unbind(-4))
        planes[channel] = -planes[channel]
        return torch.stack(planes, dim=-4)

    moved = x.transpose(-1, -2)
    x = torch.where(transpose, moved.flip(-4) if flow else moved, x)
    moved = x.flip(-1)
    x = torch.where(flip_w, negate(moved, 0) if flow else moved, x)
    moved = x.flip(-2)
    return torch.where(flip_h, negate(moved, 1) if flow else moved, x)


def dihedral_(batch: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Replace every clip tensor of `batch` (rgb, flow and their segments) in the dict; one element
    per (sample, copy), shared by all of them."""
    keys = [k for k in CLIP_KEYS if k in batch]
    if not keys:
        return
    b, v = batch[keys[0]].shape[:2]
    # one copy to the device per step, non-blocking: a pageable one made the host wait for the GPU
    elements = to_device_async(draw_elements(b, v, generator), batch[keys[0]].device)
    for key in keys:
        if batch[key].shape[:2] != (b, v):
            raise ValueError(f"data.dihedral: batch[{key!r}] starts with {tuple(batch[key].shape[:2])}, "
                             f"batch[{keys[0]!r}] with {(b, v)}: every clip tensor must be [B, V, ...]")
        batch[key] = apply_dihedral(batch[key], elements, key.startswith("flow"))
