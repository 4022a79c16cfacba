"""Classify images with a published INT8 FrostNet loaded through torch.hub from this checkout.

    python tools/predict.py                                   # the bundled examples/*.png
    python tools/predict.py my_shoe.jpg --model frostnet_small_1_0 --backend qnnpack --topk 5

Images are preprocessed by the weights' own transforms (``entry.transforms()``: Fashion-MNIST
weights see gray 28x28, zero-padded to the input size, normalized, replicated to 3 channels);
8-bit, 16-bit and float images are scaled to [0, 1] by their bit depth. An image that cannot be
read is reported and the others are still predicted; the exit status is then 1. The INT8 model
runs through the traced and frozen path of :func:`frostnet.quant.optimize_for_inference`.
Segmentation and detection models are not supported here yet.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError

ROOT = Path(__file__).resolve().parents[1]
#: Default models, best first: the first one with published INT8 weights for the backend is used.
PREFERRED = ("frostnet_large_1_0", "frostnet_base_1_0", "frostnet_small_1_0")
#: Largest image accepted, checked from the header before any pixel is decoded (PIL's own
#: decompression-bomb limit, ~89.5 megapixels).
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
BACKENDS = ("x86", "fbgemm", "qnnpack")  # == frostnet.quant.BACKENDS (tests/test_predict.py checks)


def default_model(backend: str) -> str:
    """The first of PREFERRED that has default INT8 weights for ``backend`` in the manifest."""
    from frostnet import hub

    published = {e.arch for e in map(hub.get_weights, hub.list_weights()) if e.default and e.backend == backend}
    for arch in PREFERRED:
        if arch in published:
            return arch
    raise SystemExit(f"no published INT8 ({backend}) weights for any of {', '.join(PREFERRED)} in "
                     f"{hub.MANIFEST_PATH}; pass --model and --weights")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (labels to print per image), got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default (options defaulting to None
    say in their help what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return str(action.help) if action.default is None else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("images", nargs="*", type=Path, help="image files (default: examples/*.png)")
    p.add_argument("--model", default=None,
                   help="classification model with published weights (default: the largest published "
                        "FrostNet 1.0 of " + ", ".join(PREFERRED) + ")")
    p.add_argument("--weights", default="DEFAULT", help="'DEFAULT' or a name from frostnet.list_weights()")
    p.add_argument("--backend", default="x86", choices=BACKENDS, help="INT8 engine")
    p.add_argument("--topk", type=_positive_int, default=3, help="labels to print per image")
    return p


def open_image(path: Path) -> Image.Image:
    """Open ``path``, checking its size from the header before any pixel is decoded.

    Raises:
        ValueError: the file is missing, not an image PIL can read, or larger than MAX_PIXELS.
    """
    if not path.is_file():
        raise ValueError("no such file")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # PIL's own check would fail before we can name the size
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a readable image ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise ValueError(f"image is {width}x{height} = {width * height:,} pixels, more than the {MAX_PIXELS:,} "
                         "accepted (PIL's decompression-bomb limit); downscale it first")
    try:
        img.load()  # decode now, so a truncated file is reported here
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode the image ({e})") from None
    return img


def load_model(model: Optional[str], weights: str, backend: str):
    """The INT8 model and its manifest entry, through torch.hub from this checkout."""
    import frostnet
    from frostnet import hub

    if model is None:
        model = default_model(backend)
    try:
        task = frostnet.models.get_model_task(model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if task != "classification":
        raise SystemExit(f"--model {model}: {task} prediction is not supported by tools/predict.py yet; "
                         f"classification models: {', '.join(frostnet.list_models(task='classification'))}")
    try:
        entry = (hub.default_weights(model, quantized=True, backend=backend) if weights == "DEFAULT"
                 else hub.get_weights(weights))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    with warnings.catch_warnings():
        # torch 2.14 deprecates the quantized tensors that eager INT8 models are made of; the
        # notice says nothing a user of this tool can act on.
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        net = torch.hub.load(str(ROOT), model, source="local", trust_repo=True,
                             weights=entry.name, quantized=True, backend=backend)
    return net, entry


def main(args: argparse.Namespace) -> int:
    from frostnet import quant

    paths = args.images or sorted((ROOT / "examples").glob("*.png"))
    if not paths:
        raise SystemExit("no images given and none in examples/")
    model, entry = load_model(args.model, args.weights, args.backend)
    preprocess = entry.transforms()
    inputs, good, failed = [], [], 0
    for path in paths:
        try:
            with open_image(path) as img:
                inputs.append(preprocess(img))
            good.append(path)
        except ValueError as e:
            failed += 1
            print(f"{path}: skipped: {e}", file=sys.stderr)
    print(f"{entry.name} ({entry.format}, {entry.backend}; test top-1 {entry.metrics.get('acc@1', float('nan')):.2f}%)")
    if inputs:
        x = torch.stack(inputs)
        runner = quant.optimize_for_inference(model, x)  # traced + frozen: same outputs, less Python overhead
        with torch.no_grad():
            probs = runner(x).softmax(1)
        for path, pr in zip(good, probs):
            top = pr.topk(min(args.topk, pr.numel()))
            labels = ", ".join(f"{entry.categories[i]} {100 * v:.1f}%"
                               for v, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"{path.name}: {labels}")
    if failed:
        print(f"{failed} of {len(paths)} images could not be read (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
