"""Classify images with a published INT8 FrostNet loaded through torch.hub from this checkout.

    python tools/predict.py                                   # the bundled examples/*.png
    python tools/predict.py my_shoe.jpg --model frostnet_small_1_0 --backend qnnpack --topk 5

Images are converted the way the weights were trained (Fashion-MNIST: grayscale 28x28, zero-padded
to the input size, normalized, replicated to 3 channels). The INT8 model runs through the traced and
frozen path of :func:`frostnet.quant.optimize_for_inference` when available.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
#: Default models, best first: the first one with published INT8 weights for the backend is used.
PREFERRED = ("frostnet_large_1_0", "frostnet_base_1_0", "frostnet_small_1_0")


def default_model(backend: str) -> str:
    """The first of PREFERRED that has default INT8 weights for ``backend`` in the manifest."""
    from frostnet import hub

    published = {e.arch for e in map(hub.get_weights, hub.list_weights()) if e.default and e.backend == backend}
    for arch in PREFERRED:
        if arch in published:
            return arch
    raise SystemExit(f"no published INT8 ({backend}) weights for any of {', '.join(PREFERRED)} in "
                     f"{hub.MANIFEST_PATH}; pass --model and --weights")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", type=Path, help="image files (default: examples/*.png)")
    p.add_argument("--model", default=None,
                   help="hub entrypoint with published weights (default: the largest published FrostNet 1.0: "
                        + ", ".join(PREFERRED) + ")")
    p.add_argument("--weights", default="DEFAULT", help="'DEFAULT' or a name from frostnet.list_weights()")
    p.add_argument("--backend", default="x86", help="INT8 engine: x86 or qnnpack")
    p.add_argument("--topk", type=int, default=3, help="labels to print per image")
    return p


def load_images(paths: list[Path], size: int, mean: float, std: float, dataset: str) -> torch.Tensor:
    """(N, 3, size, size) float batch, preprocessed as the weights' dataset was."""
    if dataset != "fashion_mnist":
        raise ValueError(f"tools/predict.py knows the preprocessing of fashion_mnist weights only, not {dataset!r}")
    from frostnet.data import prepare_batch

    imgs = []
    for p in paths:
        img = Image.open(p).convert("L")
        if img.size != (28, 28):
            img = img.resize((28, 28), Image.BILINEAR)
        imgs.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(28, 28))
    return prepare_batch(torch.stack(imgs), size=size, mean=mean, std=std)


def main(args: argparse.Namespace) -> int:
    from frostnet import hub, quant

    paths = args.images or sorted((ROOT / "examples").glob("*.png"))
    if not paths:
        raise SystemExit("no images given and none in examples/")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"no such image file: {', '.join(missing)}")
    if args.model is None:
        args.model = default_model(args.backend)
    with warnings.catch_warnings():
        # torch 2.14 deprecates the quantized tensors that eager INT8 models are made of; the
        # notice says nothing a user of this tool can act on.
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        model = torch.hub.load(str(ROOT), args.model, source="local", trust_repo=True,
                               weights=args.weights, quantized=True, backend=args.backend)
    entry = (hub.default_weights(args.model, quantized=True, backend=args.backend) if args.weights == "DEFAULT"
             else hub.get_weights(args.weights))
    x = load_images(paths, entry.input_size[-1], entry.mean[0], entry.std[0], entry.dataset)
    runner = quant.optimize_for_inference(model, x)  # traced + frozen: same outputs, less Python overhead
    with torch.no_grad():
        probs = runner(x).softmax(1)
    print(f"{entry.name} ({entry.format}, {entry.backend}; test top-1 {entry.metrics.get('acc@1', float('nan')):.2f}%)")
    for path, pr in zip(paths, probs):
        top = pr.topk(min(args.topk, pr.numel()))
        labels = ", ".join(f"{entry.categories[i]} {100 * v:.1f}%" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path.name}: {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
