"""Model registry: every public builder registers here under its name."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, Optional

from torch import nn

__all__ = ["check_foreign_kwargs", "get_model", "get_model_builder", "get_model_task", "list_models", "register_model"]

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


# Keywords that belong to the weights layer above the models (frostnet.get_model), and the
# torchvision/timm spellings users bring from elsewhere.
_WEIGHTS_KWARGS = ("weights", "quantized", "backend")
_FOREIGN_KWARGS = {"pretrained": "weights='DEFAULT' (or a name from frostnet.list_weights())",
                   "quantize": "quantized=True"}


def check_foreign_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise a TypeError naming frostnet's keyword for torchvision/timm's ``pretrained``/``quantize``."""
    for key, ours in _FOREIGN_KWARGS.items():
        if key in kwargs:
            raise TypeError(f"frostnet takes {ours}, not {key}={kwargs[key]!r} (the torchvision/timm spelling)")


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with random weights; ``kwargs`` go to its builder.

    Weights (``weights=``, ``quantized=``, ``backend=``) are attached one layer up: use
    :func:`frostnet.get_model`.
    """
    builder = get_model_builder(name)
    check_foreign_kwargs(kwargs)
    given = [k for k in _WEIGHTS_KWARGS if k in kwargs]
    if given:
        raise TypeError(f"frostnet.models.get_model builds architectures only; for {', '.join(given)}= use "
                        f"frostnet.get_model({name!r}, ...)")
    return builder(**kwargs)
