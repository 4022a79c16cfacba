"""Import of the FrostNet authors' released checkpoints.

Their state-dict layout is this project's (``conv1.conv.0.weight``, ``layer3.0.squeeze_conv...``),
so importing means unwrapping (``state_dict``/``state_dict_ema``/``model``), stripping DataParallel
``module.`` prefixes, recognising which variant and width the tensors belong to, and a strict load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import torch

from .frostnet import MODES, WIDTHS, FrostNet, _model_name, frostnet

__all__ = ["unwrap_state_dict", "identify_frostnet", "load_reference_checkpoint"]

_WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model_ema", "model")


def unwrap_state_dict(obj: Any, *, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Return the plain tensor state dict inside a training checkpoint, without ``module.`` prefixes."""
    if isinstance(obj, Mapping):
        order = _WRAPPER_KEYS if prefer_ema else ("state_dict", "model", "state_dict_ema", "model_ema")
        for key in order:
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key], prefer_ema=prefer_ema)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            out = {}
            for k, v in obj.items():
                while k.startswith("module."):
                    k = k[len("module."):]
                out[k] = v
            return out
    raise ValueError(
        "not a FrostNet checkpoint: expected a dict of tensors, possibly under one of "
        f"{', '.join(_WRAPPER_KEYS)}; got {type(obj).__name__}"
        + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, Mapping) else "")
    )


def identify_frostnet(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, float, int]:
    """(mode, width, num_classes) of the FrostNet whose parameter shapes match ``state_dict``."""
    if "classifier.2.weight" not in state_dict:
        raise ValueError("not a FrostNet state dict: no 'classifier.2.weight' key")
    num_classes = int(state_dict["classifier.2.weight"].shape[0])
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for mode in MODES:
        for width in WIDTHS:
            with torch.device("meta"):
                ref = frostnet(mode, width, num_classes=num_classes).state_dict()
            if shapes == {k: tuple(v.shape) for k, v in ref.items()}:
                return mode, width, num_classes
    raise ValueError(
        f"the state dict ({len(shapes)} tensors) matches no FrostNet "
        f"({', '.join(MODES)} at widths {', '.join(map(str, WIDTHS))}); is it another architecture?"
    )


def load_reference_checkpoint(
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
) -> tuple[FrostNet, str]:
    """Build the matching FrostNet and load the authors' checkpoint into it strictly.

    ``checkpoint`` is a path to their ``.pth`` file (read with ``weights_only=True``: no pickled
    code runs) or an already loaded dict. Returns the model (eval mode) and its registry name.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = unwrap_state_dict(checkpoint)
    mode, width, num_classes = identify_frostnet(state_dict)
    model = frostnet(mode, width, num_classes=num_classes)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), _model_name(mode, width)
