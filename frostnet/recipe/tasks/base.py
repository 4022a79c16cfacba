"""What every task tells the training loop: its data, model arguments, loss, metric and head.

The loop (:mod:`frostnet.recipe.engine`) is the same for every task; a :class:`Task` holds what
differs. One subclass per task, in a module named for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import nn

from ..config import RunConfig
from ..data import DataInfo

__all__ = ["DenseTask", "Task"]

#: (train batches, eval batches, data description); batches have ``__len__`` and ``epoch(e, start_batch)``.
DataTriple = tuple[Any, Any, DataInfo]


class Task(ABC):
    """The task-specific parts of a run.

    Attributes:
        name: the registry task name.
        report_keys: metric keys reported per evaluation (``fp32_<key>``, ``fake_quant_<key>``,
            ``int8_<key>``); the first is the headline.
    """

    name: str = ""
    report_keys: tuple[str, ...] = ()

    @abstractmethod
    def build_data(self, cfg: RunConfig, *, rank: int, world: int, eval_split: Optional[str] = None) -> DataTriple:
        """Train and eval batches for ``--data`` (``eval_split`` overrides the per-epoch split)."""

    def model_kwargs(self, cfg: RunConfig, info: DataInfo) -> dict[str, Any]:
        """Builder arguments that follow from the data (the number of classes)."""
        return {"num_classes": len(info.categories)}

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: Any, cfg: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass and loss of a training batch: ``(loss, sums)``.

        ``sums`` are added up over the epoch (always ``n``, the samples, and ``loss``, the loss
        times ``n``); :meth:`train_record` turns the totals into the epoch's log entries.
        """

    def train_record(self, sums: dict[str, float]) -> dict[str, float]:
        """The epoch's training entries of metrics.jsonl from the summed :meth:`loss` statistics."""
        n = max(1.0, sums.get("n", 0.0))
        return {("train_loss" if k == "loss" else f"train_{k}"): v / n for k, v in sums.items() if k != "n"}

    @abstractmethod
    def new_metric(self, num_classes: int) -> Any:
        """An empty metric (``update(outputs, targets)``, ``compute() -> dict``) for ``num_classes`` classes."""

    @abstractmethod
    def eval_step(self, model: nn.Module, x: torch.Tensor, y: Any, metric: Any) -> None:
        """Run ``model`` (in eval mode) on a batch and add the result to ``metric``."""

    def test_split(self, info: DataInfo) -> str:
        """The split the final figures come from: the test split where the data has one, else val."""
        return "test" if info.name in ("fashion_mnist", "fashion_scenes") else "val"

    def report(self, prefix: str, result: dict[str, Any]) -> dict[str, float]:
        """``{prefix_key: value}`` for the task's report keys of a metric result."""
        return {f"{prefix}_{k}": result[k] for k in self.report_keys if k in result}


class DenseTask(Task):
    """A task whose data comes from :func:`~frostnet.recipe.dense_data.build_dense_data`."""

    def build_data(self, cfg: RunConfig, *, rank: int, world: int, eval_split: Optional[str] = None) -> DataTriple:
        from ..dense_data import build_dense_data

        a = cfg.args
        return build_dense_data(a.data, task=self.name, input_size=a.input_size, batch_size=a.batch_size, seed=a.seed,
                                rank=rank, world=world, train_subset=a.train_subset, val_size=a.val_size,
                                eval_subset=a.eval_subset, workers=a.workers, eval_split=eval_split)
