"""Checkpoints: flax msgpack files (never pickle), written atomically, read back
with one-line errors, and the pieces of state that are not JAX arrays.

A resumable run saves everything it needs to continue as one pytree: params,
optimiser states, counters, JAX keys, buffers, and the two kinds of state that
live outside JAX, captured here as plain arrays and strings:

    numpy_rng_state(rng) / set_numpy_rng_state(rng, s)   a np.random.Generator
    env_state(env)       / set_env_state(env, s)         a gymnasium env mid-episode
                                                          (MuJoCo physics, classic-control
                                                          state, pure-JAX state; its RNG
                                                          and time-limit counter)

`Run.save` / `Run.restore` (common/experiment.py) use these to write
runs/<run>/checkpoint.msgpack; `load_checkpoint` reads any file into a template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import serialization

from common.checks import fail


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------
def save_checkpoint(path: str | Path, target: Any) -> Path:
    """Serialise a pytree with flax msgpack, atomically: a temporary file in the
    same folder, fsync, rename over the old file, fsync the folder. A crash or a
    `kill -9` at any moment leaves either the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(target)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """The raw state dict of a msgpack file, or a one-line error if it is missing
    or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        fail(f"{what} '{path}' does not exist")
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on corrupt data
        fail(f"{what} '{path}' is corrupt or not a flax msgpack file ({type(e).__name__})")
    if not isinstance(raw, dict):
        fail(f"{what} '{path}' does not hold a tree of arrays")
    return raw


def _mismatch(template, raw, where: str = "") -> str | None:
    """Where `raw` (a state dict) differs from `template` in structure, shape or dtype."""
    want = serialization.to_state_dict(template)
    if isinstance(want, dict):
        if not isinstance(raw, dict) or set(want) != set(raw):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            return f"'{where or '/'}' holds {got}, expected {sorted(want)}"
        for k in want:
            found = _mismatch(want[k], raw[k], f"{where}/{k}")
            if found:
                return found
        return None
    if isinstance(want, str) or want is None:
        return None if isinstance(raw, type(want)) else f"'{where}' is {type(raw).__name__}"
    want_arr, raw_arr = np.asarray(want), np.asarray(raw)
    if want_arr.shape != raw_arr.shape:
        return f"'{where}' has shape {raw_arr.shape}, expected {want_arr.shape}"
    if want_arr.dtype.kind != raw_arr.dtype.kind:
        return f"'{where}' has dtype {raw_arr.dtype}, expected {want_arr.dtype}"
    return None


def restore_into(template: Any, raw: dict, path: str | Path, what: str = "checkpoint") -> Any:
    """`raw` (from read_checkpoint) restored into `template`'s structure, or a
    one-line error naming the first leaf whose structure or shape differs.
    Each leaf comes back as the template's kind: a JAX array where the template
    has one of the same dtype, else a writable NumPy array (msgpack's own are
    read-only views; a float64 leaf stays float64 when x64 is off)."""
    problem = _mismatch(template, raw)
    if problem:
        fail(f"{what} '{path}' does not match this run: {problem}")
    def like(t, r):
        if not isinstance(r, np.ndarray):
            return r
        return jnp.asarray(r) if isinstance(t, jax.Array) and t.dtype == r.dtype else np.array(r)

    return jax.tree.map(like, template, serialization.from_state_dict(template, raw))


def load_checkpoint(path: str | Path, template: Any = None, what: str = "checkpoint") -> Any:
    """Read a checkpoint into the structure of `template` (same tree, shapes and
    dtype kinds, else a one-line error); with no template, the raw state dict."""
    raw = read_checkpoint(path, what)
    return raw if template is None else restore_into(template, raw, path, what)


# --------------------------------------------------------------------------
# NumPy generators
# --------------------------------------------------------------------------
def numpy_rng_state(rng: np.random.Generator) -> str:
    """The generator's full state as a JSON string (PCG64's 128-bit integers do
    not fit msgpack's integers, but they fit JSON)."""
    return json.dumps(rng.bit_generator.state)


def set_numpy_rng_state(rng: np.random.Generator, state: str) -> np.random.Generator:
    rng.bit_generator.state = json.loads(state)
    return rng


# --------------------------------------------------------------------------
# Gymnasium envs
# --------------------------------------------------------------------------
def _wrappers(env):
    while isinstance(env, gym.Wrapper):
        yield env
        env = env.env


def env_state(env: gym.Env) -> dict:
    """What is needed to continue an episode exactly where it was: the simulator's
    state, the env's RNG (used at reset) and its spaces' RNGs, and each time-limit
    counter. MuJoCo envs keep their whole integration state (mj_getState with
    mjSTATE_INTEGRATION: positions, velocities, actuator states, warm start,
    time), so the next `step` gives the same numbers as it would have. A vector
    env (`.envs`) gives one state per sub-env."""
    if hasattr(env, "envs") and not isinstance(env, gym.Wrapper):
        return {str(i): env_state(e) for i, e in enumerate(env.envs)}
    u = env.unwrapped
    out = {"elapsed_steps": np.asarray([w._elapsed_steps or 0 for w in _wrappers(env)
                                        if hasattr(w, "_elapsed_steps")], np.int64)}
    out["np_random"] = numpy_rng_state(u.np_random)
    out["action_space_rng"] = numpy_rng_state(u.action_space.np_random)
    if hasattr(u, "model") and hasattr(u, "data"):  # MuJoCo
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(u.model, spec), np.float64)
        mujoco.mj_getState(u.model, u.data, physics, spec)
        out["physics"] = physics
    elif hasattr(u, "func_env"):  # the project's pure-JAX envs (common/jax_envs)
        out["func"] = {"state": u.state, "rng": u.rng, "params": u.params}
    elif getattr(u, "state", None) is not None:  # classic control: Pendulum, CartPole, ...
        out["state"] = np.asarray(u.state)
    return out


def set_env_state(env: gym.Env, state: dict) -> gym.Env:
    """Put back what `env_state` captured, into an env made and reset the same way."""
    if hasattr(env, "envs") and not isinstance(env, gym.Wrapper):
        for i, e in enumerate(env.envs):
            set_env_state(e, state[str(i)])
        return env
    u = env.unwrapped
    limits = [w for w in _wrappers(env) if hasattr(w, "_elapsed_steps")]
    for w, n in zip(limits, np.asarray(state["elapsed_steps"]), strict=True):
        w._elapsed_steps = int(n)
    set_numpy_rng_state(u.np_random, state["np_random"])
    set_numpy_rng_state(u.action_space.np_random, state["action_space_rng"])
    if "physics" in state:
        mujoco.mj_setState(u.model, u.data, np.asarray(state["physics"], np.float64),
                           mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(u.model, u.data)
    elif "func" in state:
        u.state, u.rng, u.params = state["func"]["state"], state["func"]["rng"], state["func"]["params"]
    elif "state" in state:
        u.state = type(u.state)(state["state"]) if isinstance(u.state, tuple) else np.asarray(state["state"])
    return env
