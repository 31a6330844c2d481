"""Checks that turn bad input and numerical blow-ups into one-line errors.

Nothing here knows about any algorithm. A script's `validate(args)` calls
`check_ranges` for its numeric flags and `fail` for anything else it cannot
run; the training loop calls `check_finite` (or `check_finite_series` on the
per-step record a jitted program returns) so the first NaN stops the run with
the true step and the name of the quantity.

    check_ranges(args, at_least_1=("batch_size",), positive=("lr",), discount=("gamma",))
    check_finite(step, **{"sac/critic_loss": loss})             # "... diverged at env step 1234: ..."
    check_finite_series(steps, **metrics)                       # metrics (num_steps, ...): first bad step
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


class BadInput(SystemExit):
    """Bad input from the user. Python prints the message and exits with
    status 1, without a traceback."""


def fail(message: str) -> None:
    """Stop with a clear one-line error: `error: <message>`."""
    raise BadInput(f"error: {' '.join(str(message).split())}")


class Divergence(SystemExit):
    """A training quantity became NaN or infinite (exit status 1, one line)."""

    last_checkpoint: str = ""  # filled in by Run (common/experiment.py) when it holds one


def flag(name: str) -> str:
    """The command-line spelling of an Args field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------
# Numeric flags
# --------------------------------------------------------------------------
def check_ranges(args, *, at_least_1=(), non_negative=(), positive=(), probability=(), discount=(),
                 open_unit=()) -> None:
    """One-line error for the first field of `args` outside its range. Fields set
    to None are skipped (None means "the paper's value" in several scripts).

    at_least_1:   counts and sizes where zero is meaningless (>= 1)
    non_negative: counts that may be zero (>= 0)
    positive:     rates, step sizes, scales (> 0)
    probability:  fractions and probabilities, [0, 1]
    discount:     discounts, (0, 1]
    open_unit:    mixing rates such as Polyak's tau, (0, 1]
    """
    rules = [(at_least_1, lambda v: v >= 1, "must be >= 1"), (non_negative, lambda v: v >= 0, "must be >= 0"),
             (positive, lambda v: v > 0, "must be > 0"), (probability, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
             (discount, lambda v: 0 < v <= 1, "must be in (0, 1]"), (open_unit, lambda v: 0 < v <= 1,
                                                                     "must be in (0, 1]")]
    for names, ok, rule in rules:
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v)):
                    fail(f"{flag(name)} {rule}, got {value}")


def check_common(args) -> None:
    """The checks every script shares: the common flags of CommonArgs, and no NaN
    or infinite number in any float flag."""
    for field, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(field)} must be a finite number, got {value}")
    if not 0 <= args.seed < 2 ** 32:
        fail(f"--seed must be in [0, 2^32 - 1], got {args.seed}")
    check_ranges(args, at_least_1=("total_timesteps", "eval_interval", "eval_episodes", "checkpoint_interval"))
    if not args.exp_name or any(c in args.exp_name for c in "/\\\0") or args.exp_name in (".", ".."):
        fail(f"--exp-name must be a plain name (part of the run directory's name), got '{args.exp_name}'")


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(nbytes: float, what: str, hint: str = "") -> None:
    """One-line error when `nbytes` (an estimate of the largest allocations) would
    not fit in 80% of the available memory: better than being killed by the OS
    with no message, hours in."""
    free = available_memory()
    if free is not None and nbytes > 0.8 * free:
        fail(f"{what} needs about {nbytes / 2 ** 30:.1f} GiB, but only {free / 2 ** 30:.1f} GiB of memory is "
             f"available{'; ' + hint if hint else ''}")


# --------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------
def _diverged(step, unit: str, name: str, bad: np.ndarray) -> Divergence:
    message = (f"error: training diverged at {unit} {int(step)}: '{name}' is not finite "
               f"({int(bad.sum())} of {bad.size} values)")
    if Divergence.last_checkpoint:
        message += f"; the last good checkpoint is {Divergence.last_checkpoint}"
    return Divergence(message)


def _non_finite(value) -> np.ndarray:
    return ~np.isfinite(np.asarray(jax.device_get(value), dtype=np.float64))


def check_finite(step: int, unit: str = "env step", **quantities: Any) -> None:
    """Stop with `Divergence` naming the step (in `unit`s: "env step", "iteration")
    and the first non-finite quantity (any pytree of arrays)."""
    for name, value in quantities.items():
        for leaf in jax.tree.leaves(value):
            bad = _non_finite(leaf)
            if bad.any():
                raise _diverged(step, unit, name, bad)


def check_finite_series(steps, unit: str = "env step", **series: Any) -> None:
    """Like `check_finite` for the record a jitted program returns: every leaf of
    every series has a leading axis aligned with `steps` (one entry per update,
    say). Reports the first step at which any quantity went bad, not the end of
    the chunk, so a fully jitted run names the true step."""
    steps = np.asarray(steps)
    first, culprit = None, None
    for name, value in series.items():
        for leaf in jax.tree.leaves(value):
            bad = _non_finite(leaf).reshape(len(steps), -1)
            rows = np.flatnonzero(bad.any(1))
            if rows.size and (first is None or rows[0] < first):
                first, culprit = rows[0], (name, bad[rows[0]])
    if first is not None:
        raise _diverged(steps[first], unit, culprit[0], culprit[1])
