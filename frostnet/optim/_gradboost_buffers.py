"""GradBoost's performance machinery: flat per-(device, dtype) buffers and the fused kernels.

Kept apart from :mod:`frostnet.optim.gradboost`, which holds the method itself (the equations a
reader checks against the paper); nothing here changes what is computed, only how fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch
from torch import Tensor


def _statistics_kernel(grad: Tensor, exp_max: Tensor, exp_min: Tensor, weight: Tensor) -> None:
    # M <- max(M, lerp(M, g, 1 - gamma1)) is gamma1 M + (1 - gamma1) max(M, g) (eq. 5 with
    # Algorithm 3's max), written so that the compiler emits one pass; likewise for m.
    exp_max.copy_(torch.maximum(exp_max, torch.lerp(exp_max, grad, weight)))
    exp_min.copy_(torch.minimum(exp_min, torch.lerp(exp_min, grad, weight)))


def _boost_kernel(
    grad: Tensor, exp_max: Tensor, exp_min: Tensor, log_u: Tensor, weight: Tensor, bound: Tensor,
    scale: Tensor,
) -> None:
    # The unfused path's arithmetic (statistics, noise magnitude, sign, scale) in one kernel.
    new_max = torch.maximum(exp_max, torch.lerp(exp_max, grad, weight))
    new_min = torch.minimum(exp_min, torch.lerp(exp_min, grad, weight))
    noise = torch.minimum((log_u * (new_min - new_max)).clamp(min=0.0), bound)
    exp_max.copy_(new_max)
    exp_min.copy_(new_min)
    grad.add_(torch.sign(grad) * noise * scale)


_KERNELS: Final[dict[str, Callable[..., None]]] = {
    "statistics": _statistics_kernel,
    "boost": _boost_kernel,
}
_compiled: dict[str, Callable[..., None]] = {}


def _run_compiled(name: str, *args: Tensor) -> None:
    """Run a fused kernel, compiling it with torch.compile on first use."""
    kernel = _compiled.get(name)
    if kernel is None:
        kernel = _compiled[name] = torch.compile(_KERNELS[name], fullgraph=True)
    try:
        kernel(*args)
    except Exception as e:  # compiler missing or broken: say what to do instead
        raise RuntimeError(
            f"GradBoost(fused=True) could not run its {name} kernel through torch.compile "
            f"({type(e).__name__}: {e}); construct GradBoost with fused=False"
        ) from e


def _bits_numel(numel: int) -> int:
    """Number of int64 random words that provide 16 bits for each of ``numel`` elements."""
    return (numel + 3) // 4


class _FlatLayout:
    """One (device, dtype) bucket of parameters laid out end to end in flat tensors.

    The statistics live in ``exp_max`` / ``exp_min`` (the per-parameter state holds views of
    them); ``grad``, ``work``, ``sign`` and ``bits`` are scratch: a gathered copy of the gradients,
    two work buffers and the random words, reused every step because fresh allocations cost
    more than the arithmetic on CPU. Memory: about 5.5 times the bucket's parameters (two of
    statistics, three and a half of scratch, the last one and a half only once boosting starts).
    """

    def __init__(self, params: list[Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.params = list(params)
        self.ids = tuple(id(p) for p in self.params)
        self.numels = [p.numel() for p in self.params]
        total = sum(self.numels)
        self.exp_max = torch.zeros(total, device=device, dtype=dtype)
        self.exp_min = torch.zeros(total, device=device, dtype=dtype)
        self.grad = torch.empty(total, device=device, dtype=dtype)
        self.work = torch.empty(total, device=device, dtype=dtype)
        self.max_views = self._views(self.exp_max)
        self.min_views = self._views(self.exp_min)
        self.grad_views = self._views(self.grad)
        self.work_views = self._views(self.work)
        self.sign: Tensor | None = None
        self.sign_views: list[Tensor] = []
        self.bits: Tensor | None = None

    def allocate_noise_buffers(self) -> None:
        """Allocate the buffers only the boost phase needs."""
        self.sign = torch.empty_like(self.work)
        self.sign_views = self._views(self.sign)
        self.bits = torch.empty(_bits_numel(self.work.numel()), device=self.work.device,
                                dtype=torch.int64)

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [t.view(p.shape) for t, p in zip(flat.split(self.numels), self.params)]
