"""Optical-flow backends for preprocessing, behind one small interface.

A backend turns the grayscale frames of one video into the flow between consecutive frames.
The manifest records `backend.name` and `backend.params()`, so every dataset says what made its
flow. `opencv-tvl1` is the reference (OpenCV contrib's DualTVL1 with its default parameters, as
the CoCLR and I3D pipelines extract UCF101/HMDB51 flow); faster backends register here too.
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import numpy as np

from preprocess.schema import quantise_flow


class FlowBackend(Protocol):
    name: str

    def params(self) -> dict:
        """Every setting that changes the output, for the manifest."""
        ...

    def compute(self, gray: np.ndarray) -> np.ndarray:
        """gray: [N, H, W] uint8 frames of one video -> [N - 1, H, W, 2] float32 flow in pixels
        (x then y), flow i taking frame i to frame i + 1."""
        ...


class OpenCVTVL1:
    """OpenCV contrib's DualTVL1 optical flow on the CPU, default parameters."""

    name = "opencv-tvl1"

    def __init__(self, threads: int = 1):
        import cv2

        if not hasattr(cv2, "optflow"):
            raise RuntimeError(
                "OpenCV was installed without the contrib modules (cv2.optflow is missing). "
                "Install opencv-contrib-python-headless instead of opencv-python(-headless), "
                "or preprocess with --flow none."
            )
        # One thread per worker: preprocessing parallelises over videos, and OpenCV's own
        # thread pool would oversubscribe the cores.
        cv2.setNumThreads(threads)
        self._cv2 = cv2
        self._tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        self._nscales = self._tvl1.getScalesNumber()

    def params(self) -> dict:
        t = self._tvl1
        return {
            "tau": t.getTau(),
            "lambda": t.getLambda(),
            "theta": t.getTheta(),
            "nscales": self._nscales,  # the configured count (OpenCV may lower its own copy, see compute)
            "warps": t.getWarpingsNumber(),
            "epsilon": t.getEpsilon(),
            "inner_iterations": t.getInnerIterations(),
            "outer_iterations": t.getOuterIterations(),
            "scale_step": t.getScaleStep(),
            "gamma": t.getGamma(),
            "median_filtering": t.getMedianFiltering(),
            "opencv": self._cv2.__version__,
        }

    def compute(self, gray: np.ndarray) -> np.ndarray:
        # OpenCV writes a reduced scale count back into the object when a small frame cuts the
        # pyramid short; without this reset every later video of the worker would use fewer levels.
        self._tvl1.setScalesNumber(self._nscales)
        n, h, w = gray.shape
        out = np.zeros((max(n - 1, 0), h, w, 2), dtype=np.float32)
        for i in range(n - 1):
            out[i] = self._tvl1.calc(gray[i], gray[i + 1], None)
        return out


class NoFlow:
    """`--flow none`: RGB only."""

    name = "none"

    def params(self) -> dict:
        return {}

    def compute(self, gray: np.ndarray) -> np.ndarray:  # pragma: no cover - never called
        raise RuntimeError("flow backend 'none' computes no flow")


def _torch_tvl1(**options) -> FlowBackend:
    """`tvl1-torch` (preprocess/flow_torch.py), imported on use so that this module and the
    workers that only encode stay free of torch."""
    from preprocess.flow_torch import TorchTVL1

    return TorchTVL1(**options)


_BACKENDS: dict[str, Callable[..., FlowBackend]] = {
    "tvl1": OpenCVTVL1,  # the CLI's historical name for the reference backend
    "opencv-tvl1": OpenCVTVL1,
    "none": NoFlow,
    "tvl1-torch": _torch_tvl1,
}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


# the CLI's flags for the backends' options, to name them in an error
_OPTION_FLAGS = {"device": "--flow-device", "batch": "--flow-batch"}


def make_backend(name: str, **options) -> FlowBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown flow backend {name!r}; choose one of {backend_names()}")
    factory = _BACKENDS[name]
    taken = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in taken.values()):
        unknown = [_OPTION_FLAGS.get(key, key) for key in options if key not in taken]
        if unknown:
            raise ValueError(f"--flow {name} takes no {' or '.join(unknown)} (options of --flow tvl1-torch)")
    return factory(**options)


def encode_flow(flow: np.ndarray, quality: int) -> list[tuple[bytes, bytes]]:
    """[N, H, W, 2] float flow -> per frame (x plane, y plane) single-channel JPEGs of the
    quantised levels. Single-channel JPEG has no chroma subsampling to smear the planes."""
    import cv2

    levels = quantise_flow(flow)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    out = []
    for frame in levels:
        planes = []
        for c in range(2):
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., c]), params)
            if not ok:
                raise RuntimeError("OpenCV failed to encode a flow plane as JPEG")
            planes.append(buf.tobytes())
        out.append((planes[0], planes[1]))
    return out
