"""Classify images, or draw detections and segmentations, with a published INT8 model loaded
through torch.hub from this checkout.

    python tools/predict.py                                   # classify the bundled examples/*.png
    python tools/predict.py my_shoe.jpg --model frostnet_small_1_0 --backend qnnpack --topk 5
    python tools/predict.py --model ssdlite_frostnet_small_1_0 examples/scene*.png   # labelled boxes
    python tools/predict.py --model lraspp_frostnet_small_1_0 --out-dir pictures/    # colour overlay + legend

Images are preprocessed by the weights' own transforms (``entry.transforms()``: Fashion-MNIST
weights see gray 28x28, zero-padded to the input size, normalized, replicated to 3 channels; the
scene models see the canvas resized to their input size, 128x128, replicated to 3 channels and
normalized); 8-bit, 16-bit and float images are scaled to [0, 1] by their bit depth. An image
that cannot be read is reported and the others are still predicted; the exit status is then 1.

Classification prints the top labels of each image; the INT8 model runs through the traced and
frozen path of :func:`frostnet.quant.optimize_for_inference`. Detection and segmentation models
write a picture per image, ``<stem>.<model>.png`` next to it (or into ``--out-dir``): detection
draws the boxes scoring at least ``--score-threshold`` with class name and score, segmentation
a colour overlay of the predicted classes with a legend of the classes present. They print the
boxes found or the classes present. Small images are enlarged (nearest neighbour) to at least
256 px so the labels are readable. Without images, ``examples/`` is read: its ``scene*.png``
canvases for detection and segmentation models, the other PNGs for classification (files named
``<stem>.<model>.png``, earlier outputs, are never inputs). ``--weights`` takes a manifest name
or a local INT8 ``.safetensors`` file (its recorded preprocessing is used).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

# a segmentation model's output: {"out": logits} (torchvision's convention) or the logits
from frostnet.recipe.tasks.segmentation import _logits as logits_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
# the scene preview's class colours (docs/scenes.png), its font and its atomic PNG writer
from make_scenes import COLOURS, FONT, save_png

#: Default models, best first: the first one with published INT8 weights for the backend is used.
PREFERRED = ("frostnet_large_1_0", "frostnet_base_1_0", "frostnet_small_1_0")
#: Largest image accepted, checked from the header before any pixel is decoded (PIL's own
#: decompression-bomb limit, ~89.5 megapixels).
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
BACKENDS = ("x86", "fbgemm", "qnnpack")  # == frostnet.quant.BACKENDS (tests/test_predict.py checks)
DENSE_TASKS = ("detection", "segmentation")
#: The bundled inputs of the dense models in examples/ (written by tools/make_scenes.py --examples).
SCENE_PREFIX = "scene"
DEFAULT_TOPK = 3
DEFAULT_SCORE_THRESHOLD = 0.5
#: Pictures are enlarged (nearest neighbour) until their shorter side is at least this many
#: pixels: a 128x128 canvas with 11 px labels would be unreadable.
MIN_PICTURE_SIDE = 256


def default_model(backend: str) -> str:
    """The first of PREFERRED that has default INT8 weights for ``backend`` in the manifest."""
    from frostnet import hub

    published = {e.arch for e in map(hub.get_weights, hub.list_weights()) if e.default and e.backend == backend}
    for arch in PREFERRED:
        if arch in published:
            return arch
    raise SystemExit(f"no published INT8 ({backend}) weights for any of {', '.join(PREFERRED)} in "
                     f"{hub.MANIFEST_PATH}; pass --model and --weights")


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (a detection score), got {value:g}")
    return value


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
    p.add_argument("images", nargs="*", type=Path,
                   help="image files (default: examples/*.png; examples/scene*.png for detection and segmentation)")
    p.add_argument("--model", default=None,
                   help="model with published weights: classification (default: the largest published "
                        "FrostNet 1.0 of " + ", ".join(PREFERRED) + "), detection or segmentation")
    p.add_argument("--weights", default="DEFAULT",
                   help="'DEFAULT', a name from frostnet.list_weights() or a local INT8 .safetensors file")
    p.add_argument("--backend", default="x86", choices=BACKENDS, help="INT8 engine")
    p.add_argument("--topk", type=_positive_int, default=None,
                   help=f"classification: labels per image (default: {DEFAULT_TOPK})")
    p.add_argument("--score-threshold", type=_score, default=None,
                   help=f"detection: draw boxes scoring at least this (default: {DEFAULT_SCORE_THRESHOLD})")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where detection/segmentation pictures go (default: next to each image)")
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


def model_task(model: Optional[str]) -> str:
    """The task of ``--model`` (classification without one); an unknown name exits naming close ones."""
    import frostnet

    if model is None:
        return "classification"
    try:
        return frostnet.models.get_model_task(model)
    except ValueError as e:
        raise SystemExit(str(e)) from None


@dataclass(frozen=True)
class FileWeights:
    """What predict needs of a local weights file, read from the metadata the recipe writes into
    it: the fields of :class:`frostnet.hub.WeightsEntry` that predict uses."""

    name: str
    format: str
    backend: Optional[str]
    dataset: str
    categories: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> FileWeights:
        """The file's recorded preprocessing and classes.

        Raises:
            SystemExit: the file is missing, not frostnet weights, or records no preprocessing.
        """
        from frostnet.serialization import WeightsError, read_metadata

        if not path.is_file():
            raise SystemExit(f"--weights {path}: no such file")
        try:
            meta = read_metadata(path)
        except (WeightsError, OSError, ValueError) as e:
            raise SystemExit(f"--weights {path}: {e}") from None
        missing = [k for k in ("dataset", "categories", "input_size", "mean", "std") if k not in meta]
        if missing:
            raise SystemExit(f"--weights {path} records no {', '.join(missing)} (a file written outside the training "
                             "recipe): publish it with tools/add_weights.py and pass its manifest name")
        mean = json.loads(meta["mean"])
        side = int(meta["input_size"])
        return cls(str(path), "int8" if meta.get("format") == "frostnet-int8" else "fp32", meta.get("backend"),
                   meta["dataset"], tuple(json.loads(meta["categories"])), (len(mean), side, side), tuple(mean),
                   tuple(json.loads(meta["std"])))

    def transforms(self) -> Callable[[Any], torch.Tensor]:
        """The eval preprocessing, as :meth:`frostnet.hub.WeightsEntry.transforms`."""
        from frostnet.transforms import weights_transforms

        return weights_transforms(self.dataset, self.input_size, self.mean, self.std)


def load_model(model: Optional[str], weights: str, backend: str):
    """The INT8 model and its manifest entry (or :class:`FileWeights` for a local file), through
    torch.hub from this checkout."""
    from frostnet import hub
    from frostnet.serialization import WeightsError

    if model is None:
        model = default_model(backend)
    model_task(model)
    local = weights.endswith(".safetensors")
    try:
        if local:
            entry: Any = FileWeights.read(Path(weights))
        elif weights == "DEFAULT":
            entry = hub.default_weights(model, quantized=True, backend=backend)
        else:
            entry = hub.get_weights(weights)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    with warnings.catch_warnings():
        # torch 2.14 deprecates the quantized tensors that eager INT8 models are made of; the
        # notice says nothing a user of this tool can act on.
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        try:
            net = torch.hub.load(str(ROOT), model, source="local", trust_repo=True,
                                 weights=weights if local else entry.name, quantized=True, backend=backend)
        except (ValueError, WeightsError) as e:
            raise SystemExit(f"--model {model} --weights {weights}: {e}") from None
    return net, entry


def default_images(task: str) -> list[Path]:
    """The bundled inputs of ``task``: ``examples/scene*.png`` for detection and segmentation, the
    other ``examples/*.png`` for classification; ``<stem>.<model>.png`` pictures of earlier runs
    are outputs, never inputs."""
    inputs = [p for p in sorted((ROOT / "examples").glob("*.png")) if "." not in p.stem]
    scene = [p for p in inputs if p.name.startswith(SCENE_PREFIX)]
    return scene if task in DENSE_TASKS else [p for p in inputs if p not in scene]


def check_options(args: argparse.Namespace, task: str, model: str) -> None:
    """Exit naming the option and the fix when an option does not apply to ``model``'s task."""
    import frostnet

    if task == "classification":
        given = [flag for flag, value in (("--score-threshold", args.score_threshold), ("--out-dir", args.out_dir))
                 if value is not None]
        if given:
            dense = ", ".join(n for t in DENSE_TASKS for n in frostnet.list_models(task=t))
            verb = "applies" if len(given) == 1 else "apply"
            raise SystemExit(f"{' and '.join(given)} {verb} to detection and segmentation models (which write pictures); "
                             f"{model} is a classification model: drop {' and '.join(given)}, or pass --model one of {dense}")
        return
    if args.topk is not None:
        raise SystemExit(f"--topk applies to classification models; {model} is a {task} model: drop --topk")
    if task == "segmentation" and args.score_threshold is not None:
        raise SystemExit(f"--score-threshold applies to detection models; {model} is a segmentation model "
                         "(every pixel gets its most likely class): drop --score-threshold")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        raise SystemExit(f"--out-dir {args.out_dir} is a file, not a folder: pass a folder (it is created if missing)")


def colour(label: int) -> str:
    """The colour of class ``label``: the scene preview's (docs/scenes.png), then the VOC colour map."""
    if label < len(COLOURS):
        return COLOURS[label]
    from frostnet.data import voc_palette

    r, g, b = voc_palette()[3 * label:3 * label + 3]
    return f"#{r:02x}{g:02x}{b:02x}"


def display_image(img: Image.Image) -> torch.Tensor:
    """``img`` as uint8 RGB ``(3, H, W)``, scaled by its bit depth as the model input is (so 16-bit
    and float images are shown as they are seen), enlarged to :data:`MIN_PICTURE_SIDE`."""
    from frostnet.transforms import ImageToFloat

    x = ImageToFloat()(img)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    zoom = max(1, math.ceil(MIN_PICTURE_SIDE / min(x.shape[-2:])))
    if zoom > 1:
        x = torch.nn.functional.interpolate(x[None], scale_factor=zoom, mode="nearest")[0]
    return x.mul(255).round().to(torch.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.truetype(FONT, size) if FONT else ImageFont.load_default()


def draw_detections(picture: torch.Tensor, det: dict[str, torch.Tensor], categories: Sequence[str],
                    input_hw: tuple[int, int], threshold: float) -> tuple[Image.Image, list[str]]:
    """``picture`` with the boxes of ``det`` (the model's output for one input of ``input_hw``)
    scoring at least ``threshold``, each labelled with class name and score.

    Returns:
        The picture and one ``"<class> <score>"`` per drawn box, best first.
    """
    from torchvision.utils import draw_bounding_boxes

    keep = det["scores"] >= threshold
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep].tolist()
    h, w = picture.shape[-2:]
    scale = torch.tensor([w / input_hw[1], h / input_hw[0]] * 2)
    texts = [f"{categories[k]} {s:.2f}" for k, s in zip(labels, scores.tolist())]
    colours = [colour(k) for k in labels]
    if texts:  # (torchvision warns on an empty box list)
        picture = draw_bounding_boxes(picture, boxes * scale, labels=texts, colors=colours, width=2, font=FONT,
                                      font_size=12 if FONT else None, fill_labels=True, label_colors="white",
                                      label_background_colors=colours)
    return Image.fromarray(picture.permute(1, 2, 0).numpy()), texts


def draw_segmentation(picture: torch.Tensor, logits: torch.Tensor, categories: Sequence[str]) -> tuple[Image.Image, list[str]]:
    """``picture`` overlaid with the most likely class of each pixel of ``logits`` (``(C, h, w)``,
    resized to the picture by nearest neighbour), class 0 (background) left clear, and a legend
    strip of the classes present under it.

    Returns:
        The picture and one ``"<class> <share of pixels>%"`` per class present, largest first.
    """
    from torchvision.utils import draw_segmentation_masks

    h, w = picture.shape[-2:]
    mask = torch.nn.functional.interpolate(logits.argmax(0)[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    counts = torch.bincount(mask.flatten(), minlength=len(categories))
    present = [k for k in counts.argsort(descending=True).tolist() if k > 0 and counts[k] > 0]
    overlay = picture
    if present:
        overlay = draw_segmentation_masks(picture, torch.stack([mask == k for k in present]), alpha=0.55,
                                          colors=[colour(k) for k in present])
    texts = [f"{categories[k]} {share(counts[k].item() / mask.numel())}" for k in present]
    font, row = _font(13), 20
    per_row = max(1, w // 128)
    rows = max(1, -(-len(present) // per_row))
    sheet = Image.new("RGB", (w, h + rows * row + 8), "white")
    sheet.paste(Image.fromarray(overlay.permute(1, 2, 0).numpy()), (0, 0))
    draw = ImageDraw.Draw(sheet)
    if not present:
        draw.text((6, h + 4), "background only", fill="black", font=font)
    for i, k in enumerate(present):
        r, c = divmod(i, per_row)
        x, y = 6 + c * (w // per_row), h + 4 + r * row
        draw.rectangle([x, y, x + 13, y + 13], fill=colour(k), outline="black")
        draw.text((x + 18, y - 1), categories[k], fill="black", font=font)
    return sheet, texts


def share(fraction: float) -> str:
    """A share of pixels as a percentage, "<0.1%" rather than a misleading "0.0%"."""
    return f"{100 * fraction:.1f}%" if fraction >= 0.0005 else "<0.1%"


def _header(entry: Any, task: str) -> str:
    """The first line printed: the weights, their format and their recorded test metric."""
    m = entry.metrics
    if task == "classification":
        figures = f"top-1 {m['acc@1']:.2f}%" if "acc@1" in m else ""
    else:
        keys = {"detection": (("map", "mAP@[.5:.95]"), ("map_50", "mAP@.5")),
                "segmentation": (("miou", "mIoU"), ("pixel_acc", "pixel accuracy"))}[task]
        figures = ", ".join(f"{label} {m[k]:.3f}" for k, label in keys if k in m)
    return f"{entry.name} ({entry.format}, {entry.backend}; {'test ' + figures if figures else 'no recorded test metrics'})"


def output_path(image: Path, model: str, out_dir: Optional[Path]) -> Path:
    """``<stem>.<model>.png`` next to ``image``, or in ``out_dir``."""
    return (out_dir if out_dir is not None else image.parent) / f"{image.stem}.{model}.png"


def main(args: argparse.Namespace) -> int:
    from frostnet import quant

    task = model_task(args.model)
    model_name = args.model or default_model(args.backend)
    check_options(args, task, model_name)
    paths = args.images or default_images(task)
    if not paths:
        raise SystemExit("no images given and none in examples/"
                         + (" (run: python tools/make_scenes.py --examples examples/)" if task in DENSE_TASKS else ""))
    model, entry = load_model(model_name, args.weights, args.backend)
    preprocess = entry.transforms()
    inputs, pictures, good, failed = [], [], [], 0
    for path in paths:
        try:
            with open_image(path) as img:
                inputs.append(preprocess(img))
                if task in DENSE_TASKS:
                    pictures.append(display_image(img))
            good.append(path)
        except ValueError as e:
            failed += 1
            print(f"{path}: skipped: {e}", file=sys.stderr)
    print(_header(entry, task))
    if inputs and task == "classification":
        x = torch.stack(inputs)
        runner = quant.optimize_for_inference(model, x)  # traced + frozen: same outputs, less Python overhead
        with torch.no_grad():
            probs = runner(x).softmax(1)
        topk = args.topk or DEFAULT_TOPK
        for path, pr in zip(good, probs):
            top = pr.topk(min(topk, pr.numel()))
            labels = ", ".join(f"{entry.categories[i]} {100 * v:.1f}%"
                               for v, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"{path.name}: {labels}")
    elif inputs:
        x = torch.stack(inputs)
        with torch.no_grad():  # eager: a detector's decoding and NMS are Python, not traceable as one graph
            out = model(x)
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
        for i, (path, picture) in enumerate(zip(good, pictures)):
            if task == "detection":
                sheet, texts = draw_detections(picture, out[i], entry.categories, tuple(x.shape[-2:]), threshold)
                found = f"{len(texts)} boxes (score >= {threshold:g})" + (": " + ", ".join(texts) if texts else "")
            else:
                sheet, texts = draw_segmentation(picture, logits_of(out)[i], entry.categories)
                found = "classes present: " + (", ".join(texts) if texts else "none (background only)")
            target = output_path(path, model_name, args.out_dir)
            save_png(sheet, target)
            print(f"{path.name}: {found} -> {target}")
    if failed:
        print(f"{failed} of {len(paths)} images could not be read (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
