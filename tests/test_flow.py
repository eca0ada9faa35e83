"""The reference OpenCV TV-L1 backend and the backend registry."""

import numpy as np
import pytest

from preprocess.flow import OpenCVTVL1, backend_names, make_backend


def _video(h, w, n=3, seed=0):
    rng = np.random.default_rng(seed)
    base = (rng.random((h + 8, w + 8)) * 255).astype(np.uint8)
    return np.stack([base[4:4 + h, 4 - i:4 - i + w] for i in range(n)])


def test_small_video_does_not_shrink_the_pyramid_of_later_videos():
    # OpenCV stores a reduced scale count in the object after a frame too small for 5 levels.
    big = _video(96, 128)
    fresh = OpenCVTVL1().compute(big)
    reused = OpenCVTVL1()
    reused.compute(_video(20, 24))
    assert reused.params()["nscales"] == 5
    np.testing.assert_array_equal(reused.compute(big), fresh)


def test_registry_names_and_unknown_backend():
    assert {"opencv-tvl1", "tvl1", "none", "tvl1-torch"} <= set(backend_names())
    with pytest.raises(ValueError, match="unknown flow backend"):
        make_backend("farneback")
