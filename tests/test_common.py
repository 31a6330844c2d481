"""Run plumbing basics (common/experiment.py, common/checks.py,
common/checkpoints.py), make_env (common/envs/__init__.py) and the replay buffer
(common/buffers.py). Resume, divergence and input checks: tests/test_experiment.py."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.buffers import ReplayBuffer
from common.checkpoints import load_checkpoint, save_checkpoint
from common.checks import BadInput, Divergence, check_finite, fail
from common.envs import make_env
from common.experiment import CommonArgs, Run, read_metrics


# ----------------------------------------------------------------- errors
def test_fail_is_a_one_line_exit():
    with pytest.raises(BadInput) as e:
        fail("horizon must be >= 1")
    assert str(e.value.code) == "error: horizon must be >= 1" and isinstance(e.value, SystemExit)


def test_check_finite_names_step_and_quantity():
    check_finite(3, loss=1.0, q=np.ones(4))
    with pytest.raises(Divergence, match=r"step 7: 'q_loss' is not finite \(1 of 3"):
        check_finite(7, loss=0.5, q_loss=jnp.array([1.0, jnp.nan, 2.0]))


def test_unknown_env_id_lists_close_matches():
    with pytest.raises(BadInput, match="unknown env id 'DynaMaz-v0'; did you mean DynaMaze-v0"):
        make_env("DynaMaz-v0")
    with pytest.raises(BadInput, match="unknown env id 'zzzz'$"):
        make_env("zzzz")
    assert make_env("DynaMaze-v0").spec.id == "DynaMaze-v0"


def test_mujoco_renders_headless():
    """CI installs EGL + Mesa so MuJoCo envs render without a display."""
    env = make_env("InvertedPendulum-v5", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    env.close()
    assert frame.shape == (480, 480, 3) and frame.std() > 1.0  # a picture, not a blank


# ------------------------------------------------------ run dir and metrics
def test_run_writes_args_and_metrics_jsonl(tmp_path, capsys):
    args = CommonArgs(env_id="ns/Some-v0", exp_name="t", seed=4)
    run = Run(args, root=tmp_path)
    assert run.dir.parent == tmp_path and run.dir.name.startswith("ns_Some-v0__t__4__")
    run.log({"eval/return": np.float32(1.5), "loss": jnp.array(0.25)}, step=100)
    run.log({"eval/return": 2.0}, step=200)
    run.close()
    rows = read_metrics(run.dir)
    assert [r["global_step"] for r in rows] == [100, 200]
    assert rows[0]["eval/return"] == 1.5 and rows[0]["loss"] == 0.25 and rows[1]["time"] >= 0
    assert json.loads((run.dir / "args.json").read_text())["seed"] == 4
    assert "step      100" in capsys.readouterr().out


def test_wandb_offline_run_is_created(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = Run(CommonArgs(track=True, exp_name="wb"), root=tmp_path)
    run.log({"x": 1.0}, step=1)
    run.close()
    offline = list((run.dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))


# ------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path):
    target = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}, "step": 12}
    path = save_checkpoint(tmp_path / "ckpt.msgpack", target)
    assert path.read_bytes()[:1] != b"\x80"  # msgpack, not a pickle stream
    template = jax.tree.map(jnp.zeros_like, target)
    restored = load_checkpoint(path, template)
    assert restored["step"] == 12
    np.testing.assert_array_equal(restored["params"]["w"], target["params"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.msgpack"]  # no temporary file left


def test_common_args_can_be_specialised():
    @dataclasses.dataclass(frozen=True)  # frozen: a static argument of jitted functions
    class Args(CommonArgs):
        env_id: str = "DynaMaze-v0"
        n: int = 5

    names = [f.name for f in dataclasses.fields(Args)]
    assert names[0] == "exp_name" and names[-1] == "n" and Args().env_id == "DynaMaze-v0"
    assert hash(Args()) == hash(Args()) and Args() != Args(n=6)


# ---------------------------------------------------------------- buffers
def test_replay_buffer_wraps_around_and_samples_filled_part():
    buf = ReplayBuffer.create({"obs": jnp.zeros(2), "r": jnp.float32(0)}, capacity=5)
    batch = lambda lo, n: {"obs": jnp.stack([jnp.arange(lo, lo + n)] * 2, 1) * 1.0,
                           "r": jnp.arange(lo, lo + n) * 1.0}
    buf = buf.add(batch(0, 3))
    assert int(buf.size) == 3 and int(buf.ptr) == 3
    drawn = buf.sample(jax.random.PRNGKey(0), 500)["r"]
    assert set(np.asarray(drawn).tolist()) == {0.0, 1.0, 2.0}  # never an empty slot
    buf = buf.add(batch(3, 4))  # 7 items into 5 slots: 0 and 1 are overwritten
    assert int(buf.size) == 5 and int(buf.ptr) == 2
    np.testing.assert_array_equal(buf.data["r"], [5.0, 6.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(buf.data["obs"][:, 1], buf.data["r"])
    drawn = np.asarray(buf.sample(jax.random.PRNGKey(1), 2000)["r"])
    counts = np.array([np.sum(drawn == v) for v in [2.0, 3.0, 4.0, 5.0, 6.0]])
    assert counts.min() > 300  # uniform over the 5 stored items (expected 400 each)


def test_replay_buffer_works_under_jit_and_rejects_oversized_batches():
    buf = ReplayBuffer.create({"x": jnp.zeros(())}, capacity=4)
    buf = jax.jit(lambda b, x: b.add({"x": x}))(buf, jnp.arange(3.0))
    assert int(buf.size) == 3
    with pytest.raises(ValueError, match="capacity 4"):
        buf.add({"x": jnp.zeros(5)})
