"""tools/bench_dense_step.py: its random targets, and one tiny timed step per dense task."""

import json
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
bench = runpy.run_path(str(ROOT / "tools" / "bench_dense_step.py"), run_name="bench_dense_step")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_targets_are_realistic_boxes_and_masks():
    targets = bench["random_boxes"](torch.Generator().manual_seed(0), 16, 64)
    assert {len(t["labels"]) for t in targets} <= set(range(1, 7))
    for t in targets:
        boxes = t["boxes"]
        assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((t["labels"] >= 1) & (t["labels"] <= 10)).all()
    masks = bench["masks_from_boxes"](targets, 64)
    assert masks.shape == (16, 64, 64)
    assert set(masks.unique().tolist()) <= set(range(11)) | {255} and (masks == 255).any()


@pytest.mark.parametrize("model, qat", [("ssdlite_mobilenet_v2", False), ("lraspp_mobilenet_v3_small_re", True)])
def test_one_tiny_step_per_task_writes_the_split(tmp_path, model, qat):
    out = tmp_path / "r.json"
    argv = ["--model", model, "--size", "32", "--batch", "2", "--iters", "1", "--warmup", "0", "--json", str(out)]
    args = bench["get_args_parser"]().parse_args(argv + (["--qat"] if qat else []))
    result = bench["main"](args)
    assert json.loads(out.read_text()) == result
    assert result["mode"] == ("qat" if qat else "fp") and 0 < result["loss_share"] < 1
    assert all(v > 0 for v in result["ms"].values()) and result["images_per_s"] > 0


def test_classification_model_is_refused_naming_the_dense_models():
    args = bench["get_args_parser"]().parse_args(["--model", "frostnet_small_1_0"])
    with pytest.raises(SystemExit, match="is a classification model.*ssdlite_mobilenet_v2"):
        bench["main"](args)
    args = bench["get_args_parser"]().parse_args(["--iters", "0"])
    with pytest.raises(SystemExit, match="--iters must be >= 1, got 0"):
        bench["main"](args)
