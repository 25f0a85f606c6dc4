"""The training folder: checked before any work, locked while written, replaced safely.

:class:`TrainingFolder` is the one place that decides what a training run may do with
``--out``:

* :meth:`~TrainingFolder.check` refuses, before anything is written, an empty path, a
  symbolic link, a file, an existing folder without ``--resume``/``--overwrite``, an
  ``--overwrite`` of a folder that is not a training folder, and a ``--resume`` with no
  checkpoint.
* :meth:`~TrainingFolder.open` (after the whole configuration has been validated and
  built) locks the folder for the life of the run (:class:`~diffuse_engine.output.files.
  FolderLock`), checks again under the lock, removes the temporaries a killed writer left
  (``.checkpoint.safetensors.XXXX.tmp``) and creates the folder.
* With ``--overwrite`` the new run writes into a hidden sibling ``.NAME.new-PID`` and
  :meth:`~TrainingFolder.committed` swaps it in only once it holds its first complete
  checkpoint (old folder renamed aside, new one renamed in, old one deleted; a symlink is
  never followed into a delete). A run that fails before that leaves ``NAME`` as it was.
* :meth:`~TrainingFolder.what_is_safe` is the clause every write failure ends with:
  "the previous checkpoint at step 120 is intact in runs/x; ...".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffuse_engine.components.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError
from diffuse_engine.core.errors import OutputExistsError
from diffuse_engine.output.files import (
    FolderLock,
    OutputError,
    check_out_path,
    make_folder,
    remove_stale_temporaries,
    remove_tree,
    swap_in,
    write_json,
)


class TrainingFolder:
    """``--out`` of a training run; see the module doc. ``path`` is where files go now
    (the hidden sibling until an ``--overwrite`` run commits, then ``out``)."""

    def __init__(self, out: str | Path, resume: bool = False, overwrite: bool = False):
        self.out = check_out_path(out)
        self.resume, self.overwrite = resume, overwrite
        self.lock = FolderLock(self.out)
        self.replacing = False  # an --overwrite of an existing folder, not yet swapped in
        self.path = self.out
        self.last_step: int | None = None  # step of the newest complete checkpoint in out
        self.opened = False

    # ---- before any work -----------------------------------------------------------------
    def check(self) -> None:
        """Refuse what this run must not do to ``out``; reads only."""
        out = check_out_path(self.out)
        ckpt = out / CHECKPOINT_NAME
        if self.resume:
            if not ckpt.is_file():
                raise CheckpointError(f"--resume: no {CHECKPOINT_NAME} in {out}; nothing to resume")
            return
        if out.exists() and any(out.iterdir()):
            if not self.overwrite:
                raise OutputExistsError(
                    f"output {out} already exists; pass --resume to continue "
                    "it, --overwrite to replace it, or choose another --out"
                )
            if not (out / "status.json").is_file() and not ckpt.is_file():
                raise OutputExistsError(
                    f"--overwrite: {out} is not a training folder (no "
                    "status.json); refusing to delete it"
                )

    def load_resume(self) -> Checkpoint:
        """Lock ``out`` and read its checkpoint (``--resume``)."""
        self.check()
        self.lock.acquire()
        ckpt = Checkpoint.load(self.out / CHECKPOINT_NAME)
        self.last_step = ckpt.step
        return ckpt

    # ---- once everything is validated ------------------------------------------------------
    def open(self) -> Path:
        """Lock (if not yet), check again, clean up and create the folder; ``path``."""
        if not self.lock.held:
            self.lock.acquire()
        self.check()
        self.opened = True
        if self.resume:
            remove_stale_temporaries(self.out)
            return self.path
        if self.out.exists() and any(self.out.iterdir()):  # --overwrite (checked above)
            self.replacing = True
            self.path = self.out.with_name(f".{self.out.name}.new-{os.getpid()}")
            if self.path.exists() or self.path.is_symlink():
                remove_tree(self.path)  # our own pid: a leftover of this very process
        make_folder(self.path)
        return self.path

    def committed(self, step: int) -> None:
        """A complete checkpoint of ``step`` is in :attr:`path`; swap it in if replacing."""
        if self.replacing:
            try:
                swap_in(self.path, self.out)
            except OSError as exc:
                raise OutputError(
                    f"cannot replace {self.out} with the new run in {self.path} "
                    f"({exc.strerror}); {self.out} is as it was and the new run is in "
                    f"{self.path}"
                ) from None
            self.replacing, self.path = False, self.out
        self.last_step = step

    # ---- when something failed ----------------------------------------------------------
    def what_is_safe(self) -> str:
        """What a failed run leaves the user, as a clause for the error message."""
        if self.replacing:
            return f"{self.out} is unchanged (the new run had not written a checkpoint yet)"
        if self.last_step is not None:
            return (
                f"the previous checkpoint at step {self.last_step} is intact in {self.out}; "
                f"continue with diffuse train --resume --out {self.out}"
            )
        return f"no checkpoint was written to {self.out}"

    def fail(self, exc: BaseException) -> None:
        """Clean up after a failed run: a replacing run's sibling goes, ``out`` stays; a
        folder that is kept records the error in ``status.json`` (best effort)."""
        if not self.opened:
            return
        if self.replacing:  # the old run stays as it was; the unfinished new one goes
            try:
                remove_tree(self.path)
            except (OSError, OutputError):
                pass
            return
        if isinstance(exc, KeyboardInterrupt):
            return  # an interrupted run's status.json already says where it stopped
        status = self.path / "status.json"
        try:
            previous = json.loads(status.read_text()) if status.is_file() else {}
            if not isinstance(previous, dict):
                previous = {}
            write_json(
                status,
                {**previous, "complete": False, "error": f"{type(exc).__name__}: {exc}"},
            )
        except (OSError, ValueError, OutputError):
            pass

    def release(self) -> None:
        self.lock.release()
