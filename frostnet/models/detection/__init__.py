"""SSD machinery shared by the detectors: priors, box coding, MultiBox loss, NMS, the wrapper.

Everything here is FP32; only the detector's ``body`` is quantized.
"""

from .box_coder import BoxCoder
from .detector import Predictor, SSDDetector, SSDHead, check_detector_args
from .loss import hard_negative_mask, match_priors, multibox_loss
from .postprocess import empty_detections, postprocess_detections
from .priors import PriorSpec, make_priors

__all__ = [
    "BoxCoder",
    "Predictor",
    "PriorSpec",
    "SSDDetector",
    "SSDHead",
    "check_detector_args",
    "empty_detections",
    "hard_negative_mask",
    "make_priors",
    "match_priors",
    "multibox_loss",
    "postprocess_detections",
]
