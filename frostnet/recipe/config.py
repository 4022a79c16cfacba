"""The recipe's flags parsed once into a typed run configuration.

``tools/train.py`` parses ``argparse`` flags; :meth:`RunConfig.from_args` checks them and derives
everything the loop needs (the task, the StatAssist switch epoch, the simulated quantization
ranges, which QAT-method machinery runs) in one place, so the loop reads one object instead of
re-deriving settings from the raw namespace.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..models import get_model_task
from .args import METHOD_DEFAULTS, method_args
from .methods import quant_ranges
from .optimizer import fp_epochs as fp_epochs_of

__all__ = ["MethodConfig", "RunConfig", "check_method_args"]

QuantRange = Optional[tuple[int, int]]


@dataclass(frozen=True)
class MethodConfig:
    """The QAT-method flags (``--qat-method``, ``--talr`` and their options), by flag name.

    ``values`` holds every key of :data:`~frostnet.recipe.args.METHOD_DEFAULTS`; the properties
    name the decisions the loop takes from them.
    """

    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def qat_method(self) -> str:
        return self.values["qat_method"]

    @property
    def talr(self) -> bool:
        return bool(self.values["talr"])

    @property
    def ewgs(self) -> bool:
        return self.qat_method == "ewgs"

    @property
    def fixed_grids(self) -> bool:
        """Whether weight grids stay fixed between steps (EWGS's learned intervals, static OCTAV)."""
        return self.ewgs or (self.qat_method == "octav" and not self.values["octav_dynamic"])


def check_method_args(args: argparse.Namespace) -> None:
    """Raise for QAT-method flags that do not apply to this run (naming the flag and the fix)."""
    m = method_args(args)
    if args.mode == "fp" and (m["qat_method"] != "ste" or m["talr"] or m["keep_8bit_ends"]):
        flag = (f"--qat-method {m['qat_method']}" if m["qat_method"] != "ste" else "--talr" if m["talr"]
                else "--keep-8bit-ends")
        raise ValueError(f"{flag} needs a QAT phase: use --mode qat, qat-finetune, statassist or statassist+gradboost, "
                         "not --mode fp")
    owners = {"ewgs_": ("--qat-method ewgs", m["qat_method"] == "ewgs"),
              "octav_": ("--qat-method octav", m["qat_method"] == "octav"),
              "tr_": ("--talr", m["talr"])}
    for key, value in m.items():
        for prefix, (owner, active) in owners.items():
            if key.startswith(prefix) and not active and value != METHOD_DEFAULTS[key]:
                raise ValueError(f"--{key.replace('_', '-')} {value} only applies with {owner}")
    if m["ewgs_interval"] < 0:
        raise ValueError(f"--ewgs-interval must be >= 0 (0 = every epoch), got {m['ewgs_interval']}")
    if m["gb_rule"] != METHOD_DEFAULTS["gb_rule"] and args.mode != "statassist+gradboost":
        raise ValueError(f"--gb-rule {m['gb_rule']} only applies with --mode statassist+gradboost, not --mode {args.mode}")
    for key in ("ewgs_samples", "ewgs_batches", "octav_calib_batches", "tr_calibration_steps"):
        if m[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {m[key]}")
    if not m["ewgs_lr"] >= 0:
        raise ValueError(f"--ewgs-lr must be >= 0, got {m['ewgs_lr']}")


@dataclass(frozen=True)
class RunConfig:
    """Everything the training loop reads, checked and derived once from the flags.

    Attributes:
        args: the flags as parsed (recorded in checkpoints, run.json and the export's recipe).
        task: ``classification``, ``segmentation`` or ``detection`` (from the model registry).
        fp_epochs: epochs before the StatAssist switch to QAT (``epochs`` for ``--mode fp``).
        weight_range / act_range: simulated integer ranges below 8 bits, else None.
        methods: the QAT-method settings.
    """

    args: argparse.Namespace
    task: str
    fp_epochs: int
    weight_range: QuantRange
    act_range: QuantRange
    methods: MethodConfig

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """Check the flags that can be checked without data and derive the run's settings."""
        from .. import quant

        quant.check_backend(args.backend)
        check_method_args(args)
        if args.mode == "qat-finetune" and not args.init:
            raise ValueError("--mode qat-finetune needs --init <FP32 weights file> (the FP-trained model to fine-tune)")
        task = get_model_task(args.model)
        if task != "classification":
            for flag, value, default in (("--label-smoothing", args.label_smoothing, 0.0),
                                         ("--random-erasing", getattr(args, "random_erasing", 0.0), 0.0)):
                if value != default:
                    raise ValueError(f"{flag} {value} applies to classification models only, not to the {task} model {args.model}")
        w, a = quant_ranges(args)
        return cls(args=args, task=task, fp_epochs=fp_epochs_of(args), weight_range=w, act_range=a,
                   methods=MethodConfig(method_args(args)))

    @property
    def int8_eval(self) -> bool:
        return bool(self.args.int8_eval)

    def get(self, name: str, default: Any = None) -> Any:
        """A flag by name (``None``-safe for flags older checkpoints did not record)."""
        return getattr(self.args, name, default)
