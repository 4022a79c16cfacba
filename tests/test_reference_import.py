"""Importing the FrostNet authors' checkpoints (layout: tests/fixtures, copied from shared/fixtures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import frostnet
from frostnet.models._reference import identify_frostnet, load_reference_checkpoint, unwrap_state_dict
from frostnet.serialization import load_fp32

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = json.loads((ROOT / "tests/fixtures/reference_frostnet_state_dict_layout.json").read_text())


def _fake_reference_state_dict(key: str, seed: int = 0) -> dict:
    """Random tensors in the authors' layout, with plausible BN statistics."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in LAYOUT[key].items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(100)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(".weight") and len(shape) == 1:  # BN gamma
            sd[name] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("key", sorted(LAYOUT))
def test_every_reference_layout_is_a_registered_model(key):
    mode, width = key.split("_")
    name = f"frostnet_{mode}_{width.replace('.', '_')}"
    model = frostnet.get_model(name)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == LAYOUT[key]
    assert identify_frostnet(_fake_reference_state_dict(key)) == (mode, float(width), 1000)


def _cbr(x, sd, prefix, *, stride=1, groups=1, act=True, dilation=1):
    w = sd[f"{prefix}.conv.0.weight"]
    pad = (w.shape[-1] - 1) // 2 * dilation
    x = F.conv2d(x, w, None, stride, pad, dilation, groups)
    x = F.batch_norm(x, sd[f"{prefix}.conv.1.running_mean"], sd[f"{prefix}.conv.1.running_var"],
                     sd[f"{prefix}.conv.1.weight"], sd[f"{prefix}.conv.1.bias"], False, 0.0, 1e-5)
    return F.relu(x) if act else x


def test_imported_blocks_compute_what_the_reference_computes():
    """An independent functional forward (written from the spec) on the imported tensors."""
    sd = _fake_reference_state_dict("small_1.0", seed=1)
    model, name = load_reference_checkpoint({"state_dict_ema": {f"module.{k}": v for k, v in sd.items()}})
    assert name == "frostnet_small_1_0"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = _cbr(x, sd, "conv1", stride=2)
        torch.testing.assert_close(model.conv1(x), stem)
        # layer1.0: expansion 1 -> depthwise + project, residual-free (32 -> 16 channels)
        ref = _cbr(_cbr(stem, sd, "layer1.0.conv2", groups=32), sd, "layer1.0.reduce_conv", act=False)
        torch.testing.assert_close(model.layer1[0](stem), ref)
        # layer3.1: cascade block (80 -> squeeze 24, concat [squeezed, input], expand, dw, project, add)
        h = torch.randn(2, 80, 8, 8)
        cat = torch.cat([_cbr(h, sd, "layer3.1.squeeze_conv"), h], 1)
        e = _cbr(cat, sd, "layer3.1.conv1")
        ref = _cbr(_cbr(e, sd, "layer3.1.conv2", groups=e.shape[1]), sd, "layer3.1.reduce_conv", act=False) + h
        torch.testing.assert_close(model.layer3[1](h), ref)
        # head: last layer, pool, classifier conv with bias
        t = torch.randn(2, 320, 2, 2)
        feats = _cbr(t, sd, "last_layer").mean((2, 3), keepdim=True)
        logits = F.conv2d(feats, sd["classifier.2.weight"], sd["classifier.2.bias"]).flatten(1)
        torch.testing.assert_close(model.classifier(model.last_layer(t)).flatten(1), logits)


def test_import_tool_round_trip(tmp_path):
    sd = _fake_reference_state_dict("large_0.75", seed=2)
    src = tmp_path / "frostnet_large_0.75.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, src)
    dst = tmp_path / "frostnet_large_0_75.imagenet.fp32.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/import_reference.py"), str(src), str(dst)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "frostnet_large_0_75, 1000 classes" in proc.stdout
    tensors, meta = load_fp32(dst, arch="frostnet_large_0_75")
    assert meta["num_classes"] == "1000"
    assert set(tensors) == set(sd) and all(torch.equal(tensors[k], sd[k]) for k in sd)
    model = frostnet.get_model("frostnet_large_0_75")
    model.load_state_dict(tensors, strict=True)
    ref, _ = load_reference_checkpoint(src)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


def test_import_errors_are_clear():
    sd = _fake_reference_state_dict("base_1.0")
    with pytest.raises(ValueError, match="matches no FrostNet"):
        identify_frostnet({k: v for k, v in sd.items() if not k.startswith("layer5")})
    with pytest.raises(ValueError, match="no 'classifier.2.weight'"):
        identify_frostnet({"fc.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="not a FrostNet checkpoint"):
        unwrap_state_dict({"epoch": 3, "optimizer": {}})
    assert identify_frostnet(unwrap_state_dict({"model": sd})) == ("base", 1.0, 1000)
