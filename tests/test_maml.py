"""MAML: the meta-gradient, TRPO's pieces, the baseline, and "it learns"."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo, stopped_at_call
from jax.flatten_util import ravel_pytree

from algos import maml
from common.checkpoints import load_checkpoint, save_checkpoint
from common.checks import Divergence
from common.envs import make_env
from common.experiment import read_metrics

DIMS = maml.Dims(obs_dim=2, action_dim=2, horizon=6)


def tiny_config(**overrides):
    base = dict(meta_batch=2, trajectories_per_task=3, inner_steps=1, inner_lr=0.3, first_order=False,
                estimator="maml", gamma=0.9, max_kl=0.01, cg_iters=20, cg_damping=0.0, backtrack_ratio=0.8,
                backtrack_steps=15, promp_steps=3, promp_lr=1e-3, promp_clip=0.3, promp_kl_coef=5e-4)
    return maml.Args(**{**base, **overrides})


def replace(args, **changes):
    return dataclasses.replace(args, **changes)


def random_batch(key, shape, obs_dim=2, action_dim=2):
    """A synthetic batch with fixed data (leading axes `shape`, the last one time: one path per lane)."""
    k = jax.random.split(key, 5)
    T = shape[-1]
    return maml.Batch(
        obs=jax.random.normal(k[0], (*shape, obs_dim)),
        action=jax.random.normal(k[1], (*shape, action_dim)),
        reward=jax.random.normal(k[2], shape),
        mask=jnp.ones(shape),
        logp=jax.random.normal(k[3], shape) - 2.0,
        advantage=jax.random.normal(k[4], shape),
        step=jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32), shape),
        last=jnp.broadcast_to((jnp.arange(T) == T - 1).astype(jnp.float32), shape),
    )


def tiny_problem(**overrides):
    cfg = tiny_config(**overrides)
    policy = maml.GaussianMLP(DIMS.action_dim, (5,))
    theta = policy.init(jax.random.PRNGKey(0), jnp.zeros(DIMS.obs_dim))
    theta = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(9), x.shape), theta)
    M, K, N, T = cfg.meta_batch, max(cfg.inner_steps, 1), cfg.trajectories_per_task, DIMS.horizon
    pre = random_batch(jax.random.PRNGKey(1), (M, K, N, T))
    post = random_batch(jax.random.PRNGKey(2), (M, N, T))
    # post-update samples "come from" theta'(theta): their old log-probs match it
    adapted = jax.jit(jax.vmap(lambda p: maml.adapt(policy.apply, theta, p, cfg)))(pre)  # jitted: one compile
    post = post._replace(logp=jax.jit(jax.vmap(lambda a, b: maml.gaussian_log_prob(*policy.apply(a, b.obs),
                                                                                    b.action)))(adapted, post))
    return cfg, policy, theta, pre, post


def test_meta_gradient_matches_finite_differences_and_differs_from_first_order():
    with jax.enable_x64(True):
        cfg, policy, theta, pre, post = tiny_problem()
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), theta)
        flat, unravel = ravel_pytree(theta)

        @functools.partial(jax.jit, static_argnames="cfg")
        def objective(f, cfg=cfg):
            return maml.surrogate_and_kl(policy.apply, unravel(f), theta, pre, post, cfg)[0]

        grad = jax.grad(objective)(flat)
        rng = np.random.default_rng(0)
        for _ in range(3):
            v = jnp.asarray(rng.normal(size=flat.shape))
            eps = 1e-5
            fd = (objective(flat + eps * v) - objective(flat - eps * v)) / (2 * eps)
            assert float(grad @ v) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
        first = jax.grad(lambda f: objective(f, replace(cfg, first_order=True)))(flat)
        # the second-order term matters: the two gradients differ clearly
        assert float(jnp.linalg.norm(grad - first)) > 0.05 * float(jnp.linalg.norm(grad))
        # ... and without adaptation the two are the same function
        no_inner = replace(cfg, inner_steps=0)
        g0 = jax.grad(lambda f: objective(f, no_inner))(flat)
        g1 = jax.grad(lambda f: objective(f, replace(no_inner, first_order=True)))(flat)
        np.testing.assert_allclose(g0, g1, rtol=1e-12)


def test_promp_lvc_inner_gradient_equals_vpg_gradient_at_the_sampling_policy():
    cfg, policy, theta, pre, _ = tiny_problem()
    batch = jax.tree.map(lambda x: x[0, 0], pre)
    batch = batch._replace(logp=maml.gaussian_log_prob(*policy.apply(theta, batch.obs), batch.action))
    grad = jax.jit(jax.grad(maml.inner_objective, 1), static_argnums=(0, 3))
    g_vpg = ravel_pytree(grad(policy.apply, theta, batch, cfg))[0]
    g_lvc = ravel_pytree(grad(policy.apply, theta, batch, replace(cfg, estimator="promp")))[0]
    np.testing.assert_allclose(g_vpg, g_lvc, rtol=1e-4, atol=1e-6)


def test_fisher_vector_product_equals_explicit_fisher_and_the_kl_hessian_through_the_inner_step():
    """Without adaptation the Hessian of the mean KL at theta_old is the
    Fisher of a diagonal Gaussian policy: E_s[J_mu^T diag(1/sigma^2) J_mu] on
    the mean's parameters and 2 I on the log-stds. With adaptation, the
    Gauss-Newton product equals the KL's Hessian through the inner step (a
    jvp of its gradient, second-order terms included)."""
    with jax.enable_x64(True):
        cfg, policy, theta, pre, post = tiny_problem(inner_steps=0)
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), theta)
        flat, unravel = ravel_pytree(theta)
        v = jnp.asarray(np.random.default_rng(1).normal(size=flat.shape))
        fvp = maml.fisher_vector_product(policy.apply, theta, pre, post, cfg)(v)

        obs = post.obs.reshape(-1, DIMS.obs_dim)
        mean_fn = lambda f: policy.apply(unravel(f), obs)[0]  # noqa: E731  (S, A)
        J = jax.jacobian(mean_fn)(flat)  # (S, A, P)
        sigma2 = jnp.exp(2 * policy.apply(theta, obs[:1])[1][0])  # (A,)
        F = jnp.einsum("sap,a,saq->pq", J, 1 / sigma2, J) / obs.shape[0]
        is_log_std = ravel_pytree(jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, "log_std" in str(path)), theta))[0].astype(bool)
        F = F + jnp.diag(jnp.where(is_log_std, 2.0, 0.0))
        np.testing.assert_allclose(fvp, F @ v, rtol=1e-8, atol=1e-10)

        cfg, policy, theta, pre, post = tiny_problem(inner_steps=1)
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), theta)
        kl = lambda f: maml.surrogate_and_kl(policy.apply, unravel(f), theta, pre, post, cfg)[1]  # noqa: E731
        hessian_v = jax.jvp(jax.grad(kl), (flat,), (v,))[1]
        fvp = maml.fisher_vector_product(policy.apply, theta, pre, post, cfg)(v)
        first_order = maml.fisher_vector_product(policy.apply, theta, pre, post, replace(cfg, first_order=True))(v)
        np.testing.assert_allclose(fvp, hessian_v, rtol=1e-9, atol=1e-12)
        assert float(jnp.linalg.norm(fvp - first_order)) > 0.05 * float(jnp.linalg.norm(fvp))  # through the step


def test_conjugate_gradient_equals_direct_solve():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(12, 12))
    F = jnp.asarray(A @ A.T + 0.5 * np.eye(12))
    b = jnp.asarray(rng.normal(size=12))
    x, Fx = maml.conjugate_gradient(lambda v: F @ v, b, iters=40)
    np.testing.assert_allclose(x, jnp.linalg.solve(F, b), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(Fx, F @ x, rtol=1e-4, atol=1e-4)  # summed from the products, for the step size


def test_trpo_line_search_respects_the_kl_bound_and_improves():
    cfg, policy, theta, pre, post = tiny_problem(max_kl=0.002)
    new, info = maml.trpo_step(policy.apply, theta, pre, post, cfg)
    surr_old, _ = maml.surrogate_and_kl(policy.apply, theta, theta, pre, post, cfg)
    surr_new, kl = maml.surrogate_and_kl(policy.apply, new, theta, pre, post, cfg)
    assert float(info["step_coef"]) > 0  # it moved
    assert float(kl) <= cfg.max_kl * (1 + 1e-4) and float(kl) > 0
    assert float(surr_new) > float(surr_old)


def test_outer_step_on_an_accelerator_vmaps_the_tasks_with_the_same_sums(monkeypatch):
    """task_sum goes task by task on a CPU and vmaps on an accelerator: the same surrogate, KL, gradient and
    Fisher-vector product (float64, to rounding)."""
    with jax.enable_x64(True):
        cfg, policy, theta, pre, post = tiny_problem()
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), theta)
        v = jnp.asarray(np.random.default_rng(2).normal(size=ravel_pytree(theta)[0].shape))

        def sums(theta):  # jitted afresh for each backend (a new function each time: no cached trace)
            shifted = jax.tree.map(lambda x: x + 0.01, theta)  # a point where the KL and its gradient are not 0
            return (maml.surrogate_and_kl(policy.apply, shifted, theta, pre, post, cfg),
                    maml.surrogate_and_kl(policy.apply, theta, theta, pre, post, cfg, grad=True),
                    maml.fisher_vector_product(policy.apply, theta, pre, post, cfg)(v))

        one_by_one = jax.jit(lambda th: sums(th))(theta)
        monkeypatch.setattr(maml.jax, "default_backend", lambda: "gpu")
        batched = jax.make_jaxpr(lambda: maml.task_sum(lambda x: x, jnp.ones(3)))()
        assert "scan" not in str(batched) and "while" not in str(batched)  # no loop over the tasks
        for got, want in zip(jax.tree.leaves(jax.jit(lambda th: sums(th))(theta)), jax.tree.leaves(one_by_one),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_linear_baseline_equals_least_squares_and_returns_equal_a_loop():
    """Lanes holding several paths one after another: the returns stop at each path's last step, the baseline's
    time feature restarts with each path."""
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(4, 7, 3)))
    mask = jnp.ones((4, 7))
    rewards = jnp.asarray(rng.normal(size=(4, 7)))
    ends = [{6}, {2, 6}, {0, 3, 6}, {4, 5, 6}]  # the last step of each path, per lane
    last = jnp.asarray([[float(t in e) for t in range(7)] for e in ends])
    step = np.zeros((4, 7))
    for i in range(4):
        for t in range(1, 7):
            step[i, t] = 0 if t - 1 in ends[i] else step[i, t - 1] + 1
    ret = maml.discounted_returns(rewards, last, 0.9)
    loop = np.zeros((4, 7))
    for i in range(4):
        acc = 0.0
        for t in reversed(range(7)):
            acc = float(rewards[i, t]) + (0.0 if t in ends[i] else 0.9 * acc)
            loop[i, t] = acc
    np.testing.assert_allclose(ret, loop, rtol=1e-5)
    assert loop[1, 2] == pytest.approx(float(rewards[1, 2]))  # a path's last return is its last reward
    X = maml.baseline_features(obs, jnp.asarray(step), mask)
    np.testing.assert_allclose(X[2, :, 6], [0, 0, 0.01, 0.02, 0, 0.01, 0.02], atol=1e-7)  # t / 100, restarted
    fit = maml.fit_linear_baseline(X, ret, mask, reg=0.0)
    w, *_ = np.linalg.lstsq(np.asarray(X).reshape(28, -1), np.asarray(ret).reshape(-1), rcond=None)
    np.testing.assert_allclose(fit, (np.asarray(X) @ w), rtol=1e-3, atol=1e-3)


def test_point_navigation_tasks_change_the_reward():
    env = maml.make_task_env("PointNav2D-v0")
    tasks = env.sample_tasks(jax.random.PRNGKey(0), 64)
    assert tasks.goal.shape == (64, 2) and float(jnp.abs(tasks.goal).max()) <= 0.5
    s = env.initial(None, None)
    nxt = env.transition(s, jnp.array([0.1, 0.0]), None, None)
    rewards = jax.vmap(lambda t: env.reward(s, None, nxt, None, t))(tasks)
    np.testing.assert_allclose(rewards, -jnp.linalg.norm(nxt - tasks.goal, axis=1), rtol=1e-6)
    assert float(rewards.std()) > 0.05


def test_point_navigation_ends_within_the_goal_box_unless_told_not_to():
    """The authors' end rule: |dx| < 0.01 and |dy| < 0.01 (a box, not a disc); goal_tolerance 0 never ends."""
    from common.jax_envs.navigation import PointNav2D

    env, hover = PointNav2D(), PointNav2D(goal_tolerance=0.0)
    task = env.default_params._replace(goal=jnp.array([0.3, -0.2]))
    for offset, ends in (((0.009, -0.009), True), ((0.011, 0.0), False), ((0.0, 0.0101), False),
                         ((0.0099, 0.0099), True)):  # the corner of the box is inside: a disc of 0.01 is not it
        state = task.goal + jnp.asarray(offset)
        assert bool(env.terminal(state, None, task)) == ends, offset
        assert not bool(hover.terminal(state, None, task))
    gym_env = make_env("PointNav2D-v0")  # the registered id has the end rule
    gym_env.reset(seed=0, options={"task": task._replace(goal=jnp.array([0.1, 0.0]))})
    _, reward, terminated, truncated, _ = gym_env.step(np.array([0.1, 0.0], np.float32))
    assert terminated and not truncated and reward == pytest.approx(0.0, abs=1e-6)


class CountdownEnv:
    """A stub task family: a path ends after `length` steps (its terminal state), reward 1 per step; the state is
    the step counter. With length >= horizon the paths end only at the horizon."""

    action_space = maml.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, length):
        self.length = length

    def initial(self, rng, task):
        return jnp.float32(0.0)

    def observation(self, state, rng, task):
        return jnp.stack([state, state])

    def transition(self, state, action, rng, task):
        return state + 1

    def reward(self, state, action, nxt, rng, task):
        return jnp.float32(1.0) + 0 * task

    def terminal(self, state, rng, task):
        return state >= self.length


@pytest.mark.parametrize("length", [7, 100])
def test_step_budget_keeps_whole_paths_until_the_budget(length):
    """rllab's step budget: whole paths until at least N x H = 30 steps (H = 10). Paths of 7 steps start at 0, 7,
    14, 21 and 28 (< 30, kept whole: it ends at step 34); the one starting at 35 is dropped. Paths that only end at
    the horizon give exactly N = 3 paths of H steps."""
    cfg = tiny_config(trajectories_per_task=3)
    dims = maml.Dims(obs_dim=2, action_dim=2, horizon=10)
    policy = maml.GaussianMLP(2, (4,))
    theta = policy.init(jax.random.PRNGKey(0), jnp.zeros(2))
    b = maml.rollouts(policy.apply, theta, jnp.float32(0.0), jax.random.PRNGKey(1), CountdownEnv(length), cfg, dims)
    assert b.obs.shape == (1, 39, 2)  # L = N H + H - 1
    ends = [6, 13, 20, 27, 34] if length == 7 else [9, 19, 29]
    kept = ends[-1] + 1
    np.testing.assert_array_equal(b.mask[0], np.arange(39) < kept)
    np.testing.assert_array_equal(np.flatnonzero(b.last[0]), ends)
    np.testing.assert_array_equal(b.reward[0], b.mask[0])
    path_len = min(length, 10)
    np.testing.assert_array_equal(b.step[0, :kept], np.arange(kept) % path_len)
    np.testing.assert_array_equal(b.obs[0, :kept, 0], np.arange(kept) % path_len)  # reset after each path
    # rllab's AverageReturn: per path, then over paths (and tasks)
    assert float(maml.average_return(jax.tree.map(lambda x: x[None], b))) == pytest.approx(path_len)
    adv = maml.with_advantages(b, 0.9)
    assert float(jnp.abs(adv.advantage * (1 - b.mask)).max()) == 0.0  # dropped steps carry no advantage


def test_pretrained_baseline_takes_one_adam_step_on_the_multi_task_loss():
    """The paper's pretrained baseline: one Adam step per meta-iteration on minus the mean over tasks of each
    task's mean log pi A. Adam's first step moves every parameter by the step size in the direction of the policy
    gradient; the moments carry over to the next step."""
    cfg, policy, theta, _, post = tiny_problem(inner_steps=0, adam_lr=1e-3)
    opt_state = maml.init_opt_state(theta, cfg)
    new, opt_state, info = maml.pretrain_adam_step(policy.apply, theta, opt_state, post, cfg)
    per_task = [maml.masked_mean(maml.gaussian_log_prob(*policy.apply(theta, post.obs[i]), post.action[i])
                                 * post.advantage[i], post.mask[i]) for i in range(cfg.meta_batch)]
    assert float(info["loss"]) == pytest.approx(-float(np.mean(per_task)), rel=1e-5)
    grad = ravel_pytree(jax.grad(lambda th: -maml.pretrain_loss(policy.apply, th, post))(theta))[0]
    moved = ravel_pytree(new)[0] - ravel_pytree(theta)[0]
    big = jnp.abs(grad) > 1e-4
    np.testing.assert_allclose(moved[big], 1e-3 * jnp.sign(grad[big]), rtol=1e-2)
    assert int(opt_state[0].count) == 1
    _, opt_state, _ = maml.pretrain_adam_step(policy.apply, new, opt_state, post, cfg)
    assert int(opt_state[0].count) == 2
    assert maml.init_opt_state(theta, replace(cfg, pretrain_optimizer="trpo")) == ()
    assert maml.init_opt_state(theta, replace(cfg, inner_steps=1)) == ()


def test_pretrained_baseline_resumes_with_its_adam_moments(tmp_path, monkeypatch):
    """A pretrained-baseline run stopped after iteration 2 and resumed gives the uninterrupted run's metrics (its
    Adam moments are in the checkpoint)."""
    monkeypatch.chdir(tmp_path)
    args = maml.Args(meta_batch=2, trajectories_per_task=1, hidden_sizes=(4,), eval_episodes=1, eval_trajectories=1,
                     test_steps=0, inner_steps=0, total_timesteps=800, eval_interval=400, checkpoint_interval=200,
                     exp_name="full")
    full = maml.main(args)
    with stopped_at_call(monkeypatch, maml, "meta_iteration", 3):
        maml.main(replace(args, exp_name="cut"))
    (cut,) = (tmp_path / "runs").glob("*cut*")
    saved = load_checkpoint(cut / "checkpoint.msgpack")
    assert int(saved["state"]["iteration"]) == 2 and int(saved["state"]["opt_state"]["0"]["count"]) == 2
    maml.main(replace(args, exp_name="cut", resume=str(cut)))
    assert comparable(read_metrics(cut)) == comparable(read_metrics(full["run_dir"]))
    assert [r["global_step"] for r in read_metrics(cut)] == [200, 400, 600, 800]


def test_it_learns_to_adapt_on_point_navigation():
    """A short meta-training: after one inner step the meta-learned policy is
    much better than before adaptation and than a random init after one step."""
    args = maml.Args(meta_batch=10, trajectories_per_task=10, eval_episodes=10, eval_trajectories=10, test_steps=1,
                     total_timesteps=10 * 10 * 100 * 2 * 8, eval_interval=10**9)
    env, dims, policy, phases, test_cfg, test_phases = maml.setup(args)
    cfg = args
    key = jax.random.PRNGKey(0)
    theta = policy.init(key, jnp.zeros(dims.obs_dim))
    random_init = theta
    for it in range(8):
        tasks = env.sample_tasks(jax.random.fold_in(key, it), cfg.meta_batch)
        theta, _, _ = maml.meta_iteration(theta, (), tasks, jax.random.fold_in(key, 100 + it), phases, cfg)
    test_tasks = env.sample_tasks(jax.random.PRNGKey(7), args.eval_episodes)
    learned = maml.meta_test(theta, test_tasks, jax.random.PRNGKey(8), test_phases, test_cfg, 1)
    baseline = maml.meta_test(random_init, test_tasks, jax.random.PRNGKey(8), test_phases, test_cfg, 1)
    assert learned[1] > learned[0] + 5, (learned, baseline)
    assert learned[1] > baseline[1] + 5, (learned, baseline)


def cli(*flags, cwd):
    return run_algo("maml", *flags, cwd=cwd)


def test_cli_smoke_and_bad_inputs(tmp_path):
    out = cli("--meta-batch", "2", "--trajectories-per-task", "2", "--total-timesteps", "1600", "--eval-interval",
              "800", "--eval-episodes", "2", "--eval-trajectories", "2", "--save-model", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "eval/return_after_1_steps" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "policy.msgpack").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") == 2
    # the real entry point refuses bad input with one line on stderr and no traceback (the other messages are
    # checked in-process through the same cli(), test_bad_input_is_one_line_error)
    assert "needs a task family" in one_line_error(cli("--env-id", "DynaMaze-v0", cwd=tmp_path))


@pytest.mark.parametrize("env_id", ["HalfCheetahVel-v0", "HalfCheetahDir-v0", "AntDir-v0"])
def test_mujoco_task_families_set_the_reward_and_pass_check_env(env_id):
    from gymnasium.utils.env_checker import check_env

    from common.envs import make_env
    from common.envs.mujoco_tasks import task_family_of

    env = make_env(env_id)
    family = task_family_of(env)
    check_env(family, skip_render_check=True)
    tasks = np.asarray(family.sample_tasks(jax.random.PRNGKey(0), 200))
    if env_id == "HalfCheetahVel-v0":
        assert tasks.min() >= 0 and tasks.max() <= 2 and tasks.std() > 0.4
    else:
        assert set(tasks.tolist()) == {-1.0, 1.0}
    action = np.linspace(-0.8, 0.8, env.action_space.shape[0]).astype(np.float32)
    for task in (0.3, 1.0) if env_id == "HalfCheetahVel-v0" else (1.0, -1.0):
        env.reset(seed=0, options={"task": task})
        _, reward, _, _, info = env.step(action)
        v, ctrl = info["x_velocity"], float(np.sum(action**2))
        if env_id == "HalfCheetahVel-v0":
            expected = -abs(v - task) - 0.05 * ctrl
        elif env_id == "HalfCheetahDir-v0":
            expected = task * v - 0.05 * ctrl
        else:
            expected = task * v - 0.01 * ctrl + info["reward_contact"] + 0.05
        assert reward == pytest.approx(expected, rel=1e-5, abs=1e-6) and info["task"] == task


def test_gym_sampler_gives_each_env_its_task():
    cfg = tiny_config(meta_batch=2, trajectories_per_task=2)
    dims = maml.Dims(obs_dim=17, action_dim=6, horizon=4)
    policy = maml.GaussianMLP(dims.action_dim, (8,))
    theta = policy.init(jax.random.PRNGKey(0), jnp.zeros(dims.obs_dim))
    sampler = maml.GymTaskSampler("HalfCheetahDir-v0", policy.apply, cfg, dims, seed=0)
    batch = sampler(maml.broadcast(theta, 2), jnp.array([1.0, -1.0]), jax.random.PRNGKey(1))
    assert [float(t) for t in sampler.envs.get_attr("task")] == [1.0, 1.0, -1.0, -1.0]
    assert batch.obs.shape == (2, 2, 4, 17) and batch.action.shape == (2, 2, 4, 6)
    assert np.all(np.asarray(batch.mask) == 1.0) and np.all(np.isfinite(np.asarray(batch.logp)))
    np.testing.assert_array_equal(batch.step[1, 0], [0, 1, 2, 3])  # one path of H steps per lane
    np.testing.assert_array_equal(batch.last[1, 0], [0, 0, 0, 1])


def test_gym_sampler_state_continues_through_a_checkpoint(tmp_path):
    """The MuJoCo sampler's reset-seed counter and sub-env states round-trip
    through a checkpoint file: a new sampler then draws the same next batch."""
    cfg = tiny_config(meta_batch=2, trajectories_per_task=2)
    dims = maml.Dims(obs_dim=17, action_dim=6, horizon=4)
    policy = maml.GaussianMLP(dims.action_dim, (8,))
    params = maml.broadcast(policy.init(jax.random.PRNGKey(0), jnp.zeros(dims.obs_dim)), 2)
    tasks, key = jnp.array([1.0, -1.0]), jax.random.PRNGKey(1)
    sampler = maml.GymTaskSampler("HalfCheetahDir-v0", policy.apply, cfg, dims, seed=0)
    sampler(params, tasks, key)
    path = save_checkpoint(tmp_path / "sampler.msgpack", sampler.state())
    expected = sampler(params, tasks, key)
    other = maml.GymTaskSampler("HalfCheetahDir-v0", policy.apply, cfg, dims, seed=123)
    other.set_state(load_checkpoint(path, other.state()))
    got = other(params, tasks, key)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Surviving: kill -9 and resume, divergence, bad input
# ----------------------------------------------------------------------------
TINY = ["--meta-batch", "2", "--trajectories-per-task", "2", "--hidden-sizes", "8", "8", "--eval-episodes", "2",
        "--eval-trajectories", "2", "--test-steps", "1"]  # PointNav2D-v0: 800 env steps per meta-iteration


def test_kill_and_resume_gives_the_uninterrupted_metrics(tmp_path):
    flags = [*TINY, "--total-timesteps", "16000", "--eval-interval", "4000", "--checkpoint-interval", "800"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = cli(*flags, cwd=tmp_path / "a")
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir, step = kill_after_checkpoint("maml", *flags, cwd=tmp_path / "b", min_step=2400)
    assert step < 16000
    resumed = cli("--resume", str(run_dir), cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {step}" in resumed.stdout
    (full_dir,) = (tmp_path / "a" / "runs").iterdir()
    expected = comparable(read_metrics(full_dir))
    assert comparable(read_metrics(run_dir)) == expected
    assert [r["global_step"] for r in expected] == list(range(800, 16001, 800))
    assert sum("eval/return_after_1_steps" in r for r in expected) == 4


def test_divergence_names_the_step_and_quantity_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real, calls = maml.meta_iteration, []

    def poisoned(*a, **k):  # the third meta-iteration (env step 2400) reports a NaN surrogate gain
        theta, opt_state, info = real(*a, **k)
        calls.append(1)
        return theta, opt_state, ({**info, "surrogate_gain": jnp.nan} if len(calls) == 3 else info)

    monkeypatch.setattr(maml, "meta_iteration", poisoned)
    args = maml.Args(meta_batch=2, trajectories_per_task=2, hidden_sizes=(8, 8), eval_episodes=2, eval_trajectories=2,
                     test_steps=1, total_timesteps=4000, eval_interval=1600, checkpoint_interval=800)
    with pytest.raises(Divergence) as e:
        maml.main(args)
    message = str(e.value)
    assert message.startswith("error: training diverged at env step 2400: 'surrogate_gain' is not finite")
    assert "\n" not in message and "checkpoint.msgpack (step 1600)" in message
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoint.msgpack")
    assert int(saved["run"]["step"]) == 1600 and int(saved["state"]["iteration"]) == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [800, 1600]


@pytest.fixture(scope="module")
def init_files(tmp_path_factory):
    """Checkpoints --init-params should refuse: corrupt bytes, a different tree, other shapes."""
    folder = tmp_path_factory.mktemp("init")
    (folder / "corrupt.msgpack").write_bytes(b"\xc1 not a checkpoint")
    save_checkpoint(folder / "tree.msgpack", {"w": np.zeros(3)})
    save_checkpoint(folder / "shape.msgpack", maml.GaussianMLP(2, (4, 4)).init(jax.random.PRNGKey(0), jnp.zeros(2)))
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--estimator", "promp", "--promp-steps", "0"], "--promp-steps must be >= 1, got 0"),
    (["--init-params", "{init}/missing.msgpack"], "--init-params '{init}/missing.msgpack' does not exist"),
    (["--init-params", "{init}/corrupt.msgpack"], "is corrupt or not a flax msgpack file"),
    (["--init-params", "{init}/tree.msgpack"], "does not match this run"),
    (["--init-params", "{init}/shape.msgpack"], "has shape"),
    (["--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    (["--eval-trajectories", "0"], "--eval-trajectories must be >= 1"),
    (["--inner-steps", "0", "--adam-lr", "0"], "--adam-lr must be > 0"),
    (["--pretrain-optimizer", "sgd"], "--pretrain-optimizer"),
    (["--total-timesteps", "0"], "--total-timesteps must be >= 1"),
    (["--total-timesteps", "79999"], "less than one meta-iteration"),
    (["--cg-iters", "0"], "--cg-iters must be >= 1"),
    (["--capture-video"], "--capture-video is not supported"),
    (["--meta-batch", "0"], "--meta-batch must be >= 1"),
    (["--trajectories-per-task", "0"], "--trajectories-per-task must be >= 1"),
    (["--inner-steps", "-1"], "--inner-steps must be >= 0"),
    (["--test-steps", "-1"], "--test-steps must be >= 0"),
    (["--inner-lr", "-0.5"], "--inner-lr must be > 0"),
    (["--max-kl", "0"], "--max-kl must be > 0"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--backtrack-ratio", "1.0"], "--backtrack-ratio must be < 1"),
    (["--backtrack-ratio", "0"], "--backtrack-ratio must be in (0, 1]"),
    (["--backtrack-steps", "0"], "--backtrack-steps must be >= 1"),
    (["--cg-damping", "-1"], "--cg-damping must be >= 0"),
    (["--promp-lr", "0", "--estimator", "promp"], "--promp-lr must be > 0"),
    (["--promp-clip", "-0.1"], "--promp-clip must be > 0"),
    (["--hidden-sizes", "0", "8"], "--hidden-sizes must be >= 1"),
    (["--estimator", "promp", "--inner-steps", "0"], "--estimator promp needs --inner-steps >= 1"),
    (["--estimator", "reptile"], "--estimator"),
    (["--env-id", "DynaMaze-v0"], "needs a task family"),
    (["--env-id", "PointNav2D-v1"], "unknown env id"),
    (["--meta-batch", "1000000", "--trajectories-per-task", "1000", "--total-timesteps", str(10**15)],
     "the trajectory batches need"),
    (["--seed", "-1"], "--seed must be in"),
])
def test_bad_input_is_one_line_error(init_files, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    flags = [f.format(init=init_files) for f in flags]
    assert message.format(init=init_files) in cli_error(maml, *flags)
    assert not (tmp_path / "runs").exists()  # refused before the run directory
