"""Write a FashionScenes split to disk (COCO detection JSON + VOC-layout masks) or draw a preview.

    python tools/make_scenes.py --split test --num-images 200 --output scenes/
    python tools/make_scenes.py --split train --background texture --output scenes/
    python tools/make_scenes.py --preview docs/scenes.png            # the picture in docs/scenes.md
    python tools/make_scenes.py --split test --stats                 # the numbers in docs/scenes.md
    python tools/make_scenes.py --examples examples/                 # examples/scene_test*.png for tools/predict.py

Layout written under ``--output`` (several splits can share one folder)::

    annotations/instances_<split>.json     COCO detection: bbox [x, y, w, h] pixels, category ids 1..10
    images/<split>/<split>_<index>.png     8-bit gray canvases
    JPEGImages/<split>_<index>.png         the same files (hard links) for the VOC layout
    SegmentationClass/<split>_<index>.png  palette PNG: 0 background, 1..10 class, 255 ignore
    ImageSets/Segmentation/<split>.txt     ids of the split
    classes.txt                            class names of ids 1..10

The files load with ``coco:<out>/images/<split>,<out>/annotations/instances_<split>.json`` and
``voc:<out>`` (``frostnet.data.CocoDetection`` / ``VOCSegmentation``). Every file is written to
a temporary name and renamed into place; lists and JSON come last, so an interrupted run never
leaves an annotation file that names missing images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from frostnet.data import FASHION_MNIST_CLASSES, IGNORE_INDEX, SCENES_CATEGORIES, FashionScenes, voc_palette

# Preview colours per label (0 = background): matplotlib's tab10, readable on black.
COLOURS = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]

# A TrueType font where the system has one (Debian: fonts-dejavu-core), else PIL's bitmap font.
FONT = next((str(p) for p in (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),) if p.is_file()), None)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``: readers never see a partial file."""
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` to ``path`` as PNG, atomically (tools/predict.py writes its pictures with it too)."""
    _atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _write_text(text: str, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst`` (a copy where links are not supported), atomically."""

    def link(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    _atomic(dst, link)


def write_split(dataset: FashionScenes, output: Path) -> dict[str, Path]:
    """Write every canvas of ``dataset`` under ``output`` in the COCO + VOC layout above.

    Args:
        dataset: The split to write.
        output: Destination folder (created; other splits already in it are kept).

    Returns:
        The paths: ``coco_images``, ``coco_json``, ``voc_root``.
    """
    split = dataset.split
    dirs = {k: output / k for k in ("annotations", f"images/{split}", "JPEGImages", "SegmentationClass",
                                    "ImageSets/Segmentation")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    images, annotations, ids = [], [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        name = f"{split}_{i:06d}"
        png = dirs[f"images/{split}"] / f"{name}.png"
        save_png(Image.fromarray(image[0].numpy(), mode="L"), png)
        _link(png, dirs["JPEGImages"] / f"{name}.png")
        mask = Image.fromarray(target["masks"].numpy().astype(np.uint8), mode="P")
        mask.putpalette(palette)
        save_png(mask, dirs["SegmentationClass"] / f"{name}.png")
        h, w = image.shape[-2:]
        images.append({"id": i, "file_name": f"{name}.png", "width": int(w), "height": int(h)})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            # COCO "area" is the object's pixel area; here the visible pixels of that label in the box
            area = int((target["masks"][int(y1):int(y2), int(x1):int(x2)] == label).sum())
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0})
        ids.append(name)
    coco = {
        "info": {"description": f"FashionScenes {split}: {dataset!r}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k, "name": n, "supercategory": "fashion"}
                       for k, n in enumerate(SCENES_CATEGORIES) if k > 0],
    }
    _write_text("\n".join(FASHION_MNIST_CLASSES) + "\n", output / "classes.txt")
    _write_text("\n".join(ids) + "\n", dirs["ImageSets/Segmentation"] / f"{split}.txt")
    coco_json = dirs["annotations"] / f"instances_{split}.json"
    _write_text(json.dumps(coco), coco_json)
    return {"coco_images": dirs[f"images/{split}"], "coco_json": coco_json, "voc_root": output}


def draw_preview(dataset: FashionScenes, indices: Sequence[int], path: Path, *, zoom: int = 2,
                 columns: int = 2) -> None:
    """Draw canvases with their boxes and labels, each beside its colour-coded mask, into a PNG.

    Args:
        dataset: Where the canvases come from.
        indices: Canvas indices to show.
        path: Output PNG (written atomically).
        zoom: Nearest-neighbour magnification, so labels are readable.
        columns: Canvas/mask pairs per row.
    """
    tiles = []
    for i in indices:
        image, target = dataset[i]
        rgb = image.expand(3, -1, -1)
        big = torch.nn.functional.interpolate(rgb[None].float(), scale_factor=zoom, mode="nearest")[0].byte()
        names = [SCENES_CATEGORIES[k] for k in target["labels"].tolist()]
        colours = [COLOURS[k] for k in target["labels"].tolist()]
        boxed = draw_bounding_boxes(big, target["boxes"] * zoom, labels=names, colors=colours, width=2,
                                    font=FONT, font_size=11 if FONT else None, fill_labels=True,
                                    label_colors="white", label_background_colors=colours)
        mask = target["masks"]
        layers = torch.stack([mask == k for k in range(1, len(SCENES_CATEGORIES))] + [mask == IGNORE_INDEX])
        coloured = draw_segmentation_masks(torch.zeros_like(rgb), layers, alpha=1.0,
                                           colors=COLOURS[1:] + ["#ffffff"])
        coloured = torch.nn.functional.interpolate(coloured[None].float(), scale_factor=zoom, mode="nearest")[0].byte()
        tiles.append(torch.cat([boxed, torch.full((3, boxed.shape[1], 4), 255, dtype=torch.uint8), coloured], 2))
    gap = 12
    th, tw = tiles[0].shape[1:]
    rows = -(-len(tiles) // columns)
    legend_h = 22 * (-(-len(COLOURS) // 4)) + 10
    sheet = Image.new("RGB", (columns * tw + (columns + 1) * gap, rows * th + (rows + 1) * gap + legend_h), "white")
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (gap + c * (tw + gap), gap + r * (th + gap)))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(FONT, 13) if FONT else None
    top = rows * (th + gap) + gap
    entries = list(zip(COLOURS[1:] + ["#ffffff"], [*SCENES_CATEGORIES[1:], "ignore (255)"]))
    for k, (colour, name) in enumerate(entries):
        r, c = divmod(k, 4)
        x, y = gap + c * (sheet.width - 2 * gap) // 4, top + r * 22
        draw.rectangle([x, y, x + 14, y + 14], fill=colour, outline="black")
        draw.text((x + 20, y), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(sheet, path)


def write_examples(dataset: FashionScenes, indices: Sequence[int], folder: Path) -> list[Path]:
    """Write canvases ``indices`` of ``dataset`` as 8-bit gray PNGs ``scene_<split><index>.png``
    into ``folder`` (the images ``tools/predict.py`` reads by default for detection and
    segmentation models), each atomically.

    Raises:
        ValueError: an index outside the split (naming it and the split's size).
    """
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(f"--example-indices {bad} outside the {len(dataset)} {dataset.split} canvases (0..{len(dataset) - 1})")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        image, _ = dataset[i]
        path = folder / f"scene_{dataset.split}{i}.png"
        save_png(Image.fromarray(image[0].numpy(), mode="L"), path)
        paths.append(path)
    return paths


def _indices(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated canvas indices, e.g. 0,3,7, got {text!r}") from None


def split_stats(dataset: FashionScenes) -> dict[str, float]:
    """Counts that describe a split: boxes per canvas, hidden items, pixel shares, render time.

    Args:
        dataset: A split whose canvases are not rendered yet (the time includes rendering).

    Returns:
        ``canvases``, ``boxes_per_canvas``, ``items_without_box`` (share of pasted items),
        ``object_pixels``, ``ignore_pixels`` (shares of all pixels), ``ms_per_canvas``.
    """
    start = time.perf_counter()
    boxes = items = unboxed = objects = ignored = 0
    for i in range(len(dataset)):
        _, target = dataset[i]
        scene = dataset.scene_items(i)
        boxes += len(target["labels"])
        items += len(scene)
        unboxed += sum(not it.has_box for it in scene)
        objects += int(((target["masks"] > 0) & (target["masks"] != IGNORE_INDEX)).sum())
        ignored += int((target["masks"] == IGNORE_INDEX).sum())
    seconds = time.perf_counter() - start
    pixels = max(1, len(dataset) * dataset.size**2)
    n = max(1, len(dataset))
    return {"canvases": len(dataset), "boxes_per_canvas": boxes / n, "items_without_box": unboxed / max(1, items),
            "object_pixels": objects / pixels, "ignore_pixels": ignored / pixels, "ms_per_canvas": 1000 * seconds / n}


def _pair(text: str, kind: type) -> tuple:
    lo, sep, hi = text.partition("-")
    try:
        return (kind(lo), kind(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected min-max, e.g. 1-6, got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to write (default test)")
    p.add_argument("--num-images", type=int, default=None,
                   help="canvases (default: the split's default, 20000 train / 1000 val / 2000 test)")
    p.add_argument("--output", type=Path, default=None, help="folder to write the split into")
    p.add_argument("--preview", type=Path, default=None, help="draw a preview PNG of the first canvases")
    p.add_argument("--preview-count", type=int, default=6, help="canvases in the preview (default 6)")
    p.add_argument("--stats", action="store_true", help="print boxes per canvas, pixel shares and render time")
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help="write canvases --example-indices of the split as scene_<split><index>.png into DIR")
    p.add_argument("--example-indices", type=_indices, default=[1, 3, 4],
                   help="canvases for --examples (default 1,3,4: three to five items of several classes, some overlapping)")
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: the Debian package path)")
    p.add_argument("--size", type=int, default=128, help="canvas side (default 128)")
    p.add_argument("--items", type=lambda s: _pair(s, int), default=(1, 6), help="items per canvas (default 1-6)")
    p.add_argument("--scale", type=lambda s: _pair(s, float), default=(0.8, 2.0), help="item scale (default 0.8-2.0)")
    p.add_argument("--no-occlusion", action="store_true", help="keep items apart")
    p.add_argument("--background", default="plain", choices=("plain", "texture"), help="canvas background")
    p.add_argument("--min-visible", type=float, default=0.3, help="visible fraction for a box (default 0.3)")
    p.add_argument("--val-size", type=int, default=5000, help="Fashion-MNIST items held out for val (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="composition seed (default 0)")
    return p


def main(args: argparse.Namespace) -> int:
    if args.output is None and args.preview is None and not args.stats and args.examples is None:
        raise SystemExit("make_scenes: give --output DIR (write a split), --preview PNG (draw one), --examples DIR "
                         "and/or --stats")
    count = args.num_images
    if args.output is None and not args.stats and args.examples is None and count is None:
        count = args.preview_count  # a preview alone renders only what it shows
    dataset = FashionScenes(args.root, args.split, num_images=count, size=args.size, items=args.items,
                            scale=args.scale, occlusion=not args.no_occlusion, background=args.background,
                            min_visible=args.min_visible, val_size=args.val_size, seed=args.seed)
    if args.stats:
        stats = split_stats(dataset)
        print(f"{args.split} ({dataset!r}): " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    if args.output is not None:
        paths = write_split(dataset, args.output)
        print(f"wrote {len(dataset)} {args.split} canvases: coco:{paths['coco_images']},{paths['coco_json']}  "
              f"voc:{paths['voc_root']}")
    if args.examples is not None:
        try:
            written = write_examples(dataset, args.example_indices, args.examples)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print("wrote " + ", ".join(map(str, written)))
    if args.preview is not None:
        draw_preview(dataset, range(min(args.preview_count, len(dataset))), args.preview)
        print(f"wrote {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
