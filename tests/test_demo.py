"""The demo script runs its steps top to bottom (on a tiny dataset instead of the demo size)."""

from preprocess.synthetic import SyntheticConfig


def test_demo_generates_verifies_and_summarises(tmp_path, monkeypatch, capsys):
    import cvtcl.demo as demo

    monkeypatch.setattr(demo, "DEMO_DATA", SyntheticConfig(classes=2, videos_per_class=2, clips_per_group=1,
                                                           frames=5, height=32, width=40))
    demo.main(["--out", str(tmp_path), "--workers", "1"])
    out = capsys.readouterr().out
    assert "2 classes" in out and "4 (2 train / 2 test in split 1)" in out and "verified OK" in out
    assert (tmp_path / "data" / "manifest.json").exists()
