"""ME-TRPO: Model-Ensemble Trust-Region Policy Optimization (Kurutach, Clavera, Duan, Tamar & Abbeel, 2018).

Paper: ICLR 2018, https://arxiv.org/abs/1802.10592 (Alg. 1); configuration and every detail below from the
authors' code, thanard/me-trpo (`params/params-<env>.json`, `model_based_rl.py`, `env_helpers.py`,
`training.py`; docs/me_trpo.md lists each with its source). CS 285 (Levine), "Model-Based Policy Learning":
a policy trained on one learned model exploits the places where that model is wrong; an ensemble of models,
and a policy that must improve under most of them, does not.

What is here: an ensemble of deterministic ReLU models of the normalised state change, all trained on the same
real data (common/ensembles.py, shared-data mode) with a validation set split off by trajectory order and
per-member early stopping; TRPO on imagined rollouts that use a random member at every step, with known reward
and termination functions (common/envs/model_fns.py); the authors' stopping rule; real data from the policy
with their parameter and action noise. Ablations: `--ensemble-size 1`, `--no-stopping-rule`, `--policy-update
bptt` (backprop through the models instead of TRPO, the paper's "TRPO > BPTT" comparison).

Run:
    python -m algos.me_trpo                                        # InvertedPendulum-v5, 3000 steps: 64 s (CPU)
    python -m algos.me_trpo --env-id HalfCheetah-v5 --total-timesteps 300000     # the paper's setting (GPU)
    python -m algos.me_trpo --env-id HalfCheetah-v5 --ensemble-size 1 --no-stopping-rule
    python -m algos.me_trpo --resume runs/<run>                    # continue a run from its last checkpoint

Algorithm (Alg. 1 of the paper; the numbers mark the code below):
    [1] collect real trajectories with the policy (the first with the initial policy), exploring with
        per-trajectory parameter noise and per-step action noise; the first third of the new transitions (in
        trajectory order) joins the validation set D_val, the rest the training set D
    [2] fit the K models f_k(s, a) ~ s' - s on D (every model on all of D), each stopped at its best loss on
        D_val; re-initialise them every `reinit_every` iterations, warm-start otherwise
    [3] reset the policy's log-std to log(init_std), then repeat:
        [4] imagined rollouts: N trajectories of T steps from initial states of the env, a ~ pi(.|s), s' = s +
            f_k(s, a) with k drawn at random at every step, r = r(s, a, s') known
        [5] TRPO: advantages A = R - b(s, t) (linear feature baseline), g = grad of the surrogate, x = F^-1 g by
            conjugate gradient on Fisher-vector products, step sqrt(2 delta / x^T F x) x, backtracking until
            the mean KL <= delta and the surrogate improves
        [6] every `check_every` iterations: the deterministic policy's T-step return under EACH model from fixed
            start states; the check passes unless the return dropped for more than 30% of the models; a passing
            check saves the policy and resets the reference returns; stop after `policy_patience` iterations
            without a pass and restore the last saved policy
    [7] evaluate the deterministic policy in the real env; go to [1]
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Literal, NamedTuple

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from common import ensembles as ens
from common.checkpoints import env_state, numpy_rng_state, save_checkpoint, set_env_state, set_numpy_rng_state
from common.checks import check_finite, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import check_env_id, make_env
from common.envs.model_fns import OBS_REWARD_FUNCTIONS, OBS_TERMINATION_FUNCTIONS, POSITION_DIMS, REWARD_OBS_KWARGS
from common.experiment import CommonArgs, Run, check_video_support, episode_returns, record_video, seed_everything
from common.progress import Progress

# The authors' per-env settings (thanard/me-trpo params/params-<env>.json): horizon T (policy_opt_params.T and
# rollout_params.max_timestep), model width (dynamics_model.hidden_layers), and the reward clip of their
# half-cheetah (envs/com_half_cheetah_env.py). InvertedPendulum is ours: a small task that learns in minutes.
PAPER_CONFIGS = {
    "HalfCheetah-v5": dict(horizon=100, model_hidden=1024, reward_clip=10.0),
    "Hopper-v5": dict(horizon=100, model_hidden=1024, reward_clip=None),
    "Swimmer-v5": dict(horizon=200, model_hidden=512, reward_clip=None),
    "InvertedPendulum-v5": dict(horizon=100, model_hidden=64, reward_clip=None),
}


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "InvertedPendulum-v5"
    """an env with a known reward in common/envs/model_fns.py: HalfCheetah-v5, Hopper-v5, Swimmer-v5,
    InvertedPendulum-v5"""
    total_timesteps: int = 3000
    """real env steps in all ([1]); the paper: 100 iterations x 3000 steps"""
    eval_interval: int = 500
    """[7] evaluate the deterministic policy in the real env every this many real steps"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    steps_per_iteration: int = 500
    """[1] real steps collected per outer iteration (whole trajectories); the paper: 3000"""
    horizon: int | None = None
    """T, the length of real and imagined trajectories. None: the authors' per env: HalfCheetah 100,
    Hopper 100, Swimmer 200; InvertedPendulum 100"""
    model_hidden: int | None = None
    """width of the models' two hidden layers. None: the authors' per env: HalfCheetah 1024, Hopper 1024,
    Swimmer 512; InvertedPendulum 64"""
    reward_clip: float | None = None
    """clip imagined rewards to [-c, c]. None: the authors' per env: HalfCheetah 10, others no clip"""
    ensemble_size: int = 5
    """K, models in the ensemble (1: the paper's single-model ablation)"""
    model_lr: float = 1e-3
    """[2] Adam step size of the models (its state is reset at every fit, as the authors)"""
    model_batch_size: int = 1000
    """[2] minibatch per model"""
    model_patience: int = 25
    """[2] stop fitting once no model's validation loss improved for this many passes over D"""
    model_eval_every: int = 5
    """[2] score the validation set every this many passes"""
    model_max_passes: int = 2000
    """[2] cap on passes over D per fit"""
    reinit_every: int = 5
    """[2] re-initialise the models every this many outer iterations (0: never after the first)"""
    validation_fraction: float = 1 / 3
    """[1] fraction of each new batch of real transitions (the first, in trajectory order) kept for validation"""
    max_train_rows: int = 200_000
    """[1] D keeps at most this many transitions (oldest dropped)"""
    max_validation_rows: int = 100_000
    """[1] D_val keeps at most this many transitions"""
    policy_hidden: int = 32
    """width of the policy's two tanh hidden layers"""
    init_std: float = 1.0
    """[3] the policy's std at the start of every policy phase"""
    imagined_steps: int = 5000
    """[4] imagined transitions per TRPO iteration (N = this / T trajectories); the paper: 50000"""
    policy_update: Literal["trpo", "bptt"] = "trpo"
    """[5] trpo, or bptt: Adam on the T-step return backpropagated through the models (the paper's ablation)"""
    max_kl: float = 0.01
    """[5] TRPO's trust region delta on the mean KL"""
    cg_iters: int = 10
    """[5] conjugate gradient iterations"""
    cg_damping: float = 1e-5
    """[5] F + damping I in conjugate gradient (rllab's reg_coeff)"""
    backtrack_ratio: float = 0.8
    """[5] line search step shrink factor"""
    backtrack_steps: int = 15
    """[5] line search tries before the step is rejected"""
    gamma: float = 1.0
    """discount of the imagined returns"""
    bptt_lr: float = 1e-3
    """[5] bptt: Adam step size (gradient norm clipped at 10)"""
    bptt_batch: int = 500
    """[5] bptt: start states per gradient step"""
    max_policy_iters: int = 400
    """[3] cap on policy iterations per outer iteration"""
    stopping_rule: bool = True
    """[6] the authors' stopping rule (--no-stopping-rule: every check passes; max_policy_iters iterations, and
    the policy of the last check is kept, as the authors' mode no_early restores the last saved policy)"""
    check_every: int = 5
    """[6] iterations between validation checks"""
    policy_patience: int = 25
    """[6] stop after this many iterations without a passing check"""
    worse_fraction: float = 0.3
    """[6] a check fails when the return dropped for more than this fraction of the models"""
    validation_starts: int = 500
    """[6] fixed start states of the validation check"""
    action_noise: float = 3.0
    """[1] per-step action noise std: this x U(0, 1), drawn every step"""
    param_noise: float = 3.0
    """[1] per-trajectory weight noise std: this x |last policy phase's change| of each weight"""


class Dims(NamedTuple):
    """Sizes read from the env (static, like Args)."""

    obs_dim: int  # the full observation, positions included
    act_dim: int
    skip: int  # leading position entries the policy and the models do not see (POSITION_DIMS)
    horizon: int


def trajectories(args: Args, dims: Dims) -> int:
    """N, imagined trajectories per TRPO iteration."""
    return max(args.imagined_steps // dims.horizon, 1)


def ensemble_config(args: Args, dims: Dims) -> ens.EnsembleConfig:
    """f_k(s, a) ~ s' - s, deterministic, inputs and outputs normalised (the authors' input_rms and diff_rms,
    std floored at 0.1), ReLU, no weight decay, every member on all of D, best weights by validation loss."""
    return ens.EnsembleConfig(
        in_dim=dims.obs_dim - dims.skip + dims.act_dim, out_dim=dims.obs_dim, num_members=args.ensemble_size,
        num_elites=args.ensemble_size, hidden=args.model_hidden, num_layers=2, probabilistic=False, lr=args.model_lr,
        weight_decays=(0.0, 0.0, 0.0), batch_size=args.model_batch_size, normalize_outputs=True, activation="relu",
        bootstrap=False, improvement=0.0, score_start=True, eval_every=args.model_eval_every, std_floor=0.1,
        # The authors stop at the first check at least model_patience passes after the last improvement;
        # EnsembleConfig stops once MORE than `patience` passes have gone by.
        patience=args.model_patience - 1)


# ----------------------------------------------------------------------------
# The policy: rllab's GaussianMLPPolicy (tanh hidden layers, linear mean, state-independent log-std)
# ----------------------------------------------------------------------------
class Policy(nn.Module):
    act_dim: int
    hidden: int

    @nn.compact
    def __call__(self, obs):  # obs (..., obs_dim - skip) -> mean (..., A), log_std (A,)
        dense = partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform())  # rllab's weight init
        x = nn.tanh(dense(self.hidden)(obs))
        x = nn.tanh(dense(self.hidden)(x))
        return dense(self.act_dim)(x), self.param("log_std", nn.initializers.zeros, (self.act_dim,))


def gaussian_log_prob(mean, log_std, action):
    return jnp.sum(-0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(N_p || N_q) for diagonal Gaussians, summed over action dims."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    return jnp.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5, -1)


def with_log_std(params, init_std: float):
    """[3] the policy with its log-std reset (thanard/me-trpo `reset_opt`: log init_std at every policy phase)."""
    inner = dict(params["params"], log_std=jnp.full_like(params["params"]["log_std"], np.log(init_std)))
    return {"params": inner}


# ----------------------------------------------------------------------------
# [4] Imagined rollouts through the ensemble, one jitted, vmapped scan
# ----------------------------------------------------------------------------
class Batch(NamedTuple):
    obs: jax.Array  # (N, T, obs_dim) full observations
    action: jax.Array  # (N, T, A) the sampled (unclipped) actions, whose likelihood TRPO uses
    reward: jax.Array  # (N, T)
    mask: jax.Array  # (N, T) 1 while the trajectory is alive (a terminating step still counts)


class Task(NamedTuple):
    """What the imagined side knows about the env (static: functions and numbers)."""

    reward_fn: object
    term_fn: object
    to_env: object  # policy action in [-1, 1] -> env action
    reward_clip: float | None
    dims: Dims


def model_step(task: Task, cfg: ens.EnsembleConfig, model: ens.EnsembleState, obs, action, key):
    """One imagined step for a batch (B, obs_dim) with a random member per row: s' = s + f_k(s, a) (the
    authors' `sam_mode=step_rand`), r = r(s, a, s') (clipped as configured), done = term(s, a, s')."""
    a = jnp.clip(action, -1.0, 1.0)  # the authors clip before the model (env_helpers.VecSimpleEnv.step)
    delta = ens.sample(cfg, model, key, ens.make_inputs(obs[:, task.dims.skip:], a))  # (B, obs_dim)
    next_obs = obs + delta
    env_a = task.to_env(a)
    reward = jax.vmap(task.reward_fn)(obs, env_a, next_obs)
    if task.reward_clip is not None:
        reward = jnp.clip(reward, -task.reward_clip, task.reward_clip)
    return next_obs, reward, jax.vmap(task.term_fn)(obs, env_a, next_obs)


def imagine(task: Task, cfg: ens.EnsembleConfig, policy: Policy, params, model, starts, key) -> Batch:
    """N stochastic trajectories of T steps from starts (N, obs_dim), as one lax.scan over time (the N rows
    advance together, the ensemble vmapped over members inside ens.sample)."""

    def step(carry, key):
        obs, alive = carry
        k_act, k_model = jax.random.split(key)
        mean, log_std = policy.apply(params, obs[:, task.dims.skip:])
        action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
        next_obs, reward, done = model_step(task, cfg, model, obs, action, k_model)
        # A finished trajectory stays at the last state it was alive in (not the state that ended it, which may
        # be non-finite: InvertedPendulum's termination checks for that), so nothing downstream sees inf; where()
        # (not * 0, which turns inf into NaN) keeps its rewards exactly zero.
        next_obs = jnp.where((alive & ~done)[:, None], next_obs, obs)
        return (next_obs, alive & ~done), (obs, action, jnp.where(alive, reward, 0.0), alive)

    _, (obs, action, reward, alive) = jax.lax.scan(step, (starts, jnp.ones(starts.shape[0], bool)),
                                                   jax.random.split(key, task.dims.horizon))
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # (T, N, ...) -> (N, T, ...)
    return Batch(swap(obs), swap(action), swap(reward), swap(alive).astype(jnp.float32))


def per_model_returns(task: Task, cfg: ens.EnsembleConfig, policy: Policy, params, model, starts, gamma):
    """[6] The deterministic policy's T-step return under EACH model from the same starts (P, obs_dim): (K, P).
    Differentiable in params (BPTT's objective). Actions are clip(mean), as the authors' policy graph."""
    obs0 = jnp.broadcast_to(starts, (cfg.num_members, *starts.shape))  # (K, P, obs_dim)

    def step(carry, t):
        obs, alive, ret = carry
        a = jnp.clip(policy.apply(params, obs[..., task.dims.skip:])[0], -1.0, 1.0)
        mean, _ = ens.apply_members(cfg, model.params, model.norm, ens.make_inputs(obs[..., task.dims.skip:], a))
        next_obs = obs + ens.denormalize_output(model.norm, mean)
        env_a = task.to_env(a)
        reward = jax.vmap(jax.vmap(task.reward_fn))(obs, env_a, next_obs)
        if task.reward_clip is not None:
            reward = jnp.clip(reward, -task.reward_clip, task.reward_clip)
        done = jax.vmap(jax.vmap(task.term_fn))(obs, env_a, next_obs)
        next_obs = jnp.where((alive & ~done)[..., None], next_obs, obs)  # finished ones stay put (see imagine)
        return (next_obs, alive & ~done, ret + jnp.where(alive, gamma ** t * reward, 0.0)), None

    init = (obs0, jnp.ones(obs0.shape[:2], bool), jnp.zeros(obs0.shape[:2]))
    return jax.lax.scan(step, init, jnp.arange(task.dims.horizon))[0][2]


# ----------------------------------------------------------------------------
# [5] TRPO on the imagined batch (rllab's TRPO with the authors' settings)
# ----------------------------------------------------------------------------
def valid_only(batch: Batch) -> Batch:
    """Zeros at the steps after a trajectory ended (where(), so that even non-finite values there cannot leak
    into sums, products or gradients as NaN = inf x 0)."""
    keep = batch.mask > 0
    return batch._replace(obs=jnp.where(keep[..., None], batch.obs, 0.0),
                          action=jnp.where(keep[..., None], batch.action, 0.0),
                          reward=jnp.where(keep, batch.reward, 0.0))


def discounted_returns(reward, mask, gamma):
    """R_t = sum_{t' >= t} gamma^(t' - t) r_t' along axis 1 (masked steps carry zero reward)."""

    def back(acc, x):
        acc = x + gamma * acc
        return acc, acc

    _, ret = jax.lax.scan(back, jnp.zeros(reward.shape[0]), (reward * mask).T, reverse=True)
    return ret.T * mask


def baseline_features(obs, mask):
    """rllab's LinearFeatureBaseline features [o, o^2, t, t^2, t^3, 1], o clipped to [-10, 10], t = step / 100:
    (N, T, 2 obs_dim + 4) (the policy's observation: positions dropped)."""
    n, T = mask.shape
    o = jnp.clip(obs, -10, 10)
    t = jnp.broadcast_to((jnp.arange(T) / 100.0)[None, :, None], (n, T, 1))
    return jnp.concatenate([o, o**2, t, t**2, t**3, jnp.ones_like(t)], axis=-1) * mask[..., None]


def fit_baseline(features, returns, mask, reg: float = 1e-5):
    """Ridge regression of returns on features over the valid steps: w = (X^T X + reg I)^-1 X^T y."""
    X = features.reshape(-1, features.shape[-1])
    y = (returns * mask).reshape(-1)
    return jnp.linalg.solve(X.T @ X + reg * jnp.eye(X.shape[1]), X.T @ y)


def advantages(batch: Batch, skip: int, baseline_w, gamma: float):
    """A = R - b(s, t), b the baseline fitted on the PREVIOUS batch (rllab predicts before it refits), then
    centred to mean 0, std 1 over the valid steps (rllab's center_adv). Returns A (N, T) and the refitted
    baseline weights."""
    batch = valid_only(batch)
    ret = discounted_returns(batch.reward, batch.mask, gamma)
    feats = baseline_features(batch.obs[..., skip:], batch.mask)
    adv = (ret - feats @ baseline_w) * batch.mask
    n = jnp.maximum(batch.mask.sum(), 1.0)
    mean = adv.sum() / n
    std = jnp.sqrt(((adv - mean) ** 2 * batch.mask).sum() / n)
    return (adv - mean) / (std + 1e-8) * batch.mask, fit_baseline(feats, ret, batch.mask)


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


def trpo_step(policy: Policy, params, batch: Batch, adv, skip: int, args: Args):
    """One natural-gradient step on the surrogate S = mean ratio A with a KL-checked line search."""
    flat, unravel = ravel_pytree(params)
    batch, adv = valid_only(batch), jnp.where(batch.mask > 0, adv, 0.0)
    obs, n = batch.obs[..., skip:], jnp.maximum(batch.mask.sum(), 1.0)
    mean_old, log_std_old = jax.lax.stop_gradient(policy.apply(params, obs))
    logp_old = gaussian_log_prob(mean_old, log_std_old, batch.action)

    def surrogate_and_kl(f):
        mean, log_std = policy.apply(unravel(f), obs)
        ratio = jnp.exp(gaussian_log_prob(mean, log_std, batch.action) - logp_old)
        kl = gaussian_kl(mean_old, log_std_old, mean, log_std)  # KL(old || new), (N, T)
        return (ratio * adv * batch.mask).sum() / n, (kl * batch.mask).sum() / n

    surr_old, g = jax.value_and_grad(lambda f: surrogate_and_kl(f)[0])(flat)
    kl_grad = jax.grad(lambda f: surrogate_and_kl(f)[1])

    def fisher_vector_product(v):
        # F v as the Hessian of the mean KL at the old policy times v (forward-over-reverse): the KL is zero with
        # zero gradient there, so its Hessian is the Fisher information; F is never formed.
        return jax.jvp(kl_grad, (flat,), (v,))[1] + args.cg_damping * v

    x = conjugate_gradient(fisher_vector_product, g, args.cg_iters)  # x ~ F^-1 g
    step = jnp.sqrt(2 * args.max_kl / (x @ fisher_vector_product(x) + 1e-8)) * x  # 1/2 s^T F s = delta

    def tried(i):  # try i: step fraction ratio^i
        coef = args.backtrack_ratio ** i
        return (coef, *surrogate_and_kl(flat + coef * step))

    ok = lambda surr, kl: (kl <= args.max_kl) & (surr > surr_old) & jnp.isfinite(surr)
    _, coef, surr, kl = jax.lax.while_loop(lambda c: (c[0] < args.backtrack_steps - 1) & ~ok(c[2], c[3]),
                                           lambda c: (c[0] + 1, *tried(c[0] + 1)), (0, *tried(0)))
    accepted = ok(surr, kl)
    coef = jnp.where(accepted, coef, 0.0)  # rllab rejects the step when no try passes
    info = {"surrogate_gain": jnp.where(accepted, surr - surr_old, 0.0), "kl": jnp.where(accepted, kl, 0.0),
            "step_coef": coef}
    return unravel(flat + coef * step), info


@partial(jax.jit, static_argnames=("task", "cfg", "policy", "args"))
def trpo_iteration(task: Task, cfg, policy: Policy, args: Args, params, baseline_w, model, start_pool, key):
    """[4] + [5] as one program: N imagined trajectories from initial states drawn from start_pool, advantages,
    one TRPO step. Returns the new params, baseline weights and metrics."""
    k_start, k_roll = jax.random.split(key)
    starts = start_pool[jax.random.randint(k_start, (trajectories(args, task.dims),), 0, start_pool.shape[0])]
    batch = imagine(task, cfg, policy, params, model, starts, k_roll)
    adv, baseline_w = advantages(batch, task.dims.skip, baseline_w, args.gamma)
    params, info = trpo_step(policy, params, batch, adv, task.dims.skip, args)
    info["imagined_return"] = batch.reward.sum(1).mean()
    info["entropy"] = jnp.sum(params["params"]["log_std"] + 0.5 * jnp.log(2 * jnp.pi * jnp.e))
    return params, baseline_w, info


@partial(jax.jit, static_argnames=("task", "cfg", "policy", "args"))
def bptt_iteration(task: Task, cfg, policy: Policy, args: Args, params, opt_state, model, start_pool, key):
    """[5] bptt: one Adam step (gradient norm clipped at 10) on minus the mean over models of the T-step return
    of the deterministic policy from bptt_batch fresh initial states (thanard/me-trpo, algo "bptt")."""
    starts = start_pool[jax.random.randint(key, (args.bptt_batch,), 0, start_pool.shape[0])]
    loss_fn = lambda p: -per_model_returns(task, cfg, policy, p, model, starts, args.gamma).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = bptt_optimizer(args).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"imagined_return": -loss}


def bptt_optimizer(args: Args):
    return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(args.bptt_lr))


@partial(jax.jit, static_argnames=("task", "cfg", "policy", "gamma"))
def validation_check(task: Task, cfg, policy: Policy, gamma: float, params, model, starts):
    """[6] mean T-step return of the deterministic policy under each model from the fixed starts: (K,)."""
    return per_model_returns(task, cfg, policy, params, model, starts, gamma).mean(1)


# ----------------------------------------------------------------------------
# [6] The stopping rule
# ----------------------------------------------------------------------------
def check_passes(reference, returns, worse_fraction: float) -> bool:
    """A check passes unless the return dropped for more than worse_fraction of the models (the authors'
    `stop_critereon`, mode 'vector': fail when mean(cost_new > cost_old) > percent_models_threshold)."""
    return bool(np.mean(np.asarray(returns) < np.asarray(reference)) <= worse_fraction)


class StoppingRule:
    """The policy phase's bookkeeping: reference returns per model, the last saved policy and its iteration.
    A passing check replaces ALL the reference returns (the authors' `whole: true`)."""

    def __init__(self, params, reference, args: Args):
        self.best, self.reference, self.best_iter, self.args = params, np.asarray(reference), 0, args

    def check(self, it: int, params, returns) -> bool:
        passed = not self.args.stopping_rule or check_passes(self.reference, returns, self.args.worse_fraction)
        if passed:
            self.best, self.reference, self.best_iter = params, np.asarray(returns), it
        return passed

    def should_stop(self, it: int) -> bool:
        return self.args.stopping_rule and it - self.best_iter >= self.args.policy_patience


def policy_phase(task: Task, cfg, policy: Policy, args: Args, params, baseline_w, model, start_pool, val_starts,
                 key, step: int, timed):
    """[3]-[6]: policy iterations on the current models until the stopping rule ends them. Returns the last
    saved policy, the baseline weights, the key and the phase's metrics."""
    params = with_log_std(params, args.init_std)  # [3]
    opt_state = bptt_optimizer(args).init(params)  # bptt: Adam restarts every phase, as the authors'
    rule = StoppingRule(params, validation_check(task, cfg, policy, args.gamma, params, model, val_starts), args)
    info, checks, passes = {}, 0, 0
    for it in range(1, args.max_policy_iters + 1):
        key, sub = jax.random.split(key)
        with timed("policy_iteration"):
            if args.policy_update == "trpo":
                params, baseline_w, info = trpo_iteration(task, cfg, policy, args, params, baseline_w, model,
                                                          start_pool, sub)
            else:
                params, opt_state, info = bptt_iteration(task, cfg, policy, args, params, opt_state, model,
                                                         start_pool, sub)
            info = jax.device_get(info)
        check_finite(step, unit="real step", **{f"policy/{k}": v for k, v in info.items()})
        if it % args.check_every == 0:
            with timed("validation_check"):
                returns = np.asarray(validation_check(task, cfg, policy, args.gamma, params, model, val_starts))
            checks, passes = checks + 1, passes + rule.check(it, params, returns)
            if rule.should_stop(it):
                break
    metrics = {"policy/iterations": it, "policy/best_iteration": rule.best_iter, "policy/checks": checks,
               "policy/passed_checks": passes, "policy/model_return": float(np.mean(rule.reference)),
               **{f"policy/{k}": float(v) for k, v in info.items()}}
    return rule.best, baseline_w, key, metrics


# ----------------------------------------------------------------------------
# [1] Real data with exploration noise, [2] the models
# ----------------------------------------------------------------------------
def perturbed(params, change, scale: float, rng: np.random.Generator):
    """[1] The mean network's weights plus scale x |change| x N(0, 1) per weight, change the last policy phase's
    update (thanard/me-trpo `prepare_policy`, param_noise); the log-std is left alone."""
    def noisy(path, p, c):
        if path[-1].key == "log_std":
            return p
        return p + scale * np.abs(c) * rng.standard_normal(p.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(noisy, params, change)


@partial(jax.jit, static_argnames=("policy", "skip"))
def policy_mean(policy: Policy, skip: int, params, obs):
    return policy.apply(params, obs[skip:])[0]


def collect(env, policy: Policy, params, change, args: Args, dims: Dims, rng: np.random.Generator, to_env):
    """[1] Whole trajectories until steps_per_iteration steps: each with its own perturbed weights (none before
    the first policy phase), actions clip(mu(s) + action_noise U(0, 1) eps, -1, 1) with U drawn every step
    (thanard/me-trpo `sample_trajectories`, vary_trajectory_noise). Returns per-trajectory lists of arrays
    (obs, action, next_obs) and the undiscounted returns."""
    trajs, returns, steps = [], [], 0
    while steps < args.steps_per_iteration:
        p = params if change is None else perturbed(params, change, args.param_noise, rng)
        obs, _ = env.reset()
        rows, ret, done = [], 0.0, False
        while not done:
            mean = np.asarray(policy_mean(policy, dims.skip, p, jnp.asarray(obs, jnp.float32)))
            noise = args.action_noise * rng.uniform() * rng.standard_normal(dims.act_dim)
            a = np.clip(mean + noise, -1.0, 1.0).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(to_env(a))
            rows.append((obs, a, next_obs))
            ret, obs, done = ret + float(reward), next_obs, terminated or truncated
        trajs.append(rows)
        returns.append(ret)
        steps += len(rows)
    return trajs, returns


class Dataset(NamedTuple):
    """D (train) and D_val as fixed-capacity first-in-first-out arrays of model inputs x = (s without positions,
    a) and targets y = s' - s; n rows are valid, `at` is the next row to overwrite."""

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    at: np.ndarray

    @staticmethod
    def create(capacity, in_dim, out_dim):
        return Dataset(np.zeros((capacity, in_dim), np.float32), np.zeros((capacity, out_dim), np.float32),
                       np.int64(0), np.int64(0))

    def add(self, x, y):
        cap = len(self.x)
        x, y = x[-cap:], y[-cap:]
        idx = (int(self.at) + np.arange(len(x))) % cap
        X, Y = self.x.copy(), self.y.copy()
        X[idx], Y[idx] = x, y
        return Dataset(X, Y, np.int64(min(int(self.n) + len(x), cap)), np.int64((int(self.at) + len(x)) % cap))

    def rows(self):
        return self.x[: int(self.n)], self.y[: int(self.n)]


def split_new_data(trajs, fraction: float, skip: int):
    """[1] All new transitions in trajectory order as (x, y); the first round(fraction x n) go to D_val, the rest
    to D (the authors' splitting_mode "trajectory" with use_same_dataset)."""
    obs, act, nxt = (np.asarray([r[i] for traj in trajs for r in traj], np.float32) for i in range(3))
    x, y = np.concatenate([obs[:, skip:], act], 1), nxt - obs
    n_val = int(round(fraction * len(x)))
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def draw_starts(env, n: int) -> np.ndarray:
    """n initial states from the env's own reset distribution: (n, obs_dim)."""
    return np.stack([env.reset()[0] for _ in range(n)]).astype(np.float32)


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
def resolve(args: Args) -> Args:
    """Fill the fields left None with the authors' values for --env-id."""
    paper = PAPER_CONFIGS[args.env_id]
    filled = {k: paper[k] for k in ("horizon", "model_hidden") if getattr(args, k) is None}
    if args.reward_clip is None and paper["reward_clip"] is not None:
        filled["reward_clip"] = paper["reward_clip"]
    return dataclasses.replace(args, **filled)


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
    return Task(OBS_REWARD_FUNCTIONS[args.env_id], OBS_TERMINATION_FUNCTIONS[args.env_id], to_env,
                args.reward_clip, dims)


def validate(args: Args) -> None:
    """One-line errors for settings that cannot work, before anything heavy."""
    check_ranges(args, at_least_1=("steps_per_iteration", "horizon", "model_hidden", "ensemble_size",
                                   "model_batch_size", "model_patience", "model_eval_every", "model_max_passes",
                                   "max_train_rows", "max_validation_rows", "policy_hidden", "imagined_steps",
                                   "cg_iters", "backtrack_steps", "bptt_batch", "max_policy_iters", "check_every",
                                   "policy_patience", "validation_starts"),
                 non_negative=("reinit_every", "action_noise", "param_noise", "cg_damping"),
                 positive=("model_lr", "init_std", "max_kl", "bptt_lr", "reward_clip"),
                 probability=("worse_fraction",), discount=("gamma",), open_unit=("validation_fraction",
                                                                                   "backtrack_ratio"))
    check_env_id(args.env_id)
    env = make_task_env(args.env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"ME-TRPO needs a continuous (Box) action space; '{args.env_id}' has {env.action_space}")
    if args.env_id not in PAPER_CONFIGS:
        fail(f"ME-TRPO needs a known reward for --env-id; '{args.env_id}' has none (known: "
             f"{', '.join(PAPER_CONFIGS)}; add one to common/envs/model_fns.py)")
    if args.capture_video:
        check_video_support(args.env_id)
    a = resolve(args)
    if args.total_timesteps < a.steps_per_iteration:
        fail(f"--total-timesteps ({args.total_timesteps}) must be at least --steps-per-iteration "
             f"({a.steps_per_iteration})")
    if a.steps_per_iteration * (1 - a.validation_fraction) < 1 or a.steps_per_iteration * a.validation_fraction < 0.5:
        fail(f"--steps-per-iteration {a.steps_per_iteration} with --validation-fraction {a.validation_fraction} "
             "leaves no training or no validation rows")
    if a.policy_patience < a.check_every and a.stopping_rule:
        fail(f"--policy-patience ({a.policy_patience}) must be at least --check-every ({a.check_every})")
    obs_dim = env.observation_space.shape[0]
    rows = a.max_train_rows + a.max_validation_rows
    check_memory(2 * rows * 4 * (3 * obs_dim + env.action_space.shape[0]), f"D + D_val ({rows} rows)",
                 "lower --max-train-rows or --max-validation-rows")


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
    rng = np.random.default_rng(args.seed)  # exploration noise
    params = policy.init(k_pol, jnp.zeros((1, dims.obs_dim - dims.skip)))
    start_env = make_task_env(args.env_id)
    start_env.reset(seed=args.seed + 20_000)
    # [4] starts of imagined rollouts: a pool of draws from the env's initial-state distribution (sampled inside
    # the jitted iteration); [6] the fixed starts of the validation check (the authors' validation_init).
    start_pool, val_starts = draw_starts(start_env, 10_000), draw_starts(start_env, args.validation_starts)
    env.action_space.seed(args.seed)
    eval_env.reset(seed=args.seed + 10_000)
    env.reset(seed=args.seed)
    n_feat = 2 * (dims.obs_dim - dims.skip) + 4
    state = run.restore(dict(
        params=params, change=jax.tree.map(jnp.zeros_like, params), has_change=np.bool_(False),
        model=ens.create(cfg, k_model), baseline_w=jnp.zeros(n_feat), key=key, rng=numpy_rng_state(rng),
        train=Dataset.create(args.max_train_rows, cfg.in_dim, cfg.out_dim)._asdict(),
        val=Dataset.create(args.max_validation_rows, cfg.in_dim, cfg.out_dim)._asdict(),
        env=env_state(env), eval_env=env_state(eval_env), iteration=np.int64(0)))
    params, change, model, baseline_w, key = (state[k] for k in ("params", "change", "model", "baseline_w", "key"))
    has_change, iteration = bool(state["has_change"]), int(state["iteration"])
    train, val = (Dataset(*(np.asarray(state[s][f]) for f in Dataset._fields)) for s in ("train", "val"))
    set_numpy_rng_state(rng, state["rng"])
    set_env_state(env, state["env"])
    set_env_state(eval_env, state["eval_env"])
    del state

    def checkpoint():
        return dict(params=params, change=change, has_change=np.bool_(has_change), model=model,
                    baseline_w=baseline_w, key=key, rng=numpy_rng_state(rng), train=train._asdict(),
                    val=val._asdict(), env=env_state(env), eval_env=env_state(eval_env),
                    iteration=np.int64(iteration))

    policy_det = lambda o: to_env_np(np.clip(np.asarray(policy_mean(policy, dims.skip, params,
                                                                    jnp.asarray(o, jnp.float32))), -1, 1))
    for phase in ("collect", "model_train", "policy_iteration", "validation_check", "eval"):
        run.timings.setdefault(phase, 0.0)
    progress = Progress(f"ME-TRPO ({args.policy_update}, {args.ensemble_size} models) on {args.env_id}",
                        args.total_timesteps, start=run.start_step, every=args.eval_interval,
                        compiling="the imagined rollouts, the TRPO step and the models")
    history, step, t0 = [], run.start_step, time.time()
    while step < args.total_timesteps:
        iteration += 1
        # [1] Real trajectories with exploration noise; the first third (trajectory order) to D_val
        with run.timed("collect"):
            trajs, train_returns = collect(env, policy, params, change if has_change else None, args, dims, rng,
                                           to_env_np)
        previous, step = step, step + sum(len(t) for t in trajs)
        (x_tr, y_tr), (x_val, y_val) = split_new_data(trajs, args.validation_fraction, dims.skip)
        train, val = train.add(x_tr, y_tr), val.add(x_val, y_val)

        # [2] Fit the models on D, early-stopped on D_val; fresh weights every reinit_every iterations, a fresh
        # Adam state at every fit (thanard/me-trpo `optimize_models`)
        with run.timed("model_train"):
            key, k_init = jax.random.split(key)
            if iteration == 1 or (args.reinit_every > 0 and (iteration - 1) % args.reinit_every == 0):
                model = ens.create(cfg, k_init)
            model = model._replace(opt_state=ens.optimizer(cfg).init(model.params))
            model, model_info = ens.train(cfg, model, *train.rows(), rng, max_epochs=args.model_max_passes,
                                          holdout=val.rows())
        check_finite(step, unit="real step", **{"model/validation_mse": model_info["holdout_mse"]})

        # [3]-[6] Policy iterations on imagined data until the stopping rule ends them
        old = params
        params, baseline_w, key, policy_metrics = policy_phase(
            task, cfg, policy, args, params, baseline_w, model, jnp.asarray(start_pool), jnp.asarray(val_starts),
            key, step, run.timed)
        # The parameter noise's scale: this phase's change of the mean network, kept from an earlier phase if
        # this one changed nothing (thanard/me-trpo `train_models`: diff_weights updates only on a change).
        delta = {"params": {k: v for k, v in jax.tree.map(lambda a, b: a - b, params, old)["params"].items()
                            if k != "log_std"}}
        if any(bool(jnp.any(d != 0)) for d in jax.tree.leaves(delta)):
            change = {"params": dict(delta["params"], log_std=jnp.zeros_like(params["params"]["log_std"]))}
            has_change = True

        if step // args.eval_interval > previous // args.eval_interval or step >= args.total_timesteps:
            # [7] Deterministic evaluation in the real env
            with run.timed("eval"):
                eval_returns = episode_returns(eval_env, policy_det, args.eval_episodes)
            row = {"eval/return": float(eval_returns.mean()), "eval/return_std": float(eval_returns.std()),
                   "train/episode_return": float(np.mean(train_returns)), "iteration": iteration,
                   "model/validation_mse": float(np.mean(model_info["holdout_mse"])),
                   "model/passes": model_info["epochs"], **policy_metrics,
                   "sps": (step - run.start_step) / (time.time() - t0),
                   **{f"time/{k}": v for k, v in run.timings.items()}}
            run.log(row, step, echo=False)
            progress.update(step, row, ["eval/return", "train/episode_return", "model/validation_mse",
                                        "policy/iterations", "policy/model_return"])
            history.append({"step": step, "time": time.time() - t0, **row})
        if run.checkpoint_due(step, previous):
            run.save(checkpoint(), step)

    if run.start_step < step:
        run.save(checkpoint(), step)
    if history:
        progress.done("eval/return", history[-1]["eval/return"],
                      reference=f"the exploring initial policy's episodes: {history[0]['train/episode_return']:.1f}")
    if args.save_model:
        save_checkpoint(run.dir / "me_trpo.msgpack", {"policy": params, "model": model.params,
                                                       "model_norm": model.norm})
    if args.capture_video:
        record_video(make_task_env(args.env_id, args.horizon, render_mode="rgb_array"), policy_det,
                     run.dir / "videos")
    run.close()
    return {"history": history, "timings": dict(run.timings), "wall_seconds": time.time() - t0,
            "run_dir": str(run.dir)}


if __name__ == "__main__":
    cli(Args, main)
