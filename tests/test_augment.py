"""data.dihedral (cvtcl/augment.py): the 8 elements act on clips like a naive per-copy loop, flow
keeps describing the transformed frames, and one element is shared by the tensors of one copy."""

import pytest
import torch

from cvtcl import augment, engine
from cvtcl.config import apply_overrides
from cvtcl.presets import get_preset

ALL_ELEMENTS = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)]).bool()  # [8, 3]


def naive(clip: torch.Tensor, element, flow: bool) -> torch.Tensor:
    """One copy [..., C, T, H, W], written out step by step."""
    transpose, flip_w, flip_h = (bool(b) for b in element)
    out = clip.clone()
    if transpose:
        out = out.transpose(-1, -2)
        if flow:
            out = torch.stack([out[..., 1, :, :, :], out[..., 0, :, :, :]], dim=-4)
    if flip_w:
        out = out.flip(-1)
        if flow:
            out[..., 0, :, :, :] *= -1
    if flip_h:
        out = out.flip(-2)
        if flow:
            out[..., 1, :, :, :] *= -1
    return out


@pytest.mark.parametrize("flow", [False, True])
def test_matches_naive_loop_for_every_element(flow):
    channels = 2 if flow else 3
    x = torch.randn(8, 2, 3, channels, 4, 5, 5)  # [B, V, M, C, T, H, W] (segments shape)
    elements = torch.stack([ALL_ELEMENTS, ALL_ELEMENTS.flip(0)], dim=1)  # every element, both copies
    out = augment.apply_dihedral(x, elements, flow)
    for b in range(8):
        for v in range(2):
            assert torch.equal(out[b, v], naive(x[b, v], elements[b, v], flow)), (b, v)
    images = {tuple(out[b, 0].flatten().tolist()) for b in range(8)}
    assert len(images) == 8  # the 8 elements are 8 different maps


def moving_square(dx: int, dy: int, size: int = 12, frames: int = 3):
    """A bright square moving (dx, dy) px per frame: rgb [1, 1, 3, T, H, W] and its flow [1, 1, 2, T, H, W]."""
    rgb = torch.zeros(1, 1, 3, frames, size, size)
    for t in range(frames):
        y, x = 3 + dy * t, 2 + dx * t
        rgb[0, 0, :, t, y : y + 3, x : x + 3] = 1.0
    flow = torch.zeros(1, 1, 2, frames, size, size)
    flow[0, 0, 0], flow[0, 0, 1] = dx, dy
    return rgb, flow


def centroid(frame: torch.Tensor) -> torch.Tensor:
    """(x, y) of the bright pixels of one [H, W] frame."""
    ys, xs = torch.nonzero(frame > 0.5, as_tuple=True)
    return torch.stack([xs.float().mean(), ys.float().mean()])


@pytest.mark.parametrize("element", range(8))
def test_flow_still_describes_the_transformed_frames(element):
    rgb, flow = moving_square(dx=2, dy=1)
    batch = {"rgb": rgb, "flow": flow}
    chosen = ALL_ELEMENTS[element].view(1, 1, 3)
    out_rgb = augment.apply_dihedral(batch["rgb"], chosen, flow=False)
    out_flow = augment.apply_dihedral(batch["flow"], chosen, flow=True)
    motion = centroid(out_rgb[0, 0, 0, 1]) - centroid(out_rgb[0, 0, 0, 0])  # (x, y) px per frame
    assert torch.equal(out_flow[0, 0, :, 0].mean(dim=(-1, -2)), motion)


def test_one_element_per_copy_shared_by_modalities_and_segments():
    torch.manual_seed(0)
    rgb = torch.randn(6, 2, 3, 4, 7, 7)
    batch = {"rgb": rgb, "rgb_segments": rgb.unflatten(3, (2, 2)).movedim(3, 2), "flow": torch.randn(6, 2, 2, 4, 7, 7),
             "video_index": torch.arange(6)}
    before = dict(batch)
    augment.dihedral_(batch, torch.Generator().manual_seed(3))
    elements = augment.draw_elements(6, 2, torch.Generator().manual_seed(3))
    assert len({tuple(e.tolist()) for e in elements.view(-1, 3)}) > 1
    assert torch.equal(batch["rgb"], augment.apply_dihedral(before["rgb"], elements, False))
    assert torch.equal(batch["flow"], augment.apply_dihedral(before["flow"], elements, True))
    # the segments of a copy are slices of that copy's clip, before and after
    assert torch.equal(batch["rgb_segments"], batch["rgb"].unflatten(3, (2, 2)).movedim(3, 2))
    assert torch.equal(batch["video_index"], before["video_index"])


def test_refuses_non_square_and_mismatched_batches():
    with pytest.raises(ValueError, match="H == W"):
        augment.apply_dihedral(torch.zeros(1, 2, 3, 4, 6, 8), torch.zeros(1, 2, 3).bool(), False)
    with pytest.raises(ValueError, match="flow_segments"):
        augment.dihedral_({"rgb": torch.zeros(2, 2, 3, 4, 6, 6), "flow_segments": torch.zeros(3, 2, 2, 2, 4, 6, 6)},
                          torch.Generator().manual_seed(0))


def test_generator_depends_on_seed_step_and_rank():
    def draw(seed, step, rank):
        return augment.draw_elements(16, 2, engine.augment_generator(seed, step, rank))

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))  # a resumed run draws the same
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


def test_config_key_defaults_off():
    assert get_preset("smoke").data.dihedral is False
    assert apply_overrides(get_preset("smoke"), ["data.dihedral=true"]).data.dihedral is True
