"""Write a few Fashion-MNIST test images as PNG files into examples/ (the README's main job reads them).

    python tools/make_examples.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from frostnet.data import FASHION_MNIST_CLASSES, FashionMNIST

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "examples", help="output folder")
    p.add_argument("--classes", default="0,1,2,5,7,9", help="class indices to take the first test image of")
    return p


def main(args: argparse.Namespace) -> int:
    test = FashionMNIST(split="test")
    args.out.mkdir(parents=True, exist_ok=True)
    for c in (int(s) for s in args.classes.split(",")):
        i = int((test.targets == c).nonzero()[0])
        name = FASHION_MNIST_CLASSES[c].lower().replace("/", "_").replace(" ", "_")
        path = args.out / f"{name}_test{i}.png"
        Image.fromarray(test.images[i].numpy()).save(path)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: test image {i}, label {FASHION_MNIST_CLASSES[c]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
