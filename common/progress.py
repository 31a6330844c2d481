"""Progress lines on stdout, in one format for every script.

    progress = Progress(f"MBPO on {args.env_id}", args.total_timesteps, start=run.start_step,
                        every=args.eval_interval, compiling="the model, rollout and SAC phases")
    ...
    run.log(metrics, step, echo=False)             # everything goes to metrics.jsonl
    progress.update(step, metrics, ["eval/return", "sac/critic_loss"])   # a few, rounded
    ...
    progress.done("eval/return", final_return, reference="1000 is the maximum")

prints

    MBPO on InvertedPendulum-v5: 10,000 env steps; a line every 1,000; the first includes compiling ...
    step 1,000/10,000 (10%) | 12 sps | elapsed 1m23s | eta 12m27s | eval/return 118 | sac/critic_loss 0.52
    ...
    done: eval/return 1000 (reference: 1000 is the maximum) | 10,000 env steps in 9m02s

The rate (steps per second) and the ETA are measured from the first progress
line on, once there are two, so that the JIT compilation before the first line
does not stretch the estimate. Vectors (per-condition or per-task values) are
never printed: they belong in metrics.jsonl.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def duration(seconds: float) -> str:
    """42s, 3m07s, 1h05m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rounded(value: Any) -> str | None:
    """A number as a short string: integers with thousands separators, other numbers
    with 3 significant digits (no exponent between 1e-3 and 1e6); None for vectors."""
    value = np.asarray(value)
    if value.size != 1:
        return None
    value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    a = abs(value)
    if a >= 1e6 or (0 < a < 1e-3):
        return f"{value:.3g}"
    if a >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


class Progress:
    """One run's progress on stdout: what will run, then step/total, rate, elapsed,
    ETA and a few rounded metrics per line, then a summary with the headline metric."""

    def __init__(self, what: str, total: int, *, unit: str = "env steps", start: int = 0, every: int | None = None,
                 compiling: str | None = None, echo: bool = True):
        self.total, self.unit, self.start_step, self.echo = int(total), unit, int(start), echo
        self.t0 = time.time()
        self.first: tuple[int, float] | None = None  # (step, time) of the first update
        self.step = self.start_step
        line = f"{what}: {self.total:,} {unit}"
        if self.start_step:
            line += f", resuming after {self.start_step:,}"
        if every:
            line += f"; a line every {int(every):,}"
        if compiling:
            line += f"; the first line waits for compiling {compiling}"
        self._print(line)

    def _print(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)

    def rate(self, step: int, now: float | None = None) -> float:
        """Steps per second: since the first update once there is one before `step`,
        else since the start (compilation included)."""
        now = time.time() if now is None else now
        if self.first is not None and step > self.first[0] and now > self.first[1]:
            return (step - self.first[0]) / (now - self.first[1])
        return (step - self.start_step) / max(now - self.t0, 1e-9)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, show: Iterable[str] = ()) -> str:
        """Print and return the line for `step`: step/total, rate, elapsed, ETA, then
        the metrics named in `show` that are present and scalar, rounded."""
        now = time.time()
        sps = self.rate(step, now)
        if self.first is None:
            self.first = (int(step), now)
        self.step = int(step)
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        parts = [f"step {int(step):,}/{self.total:,} ({100 * step / max(self.total, 1):.0f}%)",
                 self._rate_text(sps), f"elapsed {duration(now - self.t0)}", f"eta {duration(eta)}"]
        metrics = metrics or {}
        for key in show:
            text = rounded(metrics[key]) if key in metrics else None
            if text is not None:
                parts.append(f"{key} {text}")
        line = " | ".join(parts)
        self._print(line)
        return line

    def _rate_text(self, rate: float) -> str:
        if self.unit == "env steps":
            return f"{rounded(rate)} sps"
        return f"{rounded(1.0 / rate) if rate > 0 else '?'} s/{self.unit.removesuffix('s')}"  # e.g. 5.8 s/iteration

    def done(self, metric: str, value: Any, reference: str | None = None, extra: str | None = None) -> str:
        """Print and return the summary line: the headline metric beside its
        reference or baseline, the steps run and the wall time."""
        line = f"done: {metric} {rounded(value)}"
        if reference:
            line += f" ({reference})"
        line += f" | {self.step:,} {self.unit} in {duration(time.time() - self.t0)}"
        if extra:
            line += f" | {extra}"
        self._print(line)
        return line
