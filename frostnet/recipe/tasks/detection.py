"""Object detection (SSD family): MultiBox loss inside the model, COCO mAP through pycocotools."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...metrics import DetectionMetric
from ..config import RunConfig
from ..dense_data import build_dense_data
from .base import DataTriple, Task

__all__ = ["DetectionTask"]


class DetectionTask(Task):
    """``--data fashion_scenes[:opts]``, ``voc:<root>`` or ``coco:<images>,<annotations>``.

    The detectors compute their loss themselves (``model(images, targets)`` in train mode, as in
    torchvision); the task adds up its terms.
    """

    name = "detection"
    report_keys = ("map", "map_50", "map_75")

    def build_data(self, cfg: RunConfig, *, rank: int, world: int, eval_split: Optional[str] = None) -> DataTriple:
        a = cfg.args
        return build_dense_data(a.data, task=self.name, input_size=a.input_size, batch_size=a.batch_size, seed=a.seed,
                                rank=rank, world=world, train_subset=a.train_subset, val_size=a.val_size,
                                eval_subset=a.eval_subset, workers=a.workers, eval_split=eval_split)

    def loss(self, model: nn.Module, x: torch.Tensor, y: Any, cfg: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
        terms = model(x, y)
        loss = sum(terms.values())
        n = float(x.shape[0])
        sums = {"n": n, "loss": loss.item() * n}
        sums.update({f"loss_{k}": v.item() * n for k, v in terms.items()})
        return loss, sums

    def new_metric(self, num_classes: int) -> DetectionMetric:
        return DetectionMetric()

    def eval_step(self, model: nn.Module, x: torch.Tensor, y: Any, metric: Any) -> None:
        metric.update(model(x), y)
