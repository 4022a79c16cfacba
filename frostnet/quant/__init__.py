"""Quantization helpers: fusion, QAT/PTQ preparation, INT8 conversion.

The eager ``torch.ao.quantization`` backend lives in :mod:`frostnet.quant._eager`; everything
else in frostnet goes through the names exported here.
"""

from ._eager import (
    BACKENDS,
    DeQuantStub,
    FloatFunctional,
    QuantStub,
    calibrate,
    check_backend,
    convert,
    disable_observer,
    enable_observer,
    freeze_bn_stats,
    fuse_modules,
    get_qconfig,
    int8_state_from_tensors,
    int8_state_to_tensors,
    is_fake_quant_module,
    is_quantized_model,
    prepare_ptq,
    prepare_qat,
    quantize_ptq,
    quantized_skeleton,
    use_engine,
    weight_qscheme,
)
from .inference import optimize_for_inference

__all__ = [
    "BACKENDS",
    "DeQuantStub",
    "FloatFunctional",
    "QuantStub",
    "calibrate",
    "check_backend",
    "convert",
    "disable_observer",
    "enable_observer",
    "freeze_bn_stats",
    "fuse_modules",
    "get_qconfig",
    "int8_state_from_tensors",
    "int8_state_to_tensors",
    "is_fake_quant_module",
    "is_quantized_model",
    "optimize_for_inference",
    "prepare_ptq",
    "prepare_qat",
    "quantize_ptq",
    "quantized_skeleton",
    "use_engine",
    "weight_qscheme",
]
