"""Command-line flags of the training recipe (``tools/train.py``)."""

from __future__ import annotations

import argparse
from typing import Any

MODES = ("fp", "qat", "qat-finetune", "statassist", "statassist+gradboost")
OPTIMIZERS = ("sgd", "adamw", "adam", "rmsprop")
SCHEDULES = ("cosine", "step", "poly", "constant")
#: Fake quantizers of the QAT phase (``--qat-method``); ``ste`` is torch's default, the recipe's original.
QAT_METHODS = ("ste", "ewgs", "octav")
OCTAV_GRADIENTS = ("mph", "mad", "pwl", "ste")
OCTAV_CLIPPINGS = ("octav", "max")
TR_SCHEDULES = ("cosine", "step", "constant")
EWGS_BOUND_OPTIMIZERS = ("adam", "main")
GB_RULES = ("paper", "authors")

#: Defaults of the QAT-method flags. A run that leaves them all at these values trains exactly as
#: before they existed, and :func:`recorded_args` leaves them out of its checkpoint and run.json.
METHOD_DEFAULTS: dict[str, Any] = {
    "qat_method": "ste",
    "ewgs_interval": 0,
    "ewgs_lr": 1e-5,            # EWGS paper Sec. 4.1 / authors' code: Adam at 1e-5 for the bounds
    "ewgs_bound_opt": "adam",
    "ewgs_samples": 4,          # 4 vectors x 2 batches, per quantizer (the paper's estimate): the sign
    "ewgs_batches": 2,          # agreement of two independent estimates was 90-96% against 46-85% for
    "ewgs_per_quantizer": True,  # all quantizers at once (docs/methods.md), at one HVP per quantizer
    "octav_gradient": "mph",
    "octav_dynamic": True,
    "octav_calib_batches": 5,
    "octav_clipping": "octav",
    "talr": False,
    "tr_target": 1.0,           # relative: R_0 = the measured STE rate (docs/methods.md)
    "tr_relative": True,
    "tr_calibration_steps": 20,
    "tr_schedule": "cosine",
    "tr_momentum": 0.99,
    "tr_eta": None,
    "keep_8bit_ends": False,
    "gb_rule": "paper",
}

_EPILOG = """\
modes:
  fp                    float training only (the FP32 baseline; --ptq-eval adds PTQ INT8 accuracy)
  qat                   fake-quantized training from scratch, no FP phase (the "scratch QAT" baseline)
  qat-finetune          classic QAT: load FP-trained weights (--init), then QAT with a small LR
  statassist            --fp-epochs of float training warm the optimizer (momentum, moments), then
                        fuse + prepare_qat keeps the same parameters and optimizer state for QAT
  statassist+gradboost  the same, with GradBoost: statistics collected in the FP phase, noise added
                        to a random half of the gradients in the QAT phase, decaying

QAT methods (any QAT mode: qat, qat-finetune, statassist, statassist+gradboost; not --mode fp):
  --qat-method ste      torch's min/max fake quantization, straight-through gradient in range (default)
  --qat-method ewgs     learnable interval per quantizer (per tensor, also on x86) with element-wise
                        gradient scaling; delta from a Hessian-trace estimate every --ewgs-interval steps
  --qat-method octav    MSE-optimal clipping (OCTAV) recomputed every step (--no-octav-dynamic: static),
                        magnitude-aware gradient for clipped weights, PWL for activations (--octav-gradient)
  --talr                transition-rate scheduling (SGD->SGDT, Adam->AdamT, AdamW->AdamWT, RMSprop too):
                        quantized weights step with a transition-adaptive LR steered toward --tr-target;
                        combines with every --qat-method, but freezes the weight quantizers while active
                        (EWGS weight intervals stop training, OCTAV weight clipping turns static at the
                        first QAT step), as the paper does. With statassist* it starts at the QAT switch.
  With statassist+gradboost the GradBoost noise goes on top (it edits gradients, TALR the step size).
  --weight-bits/--act-bits simulate W4A4 etc. for every method; the result still converts to INT8.

Paper defaults (FrostNet ImageNet): --opt rmsprop --lr 0.048 (batch 512) --sched step --decay-epochs 2.4
--decay-rate 0.97 --wd 1e-5 --dropout 0.2; GradBoost --gb-decay 0.9 --gb-clamp 1e-3 --gb-noise-decay 1e-2.
Detection (SSD): --opt sgd --nesterov --lr 1e-2; segmentation: --opt sgd --lr 7e-3 --sched poly.

examples:
  python tools/train.py --model frostnet_small_0_35 --data fashion_mnist --mode statassist+gradboost \\
      --epochs 2 --train-subset 2000 --output-dir runs/smoke
  torchrun --nproc-per-node 2 tools/train.py --model frostnet_small_1_0 --data fashion_mnist ...
  python tools/train.py ... --resume runs/smoke/checkpoint.pt
  python tools/train.py --model frostnet_small_0_5 --mode qat --qat-method octav --weight-bits 4 --act-bits 4 ...
  python tools/train.py --model frostnet_small_0_5 --mode statassist+gradboost --qat-method ewgs --talr ...
"""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Every flag of the recipe, with the papers' defaults where they apply."""
    p = argparse.ArgumentParser(
        description="frostnet training recipe: FP, QAT, StatAssist and GradBoost from scratch.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="frostnet_small_1_0", help="registered model name (frostnet.list_models())")
    g.add_argument("--data", default="fashion_mnist",
                   help="dataset spec: fashion_mnist[:<root>] (Debian package dataset-fashion-mnist) or imagefolder:<path> (ImageNet layout)")
    g.add_argument("--input-size", type=int, default=32, help="training/eval resolution (Fashion-MNIST: 28x28 zero-padded to 32)")
    g.add_argument("--train-subset", type=int, default=0, help="use a seeded random subset of this many training images (0 = all)")
    g.add_argument("--val-size", type=int, default=0,
                   help="hold out this many training images as a validation split for per-epoch evaluation (0 = evaluate on the test split)")
    g.add_argument("--eval-subset", type=int, default=0, help="evaluate on the first N images of the eval split (0 = all)")
    g.add_argument("--dropout", type=float, default=0.2, help="classifier dropout")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers (imagefolder only)")

    g = p.add_argument_group("training")
    g.add_argument("--mode", default="statassist+gradboost", choices=MODES, help="training scheme (see below)")
    g.add_argument("--epochs", type=int, default=10, help="total epochs, FP phase included (StatAssist replaces LR warm-up)")
    g.add_argument("--fp-epochs", type=int, default=1, help="StatAssist: float epochs before QAT (modes statassist*)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (split across DDP ranks)")
    g.add_argument("--opt", default="sgd", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD/RMSprop momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum for SGD")
    g.add_argument("--wd", type=float, default=4e-5, help="weight decay on conv/linear weights (not on BN or biases)")
    g.add_argument("--rmsprop-eps", type=float, default=1e-3, help="RMSprop epsilon (TF-style default of the FrostNet recipe)")
    g.add_argument("--sched", default="cosine", choices=SCHEDULES, help="LR schedule, stepped every iteration")
    g.add_argument("--decay-epochs", type=float, default=2.4, help="step schedule: epochs between decays")
    g.add_argument("--decay-rate", type=float, default=0.97, help="step schedule: LR factor per decay")
    g.add_argument("--poly-power", type=float, default=0.9, help="poly schedule power")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine schedule: final LR as a fraction of --lr")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the global gradient norm to this value (0 = off); applied before GradBoost")
    g.add_argument("--random-erasing", type=float, default=0.0,
                   help="Fashion-MNIST: probability of erasing a random box of each training image (0 = off)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay per step (e.g. 0.999; "
                        "0 = off), evaluated beside the live weights every epoch; the run exports the EMA weights "
                        "when they are better on the last epoch's evaluation split (restarted at the QAT switch)")
    g.add_argument("--init", default=None, help="FP32 weights file (safetensors) to start from (required by qat-finetune)")
    g.add_argument("--reset-head", action="store_true",
                   help="with --init: start the classifier anew (fine-tuning INT8-ready weights on a dataset with other classes)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order, augmentation, dropout and GradBoost noise")

    g = p.add_argument_group("quantization")
    g.add_argument("--backend", default="x86", help="INT8 engine the QAT targets: x86, fbgemm or qnnpack")
    g.add_argument("--weight-bits", type=int, default=8, help="simulated weight bits in fake quantization (<=8; still converts to INT8)")
    g.add_argument("--act-bits", type=int, default=8, help="simulated activation bits in fake quantization (<=8)")
    g.add_argument("--freeze-bn-epoch", type=int, default=-1, help="epoch from which BN statistics are frozen in QAT (-1 = never)")
    g.add_argument("--freeze-observer-epoch", type=int, default=-1, help="epoch from which quantization ranges are frozen (-1 = never)")
    g.add_argument("--ptq-eval", action="store_true", help="mode fp: also report the accuracy of a post-training-quantized INT8 copy each epoch")
    g.add_argument("--calib-batches", type=int, default=8, help="batches used to calibrate PTQ/other-backend INT8 copies")
    g.add_argument("--keep-8bit-ends", action="store_true", default=METHOD_DEFAULTS["keep_8bit_ends"],
                   help="keep the first and last quantized layers at 8 bits while the rest run at --weight-bits/--act-bits "
                        "(the low-bit papers' protocol)")
    g.add_argument("--int8-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate a converted INT8 copy (CPU) every QAT epoch")

    g = p.add_argument_group("GradBoost")
    g.add_argument("--gb-decay", type=float, default=0.9, help="gamma1: decay of the moving max/min of the gradient")
    g.add_argument("--gb-clamp", type=float, default=1e-3, help="gamma2: largest noise magnitude")
    g.add_argument("--gb-noise-decay", type=float, default=1e-2, help="noise scaled by (1 - this) ** boost_step")
    g.add_argument("--gb-coin-toss", action=argparse.BooleanOptionalAction, default=True, help="boost a Bernoulli(1/2) half of the elements")
    g.add_argument("--gb-rule", default=METHOD_DEFAULTS["gb_rule"], choices=GB_RULES,
                   help="paper: the paper's equations (signed-gradient spread, clamp then decay); authors: the published "
                        "code (|g| statistics divided in place, decay then clamp); see docs/methods.md")
    g.add_argument("--gb-fused", action=argparse.BooleanOptionalAction, default=False,
                   help="GradBoost's statistics and noise as one torch.compile kernel (needs a C++ compiler on CPU; "
                        "about a third of the unfused cost); same equations, equal up to rounding")

    d = METHOD_DEFAULTS
    g = p.add_argument_group("QAT methods (see below)")
    g.add_argument("--qat-method", default=d["qat_method"], choices=QAT_METHODS,
                   help="fake quantizer of the QAT phase: ste (torch default), ewgs (EWGS paper) or octav (OCTAV paper)")
    g.add_argument("--ewgs-interval", type=int, default=d["ewgs_interval"],
                   help="EWGS: re-estimate delta every N QAT steps (0 = every epoch); delta = 0 (plain STE) before the first")
    g.add_argument("--ewgs-lr", type=float, default=d["ewgs_lr"],
                   help="EWGS: peak LR of the interval bounds (own group, no weight decay, same LR schedule; paper: 1e-5)")
    g.add_argument("--ewgs-bound-opt", default=d["ewgs_bound_opt"], choices=EWGS_BOUND_OPTIMIZERS,
                   help="EWGS: optimizer of the interval bounds: adam (their own Adam, the paper's) or main (a group of --opt)")
    g.add_argument("--ewgs-samples", type=int, default=d["ewgs_samples"],
                   help="EWGS: Rademacher vectors per batch of each Hessian-trace estimate")
    g.add_argument("--ewgs-batches", type=int, default=d["ewgs_batches"], help="EWGS: batches per Hessian-trace estimate")
    g.add_argument("--ewgs-per-quantizer", action=argparse.BooleanOptionalAction, default=d["ewgs_per_quantizer"],
                   help="EWGS: one Hessian-vector product per quantizer (the paper's estimate) instead of all at once")
    g.add_argument("--octav-gradient", default=d["octav_gradient"], choices=OCTAV_GRADIENTS,
                   help="OCTAV: gradient of clipped values (mph = MAD for weights, PWL for activations)")
    g.add_argument("--octav-dynamic", action=argparse.BooleanOptionalAction, default=d["octav_dynamic"],
                   help="OCTAV: recompute the clipping every step (--no-octav-dynamic = static-OCTAV)")
    g.add_argument("--octav-clipping", default=d["octav_clipping"], choices=OCTAV_CLIPPINGS,
                   help="OCTAV: octav (MSE-optimal clipping) or max (max-scaling, the OCTAV paper's baseline)")
    g.add_argument("--octav-calib-batches", type=int, default=d["octav_calib_batches"],
                   help="static OCTAV: QAT batches averaged before the clipping freezes")
    g.add_argument("--talr", action="store_true", default=d["talr"],
                   help="transition-rate scheduling: quantized weights step with a transition-adaptive LR (SGDT/AdamT/AdamWT)")
    g.add_argument("--tr-target", type=float, default=d["tr_target"],
                   help="TALR: initial target transition rate R_0 (fraction of integer weights changing level per step; "
                        "with --tr-relative a fraction of the rate measured over the first --tr-calibration-steps)")
    g.add_argument("--tr-relative", action=argparse.BooleanOptionalAction, default=d["tr_relative"],
                   help="TALR: target relative to the plain-STE transition rate measured at the start of QAT "
                        "(--no-tr-relative: absolute, the recipe's earlier default 0.02)")
    g.add_argument("--tr-calibration-steps", type=int, default=d["tr_calibration_steps"],
                   help="TALR --tr-relative: steps at the initial LR that measure the reference rate")
    g.add_argument("--tr-schedule", default=d["tr_schedule"], choices=TR_SCHEDULES,
                   help="TALR: decay of the target over the QAT steps (step: times --decay-rate every --decay-epochs)")
    g.add_argument("--tr-momentum", type=float, default=d["tr_momentum"], help="TALR: momentum m of the running transition rate")
    g.add_argument("--tr-eta", type=float, default=d["tr_eta"],
                   help="TALR: adaptation rate eta of the TALR (default: the LR at the start of QAT)")

    g = p.add_argument_group("output, checkpoints and logging")
    g.add_argument("--output-dir", default="runs/default", help="checkpoint.pt, metrics.jsonl and exported weights go here")
    g.add_argument("--resume", default=None, help="checkpoint to resume from ('auto' = <output-dir>/checkpoint.pt if it exists)")
    g.add_argument("--override-resume", default=None, metavar="FLAG[,FLAG]",
                   help="resume although these flags (names without --) differ from the checkpoint's; logged in metrics.jsonl")
    g.add_argument("--allow-unverified-checkpoint", action="store_true",
                   help="resume from a checkpoint written before checkpoints had a sha256 digest (still key-checked; "
                        "the next checkpoint gets a digest)")
    g.add_argument("--overwrite", action="store_true",
                   help="start anew in an --output-dir that holds an earlier run's files (deletes only the recipe's own files)")
    g.add_argument("--ckpt-interval-steps", type=int, default=0, help="also checkpoint every N steps inside an epoch (0 = epoch ends only)")
    g.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write the FP32 and INT8 safetensors files into <output-dir>/export at the end")
    g.add_argument("--export-backends", default="x86,qnnpack", help="comma-separated INT8 backends to export")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="train in the channels-last memory format (faster convolutions on CPU, "
                        "docs/dense-training-speed.md); the math is the same, float rounding differs")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    g.add_argument("--exit-at-step", type=int, default=0,
                   help="testing aid: hard-exit (os._exit) right after this global step, as a killed job would")
    return p


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` without the QAT-method flags that are at their defaults.

    Checkpoints and run.json of runs that do not use the QAT methods stay exactly as they were
    before those flags existed; readers take a missing flag as its default.
    """
    return {k: v for k, v in vars(args).items() if not (k in METHOD_DEFAULTS and v == METHOD_DEFAULTS[k])}


def method_args(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The QAT-method flags of ``args`` (a namespace, or the ``args`` dict of a checkpoint)."""
    values = args if isinstance(args, dict) else vars(args)
    return {k: values.get(k, default) for k, default in METHOD_DEFAULTS.items()}
