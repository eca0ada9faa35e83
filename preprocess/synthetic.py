"""A small synthetic action dataset in the exact UCF101 layout, for the demo and the tests.

Each class is a temporal *profile* of motion: a textured object translates over a textured,
slowly panning background while a textured distractor drifts. What varies with the class is only
how the object's velocity changes over time (constant; reverse at a random time; accelerate from
rest; decelerate to rest; stop and go; ...). Everything else is random:
  - appearance (textures, colours, shapes, sizes) is drawn per source group, independent of the
    class, so appearance alone does not carry the class (the clips of one group look alike, as
    UCF101's clips cut from one recording do; splits keep groups on one side);
  - the direction is uniform on the circle, so classes are invariant to a horizontal flip (flip
    augmentation must not turn one class into another);
  - the mean speed is drawn from one class-independent range and every profile has the same mean
    speed, so time-averaged flow does not separate the classes: plain translate/rotate/zoom
    classes are solved by raw flow (94-100% R@1 in a quick experiment, issue 2), these need the
    temporal order of the motion, which is what CVTCL's temporal losses learn (docs/algorithm.md).
    `benchmarks/synthetic_separability.py` (5 classes x 40 clips, split 1, nearest neighbour):
    time-averaged flow field R@1 0.17, its global statistics 0.20 (chance 0.20), while the
    per-frame speed profile reaches 0.78; with 8 classes 0.12 / 0.22 / 0.57 (chance 0.125).
Deterministic for a seed: every clip draws from its own generator keyed by (seed, class, group, clip).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from preprocess.schema import TEMP_SUFFIX, read_json, write_json_atomic

Profile = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _along(speed: np.ndarray) -> np.ndarray:
    return np.stack([speed, np.zeros_like(speed)], axis=-1)


def _reverse(t, rng):
    return _along(np.where(t < rng.uniform(0.3, 0.7), 1.0, -1.0))


def _stop_and_go(t, rng):
    start = rng.uniform(0.3, 0.45)
    return _along(np.where((t >= start) & (t < start + 0.3), 0.0, 1.0))


def _oscillate(t, rng):
    edges = np.array([0.25, 0.5, 0.75]) + rng.uniform(-0.04, 0.04, 3)
    return _along(np.where(np.searchsorted(edges, t) % 2 == 0, 1.0, -1.0))


def _turn(t, rng):
    late = t >= rng.uniform(0.35, 0.65)
    side = rng.choice([-1.0, 1.0])  # left or right turn: a flip maps one to the other
    return np.stack([np.where(late, 0.0, 1.0), np.where(late, side, 0.0)], axis=-1)


# Velocity profiles: t [S] in (0, 1) at each frame step -> [S, 2] velocity (along, across) in the
# object's own direction; rescaled to mean speed 1 in `motion_path`. The first five are the default.
PROFILES: dict[str, Profile] = {
    "ConstantSpeed": lambda t, rng: _along(np.ones_like(t)),
    "MoveThenReverse": _reverse,
    "Accelerate": lambda t, rng: _along(t),
    "Decelerate": lambda t, rng: _along(1.0 - t),
    "StopAndGo": _stop_and_go,
    "OscillateTwice": _oscillate,
    "TurnMidway": _turn,
    "GoThenStop": lambda t, rng: _along(np.where(t < rng.uniform(0.4, 0.7), 1.0, 0.0)),
}


MIN_FRAMES, MIN_SIDE = 4, 16  # the smallest video the generator draws: frames, and pixels a side


@dataclass(frozen=True)
class SyntheticConfig:
    """The generator's parameters; recorded in raw/synthetic.json and the manifest."""

    classes: int = 5  # the first N of PROFILES
    videos_per_class: int = 12
    clips_per_group: int = 4  # clips cut from one "recording", like UCF101's gXX_cYY
    test_groups: int | None = None  # split-1 test groups per class; None = UCF101's 7 of 25, scaled
    frames: int = 48
    height: int = 64
    width: int = 80
    fps: float = 25.0
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.classes <= len(PROFILES):
            raise ValueError(f"--classes must be 1..{len(PROFILES)} (one per motion profile), got {self.classes}")
        if self.frames < MIN_FRAMES or min(self.height, self.width) < MIN_SIDE:
            raise ValueError(f"--frames must be >= {MIN_FRAMES} and --height/--width >= {MIN_SIDE}, "
                             f"got {self.frames} frames of {self.height}x{self.width}")
        if self.groups < 2 or self.clips_per_group < 1:
            raise ValueError("need at least two source groups per class: raise --videos-per-class or lower --clips-per-group")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"--fps must be a positive number of frames per second, got {self.fps}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not 1 <= self.test_groups_per_split < self.groups:
            raise ValueError(f"--test-groups must be 1..{self.groups - 1} (train groups must remain), got {self.test_groups}")

    @property
    def groups(self) -> int:
        return math.ceil(self.videos_per_class / max(self.clips_per_group, 1))

    @property
    def test_groups_per_split(self) -> int:
        return self.test_groups if self.test_groups is not None else max(1, round(self.groups * 7 / 25))

    @property
    def class_names(self) -> list[str]:
        return list(PROFILES)[: self.classes]


@dataclass
class Layer:
    """A textured, soft-edged object: texture [S, S, 3] float32, alpha [S, S] float32 in [0, 1]."""

    texture: np.ndarray
    alpha: np.ndarray


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Periodic smooth noise in [0, 1], [h, w]: low-pass filtered in Fourier space, so it tiles
    seamlessly and the panning background (BORDER_WRAP) shows no seam."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    spectrum = np.fft.fft2(rng.standard_normal((h, w))) * np.exp(-2 * (math.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.min()) / max(np.ptp(field), 1e-6)


def _colourise(rng: np.random.Generator, field: np.ndarray, away_from: np.ndarray | None = None) -> np.ndarray:
    """[h, w] in [0, 1] -> [h, w, 3] float32 BGR between two random, clearly different colours;
    with `away_from` (a BGR colour) the first colour is near its complement, so objects stand out."""
    a = rng.uniform(0, 255, 3) if away_from is None else np.clip(255 - away_from + rng.uniform(-40, 40, 3), 0, 255)
    b = np.clip(a + rng.choice([-1, 1], 3) * rng.uniform(90, 160, 3), 0, 255)
    return (a + field[..., None] * (b - a)).astype(np.float32)


def _layer(rng: np.random.Generator, size: int, background: np.ndarray) -> Layer:
    texture = _colourise(rng, _smooth_noise(rng, size, size, rng.uniform(0.8, 2.0)), background.mean((0, 1)))
    yy, xx = (np.mgrid[:size, :size] + 0.5 - size / 2) / (size / 2)
    dist = np.hypot(yy, xx) if rng.random() < 0.5 else np.maximum(abs(yy), abs(xx))
    alpha = np.clip((1.0 - dist) * size / 2, 0.0, 1.0).astype(np.float32)  # one-pixel soft edge
    return Layer(texture, alpha)


@dataclass
class Appearance:
    """What one source group looks like: background texture [H, W, 3], object and distractor."""

    background: np.ndarray
    target: Layer
    distractor: Layer


def sample_appearance(rng: np.random.Generator, height: int, width: int) -> Appearance:
    short = min(height, width)
    background = _colourise(rng, _smooth_noise(rng, height, width, rng.uniform(1.5, 4.0)))
    target = _layer(rng, int(round(short * rng.uniform(0.22, 0.3))), background)
    distractor = _layer(rng, int(round(short * rng.uniform(0.12, 0.18))), background)
    return Appearance(background, target, distractor)


@dataclass
class Motion:
    """Per-frame positions [T, 2] (x, y) of the object's top-left corner, distractor's, and the pan."""

    target: np.ndarray
    distractor: np.ndarray
    pan: np.ndarray


def motion_path(profile: Profile, frames: int, rng: np.random.Generator) -> np.ndarray:
    """[T, 2] displacement from frame 0 in units of (mean speed x 1 frame), direction uniform."""
    t = (np.arange(frames - 1) + 0.5) / (frames - 1)
    velocity = profile(t, rng)
    velocity = velocity / max(np.linalg.norm(velocity, axis=-1).mean(), 1e-6)
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.concatenate([np.zeros((1, 2)), np.cumsum(velocity @ rot.T, axis=0)])


def _place(rng, path: np.ndarray, size: int, height: int, width: int) -> np.ndarray:
    """Shift a displacement path so the object (side `size`) stays inside the frame throughout."""
    lo, hi = path.min(0), path.max(0)
    limit = np.array([width, height]) - size - 1
    start = rng.uniform(-lo, np.maximum(limit - hi, -lo))
    return path + start


def sample_motion(profile: Profile, config: SyntheticConfig, appearance: Appearance, rng: np.random.Generator) -> Motion:
    """The class profile at a class-independent random speed, a slow pan and a drifting distractor."""
    n, h, w = config.frames, config.height, config.width
    size = appearance.target.alpha.shape[0]
    # A path of total length L fits in an L x L box: bounding by the free room keeps the speed
    # range the same for every class (a class-dependent speed would be a shortcut).
    room = min(h, w) - size - 2
    speed = rng.uniform(0.5, 1.0) * min(room / (n - 1), 3.0)
    target = _place(rng, speed * motion_path(profile, n, rng), size, h, w)
    d_size = appearance.distractor.alpha.shape[0]
    drift = rng.uniform(0.1, 0.3) * motion_path(PROFILES["ConstantSpeed"], n, rng)
    distractor = _place(rng, drift, d_size, h, w)
    pan = rng.uniform(0.1, 0.35) * motion_path(PROFILES["ConstantSpeed"], n, rng)
    return Motion(target, distractor, pan)


def _paste(frame: np.ndarray, layer: Layer, xy: np.ndarray) -> None:
    """Alpha-blend a layer into `frame` at a sub-pixel top-left position (bilinear)."""
    h, w = frame.shape[:2]
    shift = np.float32([[1, 0, xy[0]], [0, 1, xy[1]]])
    tex = cv2.warpAffine(layer.texture, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.warpAffine(layer.alpha, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    frame += alpha[..., None] * (tex - frame)


def render_clip(appearance: Appearance, motion: Motion) -> np.ndarray:
    """-> [T, H, W, 3] BGR uint8 frames."""
    h, w = appearance.background.shape[:2]
    frames = []
    for i in range(len(motion.target)):
        shift = np.float32([[1, 0, motion.pan[i, 0]], [0, 1, motion.pan[i, 1]]])
        frame = cv2.warpAffine(appearance.background, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        _paste(frame, appearance.distractor, motion.distractor[i])
        _paste(frame, appearance.target, motion.target[i])
        frames.append(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_avi(path: str | os.PathLike, frames: np.ndarray, fps: float, fourcc: str = "MJPG") -> None:
    """[T, H, W, 3] BGR uint8 -> an MJPG .avi (or `fourcc` in the container the suffix names, e.g.
    mp4v in .mp4), written to a temporary name and renamed."""
    path = Path(path)
    tmp = path.with_name(path.stem + TEMP_SUFFIX + path.suffix)  # keeps .avi: OpenCV picks the container by it
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {tmp} ({fourcc}); is the folder writable?")
    for frame in frames:
        writer.write(frame)
    writer.release()
    # OpenCV's writer drops write errors: a full disk leaves a short file that a rerun would keep
    written = _frames_in(tmp)
    if written != len(frames):
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"OpenCV wrote {written} of its {len(frames)} frames (a full disk or a file-size "
                      "limit?); free space and run the command again", str(path))
    os.replace(tmp, path)


def _frames_in(path: Path) -> int:
    """Frames a reader finds in the video at `path` (packets, not decoded)."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.isOpened() and capture.grab():
        count += 1
    capture.release()
    return count


def _clip_counts(config: SyntheticConfig) -> list[int]:
    """Clips per group 1..G: `clips_per_group` each, the last group takes the remainder."""
    full, rest = divmod(config.videos_per_class, config.clips_per_group)
    return [config.clips_per_group] * full + ([rest] if rest else [])


def split_test_groups(config: SyntheticConfig) -> dict[str, range]:
    """Split id -> test group numbers (1-based), UCF101's rule scaled: split k tests groups
    (k-1)t+1 .. kt; a split exists only when its test groups exist. Train groups are the rest."""
    t = config.test_groups_per_split
    return {str(k): range((k - 1) * t + 1, k * t + 1) for k in (1, 2, 3) if k * t <= config.groups}


def generate_raw(config: SyntheticConfig, raw_dir: str | os.PathLike) -> Path:
    """Write the dataset in UCF101's layout under raw_dir (UCF-101/, ucfTrainTestlist/).

    Resumable: finished .avi files (renamed into place) are kept. A raw_dir generated with other
    parameters is refused (ValueError), so two configurations never mix.
    """
    raw = Path(raw_dir)
    videos_dir, lists = raw / "UCF-101", raw / "ucfTrainTestlist"
    record = raw / "synthetic.json"
    params = dataclasses.asdict(config)
    if record.exists() and read_json(record, f"delete {raw} and run the command again") != params:
        raise ValueError(
            f"{raw} holds a synthetic dataset made with other parameters ({record}); "
            "use another --out or delete that folder"
        )
    lists.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, params)

    entries: list[tuple[str, int]] = []  # (relative path, group number)
    for label, class_name in enumerate(config.class_names):
        (videos_dir / class_name).mkdir(parents=True, exist_ok=True)
        for group, clips in enumerate(_clip_counts(config), start=1):
            look = sample_appearance(np.random.default_rng([config.seed, 0, label, group]), config.height, config.width)
            for clip in range(1, clips + 1):
                rel = f"{class_name}/v_{class_name}_g{group:02d}_c{clip:02d}.avi"
                entries.append((rel, group))
                if (videos_dir / rel).exists():
                    continue
                rng = np.random.default_rng([config.seed, 1, label, group, clip])
                motion = sample_motion(PROFILES[class_name], config, look, rng)
                write_avi(videos_dir / rel, render_clip(look, motion), config.fps)

    label_of = {c: i + 1 for i, c in enumerate(config.class_names)}  # classInd.txt ids are 1-based
    _write_text(lists / "classInd.txt", [f"{i} {c}" for c, i in label_of.items()])
    for k, test in split_test_groups(config).items():
        train_lines = [f"{rel} {label_of[rel.split('/')[0]]}" for rel, g in entries if g not in test]
        _write_text(lists / f"trainlist0{k}.txt", train_lines)
        _write_text(lists / f"testlist0{k}.txt", [rel for rel, g in entries if g in test])
    return raw


def _write_text(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        tmp.write_text("".join(line + "\r\n" for line in lines))  # the official lists use CRLF
        os.replace(tmp, path)
    except OSError as err:  # a full disk: the file named (a write's error names none), nothing half-written
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"{err.strerror or err}; free space and run the command again", str(path)) from None
