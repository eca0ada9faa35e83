"""DALI graph pieces applied to a batch of frames (one frame per sample), shared by the pretraining
and evaluation pipelines. docs/algorithm.md "Data per training sample": crop, flip, colour, blur,
normalisation; flow gets crop and flip only, and flow-x changes sign with the flip.

Order per frame: decode -> crop+resize (one op: resize with a source ROI, linear, antialiased) ->
colour affine map (jitter + grayscale, `fn.coord_transform`) -> clamp -> Gaussian blur ->
flip + normalise + CHW + dtype (`fn.crop_mirror_normalize`). The baseline loader does the same
steps in the same order with OpenCV/numpy. The flow-x sign is a per-sample negative std, so the
flipped value is exactly the negation of the unflipped one.

Every function takes and returns DataNodes; on a GPU pipeline the decoder runs 'mixed' (nvJPEG,
with `hw_decoder_load` of the frames sent to the hardware JPEG decoder where the GPU has one) and
everything after it on the GPU; argument inputs (ROIs, colour matrices) stay on the CPU.
"""

from __future__ import annotations

from nvidia.dali import fn, types
import nvidia.dali.math as dmath

from dali_pipelines.source import FLOW_MEAN, PLANES, RGB_MEAN, RGB_STD


def decode(encoded, gray: bool, device: str, hw_decoder_load: float):
    """Encoded JPEG frames -> HWC uint8 (RGB, or one plane for flow)."""
    kwargs = {"hw_decoder_load": hw_decoder_load} if device == "gpu" else {}
    return fn.decoders.image(
        encoded, device="mixed" if device == "gpu" else "cpu",
        output_type=types.GRAY if gray else types.RGB, **kwargs,
    )


def decode_modality(nodes: dict, group: str, modality: str, device: str, hw_decoder_load: float):
    """Decode the planes of one modality for a decode group: RGB [H, W, 3], flow [H, W, 2] (x, y)."""
    planes = [decode(nodes[f"{plane}:{group}"], modality == "flow", device, hw_decoder_load)
              for plane in PLANES[modality]]
    return planes[0] if len(planes) == 1 else fn.cat(*planes, axis=2)


def crop_resize(images, roi_start, roi_end, crop_size: int):
    """Source-pixel ROI [y0, x0] .. [y1, x1] resized to crop_size x crop_size."""
    return fn.resize(
        images, roi_start=roi_start, roi_end=roi_end, roi_relative=False, size=[crop_size, crop_size],
        interp_type=types.INTERP_LINEAR, antialias=True,
    )


def colour(images, matrix, offset, sigma, window):
    """Per-frame affine colour map (A | t) on [0, 255], clamp, Gaussian blur (window 1 = none)."""
    mapped = fn.coord_transform(images, M=matrix, T=offset, dtype=types.FLOAT)
    clamped = dmath.clamp(mapped, 0.0, 255.0)
    return fn.gaussian_blur(clamped, sigma=sigma, window_size=window, dtype=types.FLOAT)


def normalise(images, modality: str, mirror, dtype, flow_std=None):
    """Flip + normalise + HWC -> CHW. RGB: ImageNet mean/std. Flow: (u8 - 128) / 128 with a
    per-sample std of -128 for x on flipped frames (flow_std), so flow-x is negated exactly."""
    if modality == "rgb":
        mean, std = list(RGB_MEAN), list(RGB_STD)
    else:
        mean, std = [FLOW_MEAN, FLOW_MEAN], flow_std
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std, output_layout="CHW",
                                    dtype=dtype)


def dali_dtype(torch_dtype):
    """DALI output type for a torch dtype: float16 stays float16, everything else is made from float32."""
    import torch

    return types.FLOAT16 if torch_dtype == torch.float16 else types.FLOAT
