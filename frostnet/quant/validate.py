"""Plausibility checks of quantization parameters and BatchNorm statistics at load time.

A weights file whose content hash was recomputed after an edit (anyone can re-sign one) passes
every integrity check, so the values themselves are checked: a zero, negative, infinite or
absurdly large scale, or a zero point outside its dtype's range, makes an INT8 model predict
one class for every input (or crash on its first forward) without any error at load time, and a
negative BatchNorm ``running_var`` makes the float model compute NaN.

The functions return the list of problems (empty when all is well); the loaders in
:mod:`frostnet.serialization` raise one error naming the file and every bad tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ._eager import _SEP  # how INT8 files name a quantized tensor's parts (``<key>@scale``)

__all__ = ["SCALE_RANGE", "bn_running_var_problems", "int8_qparam_problems"]

#: Accepted range of every INT8 scale (weights and activations). The lower end is torch's
#: observers' own floor (``torch.finfo(torch.float32).eps``, which they clamp every scale to);
#: the upper end lets one INT8 step be 1000, a range of +-127,000, far beyond any activation of
#: a normalized-image network (the zoo's published files use 0.02..0.92 for activations,
#: 0.0002..2.2 for weights) while a scale 1e6 times too large is caught.
SCALE_RANGE = (torch.finfo(torch.float32).eps, 1e3)

# eager-mode INT8 activations (conv outputs, the QuantStub's Quantize) are quint8
_ACT_ZERO_POINTS = (0, 255)


def _qparams(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any]
             ) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor, bool]]:
    """(scale name, zero-point name, scales, zero points, is an activation) of every quantized
    tensor (``<key>@scale``) and every module's output qparams (``<module>.scale`` beside
    ``<module>.zero_point``) in an INT8 file's tensors and layout."""

    def walk(key: str, desc: object) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor, bool]]:
        if not isinstance(desc, dict):
            return
        if desc.get("kind") == "qtensor":
            s, z = key + _SEP + "scale", key + _SEP + "zero_point"
            if s in tensors and z in tensors:
                yield s, z, tensors[s], tensors[z], False
        elif desc.get("kind") == "tuple" and isinstance(desc.get("items"), list):
            for i, item in enumerate(desc["items"]):
                yield from walk(f"{key}{_SEP}{i}", item)

    for key, desc in layout.items():
        yield from walk(key, desc)
        if key == "scale" or key.endswith(".scale"):
            zp_key = key[: -len("scale")] + "zero_point"
            if key in tensors and zp_key in tensors and isinstance(layout.get(zp_key), dict):
                yield key, zp_key, tensors[key], tensors[zp_key], True


def int8_qparam_problems(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any]) -> list[str]:
    """Problems with the scales and zero points stored in an INT8 file.

    Every activation scale must be finite and within :data:`SCALE_RANGE`, every activation zero
    point inside the quint8 range 0..255; weight scales must not exceed the range's upper end
    (the rest of their checks happen when the tensors are filled into the model). Works on the
    file's tensors and layout, so a bad file is refused before any model is built for it.

    Args:
        tensors: the file's tensors (:func:`frostnet.serialization.read_int8`).
        layout: the file's layout (state-dict key -> descriptor).

    Returns:
        One message per bad tensor, naming it and the bad value; empty if all are plausible.
    """
    problems = []
    lo, hi = SCALE_RANGE
    for scale_key, zp_key, scale, zero_point, activation in _qparams(tensors, layout):
        scale = scale.detach().double().reshape(-1)
        if not activation:
            # a quantized tensor: int8_state_from_tensors already refuses non-positive or
            # non-finite scales and out-of-range zero points (with its own messages); only the
            # upper bound is new
            bad = scale > hi
        else:
            bad = ~torch.isfinite(scale) | (scale < lo) | (scale > hi)
        if bad.any():
            problems.append(f"{scale_key!r} has scale {scale[bad][0].item():g} ({int(bad.sum())} of {scale.numel()} "
                            f"bad); scales must be finite and in [{lo:g}, {hi:g}]")
        if activation:
            qmin, qmax = _ACT_ZERO_POINTS
            zp = zero_point.detach().reshape(-1).long()
            out = (zp < qmin) | (zp > qmax)
            if out.any():
                problems.append(f"{zp_key!r} has zero point {int(zp[out][0])}, outside the quint8 range [{qmin}, {qmax}]")
    return problems


def bn_running_var_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Problems with the BatchNorm statistics of a float state dict: a ``running_var`` below 0
    (or NaN) makes BatchNorm divide by the square root of a negative number.

    Returns:
        One message per bad tensor, naming it and its smallest value; empty if all are >= 0.
    """
    problems = []
    for key, t in tensors.items():
        if key.endswith("running_var") and t.is_floating_point():
            bad = ~(t >= 0)  # also catches NaN
            if bad.any():
                problems.append(f"{key!r} has {int(bad.sum())} negative or NaN values (smallest {t.min().item():g}); "
                                "BatchNorm variances must be >= 0")
    return problems
