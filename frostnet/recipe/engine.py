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
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import quant
from ..models import get_model
from ..optim import TransitionRateScheduler
from ..serialization import load_fp32
from .args import METHOD_DEFAULTS, method_args, recorded_args
from .data import DataInfo, TensorBatches, build_data
from .methods import method_qconfig, quant_ranges as _quant_ranges
from .optimizer import EWGS_GROUP, build_optimizer, build_scheduler, fp_epochs as _fp_epochs
from .statassist import StatAssist, find_wrapped

__all__ = ["main", "build_optimizer", "build_scheduler", "check_method_args", "evaluate", "method_qconfig", "train"]


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
def evaluate(model: nn.Module, batches: Any, epoch: int = 0) -> dict[str, float]:
    """Top-1 accuracy (%) and mean loss of ``model`` over ``batches.epoch(epoch)``.

    A fake-quant model is evaluated with its observers paused, so the evaluation data does not
    move its quantization ranges (``quant.observers_paused``).
    """
    model.eval()
    correct = total = 0
    loss = 0.0
    with quant.observers_paused(model):
        for x, y in batches.epoch(epoch):
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += y.numel()
    return {"top1": 100.0 * correct / max(1, total), "loss": loss / max(1, total), "n": total}


def calibration_batches(train_b: Any, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` unaugmented training batches for PTQ / cross-backend calibration."""
    if isinstance(train_b, TensorBatches):
        g = torch.Generator().manual_seed(seed + 7)
        idx = torch.randperm(len(train_b.targets), generator=g)[: n * 128]
        pipe = copy.copy(train_b.pipeline)
        pipe.train = False
        return [pipe(train_b.images[idx[i:i + 128]]) for i in range(0, len(idx), 128)]
    return [x for x, _ in zip((b[0] for b in train_b.epoch(0)), range(n))]


def check_method_args(args: argparse.Namespace) -> None:
    """Raise for QAT-method flags that do not apply to this run (naming the flag and the fix)."""
    m = method_args(args)
    if args.mode == "fp" and (m["qat_method"] != "ste" or m["talr"]):
        flag = f"--qat-method {m['qat_method']}" if m["qat_method"] != "ste" else "--talr"
        raise ValueError(f"{flag} needs a QAT phase: use --mode qat, qat-finetune, statassist or statassist+gradboost, "
                         "not --mode fp")
    owners = {"ewgs_": ("--qat-method ewgs", m["qat_method"] == "ewgs"),
              "octav_": ("--qat-method octav", m["qat_method"] == "octav"),
              "tr_": ("--talr", m["talr"])}
    for key, value in m.items():
        for prefix, (owner, active) in owners.items():
            if key.startswith(prefix) and not active and value != METHOD_DEFAULTS[key]:
                raise ValueError(f"--{key.replace('_', '-')} {value} only applies with {owner}")
    for key in ("ewgs_interval",):
        if m[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0 (0 = every epoch), got {m[key]}")
    for key in ("ewgs_samples", "octav_calib_batches"):
        if m[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {m[key]}")
    if not m["ewgs_lr"] >= 0:
        raise ValueError(f"--ewgs-lr must be >= 0, got {m['ewgs_lr']}")


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


def refresh_ewgs_deltas(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, step: int) -> dict[str, float]:
    """Re-estimate every EWGS delta on the batch ``(x, y)`` (EWGS paper, Eq. 10).

    The Rademacher vectors come from a generator seeded by ``--seed`` and the global step, so a
    resumed run draws the same ones; the model's buffers and the global RNG are left as they were.
    """
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return quant.update_ewgs_deltas(
        model, lambda: F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing),
        samples=method_args(args)["ewgs_samples"], generator=gen)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the run


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the final metrics (rank 0) and writes everything to disk."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    quant.check_backend(args.backend)
    check_method_args(args)
    methods = method_args(args)
    if args.mode == "qat-finetune" and not args.init:
        raise ValueError("--mode qat-finetune needs --init <FP32 weights file> (the FP-trained model to fine-tune)")
    fp_epochs = _fp_epochs(args)
    wrange, arange = _quant_ranges(args)
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    train_b, eval_b, info = build_data(args.data, input_size=args.input_size, batch_size=args.batch_size, seed=args.seed,
                                       rank=rank, world=world, train_subset=args.train_subset, val_size=args.val_size,
                                       eval_subset=args.eval_subset, workers=args.workers,
                                       erase_p=getattr(args, "random_erasing", 0.0))
    model = get_model(args.model, num_classes=len(info.categories), dropout=args.dropout).to(device)
    if args.init:
        load_init(model, args.init, reset_head=args.reset_head, verbose=rank == 0)
    steps_per_epoch = len(train_b)
    opt = build_optimizer(model, args, steps_per_epoch)
    sa = StatAssist(model, opt, backend=args.backend, fp_epochs=fp_epochs, weight_quant_range=wrange, act_quant_range=arange,
                    qconfig=method_qconfig(args, args.backend),
                    qparam_group=EWGS_GROUP if methods["qat_method"] == "ewgs" else None)
    sched = build_scheduler(opt, args, steps_per_epoch)
    trs = find_wrapped(opt, TransitionRateScheduler)
    ewgs_every = (methods["ewgs_interval"] or steps_per_epoch) if methods["qat_method"] == "ewgs" else 0
    # EWGS learns its weight intervals on the folded weights of Conv-BN layers, static OCTAV
    # freezes its grid there; they follow BN's factor after every step so that they do not
    # collapse (quant.FoldTracker). With --talr the scheduler does this for its frozen grids.
    fixed_grids = methods["qat_method"] == "ewgs" or (methods["qat_method"] == "octav" and not methods["octav_dynamic"])
    track_folds = fixed_grids and trs is None
    fold: Optional[quant.FoldTracker] = None
    saved_fold: Optional[dict[str, Any]] = None

    start_epoch = start_batch = global_step = 0
    history: list[dict[str, Any]] = []
    ckpt_path = out / "checkpoint.pt"
    resume = str(ckpt_path) if args.resume == "auto" and ckpt_path.exists() else (None if args.resume == "auto" else args.resume)
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        if ckpt["args"]["model"] != args.model or ckpt["args"]["mode"] != args.mode:
            raise ValueError(f"{resume} was written by --model {ckpt['args']['model']} --mode {ckpt['args']['mode']}, "
                             f"not --model {args.model} --mode {args.mode}")
        saved_methods = method_args(ckpt["args"])
        for key in ("qat_method", "talr"):
            saved = saved_methods[key]
            if saved != methods[key]:
                raise ValueError(f"{resume} was written with --{key.replace('_', '-')} {saved}, not {methods[key]}; "
                                 "resume with the flags it was started with")
        sa.load_state_dict(ckpt["statassist"])  # rebuilds the QAT skeleton before the weights load
        model.load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, start_batch, global_step = ckpt["epoch"], ckpt["batch"], ckpt["global_step"]
        history = ckpt.get("history", [])
        saved_fold = ckpt.get("fold_tracker")
        if rank == 0:
            print(f"resumed from {resume}: epoch {start_epoch}, batch {start_batch}, phase {sa.phase}", flush=True)

    def checkpoint(epoch: int, batch: int) -> None:
        if rank != 0:
            return
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "statassist": sa.state_dict(), "epoch": epoch, "batch": batch, "global_step": global_step,
            "fold_tracker": fold.state_dict() if fold is not None else None,
            "rng": torch.get_rng_state(), "args": recorded_args(args), "history": history,
            "data": {"name": info.name, "categories": info.categories},
        })

    log_file = out / "metrics.jsonl"
    ddp_model: nn.Module = model
    wrapped_phase = None
    for epoch in range(start_epoch, args.epochs):
        switched = sa.on_epoch_start(epoch)
        if sa.phase == "qat":
            if args.freeze_bn_epoch >= 0 and epoch >= args.freeze_bn_epoch:
                quant.freeze_bn_stats(model)
            if args.freeze_observer_epoch >= 0 and epoch >= args.freeze_observer_epoch:
                quant.disable_observer(model)
        if world > 1 and wrapped_phase != sa.phase:
            # QAT swaps modules, so DDP must wrap the prepared model anew (same parameters).
            ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            wrapped_phase = sa.phase
        if switched and rank == 0:
            print(f"epoch {epoch}: StatAssist switched to QAT ({args.backend}); optimizer state carried over", flush=True)

        t0 = time.time()
        ddp_model.train()
        run_loss = run_correct = run_n = 0.0
        bar = None
        if args.progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch} [{sa.phase}]", mininterval=10, leave=False)
        for b, (x, y) in enumerate(train_b.epoch(epoch, start_batch), start=start_batch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if ewgs_every and sa.phase == "qat":
                qat_step = global_step - fp_epochs * steps_per_epoch
                if qat_step > 0 and qat_step % ewgs_every == 0:
                    refresh_ewgs_deltas(model, x, y, args, global_step)
            outp = ddp_model(x)
            loss = F.cross_entropy(outp, y, label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch}, batch {b} (phase {sa.phase}); "
                                         "training diverged: lower --lr or set --clip-grad, and restart from an earlier checkpoint")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            if track_folds and sa.phase == "qat":
                if fold is None:
                    fold = quant.FoldTracker(model)
                    if saved_fold is not None:
                        fold.load_state_dict(saved_fold)
                fold.update()
            sched.step()
            global_step += 1
            run_loss += loss.item() * y.numel()
            run_correct += (outp.argmax(1) == y).sum().item()
            run_n += y.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4g}", refresh=False)
            if args.ckpt_interval_steps and (b + 1) % args.ckpt_interval_steps == 0 and b + 1 < steps_per_epoch:
                checkpoint(epoch, b + 1)
            if args.exit_at_step and global_step == args.exit_at_step:
                os._exit(3)  # simulate a killed job: no cleanup, no final checkpoint
        if bar is not None:
            bar.close()
        start_batch = 0
        train_time = time.time() - t0

        in_sync = _check_replicas_in_sync(model, world) if world > 1 else None
        record: dict[str, Any] = {"epoch": epoch, "phase": sa.phase, "lr": sched.get_last_lr()[0],
                                  "train_loss": run_loss / max(1, run_n), "train_top1": 100 * run_correct / max(1, run_n),
                                  "train_time_s": round(train_time, 1), "eval_split": info.eval_split}
        if in_sync is not None:
            record["replicas_in_sync"] = in_sync
        if sa.phase == "qat" and methods["qat_method"] == "ewgs":
            deltas = [float(m.delta) for m in model.modules() if isinstance(m, quant.EWGSFakeQuantize)]
            record["ewgs_delta_mean"] = sum(deltas) / max(1, len(deltas))
        if trs is not None and trs.active:
            record.update(trs.summary())
        if rank == 0:
            ev = evaluate(model, eval_b)
            record["fp32_top1" if sa.phase == "fp" else "fake_quant_top1"] = ev["top1"]
            record["eval_loss"] = ev["loss"]
            if sa.phase == "qat" and args.int8_eval:
                record["int8_top1"] = evaluate(quant.convert(model, args.backend), eval_b)["top1"]
            elif sa.phase == "fp" and args.ptq_eval:
                calib = calibration_batches(train_b, args.calib_batches, args.seed)
                record["ptq_int8_top1"] = evaluate(quant.quantize_ptq(model, calib, args.backend), eval_b)["top1"]
            record["eval_time_s"] = round(time.time() - t0 - train_time, 1)
            history.append(record)
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        checkpoint(epoch + 1, 0)

    final: dict[str, Any] = {}
    if rank == 0:
        final = finish(args, model, sa, train_b, info, out)
        with open(log_file, "a") as f:
            f.write(json.dumps({"final": final}) + "\n")
        print(json.dumps({"final": final}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def finish(args: argparse.Namespace, model: nn.Module, sa: StatAssist, train_b: Any, info: DataInfo, out: Path) -> dict[str, Any]:
    """Final test-split evaluation (FP32 latent weights, fake-quant, INT8 per backend) and export."""
    from .export import export_run

    # the final figures come from the test split (ImageNet-style folders: their val split)
    split = "test" if info.name == "fashion_mnist" else "val"
    _, test_b, _ = build_data(args.data, input_size=args.input_size, batch_size=args.batch_size, seed=args.seed,
                              rank=0, world=1, eval_split=split, eval_subset=args.eval_subset, workers=args.workers)
    float_model = get_model(args.model, num_classes=len(info.categories), dropout=args.dropout)
    float_model.load_state_dict(sa.float_state_dict(), strict=True)
    final: dict[str, Any] = {"model": args.model, "mode": args.mode, "epochs": args.epochs, "split": split,
                             "fp32_top1": evaluate(float_model, test_b)["top1"]}
    if sa.phase == "qat":
        final["fake_quant_top1"] = evaluate(model, test_b)["top1"]
    backends = [b for b in args.export_backends.split(",") if b]
    calib = calibration_batches(train_b, args.calib_batches, args.seed)
    int8_models = {}
    for backend in backends:
        int8 = int8_for_backend(model, float_model, sa, backend, args, calib)
        try:
            final[f"int8_{backend}_top1"] = evaluate(int8, test_b)["top1"]
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
        final["files"] = export_run(args, float_model, int8_models, info, final, out / "export")
    return final


def converts_directly(args: argparse.Namespace, trained: str, target: str) -> bool:
    """Whether a QAT run's model, trained fake-quantized for ``trained``, converts as it is for
    ``target``: its activation range fits the target engine's (weights are alike on every engine)."""
    _, arange = _quant_ranges(args)
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
    wrange, arange = _quant_ranges(args)
    m = copy.deepcopy(float_model)
    quant.prepare_qat(m, backend, weight_quant_range=wrange, act_quant_range=arange, qconfig=method_qconfig(args, backend))
    if sa.phase == "qat" and method_args(args)["qat_method"] == "ewgs":
        quant.copy_ewgs_bounds(model, m)  # the learned intervals, not a new calibration
    m.eval()  # BN uses its running statistics; the fake-quant observers still record ranges
    with torch.no_grad():
        for x in calib:
            m(x)
    return quant.convert(m, backend)
