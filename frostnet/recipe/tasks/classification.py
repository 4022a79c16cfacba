"""Image classification: cross-entropy (label smoothing), top-1."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...metrics import ClassificationMetric
from ..config import RunConfig
from ..data import DataInfo, build_data
from .base import DataTriple, Task

__all__ = ["ClassificationTask"]


class ClassificationTask(Task):
    """``--data fashion_mnist[:<root>]`` or ``imagefolder:<root>``; the head is ``classifier.``."""

    name = "classification"
    report_keys = ("top1",)

    def build_data(self, cfg: RunConfig, *, rank: int, world: int, eval_split: Optional[str] = None) -> DataTriple:
        a = cfg.args
        return build_data(a.data, input_size=a.input_size, batch_size=a.batch_size, seed=a.seed, rank=rank, world=world,
                          train_subset=a.train_subset, val_size=a.val_size, eval_subset=a.eval_subset, workers=a.workers,
                          eval_split=eval_split, erase_p=cfg.get("random_erasing", 0.0))

    def model_kwargs(self, cfg: RunConfig, info: DataInfo) -> dict[str, Any]:
        return {"num_classes": len(info.categories), "dropout": cfg.args.dropout}

    def loss(self, model: nn.Module, x: torch.Tensor, y: Any, cfg: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=cfg.args.label_smoothing)
        n = float(y.numel())
        return loss, {"n": n, "loss": loss.item() * n, "top1": 100.0 * (out.argmax(1) == y).sum().item()}

    def new_metric(self, num_classes: int) -> ClassificationMetric:
        return ClassificationMetric()

    def eval_step(self, model: nn.Module, x: torch.Tensor, y: Any, metric: Any) -> None:
        metric.update(model(x), y)
