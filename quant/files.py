"""Writing files so that a crash never leaves a half-written one: one helper for a file, one for a folder.

Every writer in quant, memory and qlora (checkpoints, adapters, merged and
quantized models, recipes, metrics, the built-in model cache) goes through
these two, so there is one rule:

* everything is first written under a hidden temporary name *next to* the
  target (same filesystem, so the final ``os.replace`` is atomic);
* every file is fsynced before the rename and the parent folder after it,
  so a power cut cannot leave a renamed-but-empty file behind;
* permissions follow the user's umask, as a plain ``open()``/``mkdir`` would
  (``tempfile`` would give 0600/0700 and the result would be unreadable to
  others);
* on any exception the temporary is removed and the target is untouched; a write that fails
  (disk full, read-only or protected folder) becomes one :class:`InputError` naming the path and,
  when it is space, what is free.

It lives in the lowest package for the same reason :mod:`quant.errors` does:
``memory`` and ``qlora`` reuse it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

# how a failed write shows up in what the writers below raise: OSError errnos, and the texts torch.save
# ("unexpected pos", "failed writing file") and safetensors ("StorageFull", "No space left") wrap them in
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_WRITE_TEXTS = ("No space left", "StorageFull", "unexpected pos", "failed writing file", "Disk quota")


def _write_error(target: Path, e: BaseException) -> InputError | None:
    """The one-paragraph error for a failed write to ``target``; None when ``e`` is something else.

    Something else: an OSError about a file outside ``target``'s folder (a writer reading its source),
    or any error that is not about space or permission.
    """
    code = getattr(e, "errno", None)
    if isinstance(e, OSError):
        outside = e.filename is not None and not str(Path(e.filename).resolve()).startswith(
            str(target.parent.resolve()))
        if outside or code not in _NO_SPACE + _DENIED:
            return None
    elif not any(t in str(e) for t in _WRITE_TEXTS):
        return None
    if code in _DENIED:
        return InputError(f"Cannot write {str(target)!r}: {e.strerror} (a read-only or protected folder); nothing "
                          "there was replaced. Choose a folder you can write to.")
    try:
        free = f"{shutil.disk_usage(target.parent if target.parent.exists() else '.').free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return InputError(f"Ran out of disk space writing {str(target)!r} ({free} on its filesystem); nothing there "
                      "was replaced and the partial copy was removed. Free some space or choose another folder, "
                      "then run the same command again.")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # some filesystems refuse to open folders; nothing more can be done there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (children before their folder)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder), directory=True)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it becomes ``path`` atomically.

    Write the whole file to the yielded path (``open(tmp, 'w')``,
    ``save_file(..., tmp)``...). On success it is fsynced, given umask
    permissions and renamed over ``path``; the parent folder is fsynced.

    Raises:
        InputError: ``path`` is an existing folder.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"Cannot write the file {str(target)!r}: a folder of that name exists.")
    tmp = _sibling(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)
    except Exception as e:
        raise (_write_error(target, e) or e) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`). Returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, existing: str = "refuse", last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a new empty folder next to ``path``; fill it, and on success it becomes ``path``.

    Args:
        existing: what happens when ``path`` already exists:
            ``"refuse"`` (InputError, unless it is an empty folder),
            ``"replace"`` (the old folder is renamed aside, the new one renamed
            in, then the old one deleted: a crash leaves one complete version,
            under its own name or, if killed between the renames, as
            ``.<name>.old-...`` until :func:`remove_stale_temporaries` puts it back),
            ``"merge"`` (``path`` is kept, e.g. a run folder that also holds
            checkpoints: each top-level entry is renamed into it, over any
            entry of the same name, in sorted order with the names in
            ``last`` moved last, so that a reader that looks for the
            ``last`` file, say a config, finds everything it refers to). Each
            entry is replaced atomically; the folder as a whole is not (a crash
            part-way leaves some entries new and the rest old).
        last: see ``existing="merge"``; also sets the order nothing else would.

    Raises:
        InputError: ``path`` exists and is not a folder, or it is a non-empty
            folder with ``existing="refuse"``, or ``existing`` is unknown.
    """
    if existing not in ("refuse", "replace", "merge"):
        raise InputError(
            f"atomic_dir: unknown existing={existing!r}; valid choices are 'refuse', 'replace' or 'merge'."
        )
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"Cannot write the folder {str(target)!r}: a file of that name exists.")
    if existing == "refuse" and target.is_dir() and any(target.iterdir()):
        raise InputError(f"The folder {str(target)!r} already exists and is not empty; choose a new folder.")
    merging = existing == "merge" and target.is_dir()
    # merging: the temporary lives *inside* the target, so every rename stays in that one folder even when it
    # is a mount point or a symlink to another filesystem (a rename across filesystems fails with EXDEV)
    tmp = target / f".tmp-{os.getpid()}-{secrets.token_hex(4)}" if merging else _sibling(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # mkdir honours the umask (tempfile.mkdtemp would make it 0700)
    except OSError as e:
        raise (_write_error(target, e) or e) from None
    try:
        yield tmp
        fsync_tree(tmp)
        if merging:
            names = sorted(p.name for p in tmp.iterdir())
            for name in [n for n in names if n not in last] + [n for n in last if n in names]:
                _swap_in(tmp / name, target / name)
            _fsync(target, directory=True)
        else:
            if existing == "refuse" and target.is_dir():  # checked empty above
                target.rmdir()
            _swap_in(tmp, target)
            _fsync(target.parent, directory=True)
    except Exception as e:
        raise (_write_error(target, e) or e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, dst: Path) -> None:
    """Rename ``new`` to ``dst``; an existing folder ``dst`` is renamed aside first and deleted after.

    A failure between the two renames puts the old folder back; a kill there
    leaves it as ``.<name>.old-<pid>-<hex>``, which :func:`remove_stale_temporaries`
    renames back (so a crash never loses the one complete version).

    Raises:
        InputError: ``dst`` is a folder and ``new`` is a file.
    """
    if dst.is_dir() and not new.is_dir():
        raise InputError(f"Cannot write {str(dst)!r}: a folder of that name exists.")
    old = _sibling(dst, "old") if dst.is_dir() else None
    if old is not None:
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        if old is not None and not dst.exists():
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Clean up after writers killed in ``folder``; returns how many entries were handled.

    Only names this module makes are touched, and only those whose process
    is gone: temporaries (``.<name>.tmp-<pid>-<hex>``, ``.tmp-<pid>-<hex>``)
    are deleted; an old version set aside by a replace (``.<name>.old-...``)
    is renamed back to ``<name>`` when the kill came before the new one was
    in place, and deleted otherwise.
    """
    n = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for p in root.iterdir():
        parts = p.name.rsplit(".", 1)
        if not p.name.startswith(".") or len(parts) != 2:
            continue
        kind, _, rest = parts[1].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        original = root / parts[0][1:]
        if kind == "old" and parts[0] != "" and not original.exists():
            os.replace(p, original)  # killed between the two renames: the old version is the complete one
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
