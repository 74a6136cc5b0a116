"""genllava_jax.atomic.atomic_write: the one write-to-temp-then-rename helper (files and folders)."""

import os

import pytest

from genllava_jax.atomic import atomic_write, cut_torn_line


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "a.json"
    with atomic_write(out) as tmp:
        tmp.write_text("one")
        assert not out.exists()  # only the temporary name exists while writing
    assert out.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_write(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert out.read_text() == "one" and sorted(p.name for p in out.parent.iterdir()) == ["a.json"]
    with atomic_write(out) as tmp:
        tmp.write_text("two")
    assert out.read_text() == "two" and len(list(out.parent.iterdir())) == 1


def test_a_folder_replaces_the_old_one_only_when_finished(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_write(out, directory=True) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(FileExistsError, match="ckpt exists"), atomic_write(out, directory=True, overwrite=False):
        pass
    with pytest.raises(RuntimeError), atomic_write(out, directory=True) as tmp:
        (tmp / "y").write_text("2")
        raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["x"] and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with atomic_write(out, directory=True) as tmp:
        (tmp / "y").write_text("2")
    assert [p.name for p in out.iterdir()] == ["y"] and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_what_a_killed_run_left_is_cleaned_by_the_next_write(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that has exited
    host = socket.gethostname()
    out = tmp_path / "a.json"
    (tmp_path / f".a.json.tmp-{dead}@{host}-1234abcd").write_text("half")  # a file write killed midway
    (tmp_path / f".a.json.tmp-{os.getpid()}@{host}-5678abcd").write_text("mine")  # a running writer's
    with atomic_write(out) as tmp:
        tmp.write_text("whole")
    err = capsys.readouterr().err
    assert f".a.json.tmp-{dead}@{host}-1234abcd: removed, left by a killed run (process {dead})" in err
    assert "left alone" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".a.json.tmp-{os.getpid()}@{host}-5678abcd", "a.json"]

    # a folder replace killed between its two renames: the old folder is put back, then replaced as asked
    ckpt = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.old-{dead}@{host}-zz"
    old.mkdir()
    (old / "x").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_write(ckpt, directory=True, overwrite=False):
            pass
    assert (ckpt / "x").read_text() == "1" and not old.exists()


def test_a_torn_last_line_is_cut_before_a_resumed_run_appends(tmp_path, capsys):
    import json

    from genllava_jax.metrics import MetricWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(2, {"loss": 1.5})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 2.0},
                                                                           {"step": 2, "loss": 1.5}]
    assert "metrics.jsonl: cut its torn last line (15 bytes" in capsys.readouterr().err
    assert not cut_torn_line(path) and not cut_torn_line(tmp_path / "absent.jsonl")
