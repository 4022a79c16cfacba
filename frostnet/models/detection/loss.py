"""MultiBox loss: prior matching, SmoothL1 on positives, cross-entropy with hard-negative mining.

Everything runs on the whole batch at once: ground truths are padded to ``(N, K_max, 4)`` with a
validity mask (:func:`pad_targets`), so matching, encoding and mining are a fixed number of tensor
operations whatever the batch size (a per-image Python loop cost more than the loss terms on a
batch of 32 small images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert, box_iou

from .box_coder import BoxCoder

__all__ = ["pad_targets", "match_priors", "match_priors_batch", "hard_negative_mask", "multibox_loss"]

# Marks an IoU as "forced" (a ground truth's best prior): above any matching threshold.
_FORCED_IOU = 2.0


def pad_targets(
    targets: Sequence[dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-image targets into padded batch tensors.

    Args:
        targets: per image ``boxes`` ``(K_i, 4)`` and ``labels`` ``(K_i,)``; ``K_i`` may be 0.

    Returns:
        ``(boxes (N, K_max, 4), labels (N, K_max) int64, valid (N, K_max) bool)``; padding is zero
        boxes with label 0 and ``valid`` False. ``K_max`` is 0 when no image has a box.
    """
    if not targets:
        raise ValueError("pad_targets needs at least one target (one dict per image), got an empty sequence")
    boxes = pad_sequence([t["boxes"].reshape(-1, 4) for t in targets], batch_first=True)
    labels = pad_sequence([t["labels"].reshape(-1).long() for t in targets], batch_first=True)
    counts = torch.tensor([t["labels"].numel() for t in targets], device=boxes.device)
    valid = torch.arange(boxes.shape[1], device=boxes.device) < counts[:, None]
    return boxes, labels, valid


def match_priors_batch(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    valid: torch.Tensor,
    priors: torch.Tensor,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every prior of every image a ground truth (SSD matching), for a padded batch.

    A prior takes the ground truth it overlaps most if that IoU is at least ``iou_threshold``;
    on top of that every ground truth claims its best prior, whatever the IoU, so no object is
    left without a positive (small or oddly shaped boxes would otherwise never be trained). When
    two ground truths of an image claim the same prior, the later one (higher index) wins.

    Args:
        gt_boxes: ``(N, K, 4)`` xyxy, normalized like the priors; ``K`` may be 0.
        gt_labels: ``(N, K)`` class indices, 1.. (0 is background).
        valid: ``(N, K)`` bool, False for padding.
        priors: ``(P, 4)`` cxcywh.
        iou_threshold: IoU needed to be a positive.

    Returns:
        ``(matched_boxes (N, P, 4), labels (N, P))``: the assigned ground-truth box of every prior
        (zeros in an image without boxes) and its label, 0 for background.
    """
    n, k, _ = gt_boxes.shape
    num_priors = priors.shape[0]
    if k == 0:
        return priors.new_zeros(n, num_priors, 4), torch.zeros(n, num_priors, dtype=torch.int64, device=priors.device)
    iou = box_iou(gt_boxes.reshape(-1, 4), box_convert(priors, "cxcywh", "xyxy")).view(n, k, num_priors)
    # Padding can never win a prior (real IoUs are >= 0) nor claim one (its index is dropped below).
    iou = iou.masked_fill(~valid[:, :, None], -1.0)
    best_iou, best_gt = iou.max(dim=1)  # (N, P): per prior
    best_prior = iou.argmax(dim=2)  # (N, K): per ground truth
    # Every ground truth claims its best prior. scatter_reduce "amax" of the gt index picks the
    # highest index among the claimants of a prior: "the later gt wins", deterministically
    # (a plain scatter with repeated indices leaves the winner unspecified).
    claimant = torch.arange(k, device=iou.device).expand(n, k).masked_fill(~valid, -1)
    claim = torch.full((n, num_priors), -1, dtype=torch.int64, device=iou.device)
    claim.scatter_reduce_(1, best_prior, claimant, reduce="amax")
    forced = claim >= 0
    best_gt = torch.where(forced, claim, best_gt)
    best_iou = best_iou.masked_fill(forced, _FORCED_IOU)
    labels = gt_labels.gather(1, best_gt).masked_fill(best_iou < iou_threshold, 0)
    matched = gt_boxes.gather(1, best_gt[:, :, None].expand(n, num_priors, 4))
    return matched, labels


def match_priors(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    priors: torch.Tensor,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD matching for one image: :func:`match_priors_batch` on a batch of one.

    Args:
        gt_boxes: ``(K, 4)`` xyxy, normalized like the priors; ``K`` may be 0.
        gt_labels: ``(K,)`` class indices, 1.. (0 is background).
        priors: ``(P, 4)`` cxcywh.
        iou_threshold: IoU needed to be a positive.

    Returns:
        ``(matched_boxes (P, 4), labels (P,))``, as in :func:`match_priors_batch`.
    """
    boxes = gt_boxes.reshape(1, -1, 4)
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    matched, labels = match_priors_batch(boxes, gt_labels.reshape(1, -1).long(), valid, priors, iou_threshold)
    return matched[0], labels[0]


def hard_negative_mask(loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: int = 3) -> torch.Tensor:
    """The ``neg_pos_ratio`` x #positives negatives with the highest loss, per image.

    Args:
        loss: ``(N, P)`` classification loss of every prior (only its order matters).
        positive: ``(N, P)`` bool mask of positive priors.
        neg_pos_ratio: negatives kept per positive (3 in SSD).

    Returns:
        ``(N, P)`` bool mask of the selected negatives. An image without positives selects none.
    """
    loss = loss.detach().masked_fill(positive, -float("inf"))  # positives sort last, never picked
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
    if len(targets) != loc.shape[0]:
        raise ValueError(f"multibox_loss got {len(targets)} targets for a batch of {loc.shape[0]} images")
    gt_boxes, gt_labels, valid = pad_targets(targets)
    matched, labels = match_priors_batch(gt_boxes, gt_labels, valid, priors, iou_threshold)
    positive = labels > 0
    # Clamp: the divisor of a batch without boxes (its sums are 0 anyway).
    num_pos = positive.sum().clamp(min=1)

    loc_target = box_coder.encode(matched[positive], priors.expand_as(loc)[positive])
    bbox_loss = F.smooth_l1_loss(loc[positive], loc_target, reduction="sum")

    ce = F.cross_entropy(conf.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    selected = positive | hard_negative_mask(ce, positive, neg_pos_ratio)
    cls_loss = ce[selected].sum()
    return {"bbox_regression": bbox_loss / num_pos, "classification": cls_loss / num_pos}
