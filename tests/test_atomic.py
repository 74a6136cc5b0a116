"""genllava_jax.atomic.atomic_write: the one write-to-temp-then-rename helper (files and folders)."""

import pytest

from genllava_jax.atomic import atomic_write


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
