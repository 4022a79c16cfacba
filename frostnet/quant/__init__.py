"""Quantization helpers: fusion, QAT/PTQ preparation, INT8 conversion, QAT methods.

The eager ``torch.ao.quantization`` backend lives in :mod:`frostnet.quant._eager`; the QAT methods
beside plain fake quantization build on it, one module per method so that each sits beside its
paper: :mod:`~frostnet.quant.ewgs`, :mod:`~frostnet.quant.octav`, the per-method qconfig
(:mod:`~frostnet.quant.methods`), 8-bit first/last layers (:mod:`~frostnet.quant.precision`), the
integer weight levels that transition-rate scheduling counts (:mod:`~frostnet.quant.weight_levels`)
and :mod:`~frostnet.quant.fold_tracker`. Its successors for deployment are
:mod:`frostnet.quant.pt2e` (torch.export + torchao) and :mod:`frostnet.quant.onnx_export`
(ONNX + onnxruntime QDQ), whose optional packages are imported when used. Everything else in frostnet goes
through the names exported here.
"""

from ._eager import (
    BACKENDS,
    act_quant_max,
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
    observers_paused,
    prepare_ptq,
    prepare_qat,
    quantize_ptq,
    scalar_only,
    quantized_skeleton,
    use_engine,
    weight_qscheme,
)
from .ewgs import (
    EWGSFakeQuantize,
    EWGSTraceEstimate,
    copy_ewgs_bounds,
    estimate_ewgs_deltas,
    set_ewgs_deltas,
    ewgs_parameters,
    ewgs_trace_estimates,
    get_ewgs_qconfig,
    update_ewgs_deltas,
)
from .fold_tracker import FoldTracker
from .methods import QAT_METHODS, get_method_qconfig
from .octav import (
    OCTAV_CLIPPINGS,
    OCTAV_GRADIENTS,
    OctavFakeQuantize,
    OctavObserver,
    clipped_quantization_mse,
    get_octav_qconfig,
    octav_clip,
)
from .precision import END_LAYER_BITS, keep_8bit_ends
from .weight_levels import (
    WeightQuantGrid,
    bn_fold,
    freeze_weight_quantizer,
    weight_levels,
    weight_quant_grid,
    weight_quantized_modules,
)
from .inference import optimize_for_inference
from . import onnx_export, pt2e  # torch.export (pt2e) and ONNX successors of the eager path; optional deps load lazily

__all__ = [
    "BACKENDS",
    "DeQuantStub",
    "END_LAYER_BITS",
    "EWGSFakeQuantize",
    "EWGSTraceEstimate",
    "FoldTracker",
    "FloatFunctional",
    "OCTAV_CLIPPINGS",
    "OCTAV_GRADIENTS",
    "OctavFakeQuantize",
    "OctavObserver",
    "QAT_METHODS",
    "QuantStub",
    "WeightQuantGrid",
    "act_quant_max",
    "bn_fold",
    "calibrate",
    "check_backend",
    "clipped_quantization_mse",
    "convert",
    "copy_ewgs_bounds",
    "disable_observer",
    "enable_observer",
    "estimate_ewgs_deltas",
    "set_ewgs_deltas",
    "ewgs_parameters",
    "ewgs_trace_estimates",
    "freeze_bn_stats",
    "freeze_weight_quantizer",
    "fuse_modules",
    "get_ewgs_qconfig",
    "get_method_qconfig",
    "get_octav_qconfig",
    "get_qconfig",
    "int8_state_from_tensors",
    "int8_state_to_tensors",
    "is_fake_quant_module",
    "is_quantized_model",
    "keep_8bit_ends",
    "observers_paused",
    "octav_clip",
    "onnx_export",
    "optimize_for_inference",
    "pt2e",
    "prepare_ptq",
    "prepare_qat",
    "quantize_ptq",
    "scalar_only",
    "quantized_skeleton",
    "update_ewgs_deltas",
    "use_engine",
    "weight_levels",
    "weight_qscheme",
    "weight_quant_grid",
    "weight_quantized_modules",
]
