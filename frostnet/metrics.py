"""Evaluation metrics of the three tasks: classification top-1, segmentation mIoU, detection COCO mAP.

Every metric accumulates over ``update`` calls and reports with ``compute``; ``primary`` names the
key a training loop logs as its headline, ``merge`` folds in another instance's state (e.g. the
metrics of other DDP ranks gathered with ``torch.distributed.all_gather_object``) and ``reset``
starts over. Build the right one with :func:`metric_for_task`.

- :class:`ClassificationMetric`: top-1 in percent and mean cross-entropy.
- :class:`SegmentationMetric`: a confusion matrix over ``num_classes``; mIoU and pixel accuracy as
  fractions, pixels labelled ``ignore_index`` never count.
- :class:`DetectionMetric`: COCO mAP@[.5:.95], mAP@.5 and mAP@.75 computed by pycocotools'
  ``COCOeval`` (the reference implementation, so numbers compare with published COCO-style ones).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

__all__ = [
    "ClassificationMetric",
    "DetectionMetric",
    "Metric",
    "SegmentationMetric",
    "TASKS",
    "metric_for_task",
]


class Metric(Protocol):
    """What a training loop needs of a metric."""

    primary: ClassVar[str]

    def update(self, *args: object) -> None: ...

    def compute(self) -> dict[str, object]: ...

    def reset(self) -> None: ...


def _check_same_type(self: object, other: object) -> None:
    if type(other) is not type(self):
        raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")


# ---- classification -------------------------------------------------------------------------------


class ClassificationMetric:
    """Top-1 accuracy (percent) and mean cross-entropy over every sample seen.

    ``compute()`` returns ``{"top1": percent, "loss": mean CE, "n": samples}``.

    Args:
        num_classes: if given, logits must have this many columns.
    """

    primary: ClassVar[str] = "top1"

    def __init__(self, num_classes: Optional[int] = None) -> None:
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen."""
        self.correct = 0
        self.total = 0
        self.loss_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits: ``(N, C)`` class scores.
            targets: ``(N,)`` integer class indices in ``0..C-1``.
        """
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"logits must be a float (N, C) tensor, got {logits.dtype} of shape {tuple(logits.shape)}")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the metric was built for {self.num_classes}")
        if targets.shape != logits.shape[:1] or targets.is_floating_point():
            raise ValueError(f"targets must be integer class indices of shape ({logits.shape[0]},), got "
                             f"{targets.dtype} of shape {tuple(targets.shape)}")
        bad = (targets < 0) | (targets >= logits.shape[1])
        if bad.any():
            raise ValueError(f"target class {targets[bad][0].item()} out of range; valid classes are 0..{logits.shape[1] - 1}")
        self.loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        self.correct += (logits.argmax(1) == targets).sum().item()
        self.total += targets.numel()

    def merge(self, other: ClassificationMetric) -> None:
        """Add the samples another instance has seen."""
        _check_same_type(self, other)
        self.correct += other.correct
        self.total += other.total
        self.loss_sum += other.loss_sum

    def compute(self) -> dict[str, float]:
        """``{"top1", "loss", "n"}``; top-1 and loss are nan before any sample."""
        if self.total == 0:
            return {"top1": math.nan, "loss": math.nan, "n": 0}
        return {"top1": 100.0 * self.correct / self.total, "loss": self.loss_sum / self.total, "n": self.total}


# ---- segmentation ---------------------------------------------------------------------------------

SegmentationOutput = Union[torch.Tensor, Mapping[str, torch.Tensor]]


class SegmentationMetric:
    """Mean IoU and pixel accuracy from a confusion matrix; ``ignore_index`` pixels never count.

    mIoU averages the IoU of the classes that occur, in the targets or in the predictions, over
    everything seen (a class whose union is non-empty). A class that is never labelled nor
    predicted has no IoU (0/0): it is nan in ``iou_per_class`` and left out of the mean. This is
    the same number as torchvision's reference (mean over all classes) whenever every class
    occurs, as on a full validation set; on small subsets (a tiny-scale run, a few images) the
    all-class mean would be nan and say nothing. A class that is predicted but never labelled
    has IoU 0 and does count, so spurious predictions are penalised.

    Args:
        num_classes: classes including background; target ids are ``0..num_classes-1``.
        ignore_index: target value of pixels to skip (borders, unlabelled); outside the class ids.
    """

    primary: ClassVar[str] = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (0..{num_classes - 1}); choose a value "
                             f"outside them, e.g. 255")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget every pixel seen."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # rows: target
        self.loss_sum = 0.0
        self.loss_pixels = 0

    @torch.no_grad()
    def update(self, logits_or_preds: SegmentationOutput, targets: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits_or_preds: ``(N, C, H, W)`` float logits (then the cross-entropy is tracked too),
                ``(N, H, W)`` integer class predictions, or a torchvision-style model output
                ``{"out": logits, ...}``.
            targets: ``(N, H, W)`` integer masks, ids ``0..C-1`` or ``ignore_index``.
        """
        out = logits_or_preds
        if isinstance(out, Mapping):
            if "out" not in out:
                raise ValueError(f"a dict of outputs needs the key 'out' (the logits), got keys {sorted(out)}")
            out = out["out"]
        if targets.dim() != 3 or targets.is_floating_point():
            raise ValueError(f"targets must be integer (N, H, W) masks, got {targets.dtype} of shape {tuple(targets.shape)}")
        logits = out if out.is_floating_point() else None
        if logits is not None:
            if logits.dim() != 4 or logits.shape[1] != self.num_classes:
                raise ValueError(f"logits must be (N, {self.num_classes}, H, W) for {self.num_classes} classes, "
                                 f"got shape {tuple(logits.shape)}")
            preds = logits.argmax(1)
        elif out.dim() == 3:
            preds = out
        else:
            raise ValueError(f"predictions must be float (N, C, H, W) logits or integer (N, H, W) class ids, got "
                             f"{out.dtype} of shape {tuple(out.shape)}")
        if preds.shape != targets.shape:
            raise ValueError(f"predictions of shape {tuple(preds.shape)} do not match masks of shape "
                             f"{tuple(targets.shape)}; segmentation outputs are at the mask's resolution "
                             f"(resize the masks with nearest interpolation, or upsample the logits)")
        valid = targets != self.ignore_index
        bad = valid & ((targets < 0) | (targets >= self.num_classes))
        if bad.any():
            raise ValueError(f"mask value {targets[bad][0].item()} is neither a class id (0..{self.num_classes - 1}) "
                             f"nor the ignore index {self.ignore_index}")
        bad = (preds < 0) | (preds >= self.num_classes)
        if bad.any():
            raise ValueError(f"predicted class {preds[bad][0].item()} out of range 0..{self.num_classes - 1}")
        t, p = targets[valid].long().cpu(), preds[valid].long().cpu()
        self.confusion += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).view_as(self.confusion)
        if logits is not None:
            self.loss_sum += F.cross_entropy(logits.float(), targets.long(), ignore_index=self.ignore_index,
                                             reduction="sum").item()
            self.loss_pixels += int(valid.sum())

    def merge(self, other: SegmentationMetric) -> None:
        """Add the pixels another instance has seen (same classes and ignore index)."""
        _check_same_type(self, other)
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"cannot merge a metric over {other.num_classes} classes (ignore {other.ignore_index}) "
                             f"into one over {self.num_classes} (ignore {self.ignore_index})")
        self.confusion += other.confusion
        self.loss_sum += other.loss_sum
        self.loss_pixels += other.loss_pixels

    def compute(self) -> dict[str, Union[float, list[float]]]:
        """``{"miou", "pixel_acc", "iou_per_class"}`` as fractions in [0, 1], plus ``"loss"`` (mean
        cross-entropy per counted pixel) when logits were given. nan where nothing was counted."""
        conf = self.confusion.double()
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        iou = tp / union  # nan where the class never occurred (0/0)
        total = conf.sum()
        result: dict[str, Union[float, list[float]]] = {
            "miou": iou.nanmean().item() if (union > 0).any() else math.nan,
            "pixel_acc": (tp.sum() / total).item() if total > 0 else math.nan,
            "iou_per_class": iou.tolist(),
        }
        if self.loss_pixels:
            result["loss"] = self.loss_sum / self.loss_pixels
        return result


# ---- detection ------------------------------------------------------------------------------------


def _as_cpu(t: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t).as_subclass(torch.Tensor).detach().cpu()


class DetectionMetric:
    """COCO box mAP through pycocotools' ``COCOeval``, from detections and targets in memory.

    ``compute()`` returns ``{"map": mAP@[.5:.95], "map_50", "map_75", "n": images}`` as fractions.
    COCO's rules apply: at most 100 detections per image count (the highest scored), a class
    without any ground truth is left out of the mean, and detections on images without ground
    truth are false positives of their class. With no ground truth at all the mAP is undefined:
    nan. COCOeval's progress printing is silenced.

    Args:
        num_classes: classes including background, as the detectors count them; labels are then
            checked to lie in ``1..num_classes-1`` and those are the evaluated categories. None:
            the categories are the labels seen.
    """

    primary: ClassVar[str] = "map"

    def __init__(self, num_classes: Optional[int] = None) -> None:
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 (classes include background) or None, "
                             f"got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self.detections: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []

    def _checked(self, item: Mapping[str, torch.Tensor], index: int, kind: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if not isinstance(item, Mapping) or any(k not in item for k in keys):
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(f"{kind} {index} must be a dict with keys {list(keys)}, got {got}")
        out = {k: _as_cpu(item[k]) for k in keys}
        boxes = out["boxes"].float().reshape(-1, 4) if out["boxes"].numel() == 0 else out["boxes"].float()
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{kind} {index}: boxes must be (K, 4) xyxy pixels, got shape {tuple(boxes.shape)}")
        count = boxes.shape[0]
        for k in keys[1:]:
            if out[k].shape != (count,):
                raise ValueError(f"{kind} {index}: {k} must have shape ({count},) like its boxes, got {tuple(out[k].shape)}")
        labels = out["labels"] if out["labels"].numel() else out["labels"].long()  # torch.tensor([]) is float
        if labels.is_floating_point():
            raise ValueError(f"{kind} {index}: labels must be integers, got {labels.dtype}")
        high = self.num_classes - 1 if self.num_classes is not None else None
        bad = (labels < 1) | (labels > high) if high is not None else labels < 1
        if bad.any():
            valid = f"1..{high}" if high is not None else ">= 1"
            raise ValueError(f"{kind} {index}: label {labels[bad][0].item()} out of range; valid labels are {valid} "
                             f"(0 is background)")
        if kind == "target":
            degenerate = (boxes[:, 2:] < boxes[:, :2]).any(dim=1)
            if degenerate.any():
                raise ValueError(f"target {index}: box {boxes[degenerate][0].tolist()} has x2 < x1 or y2 < y1; boxes "
                                 f"are xyxy pixels")
        out["boxes"] = boxes
        out["labels"] = labels.long()
        return out

    def update(self, detections: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add a batch of images.

        Args:
            detections: per image ``boxes`` ``(D, 4)`` xyxy pixels, ``scores`` ``(D,)`` and
                ``labels`` ``(D,)`` (a detector's eval output); ``D`` may be 0.
            targets: per image ``boxes`` ``(K, 4)`` xyxy pixels and ``labels`` ``(K,)``; ``K`` may be 0.
        """
        if len(detections) != len(targets):
            raise ValueError(f"got detections for {len(detections)} images and targets for {len(targets)}")
        start = len(self.targets)
        dets = [self._checked(d, start + i, "detection", ("boxes", "scores", "labels")) for i, d in enumerate(detections)]
        tgts = [self._checked(t, start + i, "target", ("boxes", "labels")) for i, t in enumerate(targets)]
        self.detections += dets
        self.targets += tgts

    def merge(self, other: DetectionMetric) -> None:
        """Append the images another instance has seen."""
        _check_same_type(self, other)
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a metric over num_classes={other.num_classes} into one over {self.num_classes}")
        self.detections += other.detections
        self.targets += other.targets

    def _categories(self) -> list[int]:
        if self.num_classes is not None:
            return list(range(1, self.num_classes))
        seen = {int(c) for item in self.targets + self.detections for c in item["labels"].tolist()}
        return sorted(seen)

    def compute(self) -> dict[str, float]:
        """``{"map", "map_50", "map_75", "n"}``; the mAPs are nan without any ground-truth box."""
        # Imported here: pycocotools is needed only when detection is evaluated.
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        n = len(self.targets)
        images = [{"id": i} for i in range(n)]
        categories = [{"id": c} for c in self._categories()]
        gt_anns, dt_anns = [], []
        for i, (det, tgt) in enumerate(zip(self.detections, self.targets)):
            for box, label in zip(box_convert(tgt["boxes"], "xyxy", "xywh").tolist(), tgt["labels"].tolist()):
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": label, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
            for box, score, label in zip(box_convert(det["boxes"], "xyxy", "xywh").tolist(), det["scores"].tolist(),
                                         det["labels"].tolist()):
                dt_anns.append({"id": len(dt_anns) + 1, "image_id": i, "category_id": label, "bbox": box,
                                "score": score, "area": box[2] * box[3], "iscrowd": 0})
        if not gt_anns:
            return {"map": math.nan, "map_50": math.nan, "map_75": math.nan, "n": n}
        # The result set is built like the ground truth instead of with COCO.loadRes, which fails
        # on an empty result list (it reads anns[0]) and prints; the fields are the ones loadRes sets.
        with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt_anns}
            coco_dt.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
            coco_gt.createIndex()
            coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        ap, ap50, ap75 = (float(v) for v in evaluator.stats[:3])
        return {"map": ap, "map_50": ap50, "map_75": ap75, "n": n}


# ---- by task --------------------------------------------------------------------------------------

TASKS = ("classification", "segmentation", "detection")


def metric_for_task(task: str, num_classes: int) -> Union[ClassificationMetric, SegmentationMetric, DetectionMetric]:
    """A fresh metric for ``task`` (as ``frostnet.models.get_model_task`` names it).

    Args:
        task: one of ``TASKS``.
        num_classes: the model's classes (including background for segmentation and detection).
    """
    if task == "classification":
        return ClassificationMetric(num_classes)
    if task == "segmentation":
        return SegmentationMetric(num_classes)
    if task == "detection":
        return DetectionMetric(num_classes)
    raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
