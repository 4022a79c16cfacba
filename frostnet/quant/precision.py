"""Mixed precision for low-bit QAT: the first and last quantized layers stay at 8 bits.

The low-bit QAT papers this project follows (TR scheduling, EWGS, OCTAV) quantize every layer
but the first and the last at the simulated width; the first sees the image and the last writes
the logits, and both are small. :func:`keep_8bit_ends` does this on a QAT-prepared model: it
replaces the fake quantizers of those two layers by fresh ones from an 8-bit qconfig of the same
method, so the rest of the model keeps simulating W4A4 (etc.) and the whole model still converts
to INT8 with :func:`frostnet.quant.convert`::

    prepare_qat(model, "x86", qconfig=get_method_qconfig("ewgs", "x86", weight_quant_range=(-8, 7),
                                                         act_quant_range=(0, 15)))
    keep_8bit_ends(model, get_method_qconfig("ewgs", "x86"))   # 8-bit qconfig of the same method
"""

from __future__ import annotations

from typing import Final

from torch import nn
from torch.ao.quantization import QConfig

from ._eager import is_fake_quant_module
from .weight_levels import weight_quantized_modules

__all__ = ["END_LAYER_BITS", "keep_8bit_ends"]

#: The width :func:`keep_8bit_ends` keeps the first and last quantized layers at.
END_LAYER_BITS: Final[int] = 8


def _activation_quantizers(model: nn.Module) -> list[str]:
    # Fake quantizers of activations, in module order (the inner observers of fake quantizers
    # are observers, not fake quantizers, so they are not listed).
    return [n for n, m in model.named_modules()
            if n.split(".")[-1] == "activation_post_process" and is_fake_quant_module(m)]


def _replace(model: nn.Module, name: str, factory: object) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    new = factory()  # type: ignore[operator]
    device = next(iter(old.buffers()), None)
    setattr(parent, attr, new.to(device.device) if device is not None else new)


def keep_8bit_ends(model: nn.Module, qconfig: QConfig) -> list[str]:
    """Give the first and last weight-quantized layers of a QAT-prepared ``model`` ``qconfig``'s
    fake quantizers (the method's 8-bit qconfig); returns the names of the replaced quantizers.

    Replaced: the first layer's weight quantizer and the activation quantizer of its input; the
    last layer's weight quantizer, the activation quantizer of its input and that of its output
    (the logits of a classifier). "First", "last" and "input" follow module order (the order of
    ``named_modules()``), which is the execution order of the zoo's models: the input of a layer
    is the last activation quantizer registered before it. The new quantizers start fresh (no
    observed range; EWGS bounds are new parameters, so call this before building the optimizer's
    group for them, as :class:`frostnet.recipe.statassist.StatAssist` does).

    Args:
        model: a model prepared with :func:`frostnet.quant.prepare_qat`, before training.
        qconfig: the qconfig of the two end layers, e.g. ``get_method_qconfig(method, backend)``
            (no ranges: INT8 weights and the backend's activation range).

    Raises:
        ValueError: ``model`` has fewer than two weight-quantized layers (not prepared for QAT?).
    """
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"qconfig must be a torch.ao.quantization.QConfig, got {type(qconfig).__name__}")
    layers = [name for name, _ in weight_quantized_modules(model)]
    if len(layers) < 2:
        raise ValueError(f"{type(model).__name__} has {len(layers)} weight-quantized layers; keep_8bit_ends needs a "
                         "model prepared for QAT (frostnet.quant.prepare_qat) with at least two")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    acts = _activation_quantizers(model)
    replaced: list[str] = []
    for layer, with_output in ((layers[0], False), (layers[-1], True)):
        before = [a for a in acts if order[a] < order[layer]]
        if before:
            replaced.append(before[-1])
        replaced.append(f"{layer}.weight_fake_quant")
        own = f"{layer}.activation_post_process"
        if with_output and own in order:
            replaced.append(own)
    for name in dict.fromkeys(replaced):
        factory = qconfig.weight if name.endswith(".weight_fake_quant") else qconfig.activation
        _replace(model, name, factory)
    for layer in (layers[0], layers[-1]):
        model.get_submodule(layer).qconfig = qconfig
    return list(dict.fromkeys(replaced))
