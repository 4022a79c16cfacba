"""MultiBox loss: prior matching, SmoothL1 on positives, cross-entropy with hard-negative mining."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou

from .box_coder import BoxCoder

__all__ = ["match_priors", "hard_negative_mask", "multibox_loss"]


def match_priors(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    priors: torch.Tensor,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every prior a ground truth (SSD matching).

    A prior takes the ground truth it overlaps most if that IoU is at least ``iou_threshold``;
    on top of that every ground truth claims its best prior, whatever the IoU, so no object is
    left without a positive (small or oddly shaped boxes would otherwise never be trained).

    Args:
        gt_boxes: ``(K, 4)`` xyxy, normalized like the priors; ``K`` may be 0.
        gt_labels: ``(K,)`` class indices, 1.. (0 is background).
        priors: ``(P, 4)`` cxcywh.
        iou_threshold: IoU needed to be a positive.

    Returns:
        ``(matched_boxes (P, 4), labels (P,))``: the assigned ground-truth box of every prior (zeros
        for an image without boxes) and its label, 0 for background.
    """
    num_priors = priors.shape[0]
    if gt_boxes.numel() == 0:
        return priors.new_zeros(num_priors, 4), torch.zeros(num_priors, dtype=torch.int64, device=priors.device)
    iou = box_iou(gt_boxes, box_convert(priors, "cxcywh", "xyxy"))  # (K, P)
    best_iou, best_gt = iou.max(dim=0)  # per prior
    best_prior = iou.argmax(dim=1)  # per ground truth
    # A loop, not a scatter: when two ground truths share a best prior the later one wins, the
    # same rule every time (scatter with repeated indices is unspecified).
    for k, p in enumerate(best_prior.tolist()):
        best_gt[p] = k
        best_iou[p] = 2.0  # above any threshold
    labels = gt_labels[best_gt].clone()
    labels[best_iou < iou_threshold] = 0
    return gt_boxes[best_gt], labels


def hard_negative_mask(loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: int = 3) -> torch.Tensor:
    """The ``neg_pos_ratio`` x #positives negatives with the highest loss, per image.

    Args:
        loss: ``(N, P)`` classification loss of every prior (only its order matters).
        positive: ``(N, P)`` bool mask of positive priors.
        neg_pos_ratio: negatives kept per positive (3 in SSD).

    Returns:
        ``(N, P)`` bool mask of the selected negatives. An image without positives selects none.
    """
    loss = loss.detach().clone()
    loss[positive] = -float("inf")  # positives sort last, never picked as negatives
    order = loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = (neg_pos_ratio * num_pos).clamp(max=positive.shape[1] - num_pos)
    return rank < num_neg


def multibox_loss(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    targets: Sequence[dict[str, torch.Tensor]],
    box_coder: BoxCoder,
    *,
    iou_threshold: float = 0.5,
    neg_pos_ratio: int = 3,
) -> dict[str, torch.Tensor]:
    """SSD's MultiBox loss, both terms divided by the number of positives in the batch.

    Args:
        loc: ``(N, P, 4)`` predicted offsets.
        conf: ``(N, P, C)`` class logits, class 0 background.
        priors: ``(P, 4)`` normalized cxcywh.
        targets: per image ``boxes`` (normalized xyxy, ``(K, 4)``) and ``labels`` (``(K,)``, 1..C-1).
        box_coder: encodes the matched boxes.
        iou_threshold: matching IoU.
        neg_pos_ratio: hard negatives per positive.

    Returns:
        ``{"bbox_regression": SmoothL1, "classification": cross-entropy}``. Images without boxes
        only have negatives; with no positive to balance against they add nothing, and a batch
        without any box gives zero losses that still backpropagate (zeros).
    """
    matched, labels = [], []
    for t in targets:
        boxes, lab = match_priors(t["boxes"], t["labels"], priors, iou_threshold)
        matched.append(boxes)
        labels.append(lab)
    labels_t = torch.stack(labels)  # (N, P)
    positive = labels_t > 0
    # Clamp: the divisor of a batch without boxes (its sums are 0 anyway).
    num_pos = positive.sum().clamp(min=1)

    loc_target = box_coder.encode(torch.stack(matched)[positive], priors.expand_as(loc)[positive])
    bbox_loss = F.smooth_l1_loss(loc[positive], loc_target, reduction="sum")

    ce = F.cross_entropy(conf.flatten(0, 1), labels_t.flatten(), reduction="none").view_as(labels_t)
    selected = positive | hard_negative_mask(ce, positive, neg_pos_ratio)
    cls_loss = ce[selected].sum()
    return {"bbox_regression": bbox_loss / num_pos, "classification": cls_loss / num_pos}
