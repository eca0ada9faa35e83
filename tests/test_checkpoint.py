"""Checkpoints are plain weights_only dicts, written atomically, pruned, and rebuild the encoder."""

import pytest
import torch

from cvtcl.checkpoint import (CheckpointLoadError, latest_checkpoint, latest_loadable, list_checkpoints, load_checkpoint,
                              load_encoder, save_checkpoint)
from cvtcl.models import Encoder
from cvtcl.moco import MomentumContrast
from cvtcl.presets import get_preset


def _state(step, model):
    optimizer = torch.optim.Adam(model.query.parameters())
    channels = 3 if model.query.modality == "rgb" else 2
    model.query(torch.randn(2, channels, 4, 16, 16)).sum().backward()
    optimizer.step()
    return {"step": step, "epoch": 0, "epoch_step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": {}, "encoder": model.query.config(),
            "config": get_preset("smoke").to_dict()}


def test_save_keep_last_and_load_weights_only(tmp_path):
    torch.manual_seed(0)
    model = MomentumContrast(Encoder("rgb", "tiny", embed_dim=8), queue_size=4)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, _state(step, model), keep=2)
    (tmp_path / "checkpoint-00000040.pt.tmp").write_bytes(b"half a file")  # a killed write
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000020.pt", "checkpoint-00000030.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))  # weights_only=True inside
    assert state["step"] == 30 and state["config"]["stage"]["modality"] == "rgb"
    assert set(state["optimizer"]) == {"state", "param_groups"}


def test_a_run_resumed_past_a_damaged_checkpoint_keeps_its_own(tmp_path):
    """keep=1, the newest checkpoint (step 32) damaged: the run resumes from 28 and writes 30. Pruning
    by name alone left only the damaged 32, and the next start found nothing to load."""
    torch.manual_seed(0)
    model = MomentumContrast(Encoder("rgb", "tiny", embed_dim=8), queue_size=4)
    for step in (24, 28, 32):
        save_checkpoint(tmp_path, _state(step, model), keep=0)
    (tmp_path / "checkpoint-00000032.pt").write_bytes(b"torn")
    save_checkpoint(tmp_path, _state(30, model), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000030.pt", "checkpoint-00000032.pt"]
    assert latest_loadable(tmp_path)[1]["step"] == 30
    save_checkpoint(tmp_path, _state(32, model), keep=1)  # its own step 32 replaces the damaged file
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000032.pt"]


def test_load_encoder_rebuilds_query_and_key(tmp_path):
    torch.manual_seed(0)
    model = MomentumContrast(Encoder("flow", "tiny", embed_dim=8), queue_size=4)
    with torch.no_grad():
        next(model.key.parameters()).add_(1.0)  # make key differ from query
    path = save_checkpoint(tmp_path, _state(5, model))
    x = torch.randn(2, 2, 4, 16, 16)
    for which, original in (("query", model.query), ("key", model.key)):
        encoder, config = load_encoder(path, which=which)
        assert not encoder.training and config["model"]["backbone"] == "tiny"
        with torch.no_grad():
            torch.testing.assert_close(encoder(x), original.eval()(x))
    with pytest.raises(ValueError, match="which"):
        load_encoder(path, which="sampler")


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint-00000001.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format None"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_file_torch_cannot_read_is_named_in_one_short_line(tmp_path, recwarn):
    """torch's own error for a pickled module (or a plain pickle) is paragraphs of advice on
    weights_only, and it warns about the pickle's protocol: the error names the file, torch's
    exception and its first sentence, and nothing is printed besides; a torn file keeps torch's
    first sentence too."""
    import pickle

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    for name in ("module.pt", "pickle.pt"):
        with pytest.raises(CheckpointLoadError) as error:
            load_checkpoint(tmp_path / name)
        reason = "UnpicklingError: Weights only load failed"
        assert str(error.value) == f"checkpoint {tmp_path / name} cannot be loaded ({reason})"
        assert error.value.reason == reason
    assert not recwarn.list
    torn = tmp_path / "torn.pt"
    torch.save({"weights": torch.zeros(1000)}, torn)
    torn.write_bytes(torn.read_bytes()[:2000])
    with pytest.raises(CheckpointLoadError, match=r"\(RuntimeError: PytorchStreamReader failed reading zip archive: "
                                                  r"failed finding central directory\)$"):
        load_checkpoint(torn)



def _save_repeatedly(path, value, times):
    import os

    from cvtcl.checkpoint import save_atomic

    try:
        for _ in range(times):
            save_atomic(path, {"weights": torch.full((64, 1024), float(value))})
    except Exception as err:  # reported by the exit status: the parent asserts on it
        print(err, flush=True)
        os._exit(1)


def test_two_processes_saving_one_file_never_mix_their_writes(tmp_path):
    """Two fine-tunes of the same command (and two plots of one run) wrote through one temporary
    name: one died at its rename ("No such file or directory ... free space") and the file could
    hold both processes' bytes. Each writer now has a temporary of its own."""
    import multiprocessing

    path = tmp_path / "state.pt"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_repeatedly, args=(path, value, 40)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    weights = torch.load(path, weights_only=True)["weights"]
    assert weights.unique().tolist() in ([1.0], [2.0])
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
