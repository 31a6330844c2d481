"""Tests of algos/mb_mpo.py and of what it adds to common/ensembles.py (member_splits, stopping="rolling",
weight_norm; the MBPO and ME-TRPO defaults are covered by tests/test_ensembles.py and tests/test_me_trpo.py).

Tasks = models: consecutive blocks of tasks per member, each task's imagined data from its own member only, the
imagined observations clipped. The meta-gradient through the inner step against central finite differences (in
float64) and against the first-order one; the outer TRPO step within its KL. The ensemble: per-member random
splits, the rolling early stopping replayed per member (a stopped member keeps its weights), weight-normalised
layers. Then "it learns" on InvertedPendulum, a CLI run killed with kill -9 and resumed, and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo
from jax.flatten_util import ravel_pytree

from algos import mb_mpo as mm
from common import ensembles as ens
from common.envs.model_fns import never_terminated
from common.experiment import read_metrics


# ----------------------------------------------------------------------------
# Tasks are models
# ----------------------------------------------------------------------------
def test_task_members_are_consecutive_blocks():
    np.testing.assert_array_equal(mm.task_members(20, 5), np.repeat(np.arange(5), 4))  # the authors' 20 over 5
    np.testing.assert_array_equal(mm.task_members(10, 5), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(mm.task_members(3, 3), [0, 1, 2])


def member_id_model(cfg, key=0):
    """An ensemble whose member k moves observation dim 0 (a position: the models do not see it) by k + 1 per
    step, whatever the input; the other dims keep the member's random ReLU output. Identity normaliser."""
    state = ens.create(cfg, jax.random.PRNGKey(key))
    last = dict(state.params["params"][f"Dense_{cfg.num_layers}"])
    last["kernel"] = last["kernel"].at[:, :, 0].set(0.0)
    last["bias"] = last["bias"].at[:, 0].set(jnp.arange(cfg.num_members) + 1.0)
    return state._replace(params={"params": {**state.params["params"], f"Dense_{cfg.num_layers}": last}})


def test_each_task_imagines_under_its_own_model_and_observations_are_clipped():
    """10 tasks over 5 members: every step of every trajectory of task m moves dim 0 by k(m) + 1 until the clip
    at 20 (member 4 reaches it after 4 steps); the rewards are the reward function of those transitions."""
    K, M, N, T, skip, clip = 5, 10, 6, 8, 1, 20.0
    dims = mm.Dims(obs_dim=3, act_dim=1, skip=skip, horizon=T)
    cfg = ens.EnsembleConfig(in_dim=3, out_dim=3, num_members=K, num_elites=K, hidden=8, num_layers=2,
                             probabilistic=False, activation="relu")
    model = member_id_model(cfg)
    reward_fn = lambda o, a, n: n[0] - o[0] + 0.1 * a[0]  # noqa: E731
    task = mm.Task(reward_fn, never_terminated, lambda a: a, clip, dims)
    args = mm.resolve(mm.Args(meta_batch=M, trajectories_per_task=N, horizon=T, ensemble_size=K))
    policy = mm.Policy(1, 8)
    theta = policy.init(jax.random.PRNGKey(1), jnp.zeros((1, 2)))
    pool = jnp.asarray(np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)).at[:, 0].set(0.0)
    fn = jax.jit(mm.imagine_tasks, static_argnums=(0, 1, 2, 3), static_argnames=("per_task",))
    batch = fn(task, cfg, policy, args, theta, model, pool, jax.random.PRNGKey(2), per_task=False)
    assert batch.obs.shape == (M, N, T, 3) and batch.reward.shape == (M, N, T)
    k = mm.task_members(M, K)
    t = np.arange(T)
    expected = np.minimum((k[:, None] + 1.0) * t[None], clip)  # (M, T)
    np.testing.assert_allclose(np.asarray(batch.obs[..., 0]), np.broadcast_to(expected[:, None], (M, N, T)),
                               atol=1e-5)
    nxt = np.minimum((k[:, None] + 1.0) * (t[None] + 1), clip)
    np.testing.assert_allclose(np.asarray(batch.reward), (nxt - expected)[:, None] + 0.1 * np.asarray(
        batch.action[..., 0]), atol=1e-4)
    # the advantages are centred per task
    np.testing.assert_allclose(np.asarray(batch.advantage.mean((1, 2))), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(batch.advantage.std((1, 2))), 1.0, atol=1e-3)


# ----------------------------------------------------------------------------
# The meta-gradient through the inner step, and the outer step
# ----------------------------------------------------------------------------
def tiny_meta_problem(M=2, N=3, T=4, obs_dim=3, seed=0):
    """Random fixed pre- and post-update batches for M tasks; the post batch's logp is that of the post-update
    policies at theta0 (as if they had sampled it), so the ratio is 1 at theta0."""
    rng = np.random.default_rng(seed)
    policy = mm.Policy(1, 4)
    theta = policy.init(jax.random.PRNGKey(seed), jnp.zeros((1, obs_dim)))
    theta = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64) + 0.3 * rng.normal(size=p.shape), theta)
    f64 = lambda *shape: jnp.asarray(rng.normal(size=shape))  # noqa: E731
    mask = jnp.asarray((rng.uniform(size=(M, N, T)) > 0.2).astype(np.float64))
    pre = mm.Batch(f64(M, N, T, obs_dim), f64(M, N, T, 1), f64(M, N, T), mask, f64(M, N, T), f64(M, N, T) * mask)
    post = mm.Batch(f64(M, N, T, obs_dim), f64(M, N, T, 1), f64(M, N, T), jnp.ones((M, N, T)), f64(M, N, T),
                    f64(M, N, T))
    args = mm.Args(meta_batch=M, inner_lr=0.5)
    mean, log_std = mm.post_update_policies(policy, theta, pre, post, args, 0)
    post = post._replace(logp=mm.gaussian_log_prob(mean, log_std[:, None, None], post.action))
    return policy, theta, pre, post, args, (mean, log_std)


def test_meta_gradient_equals_finite_differences_and_differs_from_first_order():
    """S(theta) with theta'_m = theta + alpha grad L_in(theta): autodiff's gradient (through the inner grad)
    equals central finite differences of S along random directions, to 1e-6 relative; the first-order gradient
    (inner gradient held constant) misses the Hessian term by far more than that."""
    with jax.enable_x64(True):
        policy, theta, pre, post, args, old = tiny_meta_problem()
        flat, unravel = ravel_pytree(theta)
        surr = jax.jit(lambda f, a: mm.surrogate_and_kl(policy, unravel(f), pre, post, old, a, 0)[0],
                       static_argnums=1)
        grad = jax.jit(jax.grad(surr), static_argnums=1)
        assert abs(float(surr(flat, args)) - float(jnp.mean(jax.vmap(mm.masked_mean)(post.advantage, post.mask)))) \
            < 1e-12  # ratio 1 at theta0
        g, g_fo = grad(flat, args), grad(flat, mm.Args(meta_batch=2, inner_lr=0.5, first_order=True))
        rng, eps = np.random.default_rng(1), 1e-5
        for _ in range(4):
            u = jnp.asarray(rng.normal(size=flat.shape))
            fd = (surr(flat + eps * u, args) - surr(flat - eps * u, args)) / (2 * eps)
            scale = float(jnp.linalg.norm(g) * jnp.linalg.norm(u))
            assert abs(float(fd - g @ u)) < 1e-6 * scale, (float(fd), float(g @ u))
        gap = float(jnp.linalg.norm(g - g_fo) / jnp.linalg.norm(g))
        assert gap > 0.05, gap  # the second-order term matters here


def test_outer_trpo_step_stays_within_the_kl_and_improves_the_surrogate():
    with jax.enable_x64(True):
        policy, theta, pre, post, args, old = tiny_meta_problem(seed=3)
        args = mm.Args(meta_batch=2, inner_lr=0.5, max_kl=0.01)
        new, info = jax.jit(mm.trpo_step, static_argnums=(0, 4, 5))(policy, theta, pre, post, args, 0)
        objective = jax.jit(mm.surrogate_and_kl, static_argnums=(0, 5, 6))
        surr, kl = objective(policy, new, pre, post, old, args, 0)
        surr0, kl0 = objective(policy, theta, pre, post, old, args, 0)
        assert float(kl0) < 1e-12 and 0 < float(kl) <= 0.01 and float(surr) > float(surr0)
        assert float(info["step_coef"]) > 0
        np.testing.assert_allclose(float(info["kl"]), float(kl), rtol=1e-8)


# ----------------------------------------------------------------------------
# The ensemble as the authors configure it (common/ensembles.py, MB-MPO's fields)
# ----------------------------------------------------------------------------
def mbmpo_cfg(**kw):
    base = dict(in_dim=4, out_dim=2, num_members=4, num_elites=4, hidden=32, num_layers=2, probabilistic=False,
                weight_decays=(0.0, 0.0, 0.0), batch_size=40, normalize_outputs=True, activation="relu",
                bootstrap=False, member_splits=True, stopping="rolling", rolling_persistence=0.9, weight_norm=True)
    return ens.EnsembleConfig(**{**base, **kw})


def noisy_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (np.sin(2 * x[:, :2]) + 0.5 * rng.normal(size=(n, 2))).astype(np.float32)


def test_member_splits_differ_and_each_member_is_scored_on_its_own_rows():
    train, hold = ens.member_splits(100, 5, 0.2, np.random.default_rng(0))
    assert train.shape == (5, 80) and hold.shape == (5, 20)
    for e in range(5):
        np.testing.assert_array_equal(np.sort(np.concatenate([train[e], hold[e]])), np.arange(100))
    assert all(set(hold[a]) != set(hold[b]) for a in range(5) for b in range(a + 1, 5))
    x, y = noisy_data()
    cfg = mbmpo_cfg()
    state, info = ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(0)), x, y, np.random.default_rng(7),
                            max_epochs=20)
    again_train, again_hold = ens.member_splits(200, 4, 0.2, np.random.default_rng(7))  # train draws them first
    np.testing.assert_array_equal(info["holdout_rows"], again_hold)
    np.testing.assert_array_equal(info["train_rows"], again_train)
    norm = ens.fit_normalizer(x, y, True)  # on ALL rows, shared by the members
    np.testing.assert_allclose(np.asarray(state.norm.in_mean), np.asarray(norm.in_mean), atol=1e-6)
    mse = jax.jit(ens.holdout_mse, static_argnums=0)
    own = mse(cfg, state.params, state.norm, jnp.asarray(x[again_hold]), jnp.asarray(y[again_hold]), jnp.ones(40))
    np.testing.assert_allclose(info["holdout_mse"], own, rtol=1e-4)
    others = mse(cfg, state.params, state.norm, jnp.asarray(x[again_hold[::-1]]), jnp.asarray(y[again_hold[::-1]]),
                 jnp.ones(40))  # member e scored on member 3 - e's holdout instead
    assert not np.allclose(own, others, rtol=1e-3)
    on_train = mse(cfg, state.params, state.norm, jnp.asarray(x[again_train]), jnp.asarray(y[again_train]),
                   jnp.ones(160))
    assert np.mean(on_train) < np.mean(own)  # each trained on its own rows, not on its holdout


def test_rolling_stopping_is_per_member_and_a_stopped_member_keeps_its_weights():
    """The rule replayed on the recorded validation curves gives each member's stopping epoch; members stop at
    different epochs; rerunning the same fit for only as many epochs as the first member got leaves that member's
    weights unchanged (it did not train after stopping) while the others did."""
    x, y = noisy_data(seed=1)
    cfg = mbmpo_cfg()
    fit = lambda epochs: ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(3)), x, y, np.random.default_rng(5),
                                   max_epochs=epochs)  # noqa: E731
    state, info = fit(400)
    curve, stops = np.asarray(info["holdout_curve"]), np.asarray(info["member_epochs"])
    avg, expected = None, np.full(4, -1)
    for epoch, loss in enumerate(curve):
        avg, stop = ens.rolling_stop(avg, loss, 0.9)
        expected[(expected < 0) & stop] = epoch + 1
    expected[expected < 0] = len(curve)
    np.testing.assert_array_equal(stops, expected)
    assert len(curve) == stops.max() < 400 and len(set(stops.tolist())) >= 2, stops
    first = int(np.argmin(stops))
    short, short_info = fit(int(stops[first]))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(short.params), strict=True):
        np.testing.assert_allclose(np.asarray(a)[first], np.asarray(b)[first], rtol=1e-6, atol=1e-7)
    later = int(np.argmax(stops))
    assert not np.allclose(np.asarray(state.params["params"]["Dense_0"]["kernel"])[later],
                           np.asarray(short.params["params"]["Dense_0"]["kernel"])[later])
    np.testing.assert_allclose(info["holdout_mse"][first], curve[stops[first] - 1, first], rtol=1e-5)


def test_rolling_stop_starts_high_and_stops_when_the_average_rises():
    avg, stop = ens.rolling_stop(None, np.array([1.0, -1.0]), 0.5)
    np.testing.assert_allclose(avg, [0.5 * 1.5 + 0.5, 0.5 * (-1 / 1.5) - 0.5])
    assert not stop.any()
    avg2, stop = ens.rolling_stop(avg, np.array([2.0, -2.0]), 0.5)  # the first member's average rises
    np.testing.assert_allclose(avg2, 0.5 * avg + 0.5 * np.array([2.0, -2.0]))
    np.testing.assert_array_equal(stop, [True, False])


def test_weight_norm_layers_scale_unit_directions():
    cfg = mbmpo_cfg()
    state = ens.create(cfg, jax.random.PRNGKey(0))
    dense = state.params["params"]["Dense_0"]
    np.testing.assert_array_equal(np.asarray(dense["scale"]), 1.0)  # g starts at 1
    p = jax.tree.map(lambda a: a[0], state.params)
    v, g = np.asarray(p["params"]["Dense_0"]["kernel"]), np.full(32, 2.0)
    p["params"]["Dense_0"]["scale"] = jnp.asarray(g)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    h = ens.WeightNormDense(32).apply({"params": p["params"]["Dense_0"]}, jnp.asarray(x))
    w = v * g / np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(np.asarray(h), x @ w, rtol=1e-5, atol=1e-5)
    default = ens.create(ens.EnsembleConfig(in_dim=4, out_dim=2), jax.random.PRNGKey(0))
    assert "scale" not in default.params["params"]["Dense_0"]  # the default members are unchanged


# ----------------------------------------------------------------------------
# It learns; the command line
# ----------------------------------------------------------------------------
def test_it_learns_inverted_pendulum(tmp_path, monkeypatch):
    """The defaults with 2000 random steps (the authors' 5000 learn too, slower) and one iteration of adapted
    real trajectories (seed 1): random actions balance the pole for about 5 steps, the meta-trained pre-update
    policy for the whole 100-step horizon in every evaluation episode. About 25 s of CPU."""
    monkeypatch.chdir(tmp_path)
    out = mm.main(mm.Args(seed=1, total_timesteps=3000, random_steps=2000))
    rows = out["history"]
    print([(r["step"], r["eval/return"], r["train/episode_return"]) for r in rows], f"{out['wall_seconds']:.0f} s")
    assert rows[0]["train/episode_return"] < 30 and rows[0]["step"] >= 2000, rows[0]
    assert rows[-1]["step"] >= 3000 and rows[-1]["eval/return"] >= 90, rows[-1]
    assert rows[-1]["meta/return/post_update"] >= 80, rows[-1]


CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = ["--horizon", "20", "--random-steps", "100", "--eval-episodes", "1", "--model-hidden", "16",
        "--model-batch-size", "64", "--model-max-epochs", "5", "--policy-hidden", "8", "--meta-batch", "5",
        "--trajectories-per-task", "4", "--meta-steps", "2", "--total-timesteps", "300"]


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    """A tiny CLI run (100 random steps, then iterations of 5 tasks x 20 steps): the metrics of every iteration;
    kill -9 after a checkpoint, then --resume: the same metrics as the run never interrupted (the checkpoint
    holds theta, the adapted policies, the models and Adam, D, the keys, the generator and both envs)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = run_algo("mb_mpo", *TINY, "--save-model", cwd=tmp_path / "full", XLA_FLAGS=CHEAP_XLA)
    assert full.returncode == 0, full.stderr[-2000:]
    (full_dir,) = (tmp_path / "full" / "runs").iterdir()
    expected = comparable(read_metrics(full_dir))
    assert len(expected) >= 3 and expected[0]["iteration"] == 1 and expected[0]["global_step"] >= 100
    for key in ("eval/return", "train/episode_return", "model/validation_mse", "meta/kl", "meta/return/post_update"):
        assert all(np.isfinite(r[key]) for r in expected), key
    assert (full_dir / "mb_mpo.msgpack").stat().st_size > 0
    run_dir, step = kill_after_checkpoint("mb_mpo", *TINY, cwd=tmp_path / "killed", min_step=150,
                                          XLA_FLAGS=CHEAP_XLA)
    assert 150 <= step < expected[-1]["global_step"], step
    resumed = run_algo("mb_mpo", "--resume", str(run_dir), cwd=tmp_path / "killed", XLA_FLAGS=CHEAP_XLA)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == expected


@pytest.mark.parametrize("argv, message", [
    (["--env-id", "CartPole-v1"], "MB-MPO needs a continuous (Box) action space; 'CartPole-v1' has Discrete(2)"),
    (["--env-id", "Pendulum-v1"], "MB-MPO needs a known reward for --env-id; 'Pendulum-v1' has none"),
    (["--env-id", "Hoper-v5"], "unknown env id 'Hoper-v5'"),
    (["--meta-batch", "12"], "--meta-batch (12) must be a multiple of --ensemble-size (5)"),
    (["--total-timesteps", "4999"], "--total-timesteps (4999) must be at least --random-steps (5000)"),
    (["--ensemble-size", "0"], "--ensemble-size must be >= 1, got 0"),
    (["--trajectories-per-task", "0"], "--trajectories-per-task must be >= 1, got 0"),
    (["--inner-lr", "0"], "--inner-lr must be > 0, got 0.0"),
    (["--max-kl", "-1"], "--max-kl must be > 0, got -1.0"),
    (["--rolling-persistence", "1.5"], "--rolling-persistence must be in [0, 1], got 1.5"),
    (["--validation-fraction", "1"], "leaves no training or no validation rows"),
    (["--horizon", "0"], "--horizon must be >= 1, got 0"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--backtrack-ratio", "1"], "--backtrack-ratio must be < 1"),
    (["--buffer-size", "1000000000000"], "the buffer D (1000000000000 rows) needs about"),
    (["--resume", "no/such/run"], "not a run directory"),
])
def test_bad_input_table(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    text = cli_error(mm, *argv)
    assert message in text, text
    assert not list(tmp_path.glob("runs/*/args.json"))  # refused before a run directory exists


def test_bad_input_through_the_real_entry_point(tmp_path):
    assert "continuous (Box) action space" in one_line_error(run_algo("mb_mpo", "--env-id", "CartPole-v1",
                                                                      cwd=tmp_path))
