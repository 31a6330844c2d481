"""Run plumbing that every script relies on to survive: unique run directories,
valid metrics, resumable checkpoints (common/experiment.py, common/checkpoints.py),
one-line errors and divergence reports (common/checks.py)."""

import dataclasses
import json
import random
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.checkpoints import (
    env_state,
    load_checkpoint,
    numpy_rng_state,
    save_checkpoint,
    set_env_state,
    set_numpy_rng_state,
)
from common.checks import (
    BadInput,
    Divergence,
    check_common,
    check_finite,
    check_finite_series,
    check_memory,
    check_ranges,
)
from common.command_line import _one_line, cli, resume_args
from common.envs import make_env
from common.experiment import CommonArgs, Run, check_video_support, episode_returns, read_metrics


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# --------------------------------------------------------------------------
# Run directories and metrics
# --------------------------------------------------------------------------
def test_two_runs_in_the_same_second_get_different_directories(tmp_path):
    args = CommonArgs(env_id="Pendulum-v1")
    runs = [Run(args, root=tmp_path) for _ in range(5)]
    assert len({r.dir for r in runs}) == 5
    assert len({int(r.name.split("__")[3]) for r in runs}) <= 2  # same second (or two)
    for i, r in enumerate(runs):
        r.log({"i": i}, step=i)
        r.close()
    for i, r in enumerate(runs):  # nobody appended to another run's files
        assert [row["i"] for row in read_metrics(r.dir)] == [i]


def test_run_directory_that_cannot_be_created_is_a_one_line_error(tmp_path):
    (tmp_path / "runs").write_text("a file, not a folder")
    with pytest.raises(BadInput) as e:
        Run(CommonArgs(), root=tmp_path / "runs")
    assert "cannot create the run directory" in one_line(e)


def test_metrics_stay_valid_json_with_nan_and_infinity(tmp_path):
    run = Run(CommonArgs(), root=tmp_path)
    run.log({"a": float("nan"), "b": np.float32(np.inf), "c": np.array([1.0, np.nan]), "d": 2.5}, 7)
    run.close()
    line = (run.dir / "metrics.jsonl").read_text().strip()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert row["a"] is None and row["b"] is None and row["c"] == [1.0, None] and row["d"] == 2.5


def test_timed_accumulates_per_phase(tmp_path):
    run = Run(CommonArgs(), root=tmp_path)
    for _ in range(2):
        with run.timed("sleep"):
            time.sleep(0.01)
    assert 0.02 <= run.timings["sleep"] < 1.0 and set(run.timings) == {"sleep"}


# --------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------
def test_checkpoint_is_atomic_and_loads_with_checks(tmp_path):
    state = {"w": np.arange(6.0).reshape(2, 3), "step": np.int64(3), "rng": numpy_rng_state(np.random.default_rng(0))}
    path = save_checkpoint(tmp_path / "c.msgpack", state)
    assert [p.name for p in tmp_path.iterdir()] == ["c.msgpack"]  # no temporary file left behind
    back = load_checkpoint(path, {"w": np.zeros((2, 3)), "step": np.int64(0), "rng": ""})
    np.testing.assert_array_equal(back["w"], state["w"])
    assert int(back["step"]) == 3 and back["rng"] == state["rng"]
    with pytest.raises(BadInput) as e:  # wrong shape
        load_checkpoint(path, {"w": np.zeros((3, 2)), "step": np.int64(0), "rng": ""})
    assert "'/w' has shape (2, 3), expected (3, 2)" in one_line(e)
    with pytest.raises(BadInput) as e:  # wrong structure
        load_checkpoint(path, {"w": np.zeros((2, 3))})
    assert "does not match" in one_line(e)
    with pytest.raises(BadInput) as e:
        load_checkpoint(tmp_path / "missing.msgpack", {})
    assert "does not exist" in one_line(e)
    (tmp_path / "bad.msgpack").write_bytes(b"\xc1 not msgpack at all")
    with pytest.raises(BadInput) as e:
        load_checkpoint(tmp_path / "bad.msgpack", {})
    assert "corrupt" in one_line(e)


def test_resume_restores_state_counters_rngs_and_drops_later_metrics(tmp_path):
    args = CommonArgs(env_id="Pendulum-v1", eval_interval=10)
    run = Run(args, root=tmp_path)
    state = {"params": np.ones(3), "numpy": numpy_rng_state(np.random.default_rng(5))}
    for step in range(10, 40, 10):
        with run.timed("work"):
            pass
        run.log({"x": step}, step)
        assert run.checkpoint_due(step)
        if step == 20:
            state["params"] = state["params"] * 2
            random.seed(123)
            np.random.seed(456)
            run.save(state, step)
            expected = (random.random(), np.random.rand())
    run.close()  # "killed" after step 30: its row is not covered by the checkpoint
    resumed = Run(dataclasses.replace(args, resume=str(run.dir)), root=tmp_path)
    assert resumed.dir == run.dir and resumed.start_step == 20 and "work" in resumed.timings
    assert (random.random(), np.random.rand()) == expected
    got = resumed.restore({"params": np.zeros(3), "numpy": ""})
    np.testing.assert_array_equal(got["params"], 2.0)
    got["params"][0] = 5.0  # a writable NumPy array, as the template's (msgpack's own are read-only)
    assert [r["x"] for r in read_metrics(run.dir)] == [10, 20]
    assert not resumed.checkpoint_due(29) and resumed.checkpoint_due(30)
    resumed.log({"x": 30}, 30)
    resumed.close()
    assert [r["x"] for r in read_metrics(run.dir)] == [10, 20, 30]


def test_resume_errors_are_one_line(tmp_path):
    args = CommonArgs(env_id="Pendulum-v1")
    run = Run(args, root=tmp_path)
    run.close()
    for folder, message in ((tmp_path / "nope", "not a run directory"), (run.dir, "no checkpoint.msgpack")):
        with pytest.raises(BadInput) as e:
            Run(dataclasses.replace(args, resume=str(folder)))
        assert message in one_line(e)
    run = Run(args, root=tmp_path)
    run.save({"a": np.zeros(2)}, 5)
    with pytest.raises(BadInput) as e:  # arguments differ from the saved run's
        Run(dataclasses.replace(args, seed=2, resume=str(run.dir)))
    assert "--seed" in one_line(e)
    with pytest.raises(BadInput) as e:
        Run(dataclasses.replace(args, resume=str(run.dir))).restore({"a": np.zeros(3)})
    assert "does not match" in one_line(e)


def test_resume_args_takes_the_saved_arguments_and_rejects_conflicts(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Args(CommonArgs):
        lr: float = 0.1
        schedule: tuple[int, int] = (1, 2)

    saved = Args(env_id="Pendulum-v1", lr=0.5, schedule=(3, 4))
    run = Run(saved, root=tmp_path)
    run.close()
    assert resume_args(Args(resume=str(run.dir))) == dataclasses.replace(saved, resume=str(run.dir))
    assert resume_args(Args(lr=0.5, resume=str(run.dir))).lr == 0.5  # agreeing is fine
    with pytest.raises(BadInput) as e:
        resume_args(Args(lr=0.2, resume=str(run.dir)))
    assert "--lr 0.2 differs from the saved run's 0.5" in one_line(e)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Pendulum-v1", "RandomMDP-v0"])
def test_env_state_continues_an_episode_exactly(env_id, tmp_path):
    def run_steps(env, actions):
        out = []
        for a in actions:
            obs, r, term, trunc, _ = env.step(a)
            out.append((np.asarray(obs, np.float64).ravel(), r, term, trunc))
            if term or trunc:
                obs, _ = env.reset()
                out.append((np.asarray(obs, np.float64).ravel(), 0.0, False, False))
        return out

    env = make_env(env_id)
    env.reset(seed=3)
    env.action_space.seed(4)
    actions = [env.action_space.sample() for _ in range(60)]
    run_steps(env, actions[:25])
    path = save_checkpoint(tmp_path / "env.msgpack", env_state(env))  # through a file, as on resume
    expected = run_steps(env, actions[25:])
    other = make_env(env_id)
    other.reset(seed=99)  # a different episode, overwritten by the saved state
    set_env_state(other, load_checkpoint(path, env_state(other)))
    got = run_steps(other, actions[25:])
    assert len(got) == len(expected)  # episodes end at the same steps (Hopper falls, the MDP truncates)
    for (o1, r1, t1, u1), (o2, r2, t2, u2) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(o1, o2)
        assert (r1, t1, u1) == (r2, t2, u2)


def test_restored_leaves_are_of_the_templates_kind(tmp_path):
    path = save_checkpoint(tmp_path / "c.msgpack", {"j": jnp.ones(2), "n": np.ones(2), "d": np.ones(2)})
    got = load_checkpoint(path, {"j": jnp.zeros(2), "n": np.zeros(2), "d": jnp.zeros(2, jnp.float32)})
    assert isinstance(got["j"], jax.Array) and isinstance(got["n"], np.ndarray) and got["n"].flags.writeable
    assert isinstance(got["d"], np.ndarray) and got["d"].dtype == np.float64  # other dtype: kept as saved


def test_numpy_rng_state_round_trip():
    rng = np.random.default_rng(1)
    state = numpy_rng_state(rng)
    first = rng.normal(size=3)
    np.testing.assert_array_equal(set_numpy_rng_state(np.random.default_rng(2), state).normal(size=3), first)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Flags(CommonArgs):
    batch_size: int = 32
    lr: float = 1e-3
    gamma: float = 0.99
    fraction: float = 0.5
    schedule: tuple[int, int] | None = None


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
    (dict(lr=-1e-3), "--lr must be > 0"),
    (dict(lr=float("nan")), "--lr must be a finite number"),
    (dict(gamma=1.5), "--gamma must be in (0, 1]"),
    (dict(gamma=0.0), "--gamma must be in (0, 1]"),
    (dict(fraction=-0.1), "--fraction must be in [0, 1]"),
    (dict(schedule=(1, 0)), "--schedule must be >= 1"),
    (dict(seed=-1), "--seed must be in [0, 2^32 - 1]"),
    (dict(seed=2 ** 32), "--seed must be in [0, 2^32 - 1]"),
    (dict(total_timesteps=0), "--total-timesteps must be >= 1"),
    (dict(eval_interval=0), "--eval-interval must be >= 1"),
    (dict(eval_episodes=0), "--eval-episodes must be >= 1"),
    (dict(checkpoint_interval=0), "--checkpoint-interval must be >= 1"),
    (dict(exp_name="a/b"), "--exp-name must be a plain name"),
])
def test_range_checks_name_the_flag(change, message):
    args = dataclasses.replace(_Flags(), **change)
    with pytest.raises(BadInput) as e:
        check_common(args)
        check_ranges(args, at_least_1=("batch_size", "schedule"), positive=("lr",), discount=("gamma",),
                     probability=("fraction",))
    assert message in one_line(e)
    check_common(_Flags())  # the defaults pass
    check_ranges(_Flags(), at_least_1=("batch_size", "schedule"), positive=("lr",), discount=("gamma",))


def test_check_finite_names_step_unit_and_quantity():
    check_finite(3, loss=1.0, params={"w": np.ones(2)})
    with pytest.raises(Divergence) as e:
        check_finite(12, unit="iteration", loss=1.0, params={"w": np.array([1.0, np.nan])})
    assert "diverged at iteration 12: 'params' is not finite (1 of 2 values)" in one_line(e)


def test_check_finite_series_reports_the_first_bad_step():
    steps = np.arange(1, 11) * 100
    loss = np.ones((10, 2))
    grad = np.ones(10)
    loss[6, 1] = np.nan  # step 700
    grad[4] = np.inf  # step 500: earlier, so this is the one reported
    check_finite_series(steps, loss=np.ones((10, 2)))
    with pytest.raises(Divergence) as e:
        check_finite_series(steps, loss=loss, grad=grad)
    assert "at env step 500: 'grad'" in one_line(e)


def test_video_support_is_checked_before_training(monkeypatch):
    import importlib.util

    check_video_support("Pendulum-v1")  # both installed (requirements.txt)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pygame" else real(name, *a))
    check_video_support("InvertedPendulum-v5")  # MuJoCo renders without pygame
    with pytest.raises(BadInput) as e:
        check_video_support("Pendulum-v1")
    assert "--capture-video on Pendulum-v1 needs pygame" in one_line(e)


def test_memory_estimate_refuses_what_cannot_fit():
    check_memory(1e6, "the replay buffer")
    with pytest.raises(BadInput) as e:
        check_memory(1e15, "the replay buffer", hint="lower --buffer-size")
    assert "the replay buffer needs about" in one_line(e) and "lower --buffer-size" in one_line(e)


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------
def test_parser_errors_become_one_line():
    boxed = (" Value error \n ----------- \n  Error parsing --seed: invalid literal for int(): 'x'  \n"
             "  -----------\n  Argument helptext:\n      --seed INT\n  -----------\n  For full helptext, see ...\n")
    assert _one_line(boxed) == "Error parsing --seed: invalid literal for int(): 'x' (see --help)"
    with pytest.raises(BadInput) as e:
        cli(CommonArgs, lambda a: None, argv=["--sed", "3"])
    assert "Unrecognized options: --sed, 3; perhaps you meant --seed" in one_line(e)
    with pytest.raises(BadInput) as e:
        cli(CommonArgs, lambda a: None, argv=["--seed", "-1"])
    assert "--seed must be in" in one_line(e)
    with pytest.raises(BadInput) as e:  # a union-typed flag: tyro's per-type attempts are left out
        cli(_Flags, lambda a: None, argv=["--schedule", "1", "2", "3"])
    assert "Error parsing --schedule" in one_line(e) and "Got errors" not in one_line(e)
    assert cli(CommonArgs, lambda a: a.seed, argv=["--seed", "7"]) == 7


def test_unexpected_errors_are_one_line_without_traceback(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("from common.command_line import cli\nfrom common.experiment import CommonArgs\n"
                      "def main(args):\n    raise ValueError('bad\\nthing')\n"
                      "cli(CommonArgs, main)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(__import__("cli").ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: ValueError: bad thing (at boom.py:4) (JAX_MBRL_TRACEBACK=1 shows the traceback)"]


def test_episode_returns_sums_each_episode_until_it_ends():
    """Episodes end at termination or at truncation, and every reward of an episode counts once."""

    class Countdown:  # episode k: rewards action x 1, 2, 3; ends after 3 steps, terminated at even k, truncated at odd
        def __init__(self):
            self.k = -1

        def reset(self):
            self.k, self.t = self.k + 1, 0
            return np.zeros(1), {}

        def step(self, action):
            assert self.t < 3, "stepped after the episode ended"
            self.t += 1
            end = self.t == 3
            return np.zeros(1), float(action * self.t), end and self.k % 2 == 0, end and self.k % 2 == 1, {}

    np.testing.assert_array_equal(episode_returns(Countdown(), lambda obs: 2.0, 3), [12.0, 12.0, 12.0])
