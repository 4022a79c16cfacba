"""Choosing a QAT method: the qconfig of plain STE, EWGS or OCTAV for a backend.

Every method plugs into the eager ``torch.ao.quantization`` flow through a :class:`QConfig`:
:func:`frostnet.quant.prepare_qat` inserts its fake quantizers like the default ones and
:func:`frostnet.quant.convert` turns the trained model into ordinary INT8 modules::

    qconfig = get_method_qconfig("octav", "x86", weight_quant_range=(-8, 7), act_quant_range=(0, 15))
    prepare_qat(model, "x86", qconfig=qconfig)      # W4A4 simulated, still INT8-convertible
    ...train...
    int8 = convert(model, "x86")
"""

from __future__ import annotations

from typing import Any, Optional

from torch.ao.quantization import QConfig

from ._eager import get_qconfig
from .ewgs import get_ewgs_qconfig
from .octav import get_octav_qconfig

__all__ = ["QAT_METHODS", "get_method_qconfig"]

#: QAT methods of :func:`get_method_qconfig`: ``ste`` is torch's default fake quantization.
QAT_METHODS: tuple[str, ...] = ("ste", "ewgs", "octav")


def get_method_qconfig(
    method: str,
    backend: str,
    *,
    weight_quant_range: Optional[tuple[int, int]] = None,
    act_quant_range: Optional[tuple[int, int]] = None,
    **options: Any,
) -> QConfig:
    """The QAT qconfig of ``method`` (one of :data:`QAT_METHODS`) for ``backend``.

    ``options`` go to :func:`get_octav_qconfig` (``gradient``, ``dynamic``, ...) or
    :func:`get_ewgs_qconfig` (``per_channel``); ``ste`` is :func:`~frostnet.quant.get_qconfig`
    (torch's moving-average min/max fake quantization) and takes none.
    """
    if method == "ste":
        if options:
            raise TypeError(f"the ste qconfig takes no options, got {sorted(options)}")
        return get_qconfig(backend, qat=True, weight_quant_range=weight_quant_range, act_quant_range=act_quant_range)
    if method == "ewgs":
        return get_ewgs_qconfig(backend, weight_quant_range=weight_quant_range, act_quant_range=act_quant_range,
                                **options)
    if method == "octav":
        return get_octav_qconfig(backend, qat=True, weight_quant_range=weight_quant_range,
                                 act_quant_range=act_quant_range, **options)
    raise ValueError(f"unknown QAT method {method!r}; valid choices: {', '.join(QAT_METHODS)}")
