"""Run plumbing shared by every script: the common flags, the run directory,
metrics, wandb, resumable checkpoints, phase timers and video (the command
line and its one-line errors: common/command_line.py).

Nothing here knows about any algorithm. A script does:

    def main(args: Args):
        validate(args)                          # check_ranges(...), fail(...) (common/checks.py)
        run = Run(args)                         # runs/<env>__<exp>__<seed>__<time>__<id>/, or --resume's
        state = run.restore(initial_state)      # the checkpoint's state on --resume, else initial_state
        for step in range(run.start_step + 1, args.total_timesteps + 1):
            with run.timed("update"): ...
            run.log({"eval/return": 0.9}, step) # stdout + metrics.jsonl (+ wandb)
            if run.checkpoint_due(step):
                run.save(state, step)           # everything needed to continue, atomically
        run.close()

    if __name__ == "__main__":
        cli(Args, main)                         # common/command_line.py: tyro, one-line errors, --resume

A run killed at any moment (even `kill -9`) and continued with
`--resume runs/<run>` loses nothing before its last checkpoint and, on the same
CPU, writes the same metrics after it as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import jax
import numpy as np
from gymnasium.wrappers import RecordVideo

from common.checkpoints import read_checkpoint, restore_into, save_checkpoint
from common.checks import Divergence, fail, flag


# --------------------------------------------------------------------------
# Common command-line flags
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CommonArgs:
    """Flags every script shares. An algorithm's `Args` subclasses this (also
    frozen, so it can be a static argument of jitted functions) and may change
    the defaults (redeclare a field with a new default)."""

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
    """also write the trained parameters alone to runs/<run>/ at the end (the resumable
    runs/<run>/checkpoint.msgpack is always written)"""
    eval_interval: int = 10_000
    """evaluate every this many env steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    checkpoint_interval: int | None = None
    """write runs/<run>/checkpoint.msgpack, everything needed to resume, every this many env
    steps (None: at every evaluation); always at the end"""
    resume: str | None = None
    """continue the run in this directory from its last checkpoint, with its saved arguments"""


def seed_everything(seed: int) -> jax.Array:
    """Seed Python and NumPy; return the root JAX key."""
    random.seed(seed)
    np.random.seed(seed)
    return jax.random.PRNGKey(seed)


# --------------------------------------------------------------------------
# Run directory, metrics and checkpoints
# --------------------------------------------------------------------------
CHECKPOINT = "checkpoint.msgpack"


class Run:
    """A run directory with metrics to stdout, `metrics.jsonl` and (if `--track`)
    wandb, and the run's resumable checkpoint.

    Each `log` call writes one JSON object with `global_step`, `time` (wall
    seconds since the run started, counting earlier sessions of a resumed run)
    and the given metrics; NaN and infinities are written as null, so every line
    stays valid JSON. With `args.resume` the run continues in that directory:
    metrics written after its checkpoint are dropped (they are written again).
    """

    def __init__(self, args, root: str | Path = "runs"):
        self.args = args
        self.config = json.loads(json.dumps(dataclasses.asdict(args), default=str))
        self.timings: dict[str, float] = {}  # cumulative wall seconds per phase (run.timed)
        self.start_step, self._saved = 0, None
        if args.resume:
            self._reopen(Path(args.resume))
        else:
            self._create(Path(root))
        self._metrics = open(self.dir / "metrics.jsonl", "a")
        self.wandb = None
        if args.track:
            import wandb  # imported only when asked for: it is slow to import

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=self.name,
                                    config=self.config, dir=str(self.dir))
        Divergence.last_checkpoint = ""
        print(f"run directory: {self.dir}" + (f" (resumed at step {self.start_step})" if args.resume else ""),
              flush=True)

    def _create(self, root: Path) -> None:
        env = str(self.args.env_id).replace("/", "_")
        if root.exists() and not root.is_dir():
            fail(f"cannot create the run directory under '{root}': it exists and is not a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
            while True:  # a random suffix: two runs started in the same second never share a folder
                self.name = f"{env}__{self.args.exp_name}__{self.args.seed}__{int(time.time())}__{secrets.token_hex(2)}"
                self.dir = root / self.name
                try:
                    self.dir.mkdir()
                    break
                except FileExistsError:
                    continue
            (self.dir / "args.json").write_text(json.dumps(self.config, indent=2))
        except OSError as e:
            fail(f"cannot create the run directory under '{root}': {e.strerror or e}")
        self._rows, self.start = 0, time.time()

    def _reopen(self, folder: Path) -> None:
        if not (folder / "args.json").is_file():
            fail(f"--resume: '{folder}' is not a run directory (no args.json)")
        if not (folder / CHECKPOINT).is_file():
            fail(f"--resume: '{folder}' has no {CHECKPOINT} (the run stopped before its first checkpoint)")
        saved = json.loads((folder / "args.json").read_text())
        for name, value in self.config.items():
            if name != "resume" and saved.get(name, value) != value:
                fail(f"--resume: {flag(name)} is {value} here but {saved.get(name)} in the saved run")
        self.dir, self.name = folder, folder.name
        self._saved = read_checkpoint(folder / CHECKPOINT)
        meta = self._saved.get("run")
        if not isinstance(meta, dict) or "step" not in meta:
            fail(f"--resume: '{folder / CHECKPOINT}' is not a resumable checkpoint")
        self.start_step, self._rows = int(meta["step"]), int(meta["metrics_rows"])
        self.start = time.time() - float(meta["elapsed"])
        self.timings = {k: float(v) for k, v in json.loads(meta["timings"]).items()}
        random.setstate(_tuples(json.loads(meta["python_random"])))
        np.random.set_state(_tuples(json.loads(meta["numpy_random"])))
        metrics = folder / "metrics.jsonl"  # keep the rows written before the checkpoint
        lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
        metrics.write_text("".join(lines[: self._rows]))
        Divergence.last_checkpoint = f"{folder / CHECKPOINT} (step {self.start_step})"

    def log(self, metrics: dict[str, Any], step: int, echo: bool = True) -> None:
        row = {"global_step": int(step), "time": round(time.time() - self.start, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics.flush()
        self._rows += 1
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "global_step"}, step=int(step))
        if echo:
            parts = [f"step {int(step):>8d}"] + [f"{k} {_fmt(v)}" for k, v in row.items() if k != "global_step"]
            print(" | ".join(parts), flush=True)

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to `self.timings[phase]`. JAX dispatches
        asynchronously: end the block with `jax.block_until_ready` on its output."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - tic

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_due(self, step: int, previous: int | None = None) -> bool:
        """Whether a checkpoint falls in (previous, step]: every --checkpoint-interval
        steps, else at every --eval-interval. `previous` defaults to the last
        checkpoint's step; pass it when steps advance in chunks (iterations)."""
        every = self.args.checkpoint_interval or self.args.eval_interval
        previous = self.start_step if previous is None else previous
        return step // every > previous // every

    def save(self, state: Any, step: int) -> Path:
        """Write `state` (a pytree of arrays and strings: all the algorithm needs
        to continue after `step`) with the run's own counters, atomically."""
        meta = {"step": int(step), "metrics_rows": self._rows, "elapsed": time.time() - self.start,
                "timings": json.dumps(self.timings), "python_random": json.dumps(random.getstate()),
                "numpy_random": json.dumps(_lists(np.random.get_state()))}
        path = save_checkpoint(self.dir / CHECKPOINT, {"state": state, "run": meta})
        self.start_step = int(step)
        Divergence.last_checkpoint = f"{path} (step {step})"
        return path

    def restore(self, template: Any) -> Any:
        """On --resume, the checkpoint's state restored into `template`'s structure
        (one-line error if it differs); otherwise, or when called again, `template`."""
        if self._saved is None:
            return template
        saved, self._saved = self._saved, None  # let the raw copy (buffers and all) be freed
        return restore_into(template, saved["state"], self.dir / CHECKPOINT)

    def close(self) -> None:
        self._metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    """A JSON value: arrays to numbers or lists, NaN and infinities to None."""
    value = jax.device_get(value)
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "nan" if value is None else str(value)


def _lists(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's `metrics.jsonl`."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------
def check_video_support(env_id: str) -> None:
    """One-line error, before training, when `--capture-video` could not write its
    video: RecordVideo needs moviepy, and the classic-control envs draw with pygame."""
    needs = ["moviepy"]
    entry = str(getattr(gym.spec(env_id), "entry_point", ""))
    if entry.startswith("gymnasium.envs.classic_control"):
        needs.append("pygame")
    for module in needs:
        if importlib.util.find_spec(module) is None:
            fail(f"--capture-video on {env_id} needs {module} (pip install {module})")


def episode_returns(env, policy: Callable[[Any], Any], episodes: int) -> np.ndarray:
    """Returns of `episodes` whole episodes (until termination or truncation) of `policy(obs) -> action` in a
    gymnasium env, each from `env.reset()` (the env's own seed stream): an algorithm's evaluation."""
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        done, ret = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            ret, done = ret + float(reward), terminated or truncated
        returns.append(ret)
    return np.asarray(returns)


def record_video(env, policy: Callable[[Any], Any], folder: str | Path, episodes: int = 1,
                 seed: int = 0, max_steps: int = 1000) -> Path:
    """Record `episodes` episodes of `policy(obs) -> action` with gymnasium's
    RecordVideo. `env` must be made with `render_mode="rgb_array"`."""
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

