"""The integer ranges a method qconfig simulates (shared by the EWGS and OCTAV qconfigs)."""

from __future__ import annotations

from typing import Optional

from ._eager import _ACT_QUANT_MAX, check_backend


def quant_ranges(backend: str, weight_quant_range: Optional[tuple[int, int]],
                 act_quant_range: Optional[tuple[int, int]]) -> tuple[int, int, int, int]:
    """``(wmin, wmax, amin, amax)``: the given ranges, or INT8 weights and ``backend``'s activations."""
    check_backend(backend)
    wmin, wmax = weight_quant_range or (-128, 127)
    amin, amax = act_quant_range or (0, _ACT_QUANT_MAX[backend])
    return wmin, wmax, amin, amax
