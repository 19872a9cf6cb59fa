import pickle

import pytest
import torch

from moco.runtime import checkpoint


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth.tar"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)

    def explode(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2}, path)
    assert checkpoint.load(path)["epoch"] == 1  # the previous checkpoint survived, intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth.tar"]  # no temporary left behind


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        pickle.dump({"epoch": 1, "x": _Payload()}, f, protocol=2)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="evil.pth.tar: not a readable checkpoint"):
        checkpoint.load(path)


def test_truncated_or_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    checkpoint.save_atomic({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="ckpt.pth.tar: not a readable checkpoint"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="absent.pth.tar: no such checkpoint"):
        checkpoint.load(tmp_path / "absent.pth.tar")


def test_names_and_prefix():
    assert checkpoint.numbered_name(100) == "checkpoint_0100.pth.tar"
    assert checkpoint.strip_prefix({"module.encoder_q.w": 1, "queue": 2}) == {"encoder_q.w": 1, "queue": 2}


def test_an_unreadable_previous_stage_is_one_line_for_the_user(tmp_path):
    """r2 chaining from an r1 checkpoint_last that does not read: an error naming it, not a traceback."""
    from demo.train import main

    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / checkpoint.LAST).write_bytes(b"truncated")
    with pytest.raises(SystemExit, match=r"^error: .*r1/checkpoint_last.pth.tar: not a readable checkpoint"):
        main(["--stage", "r2", "--dataset-root", str(tmp_path / "data"), "--output-dir", str(tmp_path), "-j", "0"])
    assert issubclass(checkpoint.UnreadableCheckpoint, ValueError)
