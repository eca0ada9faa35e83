"""Pack Python wheels for a GPU machine that reaches no package registry, as one small file.

`benchmarks/gpu_check.sh` compares tvl1-torch with OpenCV's DualTVL1 (the speed ratio and the
end-point error), which lives in opencv-contrib; a machine with only plain OpenCV records those
rows as errors. This downloads the wheels for that machine's Python and platform, unpacks them
into `site/` and writes `site/` as one xz tarball (opencv-contrib: ~45 MiB), small enough to
travel with the checkout in one call. On the GPU machine:

    GPU_CHECK_EXTRAS=extras.tar.xz bash benchmarks/gpu_check.sh OUTDIR perf

unpacks it to a temporary folder, puts it first on PYTHONPATH (so contrib's cv2 shadows a plain
cv2 there) and removes it at the end; environment.json records which OpenCV the check used.

    python benchmarks/pack_extras.py .gpu-carry/extras.tar.xz                       # opencv-contrib for Python 3.12
    python benchmarks/pack_extras.py OUT.tar.xz --python 3.11 'opencv-contrib-python-headless==5.0.0.93'

pip's own settings apply (PIP_INDEX_URL, PIP_FIND_LINKS, a proxy). Dependencies are not packed
(`--no-deps`): the machine is expected to have numpy and the like already.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DEFAULT_REQUIREMENTS = ["opencv-contrib-python-headless==5.0.0.93"]  # the OpenCV the 2026-11-26 GPU check used
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
MAX_MIB = 58  # a device call carries 64 MiB, the checkout included


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the tarball to write (.tar.xz)")
    parser.add_argument("requirements", nargs="*", default=DEFAULT_REQUIREMENTS,
                        help=f"what to pack (default: {' '.join(DEFAULT_REQUIREMENTS)})")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB,
                        help=f"refuse a tarball larger than this (default {MAX_MIB}: one device call's carry)")
    return parser.parse_args(argv)


def download(requirements: list[str], python: str, into: Path) -> list[Path]:
    """The wheels of `requirements` for CPython `python` on x86-64 Linux, no dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "--dest", str(into)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    proc = subprocess.run(command + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()[-3:]
        raise SystemExit(f"pack_extras: pip could not download {' '.join(requirements)} for Python {python}: "
                         + " / ".join(detail))
    return sorted(into.glob("*.whl"))


def pack(wheels: list[Path], out: Path, max_mib: float) -> float:
    """Unpack the wheels into site/ and write it as out (xz) through a temporary name, renamed
    only if it is at most max_mib (a tarball already at `out` stays otherwise); its MiB."""
    partial = out.with_name(out.name + ".partial")
    with tempfile.TemporaryDirectory() as scratch:
        site = Path(scratch) / "site"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        with tarfile.open(partial, "w:xz", preset=6) as tar:
            tar.add(site, arcname="site")
    mib = partial.stat().st_size / 2**20
    if mib > max_mib:
        partial.unlink()
        raise SystemExit(f"pack_extras: the tarball would be {mib:.1f} MiB, over --max-mib {max_mib:g}: "
                         "pack fewer requirements per file")
    os.replace(partial, out)
    return mib


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as downloads:
        wheels = download(args.requirements, args.python, Path(downloads))
        print(f"packing {', '.join(w.name for w in wheels)} (xz, a minute or two) ...", flush=True)
        mib = pack(wheels, args.out, args.max_mib)
    print(f"wrote {args.out} ({mib:.1f} MiB); on the GPU machine: "
          f"GPU_CHECK_EXTRAS={args.out} bash benchmarks/gpu_check.sh OUTDIR perf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
