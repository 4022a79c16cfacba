"""INT8 through ``torch.export`` (pt2e): the successor of the eager ``torch.ao.quantization`` path.

The float model (QAT-trained latent weights; its QuantStub/FloatFunctional modules are identities
in float mode) is exported with a dynamic batch dimension, annotated by a backend quantizer,
calibrated, and converted to a graph of quantize/dequantize ops around float ops that a backend
lowers to INT8 kernels::

    int8 = pt2e.quantize_pt2e(model, calibration_batches, backend="x86")
    fast = pt2e.compile_pt2e(int8)          # torch.compile + freezing: Inductor's INT8 kernels
    pt2e.save_pt2e(int8, "model.pt2", calibration_batches[0])   # a torch.export archive

Backends: ``x86`` (torchao's ``X86InductorQuantizer``, lowered by ``torch.compile``) and
``xnnpack`` (ExecuTorch's ``XNNPACKQuantizer``: the graph that ExecuTorch's XNNPACK delegate
consumes; in PyTorch it runs its quantize/dequantize ops as reference float ops, so it is for
export and accuracy checks, not for timing).

Activation ranges: by default every activation observer is calibrated on ``batches``. With
``ranges_from`` (the eager INT8 model converted from the same QAT run), the ranges the QAT run
learned are carried over instead: each observed value is traced back through the exported graph
to the module that produced it (``nn_module_stack``), whose converted eager counterpart holds the
scale and zero point; the range ``[-zp * scale, (qmax - zp) * scale]`` is then re-gridded on the
pt2e quantizer's own levels (x86 Inductor uses 0..255; frostnet's eager x86 qconfig 0..127).

torchao is optional (``pip install 'frostnet[export]'``), and so is executorch for ``xnnpack``
(``pip install executorch``: a large dependency tree, kept out of the extra).
They are imported when a function here needs them, with an error naming the package otherwise.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "PT2E_BACKENDS",
    "carry_over_ranges",
    "compile_pt2e",
    "dynamic_batch",
    "example_from",
    "export_float",
    "load_pt2e",
    "quantize_pt2e",
    "require",
    "save_pt2e",
]

#: Quantizers this module drives: backend -> (module, class) and the package that provides it.
_QUANTIZERS: dict[str, tuple[str, str, str]] = {
    "x86": ("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "X86InductorQuantizer", "torchao"),
    # torchao >= 0.13 no longer ships the XNNPACK quantizer; it lives beside its delegate.
    "xnnpack": ("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "XNNPACKQuantizer", "executorch"),
}
PT2E_BACKENDS: tuple[str, ...] = tuple(_QUANTIZERS)
EXPORT_EXTRA = "pip install 'frostnet[export]'"
_EXTRA_PACKAGES = ("torchao", "onnx", "onnxscript", "onnxruntime")

PathLike = Union[str, os.PathLike]


def require(module: str, *, package: Optional[str] = None, purpose: str = "INT8 export") -> ModuleType:
    """Import ``module`` or raise an ImportError that names the package and the extra to install.

    Args:
        module: dotted module name, e.g. ``"torchao.quantization.pt2e.quantize_pt2e"``.
        package: the PyPI package that provides it (default: the module's top-level name).
        purpose: what needs it, for the message.
    """
    package = package or module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        fix = (f"install the export extra: {EXPORT_EXTRA} (or pip install {package})" if package in _EXTRA_PACKAGES
               # executorch (XNNPACK's quantizer) pulls in a large tree; it stays out of the extra
               else f"pip install {package}")
        raise ImportError(
            f"{purpose} needs the optional package {package!r} (module {module!r} could not be imported: {e}); {fix}"
        ) from e


def _check_pt2e_backend(backend: str) -> str:
    if backend not in _QUANTIZERS:
        raise ValueError(f"unknown pt2e backend {backend!r}; valid choices: {', '.join(PT2E_BACKENDS)}")
    return backend


def example_from(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The export example: the first calibration batch cut (or repeated) to batch size 2."""
    if not batches or not all(isinstance(b, torch.Tensor) and b.is_floating_point() for b in batches):
        raise ValueError("calibration batches must be a non-empty sequence of float image tensors (N, C, H, W), got "
                         f"{[type(b).__name__ for b in batches][:3] or 'nothing'}")
    x = batches[0]
    # torch.export specializes a dimension whose example size is 1, so the example has batch 2.
    # a copy, not a view: a saved archive keeps its sample input, and a view would keep the whole batch
    return torch.cat([x[:1], x[:1]]) if x.shape[0] < 2 else x[:2].clone()


def export_float(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of a float model with a dynamic batch dimension.

    Args:
        model: float model in eval mode (a converted eager INT8 model cannot be exported).
        example_input: an input with batch size >= 2 (a size-1 dimension would be specialized).
    """
    from .inference import _describe  # one place that says what a value is, for errors

    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 2:
        raise ValueError(f"example_input must be a tensor with batch size >= 2, got {_describe(example_input)}")
    from ._eager import is_quantized_model

    if is_quantized_model(model):
        raise TypeError("export_float takes the float model (the FP32 weights); a converted eager INT8 model "
                        "cannot be exported by torch.export: load the .fp32 weights instead")
    return torch.export.export(model.eval(), (example_input,), dynamic_shapes=dynamic_batch())


def dynamic_batch() -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` for a one-input model whose batch dimension is free."""
    return ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)


def _quantizer(backend: str) -> Any:
    module, name, package = _QUANTIZERS[backend]
    mod = require(module, package=package, purpose=f"pt2e quantization for {backend!r}")
    quantizer = getattr(mod, name)()
    if backend == "x86":
        return quantizer.set_global(mod.get_default_x86_inductor_quantization_config())
    # per-channel symmetric weights, as frostnet's eager qconfig (depthwise convs need them)
    return quantizer.set_global(mod.get_symmetric_quantization_config(is_per_channel=True))


def quantize_pt2e(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    backend: str = "x86",
    ranges_from: Optional[nn.Module] = None,
    ranges_quant_max: int = 127,
) -> torch.fx.GraphModule:
    """Export, annotate, calibrate and convert ``model`` to a pt2e INT8 graph.

    Args:
        model: the float model (QAT latent weights or any FP32 model) in eval mode.
        batches: calibration images, e.g. ``frostnet.recipe.engine.calibration_batches(...)``;
            the first one is also the export example.
        backend: one of :data:`PT2E_BACKENDS`.
        ranges_from: the eager INT8 model converted from the same QAT run; its activation
            ranges replace the calibrated ones (:func:`carry_over_ranges`).
        ranges_quant_max: the largest activation level ``ranges_from`` was converted with
            (``frostnet.quant.act_quant_max(backend)``: 127 for x86, 255 for qnnpack).

    Returns:
        The converted ``GraphModule`` (``model.eval()`` works on it), taking the float NCHW input.
    """
    _check_pt2e_backend(backend)
    qpt2e = require("torchao.quantization.pt2e.quantize_pt2e", package="torchao", purpose="pt2e quantization")
    utils = require("torchao.quantization.pt2e", package="torchao", purpose="pt2e quantization")
    example = example_from(list(batches))
    quantizer = _quantizer(backend)
    try:
        prepared = qpt2e.prepare_pt2e(export_float(model, example).module(), quantizer)
    except Exception as e:  # the quantizer's own annotation errors do not name the model or a way out
        raise RuntimeError(
            f"prepare_pt2e with the {backend} quantizer failed on {type(model).__name__}: {e}. Export this model with "
            "ONNX instead (frostnet.quant.onnx_export / tools/export.py --format onnx)"
        ) from e
    with torch.no_grad():
        for x in batches:
            prepared(x)
    if ranges_from is not None:
        carry_over_ranges(prepared, ranges_from, act_quant_max=ranges_quant_max)
    converted = qpt2e.convert_pt2e(prepared)
    utils.allow_exported_model_train_eval(converted)
    return converted


def _module_path(node: torch.fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


# The source line of an op a FloatFunctional ran: ``out = self.skip_add.add(out, x)``.
_FUNCTIONAL_CALL = re.compile(r"self\.([A-Za-z_][\w.]*)\.(?:add|add_relu|add_scalar|cat|mul|mul_scalar)\(")


def _functional_module(node: torch.fx.Node, path: Optional[str], modules: dict[str, nn.Module]) -> Optional[nn.Module]:
    """The (converted) FloatFunctional that ran ``node``'s op. Its methods are not ``forward``, so
    export records the enclosing block as the module; the call's source line names the attribute."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines()]
    match = _FUNCTIONAL_CALL.search(lines[-1]) if lines else None
    if match is None or path is None:
        return None
    return modules.get(f"{path}.{match.group(1)}" if path else match.group(1))


def _eager_qparams(node: torch.fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[float, int]]:
    """(scale, zero point) of the eager module that produced ``node``'s value, walking back
    through ops without their own output qparams (fused-away BN/ReLU, pooling, reshapes)."""
    seen = 0
    while node is not None and seen < 64:
        seen += 1
        if node.op == "placeholder":
            stub = modules.get("quant")  # the QuantStub converted to Quantize
            if stub is not None and hasattr(stub, "scale"):
                return float(stub.scale), int(stub.zero_point)
            return None
        if node.op == "get_attr":
            return None
        path = _module_path(node)
        for m in (modules.get(path) if path is not None else None, _functional_module(node, path, modules)):
            if m is not None and hasattr(m, "scale") and hasattr(m, "zero_point"):
                return float(m.scale), int(m.zero_point)
        node = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
    return None


def carry_over_ranges(prepared: torch.fx.GraphModule, int8_model: nn.Module, *, act_quant_max: int = 127) -> dict[str, int]:
    """Replace the calibrated activation ranges of a prepared pt2e model by an eager INT8 model's.

    Args:
        prepared: the output of ``prepare_pt2e`` (observers inserted, before ``convert_pt2e``).
        int8_model: the converted eager INT8 model of the same architecture (e.g. the published
            ``.int8_x86`` weights of the same QAT run).
        act_quant_max: the largest activation level the eager model was converted with
            (``frostnet.quant.act_quant_max(backend)``: 127 for x86, 255 for qnnpack).

    Returns:
        ``{"carried": n, "calibrated": m}``: activation observers that took the eager range and
        those left calibrated because no eager module with qparams produced their value.
    """
    from ._eager import is_quantized_model

    if not is_quantized_model(int8_model):
        raise TypeError("ranges_from must be a converted eager INT8 model (e.g. hub.load_weights('<arch>.<data>.int8_x86'))"
                        f", got a float {type(int8_model).__name__}")
    modules = dict(int8_model.named_modules())
    counts = {"carried": 0, "calibrated": 0}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.target.startswith("activation_post_process"):
            continue
        observer = getattr(prepared, node.target)
        if getattr(observer, "dtype", None) not in (torch.quint8, torch.qint8, torch.uint8, torch.int8):
            continue
        producer = node.args[0]
        if producer.op == "get_attr" or getattr(observer, "qscheme", None) in (torch.per_channel_symmetric,
                                                                              torch.per_channel_affine):
            continue  # weights: their ranges come from the weights themselves
        qparams = _eager_qparams(producer, modules)
        if qparams is None:
            counts["calibrated"] += 1
            continue
        scale, zero_point = qparams
        lo, hi = torch.tensor(-zero_point * scale), torch.tensor((act_quant_max - zero_point) * scale)
        fixed = observer._calculate_qparams(lo, hi)
        observer.calculate_qparams = lambda fixed=fixed: fixed  # what convert_pt2e reads
        counts["carried"] += 1
    return counts


def compile_pt2e(model: nn.Module) -> nn.Module:
    """``torch.compile`` with freezing: Inductor folds the weights and fuses the x86 quantize/
    dequantize patterns of a pt2e graph into INT8 convolutions (the first call compiles)."""
    # torchao registers its x86 INT8 fusion patterns for Inductor's freezing passes on import
    require("torchao.quantization.pt2e.inductor_passes.x86", package="torchao", purpose="pt2e compilation")
    return _FrozenCompiled(torch.compile(model))


class _FrozenCompiled(nn.Module):
    """Runs a ``torch.compile``d module with Inductor's ``freezing`` on for every (re)compilation.

    ``torch.compile(..., options={"freezing": True})`` does not reach the freezing passes that
    prepack the INT8 weights (Inductor then fails on ``onednn.qconv_prepack``), and setting the
    global config would change every other compilation in the process."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> Any:
        import torch._inductor.config

        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)


def save_pt2e(model: nn.Module, path: PathLike, example_input: torch.Tensor) -> Path:
    """Write a converted pt2e graph as a ``torch.export`` archive (``torch.export.load`` reads it),
    atomically: a temporary file in the same directory, then a rename.

    Args:
        model: the output of :func:`quantize_pt2e`.
        path: the ``.pt2`` file to write.
        example_input: an input of the model's shape (any batch size).
    """
    path = Path(path)
    example = example_from([example_input])
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_batch())
    path.parent.mkdir(parents=True, exist_ok=True)
    # the archive's inner folder is named after the file, so the temporary file keeps the final name
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        torch.export.save(program, staged)
        os.replace(staged, path)
    return path


def load_pt2e(path: PathLike) -> nn.Module:
    """The model a :func:`save_pt2e` archive holds (``model.eval()`` works on it; compile it with
    :func:`compile_pt2e` for x86 speed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pt2e archive at {path} (write one with tools/export.py --format pt2e)")
    utils = require("torchao.quantization.pt2e", package="torchao", purpose="loading a pt2e INT8 archive")
    module = torch.export.load(path).module()
    utils.allow_exported_model_train_eval(module)
    return module
