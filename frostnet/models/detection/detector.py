"""The SSD-style detector wrapper shared by SSDLite and Tiny-DSOD.

Only the tensor body (backbone, extra layers, heads) is quantized. It is laid out as
``QuantStub -> INT8 features -> INT8 head layers -> DeQuantStub -> FP32 last layer`` per prediction
branch: the StatAssist/GradBoost paper keeps the last layer of every model in FP32. Priors, box
coding, the MultiBox loss and NMS run in FP32 outside the body, so ``frostnet.quant.convert``
never touches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from ...quant import DeQuantStub
from .._layers import check_image_input, fuse_conv_bn_act
from .box_coder import BoxCoder
from .loss import multibox_loss
from .postprocess import postprocess_detections
from .priors import PriorSpec, make_priors

__all__ = ["Predictor", "SSDHead", "SSDDetector", "check_detector_args"]

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
Targets = Sequence[dict[str, torch.Tensor]]


class Predictor(nn.Module):
    """One prediction branch: optional INT8 layers (``pre``), a DeQuantStub, the FP32 ``pred``."""

    def __init__(self, pred: nn.Module, pre: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.dequant = DeQuantStub()
        self.pred = pred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.dequant(self.pre(x)))


class SSDHead(nn.Module):
    """Box-offset (``loc``) and class-logit (``conf``) predictors, one pair per level.

    ``float_modules`` names the FP32 last layers (``loc.<i>.pred``, ``conf.<i>.pred``).
    """

    def __init__(self, loc: Sequence[Predictor], conf: Sequence[Predictor]) -> None:
        super().__init__()
        if len(loc) != len(conf):
            raise ValueError(f"need one loc and one conf predictor per level, got {len(loc)} and {len(conf)}")
        self.loc = nn.ModuleList(loc)
        self.conf = nn.ModuleList(conf)
        self.float_modules: tuple[str, ...] = tuple(
            f"{branch}.{i}.pred" for branch in ("loc", "conf") for i in range(len(loc))
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(features) != len(self.loc):
            raise ValueError(f"head has {len(self.loc)} levels, got {len(features)} feature maps")
        return [(loc(f), conf(f)) for f, loc, conf in zip(features, self.loc, self.conf)]


class SSDDetector(nn.Module):
    """Single-shot detector with torchvision's calling convention.

    ``model(images)`` in eval mode returns one dict per image with ``boxes`` (xyxy, pixels of the
    input), ``scores`` and ``labels`` (1..num_classes-1; 0 is background). ``model(images, targets)``
    in train mode returns ``{"bbox_regression", "classification"}`` losses. Priors follow the
    feature-map sizes of each input, so any input size works (the papers train at 300x300).

    Args:
        body: image batch -> list of ``(loc (N, A*4, H, W), conf (N, A*C, H, W))`` float maps, one
            per level; it holds the QuantStub and DeQuantStubs. Its ``float_modules`` (names of
            layers kept FP32) are re-exported with a ``body.`` prefix.
        priors: default boxes per level.
        num_classes: classes including background.
        in_channels: input image channels.
        name: shown in error messages.
        image_size: the training/evaluation resolution the model was designed for (informative).
        variances: box-coding variances.
        iou_threshold: prior matching IoU.
        neg_pos_ratio: hard negatives per positive.
        score_thresh, nms_thresh, topk_candidates, detections_per_img: post-processing.
    """

    def __init__(
        self,
        body: nn.Module,
        priors: PriorSpec,
        *,
        num_classes: int,
        in_channels: int = 3,
        name: str = "SSDDetector",
        image_size: int = 300,
        variances: tuple[float, float] = (0.1, 0.2),
        iou_threshold: float = 0.5,
        neg_pos_ratio: int = 3,
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        topk_candidates: int = 200,
        detections_per_img: int = 200,
    ) -> None:
        super().__init__()
        check_detector_args(num_classes=num_classes, in_channels=in_channels, score_thresh=score_thresh,
                            nms_thresh=nms_thresh, topk_candidates=topk_candidates,
                            detections_per_img=detections_per_img)
        self.body = body
        self.prior_spec = priors
        self.box_coder = BoxCoder(variances)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.name = name
        self.image_size = image_size
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.topk_candidates = topk_candidates
        self.detections_per_img = detections_per_img
        self.float_modules: tuple[str, ...] = tuple(f"body.{n}" for n in getattr(body, "float_modules", ()))
        self._priors_key: Optional[tuple] = None
        self._priors: Optional[torch.Tensor] = None

    # ---- tensors -------------------------------------------------------------------------------
    def _batch(self, images: Images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            check_image_input(images, self.in_channels, self.name)
            return images
        images = list(images)
        if not images:
            raise ValueError(f"{self.name} got an empty list of images")
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1:
            raise ValueError(
                f"{self.name} takes equally sized images (SSD resizes inputs to one size), got shapes "
                f"{sorted(shapes)}; resize them first, e.g. with torchvision.transforms.v2.Resize"
            )
        if images[0].dim() != 3:
            raise ValueError(f"{self.name} expects a list of (C, H, W) images, got shape {tuple(images[0].shape)}")
        x = torch.stack(images)
        check_image_input(x, self.in_channels, self.name)
        return x

    def priors(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Normalized cxcywh priors for these per-level map sizes (the last set is cached)."""
        key = (tuple(feature_sizes), str(device))
        if key != self._priors_key:
            self._priors = make_priors(self.prior_spec, feature_sizes, device=device)
            self._priors_key = key
        assert self._priors is not None
        return self._priors

    def raw_outputs(self, images: Images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loc (N, P, 4), conf (N, P, C), priors (P, 4))``: head outputs before any decoding."""
        return self._raw(self._batch(images))

    def _raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            levels = self.body(x)
        except ValueError as e:
            if self.training and "Expected more than 1 value per channel" in str(e):
                raise ValueError(
                    f"{self.name}: a batch of {x.shape[0]} image(s) of {x.shape[-2]}x{x.shape[-1]} reaches a 1x1 "
                    f"feature map, where BatchNorm cannot compute training statistics; train with at least 2 images"
                ) from e
            raise
        anchors = self.prior_spec.num_anchors
        if len(levels) != len(anchors):
            raise RuntimeError(f"{self.name}: body returned {len(levels)} levels for {len(anchors)} prior levels")
        locs, confs, sizes = [], [], []
        for k, ((loc, conf), a) in enumerate(zip(levels, anchors)):
            n, _, h, w = loc.shape
            if loc.shape[1] != a * 4 or conf.shape[1] != a * self.num_classes:
                raise RuntimeError(
                    f"{self.name}: level {k} predicts {loc.shape[1]} offsets and {conf.shape[1]} logits per "
                    f"location, expected {a * 4} and {a * self.num_classes} for {a} priors"
                )
            # (N, A*K, H, W) -> (N, H*W*A, K): row-major locations, priors last, as make_priors
            locs.append(loc.permute(0, 2, 3, 1).reshape(n, -1, 4))
            confs.append(conf.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
            sizes.append((h, w))
        return torch.cat(locs, 1), torch.cat(confs, 1), self.priors(sizes, x.device)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self, images: Images, targets: Optional[Targets] = None
    ) -> Union[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        if self.training and targets is None:
            raise ValueError(
                f"{self.name} is in training mode and needs targets (a list of dicts with boxes and labels)"
            )
        x = self._batch(images)
        size = (x.shape[-2], x.shape[-1])
        if self.training:
            assert targets is not None
            # validate before the (expensive) forward pass
            normalized = self._normalized_targets(targets, x.shape[0], size, x.device)
            loc, conf, priors = self._raw(x)
            return multibox_loss(loc, conf, priors, normalized, self.box_coder,
                                 iou_threshold=self.iou_threshold, neg_pos_ratio=self.neg_pos_ratio)
        loc, conf, priors = self._raw(x)
        return postprocess_detections(
            loc, conf, priors, size, self.box_coder,
            score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
            topk_candidates=self.topk_candidates, detections_per_img=self.detections_per_img,
        )

    def _normalized_targets(
        self, targets: Targets, batch: int, size: tuple[int, int], device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        if len(targets) != batch:
            raise ValueError(f"{self.name} got {len(targets)} targets for {batch} images")
        height, width = size
        out = []
        for i, t in enumerate(targets):
            if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
                raise ValueError(f"target {i} must be a dict with 'boxes' and 'labels', got {type(t).__name__} "
                                 f"{sorted(t) if isinstance(t, dict) else ''}")
            # plain tensors: tv_tensors.BoundingBoxes would re-wrap every result
            boxes = torch.as_tensor(t["boxes"]).as_subclass(torch.Tensor).float()
            labels = torch.as_tensor(t["labels"]).as_subclass(torch.Tensor)
            if boxes.numel() == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"target {i}: boxes must be (K, 4) xyxy, got shape {tuple(boxes.shape)}")
            if labels.shape != (boxes.shape[0],) or labels.is_floating_point():
                raise ValueError(f"target {i}: labels must be an integer tensor of shape ({boxes.shape[0]},), "
                                 f"got {labels.dtype} of shape {tuple(labels.shape)}")
            bad = (labels < 1) | (labels >= self.num_classes)
            if bad.any():
                raise ValueError(f"target {i}: label {labels[bad][0].item()} out of range; valid labels are "
                                 f"1..{self.num_classes - 1} (0 is background)")
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if degenerate.any():
                raise ValueError(f"target {i}: box {boxes[degenerate][0].tolist()} has no area; boxes are xyxy "
                                 f"with x2 > x1 and y2 > y1 (drop such boxes, e.g. with SanitizeBoundingBoxes)")
            scale = boxes.new_tensor([width, height, width, height])
            out.append({"boxes": (boxes / scale).to(device), "labels": labels.long().to(device)})
        return out

    def fuse_model(self, is_qat: Optional[bool] = None) -> None:
        """Fuse every Conv-BN(-ReLU) in place; ``is_qat`` defaults to ``self.training``."""
        fuse_conv_bn_act(self, self.training if is_qat is None else is_qat)


def check_detector_args(
    *, num_classes: int, in_channels: int, score_thresh: float, nms_thresh: float,
    topk_candidates: int, detections_per_img: int,
) -> None:
    """Raise a clear error for an out-of-range detector argument."""
    for name, value, low in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1),
                             ("topk_candidates", topk_candidates, 1), ("detections_per_img", detections_per_img, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            hint = " (classes include background)" if name == "num_classes" else ""
            raise ValueError(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
