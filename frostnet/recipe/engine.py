"""The training engine behind ``tools/train.py``.

One process::

    python tools/train.py --model frostnet_small_0_35 --data fashion_mnist --epochs 2 --output-dir runs/x

Distributed (gloo on CPU, nccl on GPU, detected from the torchrun environment)::

    torchrun --nproc-per-node 2 tools/train.py ...

Checkpoints (``<output-dir>/checkpoint.pt``, written atomically) hold the model, optimizer (with
GradBoost and transition-rate state), scheduler, StatAssist phase, epoch/step, RNG state and args;
``--resume`` continues bitwise where the checkpoint left off. The QAT methods (``--qat-method``,
``--talr``) leave runs that do not use them exactly as before, checkpoints included.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import quant
from ..models import get_model, get_model_task
from ..optim import TransitionRateScheduler
from ..serialization import load_fp32, read_metadata
from .args import get_args_parser, method_args, recorded_args
from .checkpoint import load_checkpoint, previous_path
from .checkpoint import save_checkpoint as _save_verified_checkpoint
from .config import RunConfig, check_method_args
from .data import TensorBatches
from .ema import WeightEMA
from .methods import end_layers_qconfig, method_qconfig, quant_ranges, refresh_ewgs_deltas
from .optimizer import EWGS_GROUP, build_optimizer, build_scheduler
from .resume_check import check_resume_flags, parse_override_flags
from .rundir import RunDir, open_run_dir
from .statassist import StatAssist, find_wrapped
from .tasks import Task, get_task
from .validate import validate_run_config

__all__ = ["Trainer", "build_optimizer", "build_scheduler", "check_method_args", "evaluate", "load_backbone", "load_init", "main", "method_qconfig"]


# ---------------------------------------------------------------------------------------------
# pieces


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from the torchrun environment; initialises the process group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return rank, world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, epoch: int = 0, task: Optional[Task] = None,
             num_classes: int = 0) -> dict[str, Any]:
    """The task's metric of ``model`` over ``batches.epoch(epoch)`` (default: classification, top-1 % and loss).

    ``num_classes`` (background included) is needed by the dense metrics.

    A fake-quant model is evaluated with its observers paused, so the evaluation data does not
    move its quantization ranges (``quant.observers_paused``).
    """
    task = task or get_task("classification")
    metric = task.new_metric(num_classes)
    model.eval()
    with quant.observers_paused(model):
        for x, y in batches.epoch(epoch):
            task.eval_step(model, x, y, metric)
    return metric.compute()


def calibration_batches(train_b: Any, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` unaugmented training batches for PTQ / cross-backend calibration."""
    if isinstance(train_b, TensorBatches):
        g = torch.Generator().manual_seed(seed + 7)
        idx = torch.randperm(len(train_b.targets), generator=g)[: n * 128]
        pipe = copy.copy(train_b.pipeline)
        pipe.train = False
        return [pipe(train_b.images[idx[i:i + 128]]) for i in range(0, len(idx), 128)]
    return [x for x, _ in zip((b[0] for b in train_b.epoch(0)), range(n))]




def _check_replicas_in_sync(model: nn.Module, world: int) -> bool:
    """Raise unless every DDP rank holds bitwise-identical parameters (GradBoost noise must agree)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Optional[str]] = [None] * world
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests}")
    return True


HEAD_PREFIXES = ("classifier.",)


def load_init(model: nn.Module, path: str, *, reset_head: bool = False, verbose: bool = True) -> None:
    """Load FP32 weights (e.g. QAT-trained, INT8-ready) into ``model``, strictly.

    With ``reset_head`` the classifier keys are not loaded (the model keeps its freshly
    initialised head for another number of classes); everything else must match exactly.
    """
    tensors, _ = load_fp32(path)
    if reset_head:
        dropped = sorted(k for k in tensors if k.startswith(HEAD_PREFIXES))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIXES)}
        head = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
        model.load_state_dict({**tensors, **head}, strict=True)
        if verbose:
            print(f"loaded {path} without its classifier ({', '.join(dropped)}): the head starts anew", flush=True)
        return
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path} does not fit {type(model).__name__}: shapes differ for {', '.join(bad[:5])}"
                         + ("; to fine-tune on other classes pass --reset-head" if all(k.startswith(HEAD_PREFIXES) for k in bad) else ""))
    model.load_state_dict(tensors, strict=True)


def _backbone_of(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the submodule called ``backbone`` (LR-ASPP: ``backbone``, SSDLite: ``body.backbone``)."""
    found = [(n, m) for n, m in model.named_modules() if n == "backbone" or n.endswith(".backbone")]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ValueError(f"{type(model).__name__} has {len(found)} submodules named 'backbone' ({names}); "
                         "--init with a classification file needs exactly one")
    return found[0]


def load_backbone(model: nn.Module, path: str, *, verbose: bool = True) -> dict[str, list[str]]:
    """Load a classification FP32 file into the ``backbone`` of a dense model.

    Strict on the backbone: every backbone tensor must come from the file with its shape. The
    file's other tensors (the classifier's head) are left out and reported, and so are the
    model's parts outside the backbone, which keep their initialisation.

    Returns:
        ``{"loaded": backbone keys, "unused": file keys not loaded, "initialised": model keys left at init}``.
    """
    tensors, meta = load_fp32(path)
    name, backbone = _backbone_of(model)
    own = backbone.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise ValueError(f"{path} (arch {meta.get('arch', '?')}) does not hold the backbone of {type(model).__name__}: "
                         f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(own)}); "
                         "use the classification weights of the same FrostNet (e.g. frostnet_small_1_0 for *_frostnet_small_1_0)")
    bad = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if tensors[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path} does not fit the backbone of {type(model).__name__}: shapes differ for {', '.join(bad[:3])}")
    backbone.load_state_dict({k: tensors[k] for k in own}, strict=True)
    report = {"loaded": [f"{name}.{k}" for k in own], "unused": sorted(k for k in tensors if k not in own),
              "initialised": [k for k in model.state_dict() if not k.startswith(name + ".")]}
    if verbose:
        print(f"--init {path}: loaded {len(own)} backbone tensors into {name}; not loaded from the file: "
              f"{', '.join(report['unused']) or 'nothing'}; {len(report['initialised'])} tensors outside the backbone "
              "keep their initialisation", flush=True)
    return report


#: what a checkpoint must hold to resume a run
CKPT_KEYS = ("model", "optimizer", "scheduler", "statassist", "epoch", "batch", "global_step", "rng", "args")


# ---------------------------------------------------------------------------------------------
# the run


class Trainer:
    """One run of the recipe, in the steps :func:`main` takes: build, resume, train an epoch,
    evaluate, checkpoint, finish (final evaluation and export).

    Every task runs through the same steps; what differs (data, loss, metric) comes from its
    :class:`~frostnet.recipe.tasks.Task`.
    """

    def __init__(self, cfg: RunConfig) -> None:
        """Build data, model, optimizer (+ GradBoost/TALR), StatAssist and LR schedule."""
        args = self.args = cfg.args
        self.cfg = cfg
        if args.threads:
            torch.set_num_threads(args.threads)
        self.rank, self.world, self.device = setup_distributed()
        if args.batch_size % self.world:
            raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {self.world}")
        self.task = get_task(cfg.task)
        self.out = Path(args.output_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        torch.manual_seed(args.seed)

        self.train_b, self.eval_b, self.info = self.task.build_data(cfg, rank=self.rank, world=self.world)
        # every flag that can be wrong is refused before any work starts or any file is written
        validate_run_config(args, self.info.train_size, eval_size=self.info.eval_size, world=self.world)
        if args.resume == "auto":
            found = self.ckpt_path.exists() or previous_path(self.ckpt_path).exists()
            self.resume_from: Optional[Path] = self.ckpt_path if found else None
        else:
            self.resume_from = Path(args.resume) if args.resume else None
        # rank 0 holds the output directory's lock for the run's life: a second run into it fails
        self.run_dir: Optional[RunDir] = (open_run_dir(self.out, resume=self.resume_from is not None, overwrite=args.overwrite)
                                          if self.rank == 0 else None)
        self.run_id = self.run_dir.run_id if self.run_dir is not None else ""
        # the checkpoint is verified and its flags compared before the model is built
        self.loaded = (load_checkpoint(self.resume_from, required_keys=CKPT_KEYS,
                                       allow_missing_digest=args.allow_unverified_checkpoint)
                       if self.resume_from is not None else None)
        self.overridden: dict[str, tuple[Any, Any]] = {}
        if self.loaded is not None:
            ckpt = self.loaded.state
            defaults = vars(get_args_parser().parse_args([]))
            self.overridden = check_resume_flags(ckpt["args"], args, defaults=defaults, position=(ckpt["epoch"], ckpt["batch"]),
                                                 overrides=parse_override_flags(args.override_resume, defaults))
        self.model = get_model(args.model, **self.task.model_kwargs(cfg, self.info)).to(self.device)
        if args.init:
            self._load_init(args.init)
        self.steps_per_epoch = len(self.train_b)
        self.opt = build_optimizer(self.model, args, self.steps_per_epoch)
        m = cfg.methods
        self.sa = StatAssist(self.model, self.opt, backend=args.backend, fp_epochs=cfg.fp_epochs,
                             weight_quant_range=cfg.weight_range, act_quant_range=cfg.act_range,
                             qconfig=method_qconfig(args, args.backend), qparam_group=EWGS_GROUP if m.ewgs else None,
                             end_qconfig=end_layers_qconfig(args, args.backend))
        self.sched = build_scheduler(self.opt, args, self.steps_per_epoch)
        self.trs = find_wrapped(self.opt, TransitionRateScheduler)
        self.ewgs_every = (m["ewgs_interval"] or self.steps_per_epoch) if m.ewgs else 0
        # EWGS learns its weight intervals on the folded weights of Conv-BN layers, static OCTAV
        # freezes its grid there; they follow BN's factor after every step so that they do not
        # collapse (quant.FoldTracker). With --talr the scheduler does this for its frozen grids.
        self.track_folds = m.fixed_grids and self.trs is None
        self.fold: Optional[quant.FoldTracker] = None
        self.saved_fold: Optional[dict[str, Any]] = None
        self.start_epoch = self.start_batch = self.global_step = 0
        self.train_sums: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.pending_eval: Optional[dict[str, Any]] = None
        self.ema: Optional[WeightEMA] = WeightEMA(args.ema_decay) if args.ema_decay > 0 else None
        self.log_file = self.out / "metrics.jsonl"
        self.ddp_model: nn.Module = self.model
        self._wrapped_phase: Optional[str] = None

    def _load_init(self, path: str) -> None:
        meta = read_metadata(path)
        verbose = self.rank == 0
        if self.cfg.task != "classification" and _task_of_arch(meta.get("arch")) == "classification":
            if self.args.reset_head:
                raise ValueError("--reset-head applies to classification models; a dense model loads only the backbone "
                                 "of a classification --init file and starts its head anew anyway")
            load_backbone(self.model, path, verbose=verbose)
        else:
            load_init(self.model, path, reset_head=self.args.reset_head, verbose=verbose)

    # ---- resume ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``--resume`` (``auto``: the output dir's checkpoint, if any) bit for bit.

        The checkpoint was verified against its digest (a damaged file falls back to the previous
        good one, or fails naming the file) and its flags compared with this run's (refused unless
        named by ``--override-resume``) when the trainer was built; here its state is restored and
        the resume, with any overrides, is logged.
        """
        loaded, overridden = self.loaded, self.overridden
        if loaded is None:
            return
        ckpt = loaded.state
        self.sa.load_state_dict(ckpt["statassist"])  # rebuilds the QAT skeleton before the weights load
        self.model.load_state_dict(ckpt["model"], strict=True)
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"], self.model)  # else (the flag added on resume) it starts anew
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        self.start_epoch, self.start_batch, self.global_step = ckpt["epoch"], ckpt["batch"], ckpt["global_step"]
        self.history = ckpt.get("history", [])
        self.train_sums = dict(ckpt.get("train_sums") or {})
        self.pending_eval = ckpt.get("pending_eval")
        self.saved_fold = ckpt.get("fold_tracker")
        if ckpt.get("run_id"):
            self.run_id = ckpt["run_id"]
            if self.run_dir is not None:
                self.run_dir.run_id = self.run_id
        self.loaded = None  # the state now lives in the model and optimizer
        if self.rank == 0:
            # no "epoch" key: readers of metrics.jsonl take records with one for per-epoch figures
            event: dict[str, Any] = {"event": "resume", "from": str(loaded.path),
                                     "position": {"epoch": self.start_epoch, "batch": self.start_batch}, "phase": self.sa.phase}
            if loaded.fallback_reason:
                event["fallback"] = loaded.fallback_reason
            if overridden:
                event["overrides"] = {k: {"checkpoint": old, "now": new} for k, (old, new) in overridden.items()}
            self.log(event)

    # ---- checkpoint -----------------------------------------------------------------------------
    def checkpoint(self, epoch: int, batch: int) -> None:
        """Everything needed to continue at ``(epoch, batch)``, written atomically by rank 0."""
        if self.rank != 0:
            return
        _save_verified_checkpoint(self.ckpt_path, {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "statassist": self.sa.state_dict(), "epoch": epoch, "batch": batch, "global_step": self.global_step,
            "fold_tracker": self.fold.state_dict() if self.fold is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            # the interrupted epoch's running sums, so its logged train figures cover every batch
            "train_sums": dict(self.train_sums) if batch else {},
            # a finished epoch whose evaluation has not been logged yet (checkpointed before evaluating)
            "pending_eval": self.pending_eval,
            "rng": torch.get_rng_state(), "args": recorded_args(self.args), "history": self.history,
            "data": {"name": self.info.name, "categories": self.info.categories}, "task": self.cfg.task,
            "run_id": self.run_id,
        })

    # ---- train ----------------------------------------------------------------------------------
    def _begin_epoch(self, epoch: int) -> None:
        args, model = self.args, self.model
        switched = self.sa.on_epoch_start(epoch)
        if self.sa.phase == "qat":
            if args.freeze_bn_epoch >= 0 and epoch >= args.freeze_bn_epoch:
                quant.freeze_bn_stats(model)
            if args.freeze_observer_epoch >= 0 and epoch >= args.freeze_observer_epoch:
                quant.disable_observer(model)
        if self.world > 1 and self._wrapped_phase != self.sa.phase:
            # QAT swaps modules, so DDP must wrap the prepared model anew (same parameters).
            self.ddp_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._wrapped_phase = self.sa.phase
        if switched and self.rank == 0:
            print(f"epoch {epoch}: StatAssist switched to QAT ({args.backend}); optimizer state carried over", flush=True)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch from ``start_batch``; returns the epoch's training entries of metrics.jsonl."""
        args, cfg = self.args, self.cfg
        self._begin_epoch(epoch)
        # after _begin_epoch: switching to QAT adds modules (their parameters are the float ones)
        layout = self._layout()
        self.model.to(memory_format=layout)
        if self.ema is not None and self.ema.phase != self.sa.phase:
            self.ema.start(self.model, self.sa.phase)  # QAT changed the structure: average anew
        t0 = time.time()
        self.ddp_model.train()
        bar = None
        if args.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=self.start_batch, desc=f"epoch {epoch} [{self.sa.phase}]",
                       mininterval=10, leave=False)
        for b, (x, y) in enumerate(self.train_b.epoch(epoch, self.start_batch), start=self.start_batch):
            x, y = x.to(self.device, non_blocking=True), _to_device(y, self.device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=layout)
            if self.ewgs_every and self.sa.phase == "qat":
                qat_step = self.global_step - cfg.fp_epochs * self.steps_per_epoch
                if qat_step > 0 and qat_step % self.ewgs_every == 0:
                    # this batch and the next --ewgs-batches - 1 of the epoch (drawn anew: the epoch's stream is untouched)
                    following = ((xb.to(self.device), _to_device(yb, self.device))
                                 for xb, yb in self.train_b.epoch(epoch, b + 1))
                    refresh_ewgs_deltas(self.model, itertools.chain([(x, y)], following), args, self.global_step,
                                        loss_of=lambda xb, yb: self.task.loss(self.model, xb, yb, cfg)[0])
            loss, sums = self.task.loss(self.ddp_model, x, y, cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch}, batch {b} (phase {self.sa.phase}); "
                                         "training diverged: lower --lr or set --clip-grad, and restart from an earlier checkpoint")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            self.opt.step()
            if self.track_folds and self.sa.phase == "qat":
                if self.fold is None:
                    self.fold = quant.FoldTracker(self.model)
                    if self.saved_fold is not None:
                        self.fold.load_state_dict(self.saved_fold)
                self.fold.update()
            if self.ema is not None:
                self.ema.update(self.model)
            self.sched.step()
            self.global_step += 1
            for k, v in sums.items():
                self.train_sums[k] = self.train_sums.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.sched.get_last_lr()[0]:.4g}", refresh=False)
            if args.ckpt_interval_steps and (b + 1) % args.ckpt_interval_steps == 0 and b + 1 < self.steps_per_epoch:
                self.checkpoint(epoch, b + 1)
            if args.exit_at_step and self.global_step == args.exit_at_step:
                os._exit(3)  # simulate a killed job: no cleanup, no final checkpoint
        if bar is not None:
            bar.close()
        self.start_batch = 0
        record: dict[str, Any] = {"epoch": epoch, "phase": self.sa.phase, "lr": self.sched.get_last_lr()[0],
                                  **self.task.train_record(self.train_sums),
                                  "train_time_s": round(time.time() - t0, 1), "eval_split": self.info.eval_split}
        self.train_sums = {}
        if self.world > 1:
            record["replicas_in_sync"] = _check_replicas_in_sync(self.model, self.world)
        if self.sa.phase == "qat" and cfg.methods.ewgs:
            deltas = [float(m.delta) for m in self.model.modules() if isinstance(m, quant.EWGSFakeQuantize)]
            record["ewgs_delta_mean"] = sum(deltas) / max(1, len(deltas))
        if self.trs is not None and self.trs.active:
            record.update(self.trs.summary())
        return record

    def _layout(self) -> torch.memory_format:
        # Channels-last makes oneDNN's convolutions (backward above all) faster on CPU for these
        # depthwise-separable networks (docs/dense-training-speed.md); Module.to swaps tensor data in
        # place, so the optimizer keeps the same parameter objects and its state.
        return torch.channels_last if self.args.channels_last else torch.contiguous_format

    # ---- evaluate -------------------------------------------------------------------------------
    def evaluate_epoch(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add the per-epoch evaluation (float or fake-quant, and converted INT8) to ``record`` and log it."""
        if self.rank != 0:
            self.pending_eval = None
            return record
        t0 = time.time()
        args, task, info = self.args, self.task, self.info
        ev = evaluate(self.model, self.eval_b, task=task, num_classes=len(info.categories))
        prefix = "fp32" if self.sa.phase == "fp" else "fake_quant"
        record.update(task.report(prefix, ev))
        if "loss" in ev:
            record["eval_loss"] = ev["loss"]
        if self.ema is not None and self.ema.phase == self.sa.phase:
            record.update(task.report(f"ema_{prefix}", evaluate(self.ema.module, self.eval_b, task=task,
                                                                num_classes=len(info.categories))))
        if self.sa.phase == "qat" and args.int8_eval:
            record.update(task.report("int8", evaluate(quant.convert(self.model, args.backend), self.eval_b, task=task, num_classes=len(info.categories))))
        elif self.sa.phase == "fp" and args.ptq_eval:
            calib = calibration_batches(self.train_b, args.calib_batches, args.seed)
            record.update(task.report("ptq_int8", evaluate(quant.quantize_ptq(self.model, calib, args.backend), self.eval_b,
                                                           task=task, num_classes=len(info.categories))))
        record["eval_time_s"] = round(time.time() - t0, 1)
        self.history.append(record)
        self.pending_eval = None
        self.log(record)
        return record

    def _choose_ema(self) -> dict[str, Any]:
        """With ``--ema-decay``: put the EMA weights into the model if the last epoch's evaluation
        (validation split) rated them strictly better than the live ones; says which was taken."""
        if self.ema is None:
            return {}
        headline = self.task.report_keys[0]
        prefix = "fp32" if self.sa.phase == "fp" else "fake_quant"
        last = self.history[-1] if self.history else {}
        live, ema = last.get(f"{prefix}_{headline}"), last.get(f"ema_{prefix}_{headline}")
        take = live is not None and ema is not None and ema > live
        if take:
            self.ema.copy_to(self.model)
        return {"weights": "ema" if take else "live", "ema_decay": self.ema.decay,
                "ema_choice": {"split": self.info.eval_split, "key": f"{prefix}_{headline}", "live": live, "ema": ema}}

    def log(self, record: dict[str, Any]) -> None:
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    # ---- finish ---------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Final figures on the test split (latent FP32 weights, fake-quant, INT8 per backend) and the export."""
        from .export import export_run

        args, task, info = self.args, self.task, self.info
        chosen = self._choose_ema()
        # exports and INT8 conversion from the standard layout, whatever the run trained in
        self.model.to(memory_format=torch.contiguous_format)
        split = task.test_split(info)
        _, test_b, _ = task.build_data(self.cfg, rank=0, world=1, eval_split=split)
        float_model = get_model(args.model, **task.model_kwargs(self.cfg, info))
        float_model.load_state_dict(self.sa.float_state_dict(), strict=True)
        final: dict[str, Any] = {"model": args.model, "task": task.name, "mode": args.mode, "epochs": args.epochs, "split": split,
                                 **chosen,
                                 **task.report("fp32", evaluate(float_model, test_b, task=task, num_classes=len(info.categories)))}
        if self.sa.phase == "qat":
            final.update(task.report("fake_quant", evaluate(self.model, test_b, task=task, num_classes=len(info.categories))))
        calib = calibration_batches(self.train_b, args.calib_batches, args.seed)
        int8_models = {}
        for backend in [b for b in args.export_backends.split(",") if b]:
            int8 = int8_for_backend(self.model, float_model, self.sa, backend, args, calib)
            try:
                final.update(task.report(f"int8_{backend}", evaluate(int8, test_b, task=task, num_classes=len(info.categories))))
            except RuntimeError as e:
                # An engine can refuse a degenerate model (qnnpack: an add whose input-to-output scale
                # ratio is outside [2**-14, 2**8)); keep the run's other results and say why this
                # backend has none, instead of losing the whole run at its last step.
                final[f"int8_{backend}_error"] = str(e).strip().splitlines()[-1][:300]
                print(f"INT8 {backend}: no result, the engine failed on the converted model: "
                      f"{final[f'int8_{backend}_error']}", flush=True)
                continue
            int8_models[backend] = int8
        if args.export:
            final["files"] = export_run(args, float_model, int8_models, info, final, self.out / "export", run_id=self.run_id)
        return final


def _task_of_arch(arch: Optional[str]) -> Optional[str]:
    try:
        return get_model_task(arch) if arch else None
    except ValueError:
        return None


def _to_device(y: Any, device: torch.device) -> Any:
    """Targets to ``device``: a tensor (labels, masks) or a list of dicts of tensors (boxes, labels)."""
    if isinstance(y, torch.Tensor):
        return y.to(device, non_blocking=True)
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in y]


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the final metrics (rank 0) and writes everything to disk.

    ``--threads`` holds for the run only: the caller's intra-op thread count is restored after it
    (results depend on it through the order of float reductions).
    """
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    trainer = Trainer(RunConfig.from_args(args))
    trainer.resume()
    if trainer.pending_eval is not None:  # killed while evaluating: the epoch trained, its figures are missing
        trainer.evaluate_epoch(trainer.pending_eval)
        trainer.checkpoint(trainer.start_epoch, 0)
    for epoch in range(trainer.start_epoch, args.epochs):
        record = trainer.train_epoch(epoch)
        # checkpoint first: an evaluation that fails (a corrupt image, an engine error) loses no training
        trainer.pending_eval = record
        trainer.checkpoint(epoch + 1, 0)
        trainer.evaluate_epoch(record)
        trainer.checkpoint(epoch + 1, 0)
    final: dict[str, Any] = {}
    if trainer.rank == 0:
        final = trainer.finish()
        trainer.log({"final": final})
    if trainer.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def converts_directly(args: argparse.Namespace, trained: str, target: str) -> bool:
    """Whether a QAT run's model, trained fake-quantized for ``trained``, converts as it is for
    ``target``: its activation range fits the target engine's (weights are alike on every engine)."""
    _, arange = quant_ranges(args)
    return (arange[1] if arange else quant.act_quant_max(trained)) <= quant.act_quant_max(target)


def int8_for_backend(model: nn.Module, float_model: nn.Module, sa: StatAssist, backend: str, args: argparse.Namespace,
                     calib: list[torch.Tensor]) -> nn.Module:
    """INT8 model for ``backend``.

    QAT runs convert their own fake-quant model for the backend they trained for, and for any
    other backend whose activation range holds the trained one (every engine takes the same
    per-channel weights): x86-trained models convert for qnnpack as they are, and so do models
    with fewer than 8 activation bits for every engine. Otherwise (qnnpack-trained 8-bit models
    for x86, whose kernels need 7-bit activations, and FP runs) the latent FP32 weights are
    prepared for that backend and its activation ranges calibrated on ``calib`` (BN statistics
    and weights untouched), which at 4 bits loses the trained weight grid.
    """
    if sa.phase == "qat" and (backend == sa.backend or converts_directly(args, sa.backend, backend)):
        return quant.convert(model, backend)
    if sa.phase == "fp":
        return quant.quantize_ptq(float_model, calib, backend)
    wrange, arange = quant_ranges(args)
    m = copy.deepcopy(float_model)
    quant.prepare_qat(m, backend, weight_quant_range=wrange, act_quant_range=arange, qconfig=method_qconfig(args, backend))
    end_qconfig = end_layers_qconfig(args, backend)
    if end_qconfig is not None:  # --keep-8bit-ends: the first and last layers as they were trained
        quant.keep_8bit_ends(m, end_qconfig)
    if sa.phase == "qat" and method_args(args)["qat_method"] == "ewgs":
        quant.copy_ewgs_bounds(model, m)  # the learned intervals, not a new calibration
    m.eval()  # BN uses its running statistics; the fake-quant observers still record ranges
    with torch.no_grad():
        for x in calib:
            m(x)
    return quant.convert(m, backend)
