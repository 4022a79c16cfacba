"""Build a FrostNet through torch.hub from this checkout, convert it to INT8 and compare sizes.

    python tools/quickstart.py [--model frostnet_small_1_0] [--backend x86]

The model has random weights (an ImageNet-sized 1000-class head at 224x224; the published
checkpoints are 10-class Fashion-MNIST models, which tools/predict.py runs), so the INT8 model is
made by post-training quantization on random calibration inputs: a size and smoke check only.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--model", default="frostnet_small_1_0", help="a hub entrypoint (see hubconf.py)")
    parser.add_argument("--backend", default="x86", choices=("x86", "fbgemm", "qnnpack"), help="INT8 engine")
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    return parser


def _serialized_mb(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


def main(args: argparse.Namespace) -> int:
    from frostnet import quant

    torch.manual_seed(0)
    model = torch.hub.load(str(ROOT), args.model, source="local", trust_repo=True).eval()
    calib = [torch.randn(4, 3, args.size, args.size) for _ in range(2)]
    int8 = quant.quantize_ptq(model, calib, args.backend)
    x = calib[0][:1]
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(x)
        t1 = time.perf_counter()
        out = int8(x)
        t2 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f}M parameters (random weights, 1000-class head: a size check, not a trained model)")
    print(f"FP32 state dict {_serialized_mb(model):.1f} MB -> INT8 ({args.backend}) {_serialized_mb(int8):.1f} MB")
    print(f"one {args.size}x{args.size} image: FP32 {1e3 * (t1 - t0):.1f} ms, INT8 eager {1e3 * (t2 - t1):.1f} ms (single run, not a benchmark)")
    print(f"INT8 output: shape {tuple(out.shape)}, dtype {out.dtype}, top-1 class index {out.argmax().item()} (FP32: {ref.argmax().item()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
