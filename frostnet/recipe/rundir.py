"""One run per output directory: a lock held for the run's life, a fresh start, a run id.

Two runs into one ``--output-dir`` used to interleave ``metrics.jsonl`` and leave one run's
checkpoint beside the other's export; re-running into a finished directory appended to its log
and kept its stale export files, which ``tools/add_weights.py`` then published under the new
run's recipe. :func:`open_run_dir`:

* takes an exclusive ``fcntl`` lock on ``<dir>/.lock`` (released by the kernel when the process
  dies, so a killed run never leaves a stale lock) and records the holder's pid in it, so a
  second run fails at once naming that pid;
* refuses a non-empty directory unless the run resumes (``--resume``) or ``--overwrite`` is
  given; ``--overwrite`` deletes only the files the recipe writes (:data:`RUN_OUTPUTS`) and
  refuses if anything else is there, so a mistyped ``--output-dir ~`` loses nothing;
* gives the run a fresh id (uuid4 hex); the loop writes it into run.json and into every
  exported file's metadata (``run_id``), and ``tools/add_weights.py`` publishes only files
  whose ``run_id`` is the run's.

The lock is ``fcntl.flock`` written by hand rather than the ``filelock`` package because a
second run must name the holder's pid, which ``filelock`` (it truncates the lock file when it
opens it) cannot keep.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional, Union

__all__ = ["LOCK_NAME", "RUN_OUTPUTS", "RunDir", "RunDirError", "open_run_dir"]

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".lock"
#: Names (glob patterns) of everything the recipe writes into its output directory.
RUN_OUTPUTS = ("checkpoint.pt", "checkpoint.pt.sha256", "checkpoint.prev.pt", "checkpoint.prev.pt.sha256",
               "checkpoint.pt.tmp*", "checkpoint.pt.sha256.tmp*", "metrics.jsonl", "run.json", "export")


class RunDirError(RuntimeError):
    """The output directory is in use by another run, or holds results that would be mixed in."""


@dataclass
class RunDir:
    """A locked output directory (use as a context manager, or call :meth:`close`).

    Attributes:
        path: the directory.
        run_id: this run's id (uuid4 hex).
    """

    path: Path
    run_id: str
    _lock: Optional[IO[str]] = field(default=None, repr=False)

    def close(self) -> None:
        """Release the lock (the kernel also releases it when the process exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


def _lock(path: Path) -> IO[str]:
    lock_path = path / LOCK_NAME
    f = open(lock_path, "a+")  # not "w": that would erase the holder's pid before we know we hold the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise RunDirError(f"{path} is in use by another run ({_holder(lock_path)} holds {lock_path}); wait for it "
                              "to finish or choose another --output-dir") from None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _entries(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name != LOCK_NAME)


def _is_run_output(p: Path) -> bool:
    return any(p.match(pattern) for pattern in RUN_OUTPUTS)


def open_run_dir(path: PathLike, *, resume: bool, overwrite: bool, run_id: Optional[str] = None) -> RunDir:
    """Create and lock ``path`` for a run; refuse to mix this run's files with another's.

    Call it on rank 0 before any work (after the flags are validated, before the checkpoint is
    loaded), and keep the result open until the run has exported.

    Args:
        path: the ``--output-dir``.
        resume: the run resumes from a checkpoint (a non-empty directory is expected).
        overwrite: delete the recipe's files of an earlier run first (``--overwrite``).
        run_id: keep this id (a resumed run keeps the one in its checkpoint); default a new one.

    Raises:
        RunDirError: another process holds the lock (naming its pid); the directory is not
            empty and neither ``resume`` nor ``overwrite`` is set; or ``overwrite`` would have to
            delete files the recipe did not write (naming them).
        ValueError: ``resume`` and ``overwrite`` together.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: resume continues the run in the directory, "
                         "--overwrite deletes it; pass one")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    try:
        entries = _entries(path)
        if entries and not resume:
            foreign = [p.name for p in entries if not _is_run_output(p)]
            if not overwrite:
                raise RunDirError(f"{path} is not empty (it holds {', '.join(p.name for p in entries[:5])}"
                                  f"{', ...' if len(entries) > 5 else ''}): pass --resume to continue that run, "
                                  "--overwrite to delete its results and start anew, or choose another --output-dir")
            if foreign:
                raise RunDirError(f"--overwrite would delete {path}'s files, but {foreign[:5]} were not written by the "
                                  "recipe: is this the right --output-dir? Move them away or choose another directory")
            for p in entries:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    except BaseException:
        lock.close()
        raise
    return RunDir(path, run_id or uuid.uuid4().hex, lock)
