"""Registry-driven checks of every FrostNet: build, shapes, gradients, parity with the spec."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import frostnet
from frostnet.models import frostnet as build_frostnet
from frostnet.models import make_divisible

FROSTNETS = frostnet.list_models("frostnet_*")

# shared/specs/frostnet.md: params / MACs at 224x224, 1000 classes (MACs = FLOPs / 2)
SPEC = {
    ("small", 0.5): (2.35e6, 101e6), ("small", 0.75): (3.48e6, 212e6),
    ("small", 1.0): (4.86e6, 315e6), ("small", 1.25): (6.75e6, 504e6),
    ("base", 0.5): (2.38e6, 113e6), ("base", 0.75): (3.53e6, 245e6),
    ("base", 1.0): (5.00e6, 363e6), ("base", 1.25): (6.94e6, 582e6),
    ("large", 0.5): (2.60e6, 132e6), ("large", 0.75): (4.04e6, 286e6),
    ("large", 1.0): (5.81e6, 431e6), ("large", 1.25): (8.22e6, 693e6),
}


def test_registry_lists_all_fifteen_frostnets():
    expected = {f"frostnet_{m}_{w}" for m in ("small", "base", "large") for w in ("0_35", "0_5", "0_75", "1_0", "1_25")}
    assert set(FROSTNETS) == expected
    assert frostnet.list_models("frostnet_small_*") == sorted(n for n in expected if "small" in n)


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'frostnet_smal_1_0'.*frostnet_small_1_0"):
        frostnet.get_model("frostnet_smal_1_0")


def test_unknown_kwarg_is_rejected_not_swallowed():
    with pytest.raises(TypeError, match="num_clases"):
        frostnet.get_model("frostnet_small_0_35", num_clases=10)


@pytest.mark.parametrize("name", FROSTNETS)
def test_forward_backward(name):
    model = frostnet.get_model(name, num_classes=7, in_channels=1, dropout=0.1)
    x = torch.randn(2, 1, 64, 48)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out).all()
    assert model.classifier[1].p == 0.1


@pytest.mark.parametrize("mode_width", sorted(SPEC), ids=lambda mw: f"{mw[0]}_{mw[1]}")
def test_params_and_macs_match_spec(mode_width):
    mode, width = mode_width
    model = build_frostnet(mode, width).eval()
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    macs = counter.get_total_flops() / 2
    want_params, want_macs = SPEC[mode_width]
    assert math.isclose(params, want_params, rel_tol=0.01), (params, want_params)
    assert math.isclose(macs, want_macs, rel_tol=0.01), (macs, want_macs)


def test_make_divisible():
    assert make_divisible(32 * 0.35) == 16  # 11.2 -> 8 is below 90%, so 16
    assert make_divisible(10) == 16
    assert make_divisible(24) == 24
    assert make_divisible(3) == 8
    assert make_divisible(100) == 104


def test_frost_block_structure_at_width_1():
    model = build_frostnet("small", 1.0)
    first = model.layer1[0]  # expansion 1: depthwise + project only
    assert not hasattr(first, "conv1") and not hasattr(first, "squeeze_conv")
    plain = model.layer1[1]  # 16 // 4 < 8: plain inverted residual
    assert hasattr(plain, "conv1") and not plain.cascade
    cascade = model.layer3[0]  # 40 // 4 = 10 -> squeeze to 16, concat 16 + 40
    assert cascade.cascade and cascade.conv1.conv[0].in_channels == 56
    assert model.layer3[1].use_residual and not model.layer3[0].use_residual


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="tiny", width=1.0), r"unknown FrostNet mode 'tiny'; valid choices: small, base, large"),
        (dict(mode="small", width=0.6), r"unknown FrostNet width 0.6; valid choices: 0.35, 0.5, 0.75, 1.0, 1.25"),
        (dict(mode="small", width=1.0, num_classes=0), "num_classes must be a positive integer, got 0"),
        (dict(mode="small", width=1.0, output_stride=4), r"unknown output_stride 4; valid choices: 8, 16, 32"),
        (dict(mode="small", width=1.0, dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
        (dict(mode="small", width=1.0, dilated=True, output_stride=8), "dilated=True means output_stride=16"),
        (dict(mode="small", width=1.0, features_only=True, out_indices=(1, 7)), "out_indices"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_frostnet(**kwargs)


def test_bad_inputs_raise_clear_errors():
    model = frostnet.get_model("frostnet_small_0_35").eval()
    with pytest.raises(ValueError, match=r"built for 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"4-D batch.*3-D tensor.*unsqueeze"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
