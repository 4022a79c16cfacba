"""Training checkpoints that are verified before they are loaded, with one previous good copy.

``torch.load`` does not check the zip CRCs of a checkpoint: one flipped byte resumes a run with a
corrupted optimizer state and exit code 0. So every checkpoint gets a sha256 digest beside it
(``checkpoint.pt.sha256``), and :func:`load_checkpoint` verifies it before unpickling anything.
The previous good checkpoint is kept as ``checkpoint.prev.pt`` (+ its digest) to fall back to.

:func:`save_checkpoint` writes in this order, so that a crash at any point leaves at least one
complete checkpoint whose digest is on disk:

1. the new checkpoint into a temporary file (fsynced) and its digest computed;
2. the current checkpoint, if it verifies, renamed to ``.prev.pt``, then its digest likewise
   (a bad current checkpoint is dropped instead, keeping the older good ``.prev.pt``);
3. the new digest written (atomically) to ``checkpoint.pt.sha256``;
4. the temporary file renamed to ``checkpoint.pt``.

A crash inside step 2 leaves ``.prev.pt`` next to the digest of the *current* file, and a crash
between 3 and 4 leaves no ``checkpoint.pt`` at all. The loader therefore accepts a file whose
sha256 equals *either* recorded digest: a digest is only ever written for a complete checkpoint,
so a match proves the file is one, and the loader says which file it used.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["CheckpointError", "DiskFullError", "LoadedCheckpoint", "digest_path", "load_checkpoint",
           "previous_path", "save_checkpoint"]

PathLike = Union[str, os.PathLike]
_DIGEST_SUFFIX = ".sha256"
# the messages of torch's zip writer when a write fails part-way (it turns errno into text)
_DISK_FULL_HINTS = ("No space left", "unexpected pos", "file write failed")


class CheckpointError(RuntimeError):
    """No checkpoint could be written or loaded; the message names the file(s) and the fix."""


class DiskFullError(CheckpointError):
    """The checkpoint did not fit on the disk (the previous checkpoint is kept intact)."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` found.

    Attributes:
        state: the checkpoint dict.
        path: the file it came from (``checkpoint.prev.pt`` after a fallback).
        fallback_reason: why the requested file was not used (``None`` if it was); the loop logs it.
    """

    state: dict[str, Any]
    path: Path
    fallback_reason: Optional[str] = None


def digest_path(path: PathLike) -> Path:
    """``<checkpoint>.sha256``: the file holding the checkpoint's hex sha256."""
    path = Path(path)
    return path.with_name(path.name + _DIGEST_SUFFIX)


def previous_path(path: PathLike) -> Path:
    """``checkpoint.prev.pt`` for ``checkpoint.pt``: the previous good checkpoint."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read_digest(path: Path) -> Optional[str]:
    try:
        text = digest_path(path).read_text().split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text[0] if text else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(h in str(e) for h in _DISK_FULL_HINTS)


def _verified(path: Path, digests: Iterable[Optional[str]]) -> bool:
    return path.is_file() and _sha256(path) in {d for d in digests if d}


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically with its digest; keep the previous good checkpoint.

    Args:
        path: the checkpoint file (``<output-dir>/checkpoint.pt``); its directory must exist.
        state: what ``torch.save`` writes (tensors, numbers, strings, dicts and lists of them).

    Returns:
        The new checkpoint's hex sha256.

    Raises:
        DiskFullError: the disk filled up; the temporary file is removed, the previous checkpoint
            (if any) is intact, and the message says how much space is free.
        CheckpointError: any other write failure, naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(dict(state), f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            if _is_disk_full(e):
                free = shutil.disk_usage(path.parent).free
                raise DiskFullError(
                    f"the disk holding {path.parent} is full ({free / 1e6:.1f} MB free): checkpoint {path.name} was not "
                    f"written ({e}); the previous checkpoint is intact. Free some space and resume with --resume {path}"
                ) from e
            raise CheckpointError(f"writing checkpoint {path} failed: {e}") from e
        digest = _sha256(tmp)
        prev = previous_path(path)
        current_digest = _read_digest(path)
        if path.exists():
            if _verified(path, [current_digest]):
                os.replace(path, prev)
                os.replace(digest_path(path), digest_path(prev))
            else:  # a damaged current file must not push out the good previous one
                path.unlink()
        _write_atomic(digest_path(path), digest + "\n")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _problem(path: Path, digests: list[Optional[str]], required_keys: Iterable[str],
             allow_missing_digest: bool) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """(problem, state): exactly one of them is ``None``."""
    if not path.exists():
        return f"{path} does not exist", None
    if path.stat().st_size == 0:
        return f"{path} is empty (the run was killed while writing it?)", None
    known = [d for d in digests if d]
    if not known and not allow_missing_digest:
        return (f"{path} has no digest file {digest_path(path).name}, so it cannot be verified (a checkpoint "
                "written before digests existed resumes with --allow-unverified-checkpoint)"), None
    if known and _sha256(path) not in known:
        return f"{path} does not match its sha256 digest (corrupted or truncated)", None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for bad files
        return f"{path} is not a readable checkpoint ({type(e).__name__}: {e})", None
    if not isinstance(state, dict):
        return f"{path} holds a {type(state).__name__}, not a checkpoint dict", None
    missing = [k for k in required_keys if k not in state]
    if missing:
        return f"{path} lacks the keys {missing} (written by another program or version?)", None
    return None, state


def load_checkpoint(path: PathLike, *, required_keys: Iterable[str], allow_missing_digest: bool = False,
                    fallback: bool = True) -> LoadedCheckpoint:
    """Verify ``path`` against its digest, then load it; fall back to ``checkpoint.prev.pt``.

    Args:
        path: the checkpoint to resume from.
        required_keys: keys the checkpoint must hold (e.g. ``("model", "optimizer", "epoch")``).
        allow_missing_digest: accept a checkpoint without a digest file (written before digests
            existed); it is still loaded with ``weights_only=True`` and key-checked.
        fallback: try the previous good checkpoint when ``path`` fails.

    Returns:
        A :class:`LoadedCheckpoint`; its ``fallback_reason`` says why ``path`` was skipped.

    Raises:
        CheckpointError: neither file is usable; names each file's problem and the fix.
    """
    path = Path(path)
    prev = previous_path(path)
    required_keys = tuple(required_keys)
    # a crash while save_checkpoint rotates files can leave a good file beside the other's digest
    digests = [_read_digest(path), _read_digest(prev)]
    problem, state = _problem(path, digests, required_keys, allow_missing_digest)
    if state is not None:
        return LoadedCheckpoint(state, path)
    problems = [problem]
    if fallback and prev.exists():
        prev_problem, state = _problem(prev, digests, required_keys, allow_missing_digest)
        if state is not None:
            warnings.warn(f"{problem}; resuming from the previous good checkpoint {prev} instead", stacklevel=2)
            return LoadedCheckpoint(state, prev, fallback_reason=problem)
        problems.append(prev_problem)
    raise CheckpointError("cannot resume: " + "; ".join(str(p) for p in problems) + ". Resume from another good "
                          f"checkpoint (--resume <file>), or delete {path.parent} (or pass --overwrite) to start anew")
