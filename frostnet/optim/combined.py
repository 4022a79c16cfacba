"""Two optimizers stepped as one: e.g. SGD for the weights and Adam for EWGS's interval bounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from ._wrapper import OptimizerWrapper

__all__ = ["CombinedOptimizer"]


class CombinedOptimizer(OptimizerWrapper):
    """``main`` and ``extra`` behind one :class:`~torch.optim.Optimizer` interface.

    The EWGS paper and its authors' code train the quantizers' interval bounds with their own
    Adam (lr 1e-5) beside the weights' optimizer; torch has no optimizer holding groups of two
    algorithms, hence this small wrapper (written here, not taken from a library: torch.optim
    offers only chained *schedulers*). ``param_groups`` is main's groups followed by extra's (the
    same dicts), so one LR scheduler anneals both, each group from its own initial lr, as the
    authors' code does with two cosine schedulers; ``step()`` and ``zero_grad()`` act on both;
    ``state_dict()`` holds both (``"main"``, ``"extra"``) plus the combined ``param_groups``
    numbering that wrappers such as :class:`~frostnet.optim.GradBoost` index their own state by.
    A training loop therefore steps, zeroes and checkpoints it like any optimizer. ``.optimizer``
    is ``main`` (so wrapper chains, e.g. a transition-rate scheduler inside, are found through it);
    ``.extra`` is the second optimizer.

    Args:
        main: the optimizer of the model's weights (possibly a wrapper such as
            :class:`~frostnet.optim.TransitionRateScheduler`).
        extra: the second optimizer (its groups may start empty and be filled later, e.g. with
            the EWGS bounds created at the QAT switch).
    """

    def __init__(self, main: Optimizer, extra: Optimizer) -> None:
        for name, opt in (("main", main), ("extra", extra)):
            if not isinstance(opt, Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer instance, got {type(opt).__name__}")
        if main is extra:
            raise ValueError("main and extra must be two different optimizers")
        self.optimizer = main
        self.extra = extra
        self._init_optimizer_base()

    def __repr__(self) -> str:
        return f"CombinedOptimizer(\n  main={self.optimizer!r},\n  extra={self.extra!r}\n)"

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """main's groups, then extra's (the same dicts: LR schedulers reach both)."""
        return self.optimizer.param_groups + self.extra.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("CombinedOptimizer.param_groups is the concatenation of its two optimizers' groups; "
                             "change main.param_groups or extra.param_groups instead")

    @property
    def state(self) -> Any:  # type: ignore[override]
        """A merged, read-only copy of both optimizers' per-parameter state."""
        return {**self.optimizer.state, **self.extra.state}

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("CombinedOptimizer.state is read-only; load a state dict instead")

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step ``main`` (with the closure, if any), then ``extra`` on the same gradients."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.extra.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of both optimizers' parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.extra.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{"main": ..., "extra": ..., "param_groups": ..., "state": {}}``; ``param_groups``
        numbers the parameters over both optimizers in order (``Optimizer.state_dict``'s scheme)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        main, extra = self.optimizer.state_dict(), self.extra.state_dict()
        index = self._param_indices()
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return self._state_dict_post_hooks({"main": main, "extra": extra, "param_groups": groups, "state": {}})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`.

        Raises:
            ValueError: ``state_dict`` is not a CombinedOptimizer's (e.g. a checkpoint written
                before the second optimizer existed).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or "main" not in state_dict or "extra" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a CombinedOptimizer state dict (keys {keys}); it needs 'main' and 'extra' "
                             "entries: a checkpoint written with another optimizer layout cannot be resumed here")
        self.optimizer.load_state_dict(state_dict["main"])
        self.extra.load_state_dict(state_dict["extra"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
