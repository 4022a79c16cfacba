"""Time one training step of a dense model, split into forward / loss / backward.

Detection (SSD-style) models: forward = the body producing raw ``loc``/``conf`` and the priors
(``model.raw_outputs``), loss = prior matching + box encoding + hard-negative mining + the loss
terms (``multibox_loss``), backward = ``loss.backward()``. Segmentation models: forward = the
model's ``"out"`` logits, loss = cross-entropy with ignore index 255, backward. The full step
as the training loop runs it (``model(images, targets)`` for a detector, which also validates and
normalizes the targets, then backward) is timed as well; images/s come from it.

Inputs are random images with realistic random targets (1-6 boxes per image, labels 1..10; for
segmentation the same boxes painted into a mask with a 255 ignore band on their borders), drawn
from a seeded generator. Each phase is timed with ``time.perf_counter`` after warm-up iterations;
the median over the timed iterations is reported (the machine is shared: medians resist other
processes' bursts better than means). The optimizer step is not timed.

    PYTHONPATH=. python tools/bench_dense_step.py --model ssdlite_mobilenet_v2 --size 128 --batch 32 --threads 1 --iters 10
    PYTHONPATH=. python tools/bench_dense_step.py --model lraspp_mobilenet_v3_large_re --qat --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import frostnet
from frostnet import quant
from frostnet.models import get_model_task
from frostnet.models.detection import SSDDetector, multibox_loss

TASKS = ("detection", "segmentation")
IGNORE_INDEX = 255


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--model", default="ssdlite_mobilenet_v2",
                        help="registered detection or segmentation model (default: ssdlite_mobilenet_v2)")
    parser.add_argument("--num-classes", type=int, default=11, help="classes including background (default 11)")
    parser.add_argument("--size", type=int, default=128, help="square input side (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--qat", action="store_true",
                        help='measure QAT training: frostnet.quant.prepare_qat(model, "x86") first')
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="model and images in the channels-last memory format, as tools/train.py trains by default")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images and targets")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    return parser


def random_boxes(gen: torch.Generator, batch: int, size: int) -> list[dict[str, torch.Tensor]]:
    """Per image 1-6 boxes (xyxy pixels, sides 10-60% of the image) with labels 1..10."""
    targets = []
    for _ in range(batch):
        k = int(torch.randint(1, 7, (1,), generator=gen))
        wh = (0.1 + 0.5 * torch.rand(k, 2, generator=gen)) * size
        xy = torch.rand(k, 2, generator=gen) * (size - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).round(),
                        "labels": torch.randint(1, 11, (k,), generator=gen)})
    return targets


def masks_from_boxes(targets: list[dict[str, torch.Tensor]], size: int) -> torch.Tensor:
    """``(N, size, size)`` int64 masks: boxes painted with their labels in order, borders ignored."""
    masks = torch.zeros(len(targets), size, size, dtype=torch.int64)
    for mask, t in zip(masks, targets):
        for (x1, y1, x2, y2), label in zip(t["boxes"].long().tolist(), t["labels"].tolist()):
            mask[y1:y2, x1:x2] = IGNORE_INDEX
            mask[y1 + 1:y2 - 1, x1 + 1:x2 - 1] = label
    return masks


def _phases(model: nn.Module, task: str, x: torch.Tensor, targets: list[dict[str, torch.Tensor]],
            masks: torch.Tensor) -> tuple[Callable[[], Any], Callable[[Any], torch.Tensor], Callable[[], torch.Tensor]]:
    """(forward, loss(forward output), full step loss) callables for one model and batch."""
    if task == "detection":
        assert isinstance(model, SSDDetector)
        scale = x.new_tensor([x.shape[-1], x.shape[-2]] * 2)
        normalized = [{"boxes": t["boxes"] / scale, "labels": t["labels"]} for t in targets]

        def det_loss(out: Any) -> torch.Tensor:
            loc, conf, priors = out
            losses = multibox_loss(loc, conf, priors, normalized, model.box_coder,
                                   iou_threshold=model.iou_threshold, neg_pos_ratio=model.neg_pos_ratio)
            return sum(losses.values())

        return (lambda: model.raw_outputs(x)), det_loss, (lambda: sum(model(x, targets).values()))

    def seg_loss(out: Any) -> torch.Tensor:
        return F.cross_entropy(out, masks, ignore_index=IGNORE_INDEX)

    return (lambda: model(x)["out"]), seg_loss, (lambda: seg_loss(model(x)["out"]))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print the split and return it (milliseconds, medians)."""
    task = get_model_task(args.model)
    if task not in TASKS:
        raise SystemExit(f"--model {args.model!r} is a {task} model; this benchmark times dense models "
                         f"({', '.join(TASKS)}): choose one of {frostnet.list_models(task='detection') + frostnet.list_models(task='segmentation')}")
    for name in ("size", "batch", "threads", "iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = frostnet.get_model(args.model, num_classes=args.num_classes).train()
    if args.qat:
        quant.prepare_qat(model, "x86")
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=gen)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    targets = random_boxes(gen, args.batch, args.size)
    masks = masks_from_boxes(targets, args.size)
    forward, loss_fn, full_step = _phases(model, task, x, targets, masks)

    samples: dict[str, list[float]] = {"forward": [], "loss": [], "backward": [], "step": []}
    for i in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        out, t_fwd = _timed(forward)
        loss, t_loss = _timed(lambda: loss_fn(out))
        _, t_bwd = _timed(loss.backward)
        model.zero_grad(set_to_none=True)
        step_start = time.perf_counter()
        full_step().backward()
        t_step = time.perf_counter() - step_start
        if i >= args.warmup:
            for key, t in zip(samples, (t_fwd, t_loss, t_bwd, t_step)):
                samples[key].append(t * 1e3)

    ms = {key: statistics.median(v) for key, v in samples.items()}
    split_total = ms["forward"] + ms["loss"] + ms["backward"]
    result = {
        "model": args.model, "task": task, "mode": "qat" if args.qat else "fp", "size": args.size,
        "channels_last": args.channels_last,
        "batch": args.batch, "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
        "ms": {key: round(v, 2) for key, v in ms.items()},
        "loss_share": round(ms["loss"] / split_total, 4),
        "images_per_s": round(args.batch / (ms["step"] / 1e3), 2),
        "torch": torch.__version__,
    }
    print(f"{args.model} {result['mode']}{' channels-last' if args.channels_last else ''} {args.size}x{args.size} batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.iters}: forward {ms['forward']:.1f} ms, loss {ms['loss']:.1f} ms "
          f"({100 * result['loss_share']:.1f}% of forward+loss+backward), backward {ms['backward']:.1f} ms; "
          f"full step {ms['step']:.1f} ms = {result['images_per_s']:.1f} images/s")
    if args.json is not None:
        tmp = args.json.with_name(f"{args.json.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)  # never leave a half-written file behind
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args(sys.argv[1:]))
