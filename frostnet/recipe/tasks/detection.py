"""Object detection (SSD family): MultiBox loss inside the model, COCO mAP through pycocotools."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...metrics import DetectionMetric
from ..config import RunConfig
from .base import DenseTask

__all__ = ["DetectionTask"]


class DetectionTask(DenseTask):
    """``--data fashion_scenes[:opts]``, ``voc:<root>`` or ``coco:<images>,<annotations>``.

    The detectors compute their loss themselves (``model(images, targets)`` in train mode, as in
    torchvision); the task adds up its terms.
    """

    name = "detection"
    report_keys = ("map", "map_50", "map_75")

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
