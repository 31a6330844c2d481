"""MB-MPO: Model-Based Meta-Policy Optimization (Clavera, Rothfuss, Schulman, Fujita, Asfour & Abbeel, 2018).

Paper: CoRL 2018, https://arxiv.org/abs/1809.05214 (Alg. 1, Sec. 4-5); configuration and every detail below from
the authors' code, jonasrothfuss/model_ensemble_meta_learning (`experiments/run_scripts/mb_comparison/
mb_mpo_train.py`, `sandbox/ours/algos/ModelMAML/model_batch_maml_polopt.py` and `model_maml_npo.py`,
`sandbox/ours/dynamics/dynamics_ensemble.py`, `sandbox/ours/policies/maml_improved_gauss_mlp_policy.py`;
docs/mb_mpo.md lists each with its source). CS 285 (Levine), "Model-Based Policy Learning": a policy trained on
learned models exploits where they are wrong. ME-TRPO asks for a policy that improves under most models; MB-MPO
treats every model of the ensemble as a TASK and meta-learns (MAML) a policy that one policy-gradient step
adapts to any of them. The real world is then just one more task, and the policy collects real data with its
adapted versions, where the models disagree.

What is here: an ensemble of deterministic ReLU models of the normalised state change (common/ensembles.py:
weight-normalised layers, each member its own random 80/20 split, each stopped by its own rolling validation
loss, a FIFO buffer of real transitions); tasks = members (the meta-batch split over the members in consecutive
blocks); imagined trajectories per task from env.reset() states with the known reward and termination
(common/envs/model_fns.py); one VPG inner step per task; an outer TRPO step with the exact second-order
meta-gradient through the inner step. The imagined side of one meta step is ONE jitted program vmapped over
tasks. Real data: 5000 random steps, then one trajectory per task with that task's adapted policy.
`--first-order` drops the second-order term (first-order MAML, an ablation).

Run:
    python -m algos.mb_mpo                                         # InvertedPendulum-v5, about a minute (CPU)
    python -m algos.mb_mpo --env-id HalfCheetah-v5                 # the authors' configuration (GPU)
    python -m algos.mb_mpo --env-id HalfCheetah-v5 --first-order
    python -m algos.mb_mpo --resume runs/<run>                     # continue a run from its last checkpoint

Algorithm (Alg. 1 of the paper; the numbers mark the code below):
    [1] real data: the first iteration `random_steps` uniformly random actions; later iterations one trajectory
        per task m with its adapted policy pi_theta'_m (from the last meta step), round-robin over the tasks
        until meta_batch x T steps; the buffer D keeps the last buffer_size transitions
    [2] fit the K models f_k(s, a) ~ s' - s on D, each on its own random 80% (scored on the other 20%), each
        stopped when its rolling validation loss rises; warm-started (weights and Adam) from the last fit
    repeat meta_steps times, all of it one jitted call:
        [3] for every task m (model k(m) = m // (meta_batch / K)): N imagined trajectories of pi_theta from
            env.reset() states under f_k(m) alone; A = R - b(s, t), b a linear baseline fitted on this task's
            batch; advantages centred per task
        [4] inner step: theta'_m = theta + alpha grad_theta mean_t log pi_theta(a_t|s_t) A_t
        [5] N imagined trajectories of pi_theta'_m under f_k(m); their advantages (baseline refitted)
        [6] outer step on theta, the batches of [3] and [5] fixed, theta'_m recomputed as a function of theta:
            TRPO on S(theta) = mean_m mean_t pi_theta'_m(theta)(a|s) / pi_theta'_m(theta_old)(a|s) A'_t,
            mean KL(pi_theta'_m(theta_old) || pi_theta'_m(theta)) <= delta; d theta'_m / d theta = I + alpha
            Hessian of the inner objective is the second-order term
    [7] evaluate the deterministic pre-update policy pi_theta in the real env; go to [1]
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from common import ensembles as ens
from common.checkpoints import env_state, numpy_rng_state, save_checkpoint, set_env_state, set_numpy_rng_state
from common.checks import check_finite, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import check_env_id, make_env
from common.envs.model_fns import OBS_REWARD_FUNCTIONS, OBS_TERMINATION_FUNCTIONS, POSITION_DIMS, REWARD_OBS_KWARGS
from common.experiment import CommonArgs, Run, check_video_support, episode_returns, record_video, seed_everything
from common.progress import Progress

# Per-env defaults for the fields left None. The authors run every env with one configuration (mb_mpo_train.py:
# path_length_env 200, hidden_sizes_model (512, 512), meta_batch_size 20, batch_size_dynamics_samples 50,
# num_maml_steps_per_iter 30) and report 100k real steps. InvertedPendulum is ours: a small task that learns in
# about a minute on a CPU.
ENV_CONFIGS = {
    **{env_id: dict(horizon=200, model_hidden=512, meta_batch=20, trajectories_per_task=50, meta_steps=30,
                    total_timesteps=100_000) for env_id in ("HalfCheetah-v5", "Hopper-v5", "Swimmer-v5")},
    "InvertedPendulum-v5": dict(horizon=100, model_hidden=64, meta_batch=10, trajectories_per_task=10,
                                meta_steps=10, total_timesteps=7000),
}
LOG_STD_MIN = float(np.log(1e-6))  # the authors' policy clamps its std at min_std = 1e-6


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "InvertedPendulum-v5"
    """an env with a known reward in common/envs/model_fns.py: HalfCheetah-v5, Hopper-v5, Swimmer-v5,
    InvertedPendulum-v5"""
    total_timesteps: int | None = None
    """real env steps in all, random ones included ([1]). None: per env, the paper's 100k (InvertedPendulum 7000)"""
    eval_interval: int | None = None
    """[7] evaluate every this many real steps. None: every iteration (meta_batch x horizon steps)"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    horizon: int | None = None
    """T, the length of real and imagined trajectories. None: the authors' 200 (InvertedPendulum 100)"""
    random_steps: int = 5000
    """[1] real steps with uniformly random actions before the first fit (the authors' initial_random_samples)"""
    ensemble_size: int = 5
    """K, models in the ensemble = distinct tasks"""
    model_hidden: int | None = None
    """width of the models' two ReLU hidden layers. None: the authors' 512 (InvertedPendulum 64)"""
    model_lr: float = 1e-3
    """[2] Adam step size (its state carries over from fit to fit)"""
    model_batch_size: int = 500
    """[2] minibatch per model"""
    model_max_epochs: int = 500
    """[2] cap on epochs per fit"""
    validation_fraction: float = 0.2
    """[2] each model's own random validation share of D"""
    rolling_persistence: float = 0.99
    """[2] a model stops when avg <- p avg + (1 - p) validation loss rises"""
    weight_norm: bool = True
    """[2] weight-normalised model layers"""
    buffer_size: int = 100_000
    """[1] D keeps the last this many real transitions"""
    obs_clip: float = 1000.0
    """[3] imagined next observations are clipped to [-c, c] (the authors' clip_obs)"""
    policy_hidden: int = 32
    """width of the policy's two tanh hidden layers"""
    meta_batch: int | None = None
    """M, tasks per meta step (a multiple of ensemble_size). None: the authors' 20 (InvertedPendulum 10)"""
    trajectories_per_task: int | None = None
    """N, imagined trajectories per task, before and after adaptation. None: the authors' 50 (InvertedPendulum 10)"""
    meta_steps: int | None = None
    """meta steps ([3]-[6]) per iteration. None: the authors' 30 (InvertedPendulum 10)"""
    inner_lr: float = 0.001
    """[4] alpha, the fixed inner step size (every parameter, the log-std included)"""
    first_order: bool = False
    """[6] drop the second-order term (the inner gradient as a constant)"""
    max_kl: float = 0.01
    """[6] TRPO's trust region delta on the mean KL of the post-update policies"""
    cg_iters: int = 10
    """[6] conjugate gradient iterations"""
    cg_damping: float = 1e-5
    """[6] F + damping I in conjugate gradient (rllab's reg_coeff)"""
    backtrack_ratio: float = 0.8
    """[6] line search step shrink factor"""
    backtrack_steps: int = 15
    """[6] line search tries before the step is rejected"""
    gamma: float = 0.99
    """discount of the imagined returns (GAE lambda 1: A = R - b)"""


class Dims(NamedTuple):
    """Sizes read from the env (static, like Args)."""

    obs_dim: int  # the full observation, positions included
    act_dim: int
    skip: int  # leading position entries the policy and the models do not see (POSITION_DIMS)
    horizon: int


class Task(NamedTuple):
    """What the imagined side knows about the env (static: functions and numbers)."""

    reward_fn: object
    term_fn: object
    to_env: object  # policy action in [-1, 1] -> env action
    obs_clip: float
    dims: Dims


def ensemble_config(args: Args, dims: Dims) -> ens.EnsembleConfig:
    """f_k(s, a) ~ s' - s: deterministic ReLU members, inputs and deltas normalised on all of D, squared error,
    no weight decay, weight norm, each member its own random split and rolling early stopping."""
    return ens.EnsembleConfig(
        in_dim=dims.obs_dim - dims.skip + dims.act_dim, out_dim=dims.obs_dim, num_members=args.ensemble_size,
        num_elites=args.ensemble_size, hidden=args.model_hidden, num_layers=2, probabilistic=False, lr=args.model_lr,
        weight_decays=(0.0, 0.0, 0.0), batch_size=args.model_batch_size, holdout_ratio=args.validation_fraction,
        normalize_outputs=True, activation="relu", bootstrap=False, member_splits=True, stopping="rolling",
        rolling_persistence=args.rolling_persistence, weight_norm=args.weight_norm)


def task_members(meta_batch: int, num_models: int) -> np.ndarray:
    """[3] The model of each task: consecutive blocks, tasks 0..M/K-1 -> model 0, and so on (the authors' model
    sampler splits its rows into meta_batch equal chunks in order, and the ensemble splits the same rows into K
    equal chunks in order): (M,) int."""
    return np.arange(meta_batch) // (meta_batch // num_models)


# ----------------------------------------------------------------------------
# The policy: rllab's Gaussian MLP (tanh hidden layers, linear mean, state-independent log-std)
# ----------------------------------------------------------------------------
class Policy(nn.Module):
    act_dim: int
    hidden: int

    @nn.compact
    def __call__(self, obs):  # obs (..., obs_dim - skip) -> mean (..., A), log_std (A,)
        dense = partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform())  # rllab's weight init
        x = nn.tanh(dense(self.hidden)(obs))
        x = nn.tanh(dense(self.hidden)(x))
        log_std = self.param("log_std", nn.initializers.zeros, (self.act_dim,))  # log init_std = log 1
        return dense(self.act_dim)(x), jnp.maximum(log_std, LOG_STD_MIN)


def gaussian_log_prob(mean, log_std, action):
    return jnp.sum(-0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(N_p || N_q) for diagonal Gaussians, summed over action dims."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    return jnp.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5, -1)


def masked_mean(x, mask):
    """Mean of x over the valid steps; where() (not x * mask) so that a non-finite value after an ending (an
    overflowing ratio, say) cannot turn the sum into NaN."""
    return jnp.where(mask > 0, x, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)


# ----------------------------------------------------------------------------
# [3], [5] Imagined rollouts of one task under its own model
# ----------------------------------------------------------------------------
class Batch(NamedTuple):
    """Imagined trajectories of one task: (N, T, ...); a leading task axis M for a meta-batch."""

    obs: jax.Array  # (N, T, obs_dim) full observations
    action: jax.Array  # (N, T, A) the sampled (unclipped) actions
    reward: jax.Array  # (N, T)
    mask: jax.Array  # (N, T) 1 while the trajectory is alive (a terminating step still counts)
    logp: jax.Array  # (N, T) log-prob under the policy that sampled it
    advantage: jax.Array  # (N, T) filled by `with_advantages`


def imagine(task: Task, cfg: ens.EnsembleConfig, policy: Policy, params, member, norm, starts, key) -> Batch:
    """N stochastic trajectories of T steps of pi_params from starts (N, obs_dim) under ONE model (member: that
    model's parameters, no member axis), as a lax.scan over time. s' = clip(s + f(s, a)), r = r(s, a, s')."""
    skip, module = task.dims.skip, ens.member_module(cfg)

    def step(carry, key):
        obs, alive = carry
        mean, log_std = policy.apply(params, obs[:, skip:])
        action = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        # The model sees the raw Gaussian action, as it saw the raw actions of the real data (the authors' model
        # sampler passes the policy's actions unclipped; only the real env clips them).
        x = ens.make_inputs(obs[:, skip:], action)
        delta = ens.denormalize_output(norm, module.apply(member, ens.normalize(norm, x))[0])
        next_obs = jnp.clip(obs + delta, -task.obs_clip, task.obs_clip)  # clip_obs: no overflow in long rollouts
        env_a = task.to_env(action)
        reward = jax.vmap(task.reward_fn)(obs, env_a, next_obs)
        done = jax.vmap(task.term_fn)(obs, env_a, next_obs)
        # A finished trajectory stays at the last state it was alive in (not the state that ended it, which may
        # be far out), the model never runs on drifting states, and where() (not * 0) keeps its rewards zero.
        next_obs = jnp.where((alive & ~done)[:, None], next_obs, obs)
        out = (obs, action, jnp.where(alive, reward, 0.0), alive, gaussian_log_prob(mean, log_std, action))
        return (next_obs, alive & ~done), out

    _, (obs, action, reward, alive, logp) = jax.lax.scan(
        step, (starts, jnp.ones(starts.shape[0], bool)), jax.random.split(key, task.dims.horizon))
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # (T, N, ...) -> (N, T, ...)
    return Batch(swap(obs), swap(action), swap(reward), swap(alive).astype(jnp.float32), swap(logp),
                 jnp.zeros_like(swap(reward)))


def discounted_returns(reward, mask, gamma):
    """R_t = sum_{t' >= t} gamma^(t' - t) r_t' along axis 1 (masked steps carry zero reward)."""

    def back(acc, x):
        acc = x + gamma * acc
        return acc, acc

    _, ret = jax.lax.scan(back, jnp.zeros(reward.shape[0]), (reward * mask).T, reverse=True)
    return ret.T * mask


def baseline_features(obs, mask):
    """rllab's LinearFeatureBaseline features [o, o^2, t, t^2, t^3, 1], o clipped to [-10, 10], t = step / 100:
    (N, T, 2 obs_dim + 4)."""
    n, T = mask.shape
    o = jnp.clip(obs, -10, 10)
    t = jnp.broadcast_to((jnp.arange(T) / 100.0)[None, :, None], (n, T, 1))
    return jnp.concatenate([o, o**2, t, t**2, t**3, jnp.ones_like(t)], axis=-1) * mask[..., None]


def with_advantages(batch: Batch, skip: int, gamma: float) -> Batch:
    """[3] A = R - b(s, t), b the linear baseline fitted by ridge regression (reg 1e-5) on THIS task's batch and
    then evaluated on it (the authors' MAMLBaseSampler fits before it predicts), centred to mean 0 and std 1 over
    the task's valid steps. The policy's observation (positions dropped) are the features."""
    ret = discounted_returns(batch.reward, batch.mask, gamma)
    feats = baseline_features(batch.obs[..., skip:], batch.mask)
    X, y = feats.reshape(-1, feats.shape[-1]), (ret * batch.mask).reshape(-1)
    w = jnp.linalg.solve(X.T @ X + 1e-5 * jnp.eye(X.shape[1]), X.T @ y)
    adv = (ret - feats @ w) * batch.mask
    mean = masked_mean(adv, batch.mask)
    std = jnp.sqrt(masked_mean((adv - mean) ** 2, batch.mask))
    return batch._replace(advantage=(adv - mean) / (std + 1e-8) * batch.mask)


# ----------------------------------------------------------------------------
# [4] The inner step, [6] the outer TRPO step through it
# ----------------------------------------------------------------------------
def inner_objective(policy: Policy, params, batch: Batch, skip: int):
    """L_in = mean_t log pi(a_t|s_t) A_t over the task's valid steps: its gradient is the policy gradient."""
    mean, log_std = policy.apply(params, batch.obs[..., skip:])
    return masked_mean(gaussian_log_prob(mean, log_std, batch.action) * batch.advantage, batch.mask)


def inner_step(policy: Policy, params, batch: Batch, skip: int, lr: float, first_order: bool = False):
    """[4] theta' = theta + alpha grad L_in(theta) on the task's own imagined batch, every parameter (the log-std
    too) with the same fixed alpha (the authors' step sizes are constants, trainable_step_size False)."""
    # THE SECOND-ORDER TERM COMES FROM HERE: the outer step differentiates theta' = theta + alpha grad L_in(theta)
    # with respect to theta, d theta'/d theta = I + alpha Hessian L_in(theta), by differentiating through this
    # jax.grad (reverse-over-reverse). stop_gradient makes grad a constant: first-order MAML.
    grad = jax.grad(inner_objective, argnums=1)(policy, params, batch, skip)
    if first_order:
        grad = jax.lax.stop_gradient(grad)
    return jax.tree.map(lambda p, g: p + lr * g, params, grad)


def post_update_policies(policy: Policy, theta, pre: Batch, post: Batch, args: Args, skip: int):
    """pi_theta'_m(theta) at every task's post-update states: (mean (M, N, T, A), log_std (M, A))."""
    adapt = lambda pre_m: inner_step(policy, theta, pre_m, skip, args.inner_lr, args.first_order)
    return jax.vmap(lambda pre_m, post_m: policy.apply(adapt(pre_m), post_m.obs[..., skip:]))(pre, post)


def surrogate_and_kl(policy: Policy, theta, pre: Batch, post: Batch, old, args: Args, skip: int):
    """S(theta) = mean over tasks of mean_t r_t A'_t with r_t = pi_theta'(theta)(a|s) / pi_sampling(a|s), and the
    mean KL(pi_old || pi_theta'(theta)) over ALL post-update steps of all tasks (the authors concatenate the
    tasks' KLs before the mean)."""
    mean, log_std = post_update_policies(policy, theta, pre, post, args, skip)
    logp = gaussian_log_prob(mean, log_std[:, None, None], post.action)  # (M, N, T)
    ratio = jnp.exp(logp - post.logp)
    surr = jax.vmap(masked_mean)(ratio * post.advantage, post.mask).mean()
    kl = gaussian_kl(old[0], old[1][:, None, None], mean, log_std[:, None, None])
    return surr, masked_mean(kl, post.mask)


def conjugate_gradient(matvec, b, iters: int, tol: float = 1e-10):
    """Solve F x = b for a symmetric positive definite F given only x -> F x."""

    def body(_, c):
        x, r, p, rr = c
        Fp = matvec(p)
        alpha = rr / (p @ Fp + 1e-12)
        x, r = x + alpha * p, r - alpha * Fp
        rr_new = r @ r
        beta = jnp.where(rr > tol, rr_new / (rr + 1e-12), 0.0)
        return x, r, r + beta * p, rr_new

    return jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(b), b, b, b @ b))[0]


def trpo_step(policy: Policy, theta, pre: Batch, post: Batch, args: Args, skip: int):
    """[6] One natural-gradient step on S(theta) through the inner step, with a KL-checked line search."""
    flat, unravel = ravel_pytree(theta)
    old = jax.lax.stop_gradient(post_update_policies(policy, theta, pre, post, args, skip))  # pi_theta'(theta_old)
    objective = lambda f: surrogate_and_kl(policy, unravel(f), pre, post, old, args, skip)
    surr_old, g = jax.value_and_grad(lambda f: objective(f)[0])(flat)
    kl_grad = jax.grad(lambda f: objective(f)[1])

    def fisher_vector_product(v):
        # F v as the Hessian of the mean KL at theta_old times v (forward-over-reverse). The KL is zero with zero
        # gradient at theta_old, so its Hessian is J^T F' J: the post-update policies' Fisher pulled back through
        # the inner step (J = d theta'/d theta). F is never formed. (The authors: finite differences of grads.)
        return jax.jvp(kl_grad, (flat,), (v,))[1] + args.cg_damping * v

    x = conjugate_gradient(fisher_vector_product, g, args.cg_iters)  # x ~ F^-1 g
    step = jnp.sqrt(2 * args.max_kl / (x @ fisher_vector_product(x) + 1e-8)) * x  # 1/2 s^T F s = delta

    def tried(i):  # try i: step fraction ratio^i
        coef = args.backtrack_ratio ** i
        return (coef, *objective(flat + coef * step))

    ok = lambda surr, kl: (kl <= args.max_kl) & (surr > surr_old) & jnp.isfinite(surr)
    _, coef, surr, kl = jax.lax.while_loop(lambda c: (c[0] < args.backtrack_steps - 1) & ~ok(c[2], c[3]),
                                           lambda c: (c[0] + 1, *tried(c[0] + 1)), (0, *tried(0)))
    accepted = ok(surr, kl)
    coef = jnp.where(accepted, coef, 0.0)  # rllab rejects the step when no try passes
    info = {"surrogate_gain": jnp.where(accepted, surr - surr_old, 0.0), "kl": jnp.where(accepted, kl, 0.0),
            "step_coef": coef, "grad_norm": jnp.linalg.norm(g)}
    return unravel(flat + coef * step), info


def imagine_tasks(task: Task, cfg: ens.EnsembleConfig, policy: Policy, args: Args, params, model: ens.EnsembleState,
                  start_pool, key, per_task: bool) -> Batch:
    """[3] / [5] N trajectories for every task m under ITS model k(m) (task_members), with advantages; params is
    theta (per_task False) or a stack of per-task parameters (M, ...). Starts are drawn from start_pool (draws of
    env.reset()), fresh for every task: (M, N, T, ...)."""
    M, N = args.meta_batch, args.trajectories_per_task
    members = jax.tree.map(lambda p: p[task_members(M, cfg.num_members)], model.params)  # (M, ...) weights
    k_starts, k_roll = jax.random.split(key)
    starts = start_pool[jax.random.randint(k_starts, (M, N), 0, start_pool.shape[0])]
    one = lambda p, member, s, k: with_advantages(imagine(task, cfg, policy, p, member, model.norm, s, k),
                                                  task.dims.skip, args.gamma)
    return jax.vmap(one, in_axes=(0 if per_task else None, 0, 0, 0))(params, members, starts,
                                                                     jax.random.split(k_roll, M))


@partial(jax.jit, static_argnames=("task", "cfg", "policy", "args"))
def meta_step(task: Task, cfg: ens.EnsembleConfig, policy: Policy, args: Args, theta, model: ens.EnsembleState,
              start_pool, key):
    """[3]-[6] as ONE program, vmapped over the M tasks. Returns the new theta, the adapted parameters of every
    task (computed from the theta BEFORE this step's outer update: those that sampled [5], and, after an
    iteration's last meta step, those the authors' real-data collection uses) and metrics."""
    skip, (k_pre, k_post) = task.dims.skip, jax.random.split(key)
    pre = imagine_tasks(task, cfg, policy, args, theta, model, start_pool, k_pre, per_task=False)  # [3]
    adapted = jax.vmap(lambda b: inner_step(policy, theta, b, skip, args.inner_lr))(pre)  # [4] (M, ...)
    post = imagine_tasks(task, cfg, policy, args, adapted, model, start_pool, k_post, per_task=True)  # [5]
    theta, info = trpo_step(policy, theta, pre, post, args, skip)  # [6]
    returns = lambda b: b.reward.sum(-1).mean()
    info.update({"return/pre_update": returns(pre), "return/post_update": returns(post),
                 "log_std": theta["params"]["log_std"].mean()})
    return theta, adapted, info


# ----------------------------------------------------------------------------
# [1] Real data, [7] evaluation
# ----------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("policy", "skip"))
def policy_dist(policy: Policy, skip: int, params, obs):
    return policy.apply(params, obs[skip:])


def collect_random(env, steps: int, dims: Dims, rng: np.random.Generator, to_env):
    """[1] Whole trajectories of uniformly random actions in [-1, 1] until `steps` steps (the authors'
    RandomVectorizedSampler: action_space.sample() of the normalised env). Returns trajectories, returns."""
    return _trajectories(env, steps, lambda i, obs: rng.uniform(-1, 1, dims.act_dim).astype(np.float32), to_env)


def collect_adapted(env, policy: Policy, adapted, args: Args, dims: Dims, rng: np.random.Generator, to_env):
    """[1] One trajectory per task with that task's adapted policy (Gaussian actions), round-robin over the
    tasks until meta_batch x T steps (the authors' MAMLVectorizedSampler: env i <-> post-update policy i)."""
    per_task = [jax.tree.map(lambda p, i=i: p[i], adapted) for i in range(args.meta_batch)]

    def act(i, obs):
        mean, log_std = policy_dist(policy, dims.skip, per_task[i % args.meta_batch], jnp.asarray(obs, jnp.float32))
        mean, std = np.asarray(mean), np.exp(np.asarray(log_std))
        return (mean + std * rng.standard_normal(dims.act_dim)).astype(np.float32)

    return _trajectories(env, args.meta_batch * dims.horizon, act, to_env)


def _trajectories(env, steps: int, act, to_env):
    """Whole episodes (T steps or until termination) until `steps` steps; trajectory i acts with act(i, obs). The
    raw action is stored (the models learn from it), the env gets it clipped to [-1, 1] and rescaled."""
    trajs, returns, n = [], [], 0
    while n < steps:
        obs, _ = env.reset()
        rows, ret, done = [], 0.0, False
        while not done:
            a = act(len(trajs), obs)
            next_obs, reward, terminated, truncated, _ = env.step(to_env(np.clip(a, -1.0, 1.0)))
            rows.append((obs, a, next_obs))
            ret, obs, done = ret + float(reward), next_obs, terminated or truncated
        trajs.append(rows)
        returns.append(ret)
        n += len(rows)
    return trajs, returns


class Dataset(NamedTuple):
    """D as fixed-capacity first-in-first-out arrays of model inputs x = (s without positions, a) and targets
    y = s' - s; n rows are valid, `at` is the next row to overwrite."""

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    at: np.ndarray

    @staticmethod
    def create(capacity, in_dim, out_dim):
        return Dataset(np.zeros((capacity, in_dim), np.float32), np.zeros((capacity, out_dim), np.float32),
                       np.int64(0), np.int64(0))

    def add(self, trajs, skip: int):
        obs, act, nxt = (np.asarray([r[i] for traj in trajs for r in traj], np.float32) for i in range(3))
        x, y = np.concatenate([obs[:, skip:], act], 1), nxt - obs
        cap = len(self.x)
        x, y = x[-cap:], y[-cap:]
        idx = (int(self.at) + np.arange(len(x))) % cap
        X, Y = self.x.copy(), self.y.copy()
        X[idx], Y[idx] = x, y
        return Dataset(X, Y, np.int64(min(int(self.n) + len(x), cap)), np.int64((int(self.at) + len(x)) % cap))

    def rows(self):
        return self.x[: int(self.n)], self.y[: int(self.n)]


def draw_starts(env, n: int) -> np.ndarray:
    """n initial states from the env's own reset distribution: (n, obs_dim)."""
    return np.stack([env.reset()[0] for _ in range(n)]).astype(np.float32)


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
def resolve(args: Args) -> Args:
    """Fill the fields left None with the values for --env-id; eval_interval None: one iteration."""
    paper = ENV_CONFIGS[args.env_id]
    args = dataclasses.replace(args, **{k: v for k, v in paper.items() if getattr(args, k) is None})
    if args.eval_interval is None:
        args = dataclasses.replace(args, eval_interval=args.meta_batch * args.horizon)
    return args


def make_task_env(env_id: str, horizon: int | None = None, render_mode=None):
    """The env with its positions kept in the observation, episodes cut at T steps."""
    kwargs = dict(REWARD_OBS_KWARGS.get(env_id, {}))
    if horizon is not None:
        kwargs["max_episode_steps"] = horizon
    return make_env(env_id, render_mode=render_mode, **kwargs)


def make_task(args: Args, env) -> Task:
    """The env knowledge the imagined side uses: known reward and termination, the action scaling, sizes."""
    dims = Dims(env.observation_space.shape[0], env.action_space.shape[0], POSITION_DIMS.get(args.env_id, 0),
                args.horizon)
    low, high = env.action_space.low, env.action_space.high
    to_env = partial(lambda lo, hi, a: lo + (a + 1.0) * 0.5 * (hi - lo), low, high)  # [-1, 1] -> the env's bounds
    return Task(OBS_REWARD_FUNCTIONS[args.env_id], OBS_TERMINATION_FUNCTIONS[args.env_id], to_env, args.obs_clip,
                dims)


def validate(args: Args) -> None:
    """One-line errors for settings that cannot work, before anything heavy."""
    check_ranges(args, at_least_1=("total_timesteps", "eval_interval", "eval_episodes", "horizon", "random_steps",
                                   "ensemble_size", "model_hidden", "model_batch_size", "model_max_epochs",
                                   "buffer_size", "policy_hidden", "meta_batch", "trajectories_per_task",
                                   "meta_steps", "cg_iters", "backtrack_steps"),
                 non_negative=("cg_damping",), positive=("model_lr", "obs_clip", "inner_lr", "max_kl"),
                 probability=("rolling_persistence",), discount=("gamma",),
                 open_unit=("validation_fraction", "backtrack_ratio"))
    check_env_id(args.env_id)
    env = make_task_env(args.env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"MB-MPO needs a continuous (Box) action space; '{args.env_id}' has {env.action_space}")
    if args.env_id not in ENV_CONFIGS:
        fail(f"MB-MPO needs a known reward for --env-id; '{args.env_id}' has none (known: "
             f"{', '.join(ENV_CONFIGS)}; add one to common/envs/model_fns.py)")
    if args.capture_video:
        check_video_support(args.env_id)
    a = resolve(args)
    if a.backtrack_ratio >= 1:
        fail(f"--backtrack-ratio must be < 1 (the line search shrinks the step), got {a.backtrack_ratio}")
    if a.meta_batch % a.ensemble_size:
        fail(f"--meta-batch ({a.meta_batch}) must be a multiple of --ensemble-size ({a.ensemble_size}): every "
             "model gets the same number of tasks")
    if a.total_timesteps < a.random_steps:
        fail(f"--total-timesteps ({a.total_timesteps}) must be at least --random-steps ({a.random_steps})")
    if int(min(a.random_steps, a.buffer_size) * a.validation_fraction) < 1 or a.validation_fraction >= 1:
        fail(f"--validation-fraction {a.validation_fraction} leaves no training or no validation rows of the "
             f"first {min(a.random_steps, a.buffer_size)} transitions")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    check_memory(3 * a.buffer_size * 4 * (3 * obs_dim + act_dim), f"the buffer D ({a.buffer_size} rows)",
                 "lower --buffer-size")
    # one meta step holds the pre- and post-update batches and their gradients: about 8 copies
    check_memory(8 * 4 * a.meta_batch * a.trajectories_per_task * a.horizon * (2 * obs_dim + 2 * act_dim + 4),
                 "the imagined batches of one meta step", "lower --meta-batch or --trajectories-per-task")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    args = resolve(args)
    env, eval_env = make_task_env(args.env_id, args.horizon), make_task_env(args.env_id, args.horizon)
    task = make_task(args, env)
    dims = task.dims
    run = Run(args)
    cfg = ensemble_config(args, dims)
    policy = Policy(dims.act_dim, args.policy_hidden)
    to_env_np = lambda a: task.to_env(np.asarray(a, np.float64)).astype(np.float32)

    key = seed_everything(args.seed)
    key, k_pol, k_model = jax.random.split(key, 3)
    rng = np.random.default_rng(args.seed)  # random actions, action noise, the models' splits and shuffles
    theta = policy.init(k_pol, jnp.zeros((1, dims.obs_dim - dims.skip)))
    start_env = make_task_env(args.env_id)
    start_env.reset(seed=args.seed + 20_000)
    start_pool = jnp.asarray(draw_starts(start_env, 10_000))  # [3] draws of env.reset(), sampled inside meta_step
    eval_env.reset(seed=args.seed + 10_000)
    env.reset(seed=args.seed)
    state = run.restore(dict(
        theta=theta, adapted=jax.tree.map(lambda p: jnp.broadcast_to(p, (args.meta_batch, *p.shape)), theta),
        model=ens.create(cfg, k_model), key=key, rng=numpy_rng_state(rng),
        data=Dataset.create(args.buffer_size, cfg.in_dim, cfg.out_dim)._asdict(), env=env_state(env),
        eval_env=env_state(eval_env), iteration=np.int64(0)))
    theta, adapted, model, key, iteration = (state[k] for k in ("theta", "adapted", "model", "key", "iteration"))
    iteration = int(iteration)
    data = Dataset(*(np.asarray(state["data"][f]) for f in Dataset._fields))
    set_numpy_rng_state(rng, state["rng"])
    set_env_state(env, state["env"])
    set_env_state(eval_env, state["eval_env"])
    del state

    def checkpoint():
        return dict(theta=theta, adapted=adapted, model=model, key=key, rng=numpy_rng_state(rng),
                    data=data._asdict(), env=env_state(env), eval_env=env_state(eval_env),
                    iteration=np.int64(iteration))

    policy_det = lambda o: to_env_np(np.clip(np.asarray(policy_dist(policy, dims.skip, theta,
                                                                    jnp.asarray(o, jnp.float32))[0]), -1, 1))
    for phase in ("collect", "model_train", "meta_step", "eval"):
        run.timings.setdefault(phase, 0.0)
    progress = Progress(f"MB-MPO ({args.ensemble_size} models, {args.meta_batch} tasks, {args.meta_steps} meta "
                        f"steps an iteration) on {args.env_id}", args.total_timesteps, start=run.start_step,
                        every=args.eval_interval, compiling="the meta step and the models")
    history, step, t0 = [], run.start_step, time.time()
    while step < args.total_timesteps:
        iteration += 1
        # [1] Real data: random actions first, then one trajectory per task with its ADAPTED policy
        with run.timed("collect"):
            if iteration == 1:
                trajs, real_returns = collect_random(env, args.random_steps, dims, rng, to_env_np)
            else:
                trajs, real_returns = collect_adapted(env, policy, adapted, args, dims, rng, to_env_np)
        previous, step = step, step + sum(len(t) for t in trajs)
        data = data.add(trajs, dims.skip)

        # [2] Fit the models (warm start: weights and Adam state carry over), each on its own split
        with run.timed("model_train"):
            model, model_info = ens.train(cfg, model, *data.rows(), rng, max_epochs=args.model_max_epochs)
        check_finite(step, unit="real step", **{"model/validation_mse": model_info["holdout_mse"]})

        # [3]-[6] Meta steps on the models, one jitted call each
        with run.timed("meta_step"):
            for _ in range(args.meta_steps):
                key, sub = jax.random.split(key)
                theta, adapted, info = meta_step(task, cfg, policy, args, theta, model, start_pool, sub)
                info = jax.device_get(info)
                check_finite(step, unit="real step", **{f"meta/{k}": v for k, v in info.items()})

        if step // args.eval_interval > previous // args.eval_interval or step >= args.total_timesteps:
            # [7] Deterministic evaluation of the pre-update policy in the real env
            with run.timed("eval"):
                eval_returns = episode_returns(eval_env, policy_det, args.eval_episodes)
            row = {"eval/return": float(eval_returns.mean()), "eval/return_std": float(eval_returns.std()),
                   "train/episode_return": float(np.mean(real_returns)), "iteration": iteration,
                   "model/validation_mse": float(np.mean(model_info["holdout_mse"])),
                   "model/epochs": float(np.mean(model_info["member_epochs"])),
                   **{f"meta/{k}": float(v) for k, v in info.items()},
                   "sps": (step - run.start_step) / (time.time() - t0),
                   **{f"time/{k}": v for k, v in run.timings.items()}}
            run.log(row, step, echo=False)
            progress.update(step, row, ["eval/return", "train/episode_return", "meta/return/post_update",
                                        "model/validation_mse", "meta/kl"])
            history.append({"step": step, "time": time.time() - t0, **row})
        if run.checkpoint_due(step, previous):
            run.save(checkpoint(), step)

    if run.start_step < step:
        run.save(checkpoint(), step)
    if history:
        progress.done("eval/return", history[-1]["eval/return"],
                      reference=f"random actions: {history[0]['train/episode_return']:.1f}")
    if args.save_model:
        save_checkpoint(run.dir / "mb_mpo.msgpack", {"policy": theta, "model": model.params,
                                                      "model_norm": model.norm})
    if args.capture_video:
        record_video(make_task_env(args.env_id, args.horizon, render_mode="rgb_array"), policy_det,
                     run.dir / "videos")
    run.close()
    return {"history": history, "timings": dict(run.timings), "wall_seconds": time.time() - t0,
            "run_dir": str(run.dir)}


if __name__ == "__main__":
    cli(Args, main)
