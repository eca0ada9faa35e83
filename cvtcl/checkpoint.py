"""Checkpoint contract: plain dicts, atomic writes, auto-resume, keep the last N (docs/design.md "Trainer").

A checkpoint is `run_dir/checkpoint-<step:08d>.pt`, a dict of tensors and plain Python values
only, loadable with `torch.load(path, weights_only=True)` by any later cvtcl (no pickled classes):

    format        int, CHECKPOINT_FORMAT
    step          optimizer steps done in total
    epoch, epoch_step   loader position of the NEXT step (resume calls loader.epoch(epoch, epoch_step))
    model         MomentumContrast state dict: query.*, key.*, queue.* (plus what a stage adds)
    optimizer     torch optimizer state dict
    scaler        GradScaler state dict ({} when not in fp16)
    encoder       Encoder constructor arguments (modality, backbone, embed_dim, channels_last_3d)
    config        the run's resolved TrainConfig as a nested dict
    complete      True once every epoch of the config is trained (not after max_steps or SIGTERM)
    world_size    processes that trained it (resume needs the same: global batch and data order)
    metrics_window  cvtcl.metrics.Window state: the steps since the last log line, so the first
                  line after a resume averages the same steps as an uninterrupted run's (optional)
    dataset       sha256 of the dataset's manifest.json: a resume may read a copy of the same
                  dataset under another data.root (optional: not in older checkpoints)

Resume takes the newest checkpoint that loads (`latest_loadable`): a damaged one (a torn copy, a
disk error) is named and skipped. A write that fails (full disk, unwritable directory) removes its
temporary file, keeps the previous checkpoints and raises CheckpointWriteError.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cvtcl.errors import brief
from cvtcl.models import Encoder
from preprocess.hygiene import OutputDirError, writer_temporary

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints in `run_dir`, oldest first (temporary files are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class CheckpointWriteError(OutputDirError):
    """A checkpoint could not be written; the previous ones are kept."""


class CheckpointLoadError(RuntimeError):
    """A file torch.load cannot read as a checkpoint: not one, or damaged. `reason` is torch's error
    in a few words (cvtcl.errors.brief), for messages that name the file themselves."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"checkpoint {path} cannot be loaded ({reason})")
        self.reason = reason


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_loadable(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False,
                    log: Callable[[str], Any] | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) of the newest checkpoint in `run_dir` that loads, (None, None) when none does.
    Each newer one that does not load is named, with why, through `log`. A checkpoint of another format is
    an error, not skipped: an older cvtcl must not resume behind a newer one's back."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location, mmap)
        except (RuntimeError, OSError) as err:
            if log is not None:
                log(str(err).splitlines()[0] if str(err) else f"checkpoint {path}: {type(err).__name__}")
    return None, None


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as checkpoint-<state['step']>.pt via a temporary file and a rename, then delete
    all but the newest `keep` checkpoints up to this one (0 = keep all). A kill at any moment leaves
    either the previous checkpoint or the new one, never half a file under a checkpoint name.
    Checkpoints of later steps are not this run's (a run resumed past a damaged newer one, which
    its own checkpoint of that step will replace): they neither count nor go."""
    path = save_atomic(checkpoint_path(run_dir, int(state["step"])), state)
    if keep > 0:
        found = list_checkpoints(run_dir)
        for old in found[: found.index(path) + 1][:-keep]:
            old.unlink(missing_ok=True)
    return path


def save_atomic(path: Path, state: dict[str, Any]) -> Path:
    """torch.save `state` (tagged with CHECKPOINT_FORMAT) at `path` via a temporary file, fsync and a
    rename; a failed write removes the temporary file and raises CheckpointWriteError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = writer_temporary(path)  # two fine-tunes of the same command wrote into one temporary
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        # torch's message is its stream writer's, without errno: the free space says what happened
        reason = err.strerror if isinstance(err, OSError) and err.strerror else brief(err)
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        # with room on the disk, the limit is another: a file-size limit (ulimit -f), a quota
        room = "; with that much room, a file-size limit (ulimit -f) or a quota?" if free > 2**30 else ""
        raise CheckpointWriteError(
            f"cannot write checkpoint {path} ({reason}; {free / 2**30:.2f} GiB free there{room}); the previous "
            "checkpoints are kept: free space (or fix permissions) and rerun the same command to resume"
        ) from None
    return path


def is_complete(run_dir: str | os.PathLike) -> bool:
    """Whether the run in `run_dir` trained all its epochs (its latest checkpoint says so)."""
    # memory-mapped: the schedule asks this of every sub-stage, and only one flag is read
    _, state = latest_loadable(run_dir, mmap=True)
    return state is not None and bool(state.get("complete", False))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True and check its format and, unless `mmap` (tensors
    stay in the file until touched, to read a flag), the CRC-32 of every member of its zip archive:
    torch.load does not, so a flipped bit in a weight loaded silently."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give a checkpoint-*.pt file from a run directory")
    if not mmap:
        check_crc(path)
    try:
        with warnings.catch_warnings():  # a pickle not written by torch.save: the error below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # damaged bytes make torch's unpickler raise anything (IndexError, ...)
        raise CheckpointLoadError(path, brief(err)) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: checkpoint format {found!r}, this cvtcl reads format {CHECKPOINT_FORMAT}")
    return state


def check_crc(path: Path) -> None:
    """CheckpointLoadError naming the first archive member whose bytes fail their CRC-32 (one read of
    the file). A file that is no zip archive is left to torch.load's own error."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return
    except Exception as err:  # a damaged local header (zipfile raises what it meets)
        raise CheckpointLoadError(path, brief(err)) from None
    if damaged is not None:
        raise CheckpointLoadError(path, f"{damaged} fails its CRC-32: the file is damaged")


def load_encoder(
    path: str | os.PathLike, which: str = "query", map_location: str | torch.device = "cpu"
) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild one encoder of a checkpoint: (Encoder in eval mode, the run's resolved config dict).

    which: "query" (the trained encoder; what evaluation uses) or "key" (its momentum average).
    """
    if which not in ("query", "key"):
        raise ValueError(f"which={which!r}: choose 'query' or 'key'")
    state = load_checkpoint(path, map_location)
    encoder = Encoder(**state["encoder"])
    prefix = f"{which}."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    encoder.load_state_dict(weights)
    return encoder.to(map_location).eval(), state["config"]
