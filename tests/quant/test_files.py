"""quant.files: the one atomic-write helper for a file and one for a folder."""

import errno
import os
import re
import stat

import pytest

from quant.errors import InputError
from quant.files import atomic_dir, atomic_file, remove_stale_temporaries, write_text_atomic


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "f", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner").write_text("y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f") == 0o644 and _mode(tmp_path / "d") == 0o755


def test_folder_refuse_replace_and_merge(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "w.bin").write_text("1")
    with pytest.raises(InputError, match="not empty"):
        with atomic_dir(out) as d:
            pass
    with pytest.raises(RuntimeError):  # a failed replace keeps the old folder
        with atomic_dir(out, existing="replace") as d:
            (d / "w.bin").write_text("2")
            raise RuntimeError
    assert (out / "w.bin").read_text() == "1"
    with atomic_dir(out, existing="replace") as d:
        (d / "v.bin").write_text("2")
    assert sorted(os.listdir(out)) == ["v.bin"]
    (out / "keep.txt").write_text("other files of a run folder")
    with atomic_dir(out, existing="merge", last=("config.json",)) as d:
        (d / "config.json").write_text("c")
        (d / "v.bin").write_text("3")
    assert sorted(os.listdir(out)) == ["config.json", "keep.txt", "v.bin"] and (out / "v.bin").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporaries left behind


def test_merge_moves_the_last_names_last(tmp_path, monkeypatch):
    import quant.files as files

    out = tmp_path / "out"
    out.mkdir()
    moved = []
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    with atomic_dir(out, existing="merge", last=("adapter_config.json",)) as d:
        for name in ("adapter_config.json", "adapter_model.safetensors", "z.txt"):
            (d / name).write_text(name)
    assert moved == ["adapter_model.safetensors", "z.txt", "adapter_config.json"]


def test_wrong_kind_of_target_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="a file of that name exists"):
        with atomic_dir(tmp_path / "file"):
            pass
    with pytest.raises(InputError, match="a folder of that name exists"):
        write_text_atomic(tmp_path / "dir", "x")


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".checkpoint-0000002.tmp-{dead}-abcd1234").mkdir()
    (tmp_path / f".x.tmp-{os.getpid()}-abcd1234").write_text("ours: alive")
    (tmp_path / ".hidden-user-file").write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == [".hidden-user-file", f".x.tmp-{os.getpid()}-abcd1234"]


def test_merge_renames_stay_inside_the_target_folder(tmp_path, monkeypatch):
    """A run folder may be a mount point or a symlink to another filesystem: no rename may cross its border."""
    import quant.files as files

    out = tmp_path / "out"
    out.mkdir()
    real = os.replace
    seen = []
    monkeypatch.setattr(files.os, "replace", lambda a, b: (seen.append((os.path.dirname(a), os.path.dirname(b))),
                                                          real(a, b)))
    with atomic_dir(out, existing="merge") as d:
        (d / "w.bin").write_text("1")
    assert seen and all(os.path.dirname(src) == str(out) for src, _ in seen) and all(b == str(out) for _, b in seen)


def test_a_failed_merge_puts_an_existing_subfolder_back(tmp_path, monkeypatch):
    import quant.files as files

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "old.txt").write_text("old")
    real = os.replace

    def flaky(a, b):
        if os.path.basename(b) == "sub" and ".old-" not in os.path.basename(b) and ".tmp-" in str(a):
            raise OSError("disk full")
        return real(a, b)

    monkeypatch.setattr(files.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out, existing="merge") as d:
            (d / "sub").mkdir()
            (d / "sub" / "new.txt").write_text("new")
    assert (out / "sub" / "old.txt").read_text() == "old" and sorted(os.listdir(out)) == ["sub"]


def test_a_kill_between_the_renames_of_a_replace_keeps_the_old_version(tmp_path):
    """Killed after the old folder went aside and before the new one came in: the old one comes back."""
    dead = 2**22 + 54321
    out = tmp_path / "checkpoint-0000002"
    aside = tmp_path / f".checkpoint-0000002.old-{dead}-abcd1234"
    aside.mkdir()
    (aside / "COMPLETE").write_text("2")
    (tmp_path / f".checkpoint-0000002.tmp-{dead}-abcd1234").mkdir()  # the new one, never renamed in
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0000002"] and (out / "COMPLETE").read_text() == "2"


@pytest.mark.parametrize("error, said", [
    (OSError(errno.ENOSPC, "No space left on device"), "Ran out of disk space writing"),
    # what torch.save raises when the disk fills under it (its C++ writer, not an OSError)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 1023"), "Ran out of disk space"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system (a read-only or protected folder)"),
])
def test_a_failed_write_is_one_clear_error_and_keeps_what_was_there(tmp_path, error, said):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(InputError, match=re.escape(said)) as e:
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise error
    assert str(target) in str(e.value) and target.read_text() == "old" and os.listdir(tmp_path) == ["out.bin"]
    folder = tmp_path / "ckpt"
    (folder / "a").mkdir(parents=True)
    with pytest.raises(InputError, match=re.escape(said)):
        with atomic_dir(folder, existing="replace") as tmp:
            (tmp / "b").write_text("half")
            raise error
    assert os.listdir(folder) == ["a"] and sorted(os.listdir(tmp_path)) == ["ckpt", "out.bin"]


def test_errors_that_are_not_about_writing_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError):  # a writer reading a missing source: not a disk problem
        with atomic_file(tmp_path / "out.bin"):
            open(tmp_path.parent / "no-such-source.bin")  # noqa: SIM115
    with pytest.raises(ValueError, match="a bug"):
        with atomic_dir(tmp_path / "d"):
            raise ValueError("a bug")
