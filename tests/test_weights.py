"""FP32 and INT8 safetensors files: round trips, QAT, and corrupted files that must raise clearly."""

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import frostnet
from frostnet import quant
from frostnet.serialization import (
    WeightsError,
    content_sha256,
    export_int8,
    load_fp32,
    load_fp32_into,
    load_int8,
    save_fp32,
    save_int8,
    sha256_file,
)

ARCH = "frostnet_small_0_35"
BACKENDS = ["x86", "qnnpack"]


def _trained_like(name, seed=0, **kwargs):
    """A float model with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = frostnet.get_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _int8(name, backend, x):
    """A converted model through the QAT path (fake-quant observers see ``x`` once)."""
    model = _trained_like(name, num_classes=10).train()
    quant.prepare_qat(model, backend)
    with torch.no_grad():
        model(x)
    return model.eval()


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    model = _trained_like(ARCH, num_classes=10)
    path = tmp_path_factory.mktemp("fp32") / f"{ARCH}.test.fp32.safetensors"
    sha = save_fp32(model, path, arch=ARCH, num_classes=10, metadata={"dataset": "test"})
    return model, path, sha


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory, x):
    """backend -> (converted model, its output on x, file, sha256), for ARCH."""
    out = {}
    for backend in BACKENDS:
        qat = _int8(ARCH, backend, x)
        path = tmp_path_factory.mktemp("int8") / f"{ARCH}.test.int8_{backend}.safetensors"
        int8, sha = export_int8(qat, backend, path, arch=ARCH, builder_kwargs={"num_classes": 10})
        with torch.no_grad():
            ref = int8(x)
        out[backend] = (int8, ref, path, sha)
    return out


# ------------------------------------------------------------------------------ round trips


def test_fp32_round_trip_equal_outputs(fp32_file, x):
    model, path, sha = fp32_file
    assert sha == sha256_file(path)
    meta = safe_open(str(path), "pt").metadata()
    assert {"format", "format_version", "arch", "num_classes", "frostnet_version", "torch_version",
            "builder_kwargs", "content_sha256"} <= set(meta)
    assert meta["arch"] == ARCH and json.loads(meta["builder_kwargs"]) == {"num_classes": 10}
    fresh = frostnet.get_model(ARCH, num_classes=10).eval()
    load_fp32_into(fresh, path, expected_sha256=sha, arch=ARCH)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    by_path = frostnet.get_model(ARCH, weights=str(path)).eval()  # num_classes from the file
    with torch.no_grad():
        assert torch.equal(by_path(x), model(x))
    tensors, _ = load_fp32(path, expected_sha256=sha)  # the existing API keeps working
    assert set(tensors) == set(model.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_round_trip_bitwise(int8_files, x, backend):
    int8, ref, path, sha = int8_files[backend]
    meta = safe_open(str(path), "pt").metadata()
    assert meta["backend"] == backend and meta["format"] == "frostnet-int8"
    assert meta["qscheme"] == "per_channel_affine"  # every engine: per-channel weights
    with safe_open(str(path), "pt") as f:  # no quantized dtypes in the file
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"I8", "U8", "I32", "I64", "F32", "F64"}
    torch.backends.quantized.engine = "qnnpack" if backend == "x86" else "x86"
    loaded = load_int8(path, expected_sha256=sha, arch=ARCH, backend=backend)
    assert torch.backends.quantized.engine == backend
    assert quant.is_quantized_model(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    # the builder path rebuilds the same model from the file alone
    built = frostnet.get_model(ARCH, weights=str(path), quantized=True)
    with torch.no_grad():
        assert torch.equal(built(x), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_round_trip_other_width_ptq(tmp_path, x, backend):
    name = "frostnet_small_0_5"
    int8 = quant.quantize_ptq(_trained_like(name, num_classes=7), [x], backend)
    path = tmp_path / "w.safetensors"
    save_int8(int8, path, arch=name, backend=backend)  # num_classes taken from the model
    with torch.no_grad():
        ref = int8(x)
        assert torch.equal(load_int8(path)(x), ref)


def test_fp32_into_qat_prepare_and_train(fp32_file, x):
    _, path, sha = fp32_file
    model = frostnet.get_model(ARCH, weights=str(path))
    quant.prepare_qat(model, "x86")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    w = model.conv1.conv[0].weight.detach().clone()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(w, model.conv1.conv[0].weight)


def test_qat_checkpoint_saves_latent_fp32_and_int8(tmp_path, x):
    model = _trained_like(ARCH, num_classes=10).train()
    quant.prepare_qat(model, "qnnpack")
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    fp32 = tmp_path / "qat.fp32.safetensors"
    save_fp32(model, fp32, arch=ARCH, num_classes=10)  # QAT-prepared model -> unfused latent weights
    tensors, _ = load_fp32(fp32)
    assert set(tensors) == set(frostnet.get_model(ARCH, num_classes=10).state_dict())
    assert torch.equal(tensors["conv1.conv.0.weight"], model.conv1.conv[0].weight.detach())
    assert torch.equal(tensors["conv1.conv.1.running_var"], model.conv1.conv[0].bn.running_var)
    int8, _ = export_int8(model, "qnnpack", tmp_path / "qat.int8.safetensors", arch=ARCH,
                          builder_kwargs={"num_classes": 10})
    with torch.no_grad():
        assert torch.equal(load_int8(tmp_path / "qat.int8.safetensors")(x), int8(x))
    ptq_prepared = quant.prepare_ptq(_trained_like(ARCH, num_classes=10), "x86")
    with pytest.raises(ValueError, match="PTQ-prepared or converted"):
        save_fp32(ptq_prepared, tmp_path / "bad.safetensors", arch=ARCH, num_classes=10)


def test_int8_state_handles_packed_linear_params():
    """Quantized Linear stores a (weight, bias) tuple and a dtype: the layout covers them."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.fc, self.dequant = quant.QuantStub(), torch.nn.Linear(8, 3), quant.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.fc(self.quant(x)))

        def fuse_model(self, is_qat=None):
            pass

    x = torch.randn(5, 8)
    for backend in BACKENDS:
        int8 = quant.quantize_ptq(Tiny().eval(), [x], backend)
        tensors, layout = quant.int8_state_to_tensors(int8)
        assert layout["fc._packed_params._packed_params"]["kind"] == "tuple"
        assert layout["fc._packed_params.dtype"] == {"kind": "dtype", "value": "qint8"}
        skeleton = quant.quantized_skeleton(Tiny(), backend)
        quant.int8_state_from_tensors(skeleton, tensors, layout)
        assert torch.equal(skeleton(x), int8(x))


# ----------------------------------------------------------------------------- corruptions


def _rewrite(src, dst, *, tensors=None, meta=None, rehash=True):
    """Re-save ``src`` with changed tensors/metadata, as a buggy writer would (content hash
    recomputed unless ``rehash=False``, which simulates corruption after writing)."""
    t = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        m = dict(f.metadata())
    if tensors:
        tensors(t)  # edits in place
    if meta:
        meta(m)
    if rehash:
        m["content_sha256"] = content_sha256(t, m)
    save_file(t, str(dst), metadata=m)
    return dst


def _put(dst, data):
    dst.write_bytes(data)
    return dst


def _pickle(dst):
    torch.save({"conv1.conv.0.weight": torch.zeros(1)}, dst)  # never unpickled: safetensors rejects it
    return dst


def _bytes(src, dst, edit):
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(edit(data)))
    return dst


def _header_len(data):
    return struct.unpack("<Q", bytes(data[:8]))[0]


def _flip_in_data(data):
    pos = 8 + _header_len(data) + (len(data) - 8 - _header_len(data)) // 2
    data[pos] ^= 0x5A
    return data


def _flip_in_header(data):
    pos = 8 + _header_len(data) // 2
    data[pos] ^= 0x01
    return data


def _with_layout(fn):
    def edit(m):
        layout = json.loads(m["layout"])
        fn(layout)
        m["layout"] = json.dumps(layout)
    return edit


def _first_key(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


# (id, kind of source file, how to corrupt it, load kwargs, expected message)
CORRUPTIONS = [
    ("empty", "int8", lambda s, d: _put(d, b""), {}, "is empty"),
    ("not_safetensors", "fp32", lambda s, d: _put(d, b"PK\x03\x04 this is a zip, not safetensors"), {},
     "not a readable safetensors file"),
    ("pickle_file", "fp32", lambda s, d: _pickle(d), {}, "not a readable safetensors"),
    ("truncated_half", "int8", lambda s, d: _bytes(s, d, lambda b: b[: len(b) // 2]), {}, "not a readable safetensors"),
    ("truncated_1_byte", "fp32", lambda s, d: _bytes(s, d, lambda b: b[:-1]), {}, "not a readable safetensors"),
    ("truncated_in_header", "int8", lambda s, d: _bytes(s, d, lambda b: b[:20]), {}, "not a readable safetensors"),
    ("header_length_lie_huge", "int8",
     lambda s, d: _bytes(s, d, lambda b: struct.pack("<Q", 2**40) + b[8:]), {}, "not a readable safetensors"),
    ("header_length_lie_small", "fp32",
     lambda s, d: _bytes(s, d, lambda b: struct.pack("<Q", _header_len(b) - 7) + b[8:]), {}, "not a readable safetensors"),
    ("trailing_garbage", "fp32", lambda s, d: _bytes(s, d, lambda b: b + b"\0" * 64), {}, "safetensors|corrupted"),
    ("flipped_byte_header", "int8", lambda s, d: _bytes(s, d, _flip_in_header), {},
     "not a readable safetensors|corrupted|format|layout|arch|backend"),
    ("flipped_byte_data_int8", "int8", lambda s, d: _bytes(s, d, _flip_in_data), {}, "is corrupted: its content hash"),
    ("flipped_byte_data_fp32", "fp32", lambda s, d: _bytes(s, d, _flip_in_data), {}, "is corrupted: its content hash"),
    ("sha_mismatch", "int8", lambda s, d: _bytes(s, d, lambda b: b), {"expected_sha256": "0" * 64}, "sha256 mismatch"),
    ("tensor_changed_no_rehash", "fp32",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update(
         {"conv1.conv.0.weight": t["conv1.conv.0.weight"] * 2}), rehash=False), {}, "content hash"),
    ("wrong_dtype_int8_values", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update(
         {"conv1.conv.0.weight": t["conv1.conv.0.weight"].to(torch.int16)})), {}, "has dtype int16, expected int8"),
    ("wrong_dtype_scales", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update(
         {"conv1.conv.0.weight@scale": t["conv1.conv.0.weight@scale"].float()})), {}, "dtype float32, expected float64"),
    ("wrong_dtype_fp32", "fp32",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update(
         {"conv1.conv.0.weight": t["conv1.conv.0.weight"].double()})), {}, "has dtype float64, expected float32"),
    ("wrong_shape_fp32", "fp32",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update(
         {"conv1.conv.1.bias": t["conv1.conv.1.bias"][:-1].clone()})), {}, "has shape"),
    ("missing_key_int8", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.pop("conv1.conv.0.bias"),
                           meta=_with_layout(lambda l: l.pop("conv1.conv.0.bias"))), {}, "missing keys"),
    ("missing_tensor_int8", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.pop("conv1.conv.0.weight@zero_point")), {}, "missing tensor"),
    ("extra_key_int8", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update({"extra.weight": torch.zeros(3)}),
                           meta=_with_layout(lambda l: l.update({"extra.weight": {"kind": "tensor"}}))), {},
     "unexpected keys"),
    ("extra_tensor_int8", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update({"stray": torch.zeros(3)})), {}, "unexpected tensors"),
    ("missing_key_fp32", "fp32",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.pop("layer1.0.conv2.conv.1.running_var")), {}, "missing keys"),
    ("extra_key_fp32", "fp32",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t.update({"head.weight": torch.zeros(2)})), {}, "unexpected keys"),
    ("nan_weights_fp32", "fp32",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t["classifier.2.bias"].__setitem__(0, float("nan"))), {},
     "NaN or infinite"),
    ("zero_scale_int8", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t[_first_key(t, "weight@scale")].zero_()), {},
     "not positive finite"),
    ("zero_point_out_of_range", "int8",
     lambda s, d: _rewrite(s, d, tensors=lambda t: t[_first_key(t, "weight@zero_point")].fill_(1000)), {},
     "zero points outside"),
    ("wrong_axis", "int8",
     lambda s, d: _rewrite(s, d, meta=_with_layout(lambda l: l["conv1.conv.0.weight"].update(axis=1))), {}, "axis"),
    ("layout_kind_swapped", "int8",
     lambda s, d: _rewrite(s, d, meta=_with_layout(lambda l: l.update({"conv1.conv.0.weight": {"kind": "tensor"}}))),
     {}, "stored as a plain tensor"),
    ("layout_not_json", "int8", lambda s, d: _rewrite(s, d, meta=lambda m: m.update(layout="{not json")), {},
     "unreadable layout"),
    ("no_content_hash_int8", "int8", lambda s, d: _strip_hash(s, d), {}, "no content_sha256"),
    ("wrong_arch_metadata", "fp32", lambda s, d: _rewrite(s, d, meta=lambda m: m.update(arch="frostnet_base_0_35")),
     {"arch": ARCH}, "holds weights for 'frostnet_base_0_35', not 'frostnet_small_0_35'"),
    ("other_arch_tensors", "fp32",
     lambda s, d: _rewrite(s, d, meta=lambda m: m.update(arch="frostnet_small_0_5")),
     {"build_arch": "frostnet_small_0_5"}, "does not fit"),
    ("wrong_num_classes_metadata", "int8",
     lambda s, d: _rewrite(s, d, meta=lambda m: m.update(num_classes="100", builder_kwargs='{"num_classes": 100}')),
     {}, "does not fit"),
    ("inconsistent_num_classes", "fp32", lambda s, d: _rewrite(s, d, meta=lambda m: m.update(num_classes="11")),
     {}, "inconsistent metadata"),
    ("num_classes_metadata_lies", "fp32",
     lambda s, d: _rewrite(s, d, meta=lambda m: m.update(num_classes="100", builder_kwargs='{"num_classes": 100}')),
     {}, "100-class.*but the model has 10"),
    ("wrong_format_version", "int8", lambda s, d: _rewrite(s, d, meta=lambda m: m.update(format_version="99")), {},
     "format version '99'"),
    ("int8_file_as_fp32", "int8", lambda s, d: _bytes(s, d, lambda b: b), {"as": "fp32"}, "not a frostnet FP32 file"),
    ("fp32_file_as_int8", "fp32", lambda s, d: _bytes(s, d, lambda b: b), {"as": "int8"}, "not a frostnet INT8 file"),
    ("unknown_backend", "int8", lambda s, d: _rewrite(s, d, meta=lambda m: m.update(backend="arm")), {},
     "unknown backend 'arm'"),
    # (A file whose backend metadata names the other engine is no longer an error: every engine
    # now takes the same per-channel weights, so it loads as a valid model for that engine.)
    ("backend_requested_differs", "int8", lambda s, d: _bytes(s, d, lambda b: b), {"backend": "qnnpack"},
     "for backend 'x86', not 'qnnpack'"),
    ("missing_file", "int8", lambda s, d: d.with_name("nope.safetensors"), {}, "does not exist"),
]


def _strip_hash(src, dst):
    t = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        m = {k: v for k, v in f.metadata().items() if k != "content_sha256"}
    save_file(t, str(dst), metadata=m)
    return dst


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_files_raise_clear_errors(case, fp32_file, int8_files, tmp_path):
    name, kind, corrupt, kwargs, match = case
    src = fp32_file[1] if kind == "fp32" else int8_files["x86"][2]
    path = corrupt(src, tmp_path / f"{name}.safetensors")
    kwargs = dict(kwargs)
    load_as = kwargs.pop("as", kind)
    with pytest.raises(WeightsError, match=match) as info:
        if load_as == "fp32":
            model = frostnet.get_model(kwargs.pop("build_arch", ARCH), num_classes=10).eval()
            load_fp32_into(model, path, **kwargs)
        else:
            load_int8(path, **kwargs)
    assert str(path) in str(info.value)  # every error names the file


def test_at_least_twenty_corruptions():
    assert len(CORRUPTIONS) >= 20


def test_save_rejects_reserved_metadata_and_float_models(tmp_path):
    model = frostnet.get_model(ARCH, num_classes=10)
    with pytest.raises(ValueError, match="reserved"):
        save_fp32(model, tmp_path / "a.safetensors", arch=ARCH, num_classes=10, metadata={"arch": "x"})
    with pytest.raises(ValueError, match="not a converted INT8 model"):
        save_int8(model, tmp_path / "b.safetensors", arch=ARCH, backend="x86")
    with pytest.raises(ValueError, match="unknown quantization backend 'arm'"):
        save_int8(model, tmp_path / "b.safetensors", arch=ARCH, backend="arm")
    assert not list(tmp_path.iterdir())  # nothing half-written
