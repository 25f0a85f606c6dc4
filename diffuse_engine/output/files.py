"""Run folders that are either complete or visibly incomplete, never half-written.

A run writes into ``NAME.partial/`` and is renamed to ``NAME/`` only when it finished;
``status.json`` inside says ``complete: true``. An interrupted or failed run leaves
``NAME.partial/`` with ``complete: false`` and the error. Existing outputs are only
replaced when ``overwrite`` is set, and then only after the new run has succeeded.

Every output folder is locked for as long as a process writes it
(:class:`FolderLock`: ``filelock`` on ``.NAME.lock`` beside the folder, released by the
kernel even on SIGKILL), so a second writer is refused with the holder's PID instead of
two runs silently overwriting each other. Files are written to a temporary name and
renamed (:func:`atomic_write_bytes`) with the permissions the user's umask gives a new
file; a write that fails (disk full, read-only file system) raises :class:`OutputError`,
one line naming the file and the cause, and leaves the previous version in place.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffuse_engine.core.errors import DiffuseError, OutputExistsError

#: what an ``OSError`` means for the user, by errno (the rest use ``strerror``)
_CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class OutputError(DiffuseError):
    """An output folder or file cannot be written (disk full, read-only, a symlink, ...)."""


class FolderLockedError(OutputExistsError):
    """Another process holds the lock of an output folder."""


def describe_os_error(exc: OSError) -> str:
    """``strerror`` with what it means, e.g. ``No space left on device (disk full)``."""
    text = exc.strerror or str(exc) or type(exc).__name__
    cause = _CAUSES.get(exc.errno)
    return f"{text} ({cause})" if cause and cause.lower() != text.lower() else text


# ---- atomic files -----------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename.

    The temporary file ``.NAME.XXXXXXXX.tmp`` is created with mode ``0o666`` so the
    kernel applies the umask, as for any new file (``tempfile.mkstemp`` would make it
    ``0o600``). On failure it is removed, ``path`` keeps its previous content, and an
    :class:`OutputError` names the file and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        while tmp is None:
            candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            tmp = candidate
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {describe_os_error(exc)}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files a killed writer left in ``folder`` (call it
    only while holding the folder's lock: then no live writer owns them)."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def save_tensor(x: torch.Tensor, path: Path) -> None:
    """Atomically save a tensor as .pt or .npz by suffix."""
    buf = io.BytesIO()
    if path.suffix == ".npz":
        np.savez_compressed(buf, samples=x.cpu().numpy())
    else:
        torch.save(x.cpu(), buf)
    atomic_write_bytes(path, buf.getvalue())


# ---- output paths -----------------------------------------------------------------------
def check_out_path(out: str | Path | None, option: str = "--out") -> Path:
    """``out`` as a Path, refused in one line before anything is written if it is empty,
    a symbolic link (dangling or not: a link is never followed into a delete), not a
    folder, or under a file or a read-only/unwritable folder."""
    if out is None or not str(out).strip():
        raise OutputError(f"{option} is empty; give the output folder's path")
    p = Path(out).expanduser()
    if p.is_symlink():
        target = os.readlink(p)
        state = "" if p.exists() else ", which does not exist"
        raise OutputError(
            f"{option} {p} is a symbolic link (to {target}{state}); give the real "
            "folder or another path (links are never followed into a replace or delete)"
        )
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {p} exists and is not a folder; choose another {option}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(
            f"cannot create run folder {p}: {parent} is a file; choose another {option}"
        )
    probe = p if p.exists() else parent
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(probe) else "permission denied"
        raise OutputError(f"cannot write in {probe} ({why}); choose another {option}")
    return p


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def make_folder(path: Path) -> None:
    """``mkdir -p``; a failure is an :class:`OutputError` naming the folder and cause."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create run folder {path}: {describe_os_error(exc)}; choose another --out"
        ) from None


# ---- locks ------------------------------------------------------------------------------
class FolderLock:
    """Exclusive lock on output folder ``folder`` for the life of the writing process.

    The lock is ``filelock``'s on ``.NAME.lock`` beside the folder (an OS lock: the
    kernel releases it when the process ends, even on SIGKILL, so a killed run never
    blocks its ``--resume``). The holder's PID, host and command are written to
    ``.NAME.lock.json`` so a refused second writer is told who holds it. Re-entrant
    within one object; a second object (or process) on the same folder is refused.
    """

    def __init__(self, folder: str | Path):
        from filelock import FileLock

        self.folder = Path(folder)
        self.path = self.folder.with_name(f".{self.folder.name}.lock")
        self.holder_path = self.folder.with_name(f".{self.folder.name}.lock.json")
        self._lock = FileLock(self.path, timeout=0)
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self) -> FolderLock:
        from filelock import Timeout

        if self._depth:
            self._depth += 1
            return self
        make_folder(self.folder.parent)
        try:
            self._lock.acquire()
        except Timeout:
            raise FolderLockedError(
                f"{self.folder} is being written by another process ({self._holder()}); "
                "wait for it to finish or choose another --out"
            ) from None
        except OSError as exc:
            raise OutputError(
                f"cannot lock {self.folder} ({self.path}: {describe_os_error(exc)}); "
                "choose another --out"
            ) from None
        self._depth = 1
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            write_json(self.holder_path, holder)
        except OutputError:
            pass  # the lock itself holds; only the refusal message loses its PID
        return self

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its name right after locking
            try:
                h = json.loads(self.holder_path.read_text())
                return f"pid {int(h['pid'])} on {h['host']}, {h['command']}, since {h['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.025)
        return "pid unknown"

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        self.holder_path.unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _refuse_if_alive(partial: Path) -> None:
    """Raise if the process named in ``partial/status.json`` is still running here (a
    writer that predates folder locks, or another machine's view of a shared folder)."""
    try:
        status = json.loads((partial / "status.json").read_text())
        pid, host = int(status["pid"]), status["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if host != socket.gethostname() or pid == os.getpid() or status.get("error"):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, owned by someone else
    raise OutputExistsError(
        f"{partial} is being written by another run (pid {pid}); wait "
        "for it or choose another --out"
    )


def remove_tree(path: Path) -> None:
    """``rm -r`` of a real folder; refuses a symbolic link (never follows one)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"refusing to delete {path}: not a real folder")
    shutil.rmtree(path)


def swap_in(new: Path, final: Path) -> None:
    """Replace folder ``final`` by the complete folder ``new``: move the old one aside,
    move the new one in, then delete the old. If the second rename fails the old folder
    is moved back, so ``final`` is never left missing; a crash between the two renames
    leaves both, complete, as ``.NAME.old-PID`` and ``new`` (the error names them)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError:
        if old is not None:
            os.replace(old, final)  # undo: the user's folder stays where it was
        raise
    if old is not None:
        remove_tree(old)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder this engine wrote (it holds our ``status.json``)."""
    return (path / "status.json").is_file()


class RunFolder:
    """Context manager: ``with RunFolder(out, overwrite) as folder: folder.path / ...``.

    Entering checks ``out`` (:func:`check_out_path`), locks it (:class:`FolderLock`) and
    creates ``NAME.partial``; leaving renames it to ``NAME`` on success (moving an old
    ``NAME`` aside first), or marks it incomplete with the error.
    """

    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final = check_out_path(final)
        self.overwrite = overwrite
        self.path = self.final.with_name(self.final.name + ".partial")
        self.started = time.time()
        self.lock = FolderLock(self.final)

    def check(self) -> None:
        """What entering refuses, without touching the disk."""
        check_out_path(self.final)
        if self.final.exists() and not self.overwrite:
            raise OutputExistsError(
                f"output {self.final} already exists; pass --overwrite "
                "to replace it or choose another --out"
            )
        if (
            self.final.exists()
            and (not self.final.is_dir() or any(self.final.iterdir()))
            and not is_run_folder(self.final)
        ):
            raise OutputExistsError(
                f"--overwrite: {self.final} is not a run folder (no status.json); "
                "refusing to delete it"
            )
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise OutputError(
                f"{self.path} is in the way (not a folder); remove it or choose another --out"
            )

    def __enter__(self) -> RunFolder:
        self.check()
        self.lock.acquire()
        try:
            self.check()  # again under the lock: another process may have just finished
            if self.path.exists():
                _refuse_if_alive(self.path)  # a stale NAME.partial is replaced, a live one not
                remove_tree(self.path)
            try:
                self.path.mkdir(parents=True)
            except OSError as exc:
                raise OutputError(
                    f"cannot create run folder {self.path}: {describe_os_error(exc)}; "
                    "choose another --out"
                ) from None
            write_json(
                self.path / "status.json",
                {
                    "complete": False,
                    "started": self.started,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                },
            )
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
            else:
                reason = (
                    "interrupted"
                    if exc_type is KeyboardInterrupt
                    else f"{exc_type.__name__}: {exc}"
                )
                try:  # best effort: the disk may be what failed
                    write_json(
                        self.path / "status.json",
                        {"complete": False, "started": self.started, "error": reason},
                    )
                except OutputError:
                    pass
        finally:
            self.lock.release()
        return False

    def _finish(self) -> None:
        try:
            write_json(
                self.path / "status.json",
                {"complete": True, "started": self.started, "finished": time.time()},
            )
            swap_in(self.path, self.final)
        except OSError as exc:
            raise OutputError(
                f"cannot finish run folder {self.final}: {describe_os_error(exc)}; the "
                f"samples are in {self.path} and {self.final} is as it was"
            ) from None
