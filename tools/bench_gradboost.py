"""Measure what GradBoost adds to a full training step (forward, backward, optimizer step).

Each optimizer runs twice, plain and wrapped in :class:`frostnet.optim.GradBoost`, on identical
copies of the model and a fixed synthetic batch. The variants take turns step by step, so that
load from other processes hits both alike, and the median over the timed iterations is reported.

    python tools/bench_gradboost.py                                  # frostnet_small_1_0, SGD
    python tools/bench_gradboost.py --optimizers sgd adamw --iters 30 --threads 2
    python tools/bench_gradboost.py --model torchvision:mobilenet_v3_small --phase collect
    python tools/bench_gradboost.py --optimizers sgd adamw --fused   # GradBoost(fused=True)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from frostnet.optim import PHASES, GradBoost

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    # The detection/segmentation recipes' optimizer (Nesterov SGD) and the paper's Algorithm 4.
    "sgd": lambda params, lr: torch.optim.SGD(
        params, lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5
    ),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument(
        "--model",
        default="frostnet_small_1_0",
        help="registered frostnet model name, or torchvision:<name> (default: frostnet_small_1_0)",
    )
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="square input side (default 32)")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=sorted(OPTIMIZERS),
        default=["sgd"],
        help="optimizers to measure, each plain and with GradBoost (default: sgd)",
    )
    parser.add_argument(
        "--phase", choices=PHASES, default="boost",
        help="GradBoost phase to measure (default: boost)",
    )
    parser.add_argument(
        "--fused", action="store_true",
        help="GradBoost(fused=True): statistics and noise as one torch.compile kernel",
    )
    parser.add_argument("--iters", type=int, default=20,
                        help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps per variant (default 5)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def build_model(name: str, num_classes: int) -> nn.Module:
    """A frostnet registry model, or a torchvision one for ``torchvision:<name>``."""
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], num_classes=num_classes)
    from frostnet.models import get_model

    return get_model(name, num_classes=num_classes)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Run the benchmark and print the figures of each optimizer.

    Both wall-clock time and process CPU time are measured: on a shared machine the CPU time
    (with ``--threads 1``) is the steadier of the two. Besides the overhead of the full-step
    medians, the overhead estimated from the optimizer-step medians alone (GradBoost's extra
    work over the plain full step) is reported, which background load disturbs less.

    Returns:
        Per ``"<optimizer>_<clock>"`` (clock ``"wall"`` or ``"cpu"``): median full-step and
        optimizer-step times in ms of both variants, and both overhead figures in percent.
    """
    if args.iters < 1 or args.warmup < 0:
        raise ValueError(
            f"need --iters >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.num_classes).train()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))
    criterion = nn.CrossEntropyLoss()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.model}: {n_params / 1e6:.2f}M parameters, batch {args.batch_size}x3x"
        f"{args.image_size}x{args.image_size}, {torch.get_num_threads()} threads, "
        f"GradBoost phase {args.phase!r}{' fused' if args.fused else ''}, median of {args.iters} steps after {args.warmup} warm-up"
    )
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}

    results: dict[str, dict[str, float]] = {}
    for opt_name in args.optimizers:
        variants = {}
        for boosted in (False, True):
            replica = copy.deepcopy(model)
            optimizer = OPTIMIZERS[opt_name](list(replica.parameters()), args.lr)
            if boosted:
                optimizer = GradBoost(optimizer, seed=args.seed, phase=args.phase, fused=args.fused)
            samples = {f"{clock}_{part}": [] for clock in clocks for part in ("step", "opt")}
            variants[boosted] = (replica, optimizer, samples)

        for i in range(args.warmup + args.iters):
            # Alternate the variants every step so that background load is shared fairly.
            for replica, optimizer, samples in variants.values():
                start = {name: clock() for name, clock in clocks.items()}
                optimizer.zero_grad(set_to_none=True)
                criterion(replica(images), labels).backward()
                mid = {name: clock() for name, clock in clocks.items()}
                optimizer.step()
                end = {name: clock() for name, clock in clocks.items()}
                if i >= args.warmup:
                    for name in clocks:
                        samples[f"{name}_step"].append(end[name] - start[name])
                        samples[f"{name}_opt"].append(end[name] - mid[name])

        for name in clocks:
            plain, boost = variants[False][2], variants[True][2]
            plain_step = _median_ms(plain[f"{name}_step"])
            boost_step = _median_ms(boost[f"{name}_step"])
            plain_opt = _median_ms(plain[f"{name}_opt"])
            boost_opt = _median_ms(boost[f"{name}_opt"])
            overhead = (boost_step / plain_step - 1.0) * 100.0
            overhead_from_opt = (boost_opt - plain_opt) / plain_step * 100.0
            results[f"{opt_name}_{name}"] = {
                "plain_step_ms": plain_step,
                "gradboost_step_ms": boost_step,
                "plain_optimizer_ms": plain_opt,
                "gradboost_optimizer_ms": boost_opt,
                "overhead_percent": overhead,
                "overhead_from_optimizer_step_percent": overhead_from_opt,
            }
            print(
                f"{opt_name:>6} {name:>4}: full step {plain_step:8.2f} ms plain, "
                f"{boost_step:8.2f} ms GradBoost -> overhead {overhead:+.2f}%; optimizer.step "
                f"{plain_opt:.2f} -> {boost_opt:.2f} ms -> overhead {overhead_from_opt:+.2f}%"
            )
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
