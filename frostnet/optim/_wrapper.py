"""The base of the optimizer wrappers (GradBoost, transition-rate scheduling)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer


class OptimizerWrapper(Optimizer):
    """An :class:`~torch.optim.Optimizer` that delegates its groups, state and defaults to a
    wrapped optimizer (``self.optimizer``), so LR schedulers, ``zero_grad`` and
    ``add_param_group`` reach the wrapped one, and subclasses change only ``step`` and what
    they add to ``state_dict``.

    Subclasses set ``self.optimizer`` and then call :meth:`_init_optimizer_base` instead of
    ``Optimizer.__init__``, which would rebuild the parameter groups from scratch.
    """

    optimizer: Optimizer

    def _init_optimizer_base(self) -> None:
        # Only the base-class bookkeeping: the hooks behind register_step_pre_hook & co and the
        # profiling step patch.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups (shared, so LR schedulers reach it)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's per-parameter state (momentum buffers, moments, ...)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's default hyper-parameters."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients through the wrapped optimizer (see ``Optimizer.zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; the wrapper's own state for it starts empty."""
        self.optimizer.add_param_group(param_group)

    def _param_indices(self) -> dict[int, int]:
        """id(parameter) -> its index in ``state_dict()``: ``Optimizer.state_dict``'s numbering
        (a running index over the groups, first occurrence)."""
        index: dict[int, int] = {}
        start = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"], start):
                index.setdefault(id(p), i)
            start += len(group["params"])
        return index

    def _state_dict_post_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Run the hooks of ``register_state_dict_post_hook`` on a finished state dict."""
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict
