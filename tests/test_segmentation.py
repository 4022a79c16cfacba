"""Segmentation baselines (LR-ASPP, ESPNet, ESPNetV2): registry, shapes, parity with the spec,
fusion, QAT -> INT8 on x86 and qnnpack, small/odd/bad inputs, and tools/model_stats.py."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize
from torch.utils.flop_counter import FlopCounterMode

import frostnet
from frostnet import quant
from frostnet.models._seg_common import HardSigmoid, SqueezeExcite, resize
from frostnet.models.espnet import EESP, ESPBlock
from frostnet.models.lraspp import lraspp_frostnet, lraspp_mobilenet_v3_re

ROOT = Path(__file__).resolve().parents[1]
SEGMENTATION = frostnet.list_models(task="segmentation")
BACKENDS = ["x86", "qnnpack"]
EXPECTED = {
    "lraspp_mobilenet_v3_large_re", "lraspp_mobilenet_v3_small_re", "espnet", "espnet_v2",
    "lraspp_frostnet_small_1_0", "lraspp_frostnet_base_1_0", "lraspp_frostnet_large_1_0",
}
# shared/specs/baselines.md at 20 classes: parameters, and MACs per input size
SPEC = {
    "lraspp_mobilenet_v3_large_re": (2.42e6, {(1024, 2048): 12.80e9, (768, 768): 3.60e9}),
    "lraspp_mobilenet_v3_small_re": (0.75e6, {(1024, 2048): 3.94e9, (768, 768): 1.11e9}),
    "espnet": (0.60e6, {(1024, 2048): 30.21e9, (768, 768): 8.50e9}),
    "espnet_v2": (3.43e6, {(1024, 2048): 48.60e9}),
}


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _grads_ok(model):
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_registry_lists_the_segmentation_models():
    assert EXPECTED <= set(SEGMENTATION)
    assert all(frostnet.models.get_model_task(n) == "segmentation" for n in SEGMENTATION)
    assert not set(SEGMENTATION) & set(frostnet.list_models(task="classification"))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_forward_backward_odd_size(name):
    model = frostnet.get_model(name, num_classes=7, in_channels=4)
    x = torch.randn(2, 4, 65, 97)  # odd sizes: every stride-2 layer rounds up
    out = model(x)
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 7, 65, 97) and out["out"].dtype == torch.float32
    assert torch.isfinite(out["out"]).all()
    out["out"].logsumexp(1).mean().backward()
    assert _grads_ok(model)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_small_inputs_below_the_pooling_window(name):
    """Inputs whose deepest maps are 1x1 (LR-ASPP's 25x25 pool clamps to them) still work."""
    model = frostnet.get_model(name, num_classes=5).eval()
    with torch.no_grad():
        for size in [(1, 1), (8, 8), (17, 31), (40, 9)]:
            out = model(torch.randn(1, 3, *size))["out"]
            assert out.shape == (1, 5, *size) and torch.isfinite(out).all(), size
    model.train()  # training needs two values per BN channel: batch 2 of a 16x16 image is enough
    model(torch.randn(2, 3, 16, 16))["out"].sum().backward()


@pytest.mark.parametrize("name", sorted(SPEC))
def test_params_match_spec(name):
    with torch.device("meta"):
        model = frostnet.get_model(name, num_classes=20)
    params = sum(p.numel() for p in model.parameters())
    assert math.isclose(params, SPEC[name][0], rel_tol=0.02), (params, SPEC[name][0])


@pytest.mark.parametrize("name, size", [(n, s) for n in sorted(SPEC) for s in SPEC[n][1]], ids=str)
def test_macs_match_spec(name, size):
    """MACs = FLOPs / 2 at the spec's sizes, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = frostnet.get_model(name, num_classes=20).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(torch.randn(1, 3, *size))["out"]
    assert out.shape == (1, 20, *size)
    macs = counter.get_total_flops() / 2
    assert math.isclose(macs, SPEC[name][1][size], rel_tol=0.02), (macs, SPEC[name][1][size])


def test_model_stats_tool_prints_the_table(capsys):
    spec = importlib.util.spec_from_file_location("frostnet_tools_model_stats", ROOT / "tools" / "model_stats.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    args = tool.get_args_parser().parse_args(
        ["--models", "lraspp_mobilenet_v3_*", "--models", "espnet", "--size", "1024x2048", "--num-classes", "20"]
    )
    assert tool.main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | input | classes | params | MACs |")
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == {"espnet", "lraspp_mobilenet_v3_large_re", "lraspp_mobilenet_v3_small_re"}
    assert "| 0.755M | 3.94G |" in rows["lraspp_mobilenet_v3_small_re"]
    assert "30.21G MACs @1024x2048 (±0.0%)" in rows["espnet"]
    assert tool.parse_size("768") == (768, 768) and tool.parse_size("1024x2048") == (1024, 2048)
    with pytest.raises(ValueError, match=r"no registered model matches \['nope\*'\]"):
        tool.select_models(["nope*"])


def test_mobilenet_v3_re_structure():
    large = lraspp_mobilenet_v3_re("large")
    small = lraspp_mobilenet_v3_re("small")
    for model, low, last, halved in [(large, 40, 480, (480, 80)), (small, 24, 288, (288, 48))]:
        b = model.backbone
        assert [int(i["num_chs"]) for i in b.feature_info] == [low, last]
        assert (b.layer4[-1].dw_conv.out_channels, b.layer4[-1].out_channels) == halved
        assert all(blk.stride == 1 and blk.dw_conv.conv[0].dilation == (2, 2) for blk in b.layer4)
        assert b.layer5.out_channels == last and model.head.cbr.out_channels == 128
        # "-RE": ReLU is the only activation module; the SE gate is add_scalar/relu6/mul_scalar
        assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.PReLU)) for m in model.modules())
    with torch.device("meta"):  # the pool is 25x25 stride 8 on the OS16 map: 64x128 -> 5x13
        model = lraspp_mobilenet_v3_re("large").eval()
        seen = []
        model.head.scale.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
        model(torch.randn(1, 3, 1024, 2048))
    assert seen == [(5, 13)]


def test_espnet_structure():
    espnet = frostnet.get_model("espnet", num_classes=20)
    assert [espnet.b1.out_channels, espnet.b2.out_channels, espnet.b3.out_channels] == [19, 131, 256]
    assert len(espnet.level2) == 2 and len(espnet.level3) == 8
    v2 = frostnet.get_model("espnet_v2", num_classes=20)
    assert [v2.level1.out_channels, v2.level2_0.eesp.expand.out_channels + 32] == [32, 128]
    assert [len(v2.level3), len(v2.level4), v2.level4[0].expand.out_channels] == [3, 7, 512]
    for model in (espnet, v2):
        assert not any(isinstance(m, (nn.PReLU, nn.ConvTranspose2d)) for m in model.modules())


def test_esp_and_eesp_hierarchical_fusion_is_a_running_sum():
    torch.manual_seed(1)
    block = ESPBlock(40, 40).eval()
    x = torch.randn(2, 40, 12, 12)
    r = block.reduce(x)
    d = [branch(r) for branch in block.branches]  # dilations 1, 2, 4, 8, 16
    fused = [d[0], d[1], d[1] + d[2], d[1] + d[2] + d[3], d[1] + d[2] + d[3] + d[4]]
    torch.testing.assert_close(block(x), block.cbr(torch.cat(fused, 1) + x))

    unit = EESP(64, 64, r_lim=7).eval()
    assert [b.dilation[0] for b in unit.branches] == [1, 1, 2, 3]  # kernels 3, 3, 5, 7
    assert [b.dilation[0] for b in EESP(32, 96, stride=2, r_lim=13).branches] == [1, 2, 3, 4]
    x = torch.randn(2, 64, 12, 12)
    p = unit.proj(x)
    d = [branch(p) for branch in unit.branches]
    fused = [sum(d[: k + 1]) for k in range(4)]
    torch.testing.assert_close(unit(x), F.relu(unit.expand(unit.dense(torch.cat(fused, 1))) + x))


def test_hard_sigmoid_and_one_pixel_resize():
    x = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(HardSigmoid()(x), F.hardsigmoid(x))
    # torch's quantized upsampling scrambles 1x1 maps with several channels; resize broadcasts
    q = torch.quantize_per_tensor(torch.rand(2, 8, 1, 1), 0.01, 3, torch.quint8)
    out = resize(q, (3, 5))
    assert out.is_quantized and out.shape == (2, 8, 3, 5)
    torch.testing.assert_close(out.dequantize(), q.dequantize().expand(2, 8, 3, 5))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_fuse_model(name):
    model = frostnet.get_model(name, num_classes=6)
    with torch.no_grad():  # non-trivial BN statistics (of real activations, so nothing blows up)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)["out"]
        model.fuse_model()
        model.fuse_model()  # idempotent
        out = model(x)["out"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(isinstance(m.fc1, nni.LinearReLU) for m in model.modules() if isinstance(m, SqueezeExcite))
    qat = frostnet.get_model(name, num_classes=6).train()
    qat.fuse_model()  # training mode: QAT fusion keeps BN as a module
    assert any(isinstance(m, nni.ConvBnReLU2d) for m in qat.modules())


def _calibrate(model, x):
    """Re-estimate BN statistics and every quantization range on ``x`` at the final weights.

    A few large steps leave the running BN statistics and the moving-average ranges behind the
    weights; x86 INT8 ops then do not clip where the fake-quant (7-bit ranges) does. Measuring
    both on the calibration input makes the fake-quant model the one INT8 must reproduce.
    """
    frozen = {id(m.bn) for m in model.modules() if isinstance(m, nniqat.ConvBn2d) and m.freeze_bn}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in frozen:
            m.reset_running_stats()
            m.momentum = None  # one batch: the running statistics are that batch's
        if isinstance(m, FakeQuantize):
            m.activation_post_process.averaging_constant = 1.0
    with torch.no_grad():
        model.train()
        model(x)
        model.eval()
        model(x)  # ranges of the eval-mode (BN-folded) weights and activations
    quant.disable_observer(model)


# HardSigmoid's add_scalar/mul_scalar FloatFunctionals are never observed (their INT8 ops move
# the zero point/scale instead of requantizing); convert still asks their observers for qparams.
@pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams:UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SEGMENTATION)
def test_qat_train_convert_int8_agrees_with_fake_quant(name, backend):
    # Every image: left half one colour (class 1), right half another (class 3). The same layout
    # in both images, so nothing can be learnt from which image is which.
    x = torch.randn(2, 3, 64, 64) * 0.5
    x[..., :32] += torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)
    x[..., 32:] += torch.tensor([-1.0, 1.0, 0.0]).view(1, 3, 1, 1)
    y = torch.full((2, 64, 64), 1)
    y[..., 32:] = 3
    model = frostnet.get_model(name)  # 19 classes
    quant.prepare_qat(model, backend)  # fuses (QAT) and inserts fake quantization
    # BN on a 1x1 map (LR-ASPP's pooled gate at 64x64) sees one value per image: with batch 2
    # it always outputs +-1, which train mode learns and eval mode does not reproduce. Freeze
    # those at the statistics of this input.
    tiny = []
    hooks = [m.register_forward_hook(lambda m, i, o: tiny.append(m) if o.shape[-2:] == (1, 1) else None)
             for m in model.modules() if isinstance(m, nniqat.ConvBn2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    for h in hooks:
        h.remove()
    for m in tiny:
        m.freeze_bn_stats()
    assert bool(tiny) == name.startswith("lraspp")

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and _grads_ok(model), losses
    _calibrate(model, x)
    with torch.no_grad():
        fake = model(x)["out"]
        int8 = quant.convert(model, backend)
        out = int8(x)["out"]
    assert (fake.argmax(1) == y).float().mean() > 0.9  # the eval model learnt x
    assert out.dtype == torch.float32 and out.shape == (2, 19, 64, 64)
    same = fake.argmax(1) == out.argmax(1)
    # Logits cross over within one OS8 cell (8 px) of the class boundary; elsewhere they are
    # decisive and INT8 must predict what the fake-quantized model predicts.
    decisive = same[..., list(range(0, 24)) + list(range(40, 64))]
    assert decisive.float().mean().item() >= 0.99, decisive.float().mean().item()
    assert same.float().mean().item() >= 0.97, same.float().mean().item()
    # all of it is INT8 except the FP32 tail the model lists
    assert quant.is_quantized_model(int8)
    float_left = {n for n, m in int8.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert float_left == set(model.float_modules)
    with torch.no_grad():  # odd and small inputs through the INT8 model
        assert int8(torch.randn(1, 3, 17, 31))["out"].shape == (1, 19, 17, 31)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_bad_inputs_raise_clear_errors(name):
    model = frostnet.get_model(name).eval()
    with pytest.raises(ValueError, match=rf"{name} was built for 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"4-D batch.*3-D tensor.*unsqueeze"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    "build, match, error",
    [
        (lambda: frostnet.get_model("espnet", num_classes=0), "num_classes must be a positive integer, got 0", ValueError),
        (lambda: frostnet.get_model("lraspp_mobilenet_v3_small_re", num_classes=0), "num_classes must be a positive integer, got 0", ValueError),
        (lambda: frostnet.get_model("lraspp_frostnet_small_1_0", in_channels=0), "in_channels must be a positive integer, got 0", ValueError),
        (lambda: frostnet.get_model("espnet_v2", in_channels=0), "in_channels must be a positive integer, got 0", ValueError),
        (lambda: frostnet.get_model("espnet", num_classes=3), r"espnet needs num_classes >= 5 .* got 3", ValueError),
        (lambda: frostnet.get_model("espnet_v2", dropout=1.5), r"dropout must be in \[0, 1\), got 1.5", ValueError),
        (lambda: lraspp_mobilenet_v3_re("medium"), "unknown MobileNetV3 mode 'medium'; valid choices: large, small", ValueError),
        (lambda: lraspp_frostnet("tiny", 1.0), "unknown FrostNet mode 'tiny'; valid choices: small, base, large", ValueError),
        (lambda: frostnet.get_model("espnet", num_clases=19), "num_clases", TypeError),
    ],
)
def test_bad_constructor_arguments(build, match, error):
    with pytest.raises(error, match=match):
        build()
