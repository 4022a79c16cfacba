"""INT8 export beyond the eager API: pt2e (torch.export + torchao), ONNX QDQ (onnxruntime), tools/export.py.

The round trips run on a small quantizable model (conv-BN-ReLU, a FloatFunctional skip add,
pooling, a linear head) so that export and quantization take seconds; they skip with a reason when
the ``[export]`` extra is missing. Error cases (unknown format/backend, a missing extra simulated
with monkeypatch, a dense model with a format it cannot export) run without the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import frostnet
from frostnet import quant
from frostnet.quant import onnx_export, pt2e

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_torchao = pytest.mark.skipif(not _has("torchao"), reason="torchao missing: pip install 'frostnet[export]'")
needs_onnx = pytest.mark.skipif(not (_has("onnxscript") and _has("onnxruntime")),
                                reason="onnxscript/onnxruntime missing: pip install 'frostnet[export]'")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"frostnet_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Tiny(nn.Module):
    """The quantizable patterns of the zoo in miniature: stubs, fused conv-BN-ReLU, a skip add."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = quant.QuantStub()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.skip_add = quant.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)
        self.dequant = quant.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(self.quant(x))))
        y = self.skip_add.add(self.conv2(y), y)
        return self.dequant(self.fc(self.pool(y).flatten(1)))

    def fuse_model(self, is_qat=None) -> None:
        quant.fuse_modules(self, [["conv", "bn", "relu"]], is_qat=bool(is_qat))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():  # BN statistics of a trained model, not the identity of a fresh one
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.fc.weight.mul_(4.0)
    return m.eval()


def _data():
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)]
    fixed = torch.randn(8, 3, 16, 16, generator=g)
    return calibration, fixed


def _eager_int8(model, calibration):
    import copy

    with quant.use_engine("x86"):
        return quant.quantize_ptq(copy.deepcopy(model), calibration, "x86")


# Tolerance of an artifact vs the eager INT8 model, in steps of the eager model's output scale.
# Both are INT8 renderings of the same float model with independently calibrated activation grids:
# eager x86 uses 128 levels (frostnet's qconfig), pt2e's x86 quantizer and onnxruntime 256, so
# every quantized tensor differs by up to half an eager step and the differences of the four
# quantized tensors (input, conv-BN-ReLU, add, logits) add up. Measured on this model: about 1 step
# (pt2e) and 2 steps (onnxruntime's MinMax calibration vs eager's histogram); 4 steps leaves
# margin and still fails for a wrong scale, a missing BN fold or a dropped skip add, each of which
# moves the logits by many steps (the logits span about 40 steps here).
STEPS = 4


def _steps(out, ref, int8):
    step = float(int8.fc.scale)
    assert ref.abs().max() > 10 * STEPS * step, "the fixed inputs must give logits well above the tolerance"
    return (out - ref).abs().max().item() / step


@pytest.fixture(scope="module")
def pt2e_graph():
    """One pt2e INT8 graph of the tiny model for the tests that read it (export takes seconds)."""
    if not _has("torchao"):
        pytest.skip("torchao missing: pip install 'frostnet[export]'")
    calibration, _ = _data()
    return pt2e.quantize_pt2e(_tiny(), calibration, backend="x86")


# torch.export + prepare/convert of even a tiny model takes 10-20 s on the shared 2-core machine
@pytest.mark.slow
def test_pt2e_round_trip_close_to_eager_int8(tmp_path, pt2e_graph):
    model = _tiny()
    calibration, x = _data()
    int8 = _eager_int8(model, calibration)
    graph = pt2e_graph
    with torch.no_grad(), quant.use_engine("x86"):
        ref, out = int8(x), graph(x)
    assert _steps(out, ref, int8) <= STEPS
    # the saved archive is the same graph: bit for bit, at another batch size too
    path = pt2e.save_pt2e(graph, tmp_path / "tiny.pt2", calibration[0])
    loaded = pt2e.load_pt2e(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
        assert torch.equal(loaded(x[:1]), graph(x[:1]))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt2"], "the archive is staged in a removed temporary folder"


@needs_torchao
@pytest.mark.slow  # a torch.export of its own (the prepared graph, before convert)
def test_carried_over_ranges_are_the_eager_ranges_regridded():
    qpt2e = importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
    model = _tiny()
    calibration, x = _data()
    int8 = _eager_int8(model, calibration)
    prepared = qpt2e.prepare_pt2e(pt2e.export_float(model, pt2e.example_from(calibration)).module(),
                                  pt2e._quantizer("x86"))
    with torch.no_grad():
        prepared(calibration[0])
    counts = pt2e.carry_over_ranges(prepared, int8, act_quant_max=quant.act_quant_max("x86"))
    assert counts["carried"] >= 3 and counts["calibrated"] == 0, counts
    converted = qpt2e.convert_pt2e(prepared)
    first_q = next(n for n in converted.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target))
    scale, zero_point = float(first_q.args[1]), int(first_q.args[2])
    # the QuantStub's range [-zp * s, (127 - zp) * s] on 0..255 levels: half the scale, twice the zero point
    lo, hi = -int(int8.quant.zero_point) * float(int8.quant.scale), (127 - int(int8.quant.zero_point)) * float(int8.quant.scale)
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert zero_point == pytest.approx(-lo / scale, abs=1)
    with pytest.raises(TypeError, match="converted eager INT8 model"):
        pt2e.carry_over_ranges(prepared, model)


@pytest.mark.slow
def test_pt2e_compiled_matches_the_graph(pt2e_graph):
    model = _tiny()
    calibration, x = _data()
    graph = pt2e_graph
    fast = pt2e.compile_pt2e(graph)
    with torch.inference_mode():
        out, ref = fast(x), graph(x)
    int8 = _eager_int8(model, calibration)
    assert (out - ref).abs().max().item() <= 2 * float(int8.fc.scale)  # Inductor's INT8 kernels round requantization once


@needs_onnx
@pytest.mark.slow  # the dynamo exporter and quantize_static: 10-20 s here
def test_onnx_round_trip_close_to_eager_int8(tmp_path):
    import onnx

    model = _tiny()
    calibration, x = _data()
    int8 = _eager_int8(model, calibration)
    path = onnx_export.export_onnx(model, tmp_path / "tiny.onnx", calibration)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops, ops
    session = onnx_export.OnnxModule(path, threads=1)
    with torch.no_grad(), quant.use_engine("x86"):
        ref = int8(x)
    assert _steps(session(x), ref, int8) <= STEPS
    assert session(x[:1]).shape == (1, 5)  # dynamic batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"], "temporary files are removed"


@needs_onnx
@pytest.mark.slow
def test_onnx_float_export_matches_float_model(tmp_path):
    model = _tiny()
    calibration, x = _data()
    path = onnx_export.export_onnx(model, tmp_path / "f.onnx", calibration, int8=False)
    with torch.no_grad():
        assert torch.allclose(onnx_export.OnnxModule(path)(x), model(x), atol=1e-4)  # FP32 kernel rounding only


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("missing", ["torchao", "onnxscript"])
def test_missing_extra_names_the_package_and_the_extra(monkeypatch, tmp_path, missing):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == missing:
            raise ModuleNotFoundError(f"No module named {missing!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pt2e.importlib, "import_module", fake)
    model = _tiny()
    calibration, _ = _data()
    with pytest.raises(ImportError, match=rf"{missing}.*frostnet\[export\]"):
        if missing == "torchao":
            pt2e.quantize_pt2e(model, calibration)
        else:
            onnx_export.export_onnx(model, tmp_path / "m.onnx", calibration)
    assert not (tmp_path / "m.onnx").exists()


def test_xnnpack_without_executorch_names_executorch(monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ModuleNotFoundError("No module named 'executorch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pt2e.importlib, "import_module", fake)
    with pytest.raises(ImportError, match="pip install executorch"):
        pt2e._quantizer("xnnpack")


def test_bad_pt2e_arguments():
    model = _tiny()
    calibration, _ = _data()
    with pytest.raises(ValueError, match=r"unknown pt2e backend 'fbgemm'; valid choices: x86, xnnpack"):
        pt2e.quantize_pt2e(model, calibration, backend="fbgemm")
    with pytest.raises(ValueError, match="non-empty sequence of float image tensors"):
        pt2e.example_from([])
    with pytest.raises(ValueError, match="batch size >= 2"):
        pt2e.export_float(model, torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="load the .fp32 weights"):
        pt2e.export_float(_eager_int8(model, calibration), torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"unknown ONNX INT8 method 'tflite'; valid choices: ort, pt2e"):
        onnx_export.export_onnx(model, "unused.onnx", calibration, method="tflite")
    with pytest.raises(FileNotFoundError, match="tools/export.py --format pt2e"):
        pt2e.load_pt2e("/nonexistent/model.pt2")


def test_detector_body_flattens_levels():
    class Body(nn.Module):
        def forward(self, x):
            return [(x + 1, x + 2), (x + 3, x + 4)]

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Body()

    x = torch.zeros(1)
    assert [t.item() for t in onnx_export.tensor_body(Detector(), "detection")(x)] == [1, 2, 3, 4]
    model = _tiny()
    assert onnx_export.tensor_body(model, "segmentation") is model
    with pytest.raises(TypeError, match=r"expose its tensor network as \.body"):
        onnx_export.tensor_body(model, "detection")


def _args(tool, *argv):
    return tool.get_args_parser().parse_args(["frostnet_small_1_0.fashion_mnist.fp32", "--output", "m.out", *argv])


def test_export_tool_rejects_bad_arguments(capsys):
    tool = _tool("export")
    with pytest.raises(ValueError, match=r"unknown --format 'tflite'; valid choices: onnx, pt2e, torchscript"):
        tool.check_args(_args(tool, "--format", "tflite"), "classification")
    with pytest.raises(ValueError, match=r"unknown --backend 'arm'; valid choices: x86, xnnpack"):
        tool.check_args(_args(tool, "--format", "pt2e", "--backend", "arm"), "classification")
    with pytest.raises(ValueError, match="--backend xnnpack applies to --format pt2e/torchscript"):
        tool.check_args(_args(tool, "--format", "onnx", "--backend", "xnnpack"), "classification")
    with pytest.raises(ValueError, match="--ranges qat applies to --format pt2e, not onnx"):
        tool.check_args(_args(tool, "--format", "onnx", "--ranges", "qat"), "classification")
    with pytest.raises(ValueError, match="--calib-batches must be >= 1, got 0"):
        tool.check_args(_args(tool, "--format", "onnx", "--calib-batches", "0"), "classification")
    # through main: a clear message and exit code 2, nothing written
    assert tool.main(_args(tool, "--format", "tflite")) == 2
    assert "unknown --format 'tflite'" in capsys.readouterr().err
    assert not Path("m.out").exists()


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_export_tool_rejects_a_format_dense_models_cannot_export(task):
    tool = _tool("export")
    with pytest.raises(ValueError, match=rf"--format torchscript is not supported for {task} models.*valid choices: onnx, pt2e"):
        tool.check_args(_args(tool, "--format", "torchscript"), task)
    tool.check_args(_args(tool, "--format", "onnx"), task)  # their tensor body exports


def test_export_tool_resolves_int8_names_to_their_float_base():
    info = _tool("export").describe_weights("frostnet_small_1_0.fashion_mnist.int8_x86")
    assert info["fp32"] == "frostnet_small_1_0.fashion_mnist.fp32"  # onnx/pt2e export the QAT latent weights
    assert info["int8"]["x86"] == "frostnet_small_1_0.fashion_mnist.int8_x86"
    assert info["task"] == "classification" and info["input_size"] == 32


def _scene_batches(task):
    from frostnet.data import FashionMNIST
    from frostnet.recipe.dense_data import build_dense_data

    try:
        FashionMNIST(split="test")
    except FileNotFoundError:
        pytest.skip("apt-get install -y dataset-fashion-mnist")
    _, eval_b, info = build_dense_data("fashion_scenes:size=64,train_images=32,val_images=8,test_images=16", task=task,
                                       input_size=64, batch_size=8, seed=0, eval_split="test")
    return eval_b, len(info.categories)


def test_dense_metric_of_a_perfect_segmenter_is_one():
    export = _tool("export")
    batches, num_classes = _scene_batches("segmentation")
    targets = {}

    def oracle(x):  # one-hot logits of the ground truth of the batch it is given
        y = targets[x.data_ptr()]
        return {"out": torch.nn.functional.one_hot(y.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()}

    class Batches:
        def epoch(self, epoch):
            for x, y in batches.epoch(epoch):
                targets[x.data_ptr()] = y
                yield x, y

    res = export.dense_metric("segmentation", oracle, None, Batches(), num_classes)
    assert res == {"miou": 1.0, "pixel_acc": 1.0}


def test_dense_metric_of_a_detector_body_matches_the_detector():
    """The artifact holds the tensor network only; the float detector lends priors and NMS."""
    from frostnet.quant.onnx_export import tensor_body
    from frostnet.recipe.engine import evaluate
    from frostnet.recipe.tasks import get_task

    export = _tool("export")
    batches, num_classes = _scene_batches("detection")
    torch.manual_seed(0)
    detector = frostnet.models.get_model("ssdlite_mobilenet_v2", num_classes=num_classes).eval()
    res = export.dense_metric("detection", tensor_body(detector, "detection"), detector, batches, num_classes)
    ref = evaluate(detector, batches, task=get_task("detection"), num_classes=num_classes)
    assert res == {k: round(float(ref[k]), 4) for k in ("map", "map_50", "map_75")}
