"""Model families and the registry: architectures only.

Weights are attached one layer up (:func:`frostnet.get_model`, ``hubconf.py``): nothing in
``frostnet.models`` imports ``frostnet.hub`` or ``frostnet.serialization``.
"""

from . import frostnet as _frostnet_family  # noqa: F401  (registers the FrostNets)
from . import espnet as _espnet_family, lraspp as _lraspp_family  # noqa: F401  (registers the segmentation baselines)
from . import ssdlite as _ssdlite_family, tiny_dsod as _tiny_dsod_family  # noqa: F401  (registers the detectors)
from ._features import FeatureInfo, backbone_with_fpn
from ._layers import ConvBNAct, make_divisible
from ._registry import get_model, get_model_builder, get_model_task, list_models, register_model
from .frostnet import FrostNet, frostnet

__all__ = [
    "ConvBNAct",
    "FeatureInfo",
    "FrostNet",
    "backbone_with_fpn",
    "frostnet",
    "get_model",
    "get_model_builder",
    "get_model_task",
    "list_models",
    "make_divisible",
    "register_model",
]
