"""tools/plot_curves.py: curves read from metrics.jsonl, clear errors for wrong runs and metrics."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_curves", ROOT / "tools/plot_curves.py")
plot_curves = importlib.util.module_from_spec(spec)
sys.modules["plot_curves"] = plot_curves
spec.loader.exec_module(plot_curves)


def _run(tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    lines = [{"epoch": 0, "phase": "fp", "fp32_top1": 80.0},
             {"epoch": 1, "phase": "qat", "fake_quant_top1": 85.5, "int8_top1": 85.0, "ema_fake_quant_top1": 85.75},
             {"final": {"fp32_top1": 86.0}}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return run


def test_read_curves_splits_the_phases(tmp_path):
    curves = plot_curves.read_curves(_run(tmp_path), "top1")
    assert curves == {"fp32": [(0, 80.0)], "fake_quant": [(1, 85.5)], "int8": [(1, 85.0)], "ema_fp32": [],
                      "ema_fake_quant": [(1, 85.75)]}


def test_unknown_metric_and_missing_run_name_the_fix(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ValueError, match="no '\\*_miou' entries; valid --metric for this run: top1"):
        plot_curves.read_curves(run, "miou")
    with pytest.raises(FileNotFoundError, match="pass the --output-dir of a tools/train.py run"):
        plot_curves.read_curves(tmp_path / "nothing", "top1")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "fp32_top1": 1}\n{"epo')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not JSON"):
        plot_curves.read_curves(run, "top1")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs/curves.png"
    plot_curves.plot([_run(tmp_path, "a"), _run(tmp_path, "b")], "top1", out, ema=True, ymin=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind
