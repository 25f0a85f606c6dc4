"""Run folders that are either complete or visibly incomplete, never half-written.

A run writes into ``NAME.partial/`` and is renamed to ``NAME/`` only when it finished;
``status.json`` inside says ``complete: true``. An interrupted or failed run leaves
``NAME.partial/`` with ``complete: false`` and the error. Existing outputs are only
replaced when ``overwrite`` is set, and then only after the new run has succeeded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffuse_engine.core.errors import DiffuseError, OutputExistsError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _refuse_if_alive(partial: Path) -> None:
    """Raise if the process named in ``partial/status.json`` is still running here."""
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


class RunFolder:
    """Context manager: ``with RunFolder(out, overwrite) as folder: folder.path / ...``."""

    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final = Path(final)
        self.overwrite = overwrite
        self.path = self.final.with_name(self.final.name + ".partial")
        self.started = time.time()

    def __enter__(self) -> RunFolder:
        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(
                f"output {self.final} exists and is not a folder; choose another --out"
            )
        if self.final.exists() and not self.overwrite:
            raise OutputExistsError(
                f"output {self.final} already exists; pass --overwrite "
                "to replace it or choose another --out"
            )
        if self.path.exists():
            _refuse_if_alive(self.path)  # a stale NAME.partial is replaced, a live one not
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise DiffuseError(
                f"cannot create run folder {self.path}: {exc.strerror}; choose another --out"
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
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            write_json(
                self.path / "status.json",
                {"complete": True, "started": self.started, "finished": time.time()},
            )
            old = None
            if self.final.exists():  # move aside first: a crash here loses neither run
                old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
                os.replace(self.final, old)
            os.replace(self.path, self.final)
            if old is not None:
                shutil.rmtree(old)
        else:
            reason = (
                "interrupted" if exc_type is KeyboardInterrupt else f"{exc_type.__name__}: {exc}"
            )
            write_json(
                self.path / "status.json",
                {"complete": False, "started": self.started, "error": reason},
            )
        return False


def save_tensor(x: torch.Tensor, path: Path) -> None:
    """Atomically save a tensor as .pt or .npz by suffix."""
    buf = io.BytesIO()
    if path.suffix == ".npz":
        np.savez_compressed(buf, samples=x.cpu().numpy())
    else:
        torch.save(x.cpu(), buf)
    atomic_write_bytes(path, buf.getvalue())
