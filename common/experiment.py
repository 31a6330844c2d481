"""Run plumbing shared by every script: common flags, run directory, metrics,
wandb, checkpoints, divergence checks, video, and one-line errors.

Nothing here knows about any algorithm. A script does:

    args = tyro.cli(Args)                  # Args subclasses CommonArgs
    run = Run(args)                        # runs/<env>__<exp>__<seed>__<time>/
    run.log({"eval/return": 0.9}, step)    # stdout + metrics.jsonl (+ wandb)
    save_checkpoint(run.dir / "model.msgpack", params)
    run.close()
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
class BadInput(SystemExit):
    """Bad input from the user. Python prints the message and exits with
    status 1, without a traceback."""


def fail(message: str) -> None:
    """Stop with a clear one-line error: `error: <message>`."""
    raise BadInput(f"error: {message}")


class Divergence(SystemExit):
    """A training quantity became NaN or infinite (exit status 1, one line)."""


def check_finite(step: int, **quantities: Any) -> None:
    """Stop with `Divergence` naming the step and the first non-finite quantity."""
    for name, value in quantities.items():
        bad = ~np.isfinite(np.asarray(jax.device_get(value), dtype=np.float64))
        if bad.any():
            raise Divergence(
                f"error: training diverged at step {step}: '{name}' is not finite "
                f"({int(bad.sum())} of {bad.size} values)"
            )


# --------------------------------------------------------------------------
# Common command-line flags
# --------------------------------------------------------------------------
@dataclasses.dataclass
class CommonArgs:
    """Flags every script shares. An algorithm's `Args` subclasses this and may
    change the defaults (redeclare a field with a new default)."""

    exp_name: str = "exp"
    """name of the experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of Python, NumPy, JAX and the environments"""
    env_id: str = "CartPole-v1"
    """gymnasium or project env id"""
    total_timesteps: int = 100_000
    """total real environment steps"""
    track: bool = False
    """log to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "jax-mbrl"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team); None is your default entity"""
    capture_video: bool = False
    """record evaluation episodes to runs/<run>/videos"""
    save_model: bool = False
    """write a checkpoint (flax msgpack) to runs/<run>/ at the end"""
    eval_interval: int = 10_000
    """evaluate every this many env steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""


def seed_everything(seed: int) -> jax.Array:
    """Seed Python and NumPy; return the root JAX key."""
    random.seed(seed)
    np.random.seed(seed)
    return jax.random.PRNGKey(seed)


# --------------------------------------------------------------------------
# Run directory and metrics
# --------------------------------------------------------------------------
class Run:
    """A run directory with metrics to stdout, `metrics.jsonl` and (if `--track`) wandb.

    Each `log` call writes one JSON object with `global_step`, `time` (wall
    seconds since the run started) and the given metrics.
    """

    def __init__(self, args, root: str | Path = "runs"):
        self.args = args
        env = str(args.env_id).replace("/", "_")
        self.name = f"{env}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.dir = Path(root) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(args)
        (self.dir / "args.json").write_text(json.dumps(config, indent=2, default=str))
        self._metrics = open(self.dir / "metrics.jsonl", "a")
        self.start = time.time()
        self.wandb = None
        if args.track:
            import wandb  # imported only when asked for: it is slow to import

            self.wandb = wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                name=self.name,
                config=config,
                dir=str(self.dir),
            )
        print(f"run directory: {self.dir}", flush=True)

    def log(self, metrics: dict[str, Any], step: int, echo: bool = True) -> None:
        row = {"global_step": int(step), "time": round(time.time() - self.start, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(step))
        if echo:
            parts = [f"step {int(step):>8d}"] + [f"{k} {_fmt(v)}" for k, v in row.items() if k != "global_step"]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        self._metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    value = jax.device_get(value)
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's `metrics.jsonl`."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------
# Checkpoints (flax msgpack; never pickle)
# --------------------------------------------------------------------------
def save_checkpoint(path: str | Path, target: Any) -> Path:
    """Serialise a pytree (params, optimiser state, step...) with flax msgpack.

    Written to a temporary file first and renamed, so a crash mid-write keeps
    the last good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(serialization.to_bytes(jax.device_get(target)))
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, template: Any) -> Any:
    """Read a checkpoint into the structure of `template` (same tree, shapes)."""
    return serialization.from_bytes(template, Path(path).read_bytes())


# --------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------
def record_video(env, policy: Callable[[Any], Any], folder: str | Path, episodes: int = 1,
                 seed: int = 0, max_steps: int = 1000) -> Path:
    """Record `episodes` episodes of `policy(obs) -> action` with gymnasium's
    RecordVideo. `env` must be made with `render_mode="rgb_array"`."""
    from gymnasium.wrappers import RecordVideo

    folder = Path(folder)
    env = RecordVideo(env, str(folder), episode_trigger=lambda _: True, disable_logger=True)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        for _ in range(max_steps):
            obs, _, terminated, truncated, _ = env.step(policy(obs))
            if terminated or truncated:
                break
    env.close()
    return folder
