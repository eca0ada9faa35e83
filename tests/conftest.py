"""Shared fixtures. `synthetic_dataset` is a tiny packed dataset made by the real
`cvtcl-preprocess synthetic` code path (generator, UCF101 indexing, packing with TV-L1 flow)."""

import pytest

TINY_SYNTHETIC = [
    "--classes", "3", "--videos-per-class", "4", "--clips-per-group", "2",
    "--frames", "20", "--height", "32", "--width", "40", "--seed", "0",
    "--videos-per-shard", "5", "--workers", "1",
]


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """Path of a packed synthetic dataset: 3 classes x 4 videos (2 source groups of 2 clips per
    class; split 1 tests group 1), 20 frames of 32x40 at 25 fps, RGB + TV-L1 flow, 3 shards.
    The raw UCF101-layout tree is under <path>/raw."""
    from preprocess.cli import main

    out = tmp_path_factory.mktemp("synthetic") / "data"
    status = main(["synthetic", "--out", str(out), *TINY_SYNTHETIC])
    assert status == 0, f"cvtcl-preprocess synthetic exited {status}"
    return out
