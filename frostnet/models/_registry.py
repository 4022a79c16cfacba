"""Model registry: every public builder registers here under its name."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, Optional

from torch import nn

__all__ = ["register_model", "list_models", "get_model", "get_model_builder", "get_model_task"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}
TASKS = ("classification", "segmentation", "detection")


def register_model(task: str = "classification", name: Optional[str] = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name`` (default: the function's name)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid choices: {', '.join(TASKS)}")

    def wrapper(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = fn
        _TASKS[key] = task
        return fn

    return wrapper


def list_models(pattern: Optional[str] = None, *, task: Optional[str] = None) -> list[str]:
    """Sorted names of registered models, filtered by a shell-style ``pattern`` and/or ``task``."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid choices: {', '.join(TASKS)}")
    names = sorted(_MODELS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if task:
        names = [n for n in names if _TASKS[n] == task]
    return names


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; unknown names raise with close matches."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (frostnet.list_models() lists all {len(_MODELS)} models)"
        ) from None


def get_model_task(name: str) -> str:
    """``classification``, ``segmentation`` or ``detection``."""
    get_model_builder(name)
    return _TASKS[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its builder, which rejects unknown ones."""
    return get_model_builder(name)(**kwargs)
