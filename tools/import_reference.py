"""Convert a FrostNet checkpoint released by the paper's authors into a frostnet FP32 file.

    python tools/import_reference.py frostnet_small_1.0.pth weights/frostnet_small_1_0.imagenet.fp32.safetensors

The variant and width are recognised from the tensor shapes; wrappers (``state_dict``,
``state_dict_ema``, ``model``) and DataParallel ``module.`` prefixes are removed; the load is strict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from frostnet.models._reference import load_reference_checkpoint
from frostnet.serialization import save_fp32


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the authors' .pth/.pth.tar file (read with weights_only=True)")
    parser.add_argument("output", type=Path, help="destination .safetensors file")
    parser.add_argument("--dataset", default="imagenet", help="metadata: dataset the weights were trained on")
    return parser


def main(args: argparse.Namespace) -> int:
    model, name = load_reference_checkpoint(args.checkpoint)
    sha = save_fp32(model, args.output, arch=name, num_classes=model.num_classes,
                    metadata={"dataset": args.dataset, "source": "imported from the FrostNet authors' checkpoint"})
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.checkpoint} -> {args.output}: {name}, {model.num_classes} classes, {n / 1e6:.2f}M params, sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
