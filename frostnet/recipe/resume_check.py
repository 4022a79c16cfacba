"""Refuse to resume a run with flags that would change it, unless told to.

A resumed run that silently takes a new ``--lr`` (or seed, batch size, ...) continues with a mix
of two runs: the optimizer and schedule of one, the flags (and run.json) of the other. Every
flag is therefore *run-changing* unless it is listed in :data:`HARMLESS_FLAGS` (default-deny:
a flag added later is protected without anyone remembering to list it). A run-changing flag
that differs from the checkpoint's recorded value is refused unless it is named in
``--override-resume FLAG[,FLAG...]``; the overrides are returned so the loop logs them.

Decisions, flag by flag (see docs/hardening.md):

* harmless (:data:`HARMLESS_FLAGS`): where output goes and how fast it runs, none of which
  touches the weights or the recorded metrics: ``--output-dir`` (the same directory spelled
  differently), ``--resume``, ``--threads``, ``--channels-last`` (memory layout: the same math
  in another order of float operations, like ``--threads``), ``--workers`` (ImageFolder batches do not depend on
  it, see :class:`frostnet.recipe.data.LoaderBatches`), ``--progress``, ``--ckpt-interval-steps``,
  ``--exit-at-step`` (a test aid), ``--export``/``--export-backends`` (only what is written at
  the end), and the resume/overwrite flags themselves.
* refused even with an override (:data:`NEVER_OVERRIDABLE`): ``--model`` and ``--mode`` (the
  checkpoint's tensors would not fit), and ``--epochs`` below the checkpoint's position (it
  would export a state from the middle of an epoch that no longer exists).
* everything else (``--lr``, every ``--gb-*``, ``--batch-size``, ``--seed``, ``--train-subset``,
  ``--backend``, ``--epochs``, ``--data``, ``--input-size``, the QAT-method flags,
  ``--eval-subset`` and ``--int8-eval``/``--ptq-eval`` whose results go into the run's logged
  history, ...) is run-changing and needs ``--override-resume``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["HARMLESS_FLAGS", "NEVER_OVERRIDABLE", "ResumeFlagError", "check_resume_flags", "flag_name",
           "parse_override_flags"]

#: Flags (argparse ``dest`` names) that may differ between a run and its resumption.
HARMLESS_FLAGS = frozenset({
    "output_dir", "resume", "threads", "channels_last", "workers", "progress", "ckpt_interval_steps", "exit_at_step",
    "export", "export_backends", "override_resume", "overwrite", "allow_unverified_checkpoint",
})
#: Flags whose change no override can make consistent with the checkpoint.
NEVER_OVERRIDABLE = frozenset({"model", "mode"})


class ResumeFlagError(ValueError):
    """The resumed run's flags differ from the checkpoint's in a way that changes the run."""


def flag_name(dest: str) -> str:
    """``gb_decay`` -> ``--gb-decay``."""
    return "--" + dest.replace("_", "-")


def parse_override_flags(text: str | None, known: Iterable[str]) -> frozenset[str]:
    """The ``dest`` names of ``--override-resume lr,gb-decay`` (``--`` prefixes optional).

    Args:
        text: the flag's value (``None`` or empty: no overrides).
        known: the ``dest`` names of every flag of the parser.

    Raises:
        ResumeFlagError: a name that is not a flag, or one that can never be overridden.
    """
    known = set(known)
    out = set()
    for raw in (text or "").split(","):
        name = raw.strip().lstrip("-").replace("-", "_")
        if not name:
            continue
        if name not in known:
            raise ResumeFlagError(f"--override-resume names unknown flag {raw.strip()!r}; valid choices: "
                                  + ", ".join(flag_name(k)[2:] for k in sorted(known - HARMLESS_FLAGS)))
        if name in NEVER_OVERRIDABLE:
            raise ResumeFlagError(f"{flag_name(name)} cannot be overridden on resume: the checkpoint's tensors belong "
                                  f"to its {flag_name(name)}; start a new run in another --output-dir")
        out.add(name)
    return frozenset(out)


def check_resume_flags(saved: Mapping[str, Any], args: argparse.Namespace, *, defaults: Mapping[str, Any],
                       position: tuple[int, int], overrides: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Compare the resumed run's flags with the ones the checkpoint recorded.

    Args:
        saved: the checkpoint's ``args`` dict (flags at their defaults may be left out of it).
        args: the resumed run's flags.
        defaults: every flag's default (``get_args_parser().parse_args([])``), taken for a flag
            the checkpoint does not record.
        position: ``(epoch, batch)`` of the checkpoint.
        overrides: ``dest`` names the user allowed to change (:func:`parse_override_flags`).

    Returns:
        ``{dest: (checkpoint value, new value)}`` of the overridden flags that changed, for the log.

    Raises:
        ResumeFlagError: listing every refused change with both values and the override to pass.
    """
    overrides = set(overrides)
    new = vars(args)
    changed = {}
    for dest in sorted(set(new) | set(saved)):
        if dest in HARMLESS_FLAGS:
            continue
        old_value = saved.get(dest, defaults.get(dest))
        new_value = new.get(dest, defaults.get(dest))
        if old_value != new_value:
            changed[dest] = (old_value, new_value)
    hard = [f"{flag_name(d)} {changed[d][1]!r} (the checkpoint's: {changed[d][0]!r})" for d in sorted(changed)
            if d in NEVER_OVERRIDABLE]
    epoch, batch = position
    epochs = new.get("epochs", defaults.get("epochs"))
    if epochs is not None and epochs < epoch + (batch > 0):
        hard.append(f"--epochs {epochs} ends before the checkpoint's position (epoch {epoch}, batch {batch}): the run "
                    "would export a state it has already trained past")
    if hard:
        raise ResumeFlagError("cannot resume: " + "; ".join(hard) + "; resume with the checkpoint's values or start "
                              "a new run in another --output-dir")
    refused = {d: v for d, v in changed.items() if d not in overrides}
    if refused:
        lines = "; ".join(f"{flag_name(d)} {new_v!r} (the checkpoint's: {old!r})" for d, (old, new_v) in refused.items())
        raise ResumeFlagError(f"resuming with changed flags would mix two runs: {lines}. Resume with the checkpoint's "
                              f"values, or pass --override-resume {','.join(flag_name(d)[2:] for d in refused)} "
                              "to continue with the new ones (recorded in the log)")
    return {d: v for d, v in changed.items() if d in overrides}
