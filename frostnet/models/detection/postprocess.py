"""FP32 post-processing: softmax, box decoding, per-class thresholding, top-k and NMS."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from .box_coder import BoxCoder

__all__ = ["postprocess_detections", "empty_detections"]


def empty_detections(device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A detection result with nothing in it, shaped like a full one."""
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
    }


def postprocess_detections(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    image_size: tuple[int, int],
    box_coder: BoxCoder,
    *,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    topk_candidates: int = 200,
    detections_per_img: int = 200,
) -> list[dict[str, torch.Tensor]]:
    """Turn raw head outputs into torchvision-style detections.

    Per image and class: keep scores above ``score_thresh``, the ``topk_candidates`` best of them,
    NMS at ``nms_thresh`` (classes never suppress each other), then the ``detections_per_img``
    best overall.

    Args:
        loc: ``(N, P, 4)`` offsets.
        conf: ``(N, P, C)`` logits, class 0 background.
        priors: ``(P, 4)`` normalized cxcywh.
        image_size: ``(height, width)`` of the input; boxes come back in its pixels.
        box_coder: decodes the offsets.

    Returns:
        One dict per image: ``boxes`` ``(D, 4)`` xyxy pixels clipped to the image, ``scores``
        ``(D,)`` and ``labels`` ``(D,)`` int64 in 1..C-1, sorted by score; ``D`` may be 0.
    """
    height, width = image_size
    scale = loc.new_tensor([width, height, width, height])
    boxes = (box_coder.decode(loc.float(), priors) * scale).clamp(min=0)
    boxes = torch.min(boxes, scale)  # clip to the image
    scores = conf.float().softmax(dim=-1)[..., 1:]  # drop background
    num_priors, num_fg = scores.shape[1], scores.shape[2]
    k = min(topk_candidates, num_priors)
    labels = torch.arange(1, num_fg + 1, device=loc.device).expand(k, num_fg)

    results = []
    for img_boxes, img_scores in zip(boxes, scores):
        # per-class top-k over priors: (k, C-1) scores and prior indices
        top_scores, top_idx = img_scores.topk(k, dim=0)
        keep = top_scores > score_thresh
        if not keep.any():
            results.append(empty_detections(loc.device))
            continue
        cand_boxes, cand_scores, cand_labels = img_boxes[top_idx[keep]], top_scores[keep], labels[keep]
        kept = batched_nms(cand_boxes, cand_scores, cand_labels, nms_thresh)[:detections_per_img]
        results.append({"boxes": cand_boxes[kept], "scores": cand_scores[kept], "labels": cand_labels[kept]})
    return results

