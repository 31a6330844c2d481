"""MBPO: Model-Based Policy Optimization (Janner, Fu, Zhang & Levine, 2019).

Paper: "When to Trust Your Model: Model-Based Policy Optimization", NeurIPS 2019,
https://arxiv.org/abs/1906.08253 (Alg. 2; configurations from jannerm/mbpo,
`examples/config/<env>/0.py`). CS 285 (Levine), "Model-Based Policy Learning",
part 2: short model rollouts branched from real states ("Dyna-style").

What is here: a probabilistic ensemble of dynamics models (common/ensembles.py:
7 Gaussian MLPs, 5 elites, holdout early stopping) retrained every 250 env
steps; k-step model rollouts branched from states of the real replay buffer,
with the paper's rollout-length schedule and known termination functions
(common/envs/model_fns.py); SAC (twin Q, target networks, automatic entropy
tuning) updated G times per env step on minibatches mixing real data (fraction
real_ratio) and model data. What is left out: the paper's model-error and
return-discrepancy analyses (Sec. 4), and learned termination or reward-free
variants.

Run:
    python -m algos.mbpo                                  # InvertedPendulum-v5, 6k steps: solved at 5k; 8 min, loaded
    python -m algos.mbpo --total-timesteps 20000          # the paper's InvertedPendulum budget
    python -m algos.mbpo --env-id Hopper-v5 --total-timesteps 125000   # the paper's Hopper config and budget
    python -m algos.mbpo --env-id HalfCheetah-v5 --num-updates 40
    python -m algos.mbpo --resume runs/<run>              # continue a run from its last checkpoint

Algorithm (Alg. 2 of the paper; the numbers mark the code below):
    [1] fill the real buffer D_env with `random_steps` uniformly random actions
    for each env step t:
      every model_train_freq steps, the model phase:
        [2] train the ensemble p_theta on D_env by maximum likelihood
            (holdout early stopping, elites)                             (line 3)
        [3] branch M = rollout_batch_size rollouts of length k(epoch) from
            states drawn uniformly from D_env, using the policy and a random
            elite per step; add them to D_model                    (lines 6-8)
      [4] take an action in the real env with pi_phi; add it to D_env    (line 5)
      [5] G SAC updates on minibatches of real_ratio D_env + (1 - real_ratio)
          D_model: critic (Eq. below), actor, temperature, target nets (line 10)
      [6] every eval_interval steps: evaluate the deterministic policy tanh(mu(s))

SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications"):
    y       = r + gamma (1 - terminated) [min_i Q_targ_i(s', a') - alpha log pi(a'|s')],  a' ~ pi(.|s')
    L_Q     = sum_i 1/2 E[(Q_i(s, a) - y)^2]
    L_pi    = E[alpha log pi(a|s) - min_i Q_i(s, a)],  a = tanh(mu + sigma eps) (reparameterised)
    L_alpha = -E[log alpha (log pi(a|s) + H_target)]   -> entropy pulled towards H_target
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from common import ensembles as ens
from common.buffers import ReplayBuffer
from common.checkpoints import env_state, numpy_rng_state, save_checkpoint, set_env_state, set_numpy_rng_state
from common.checks import check_finite, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import check_env_id, make_env
from common.envs.model_fns import TERMINATION_FUNCTIONS, TRUNCATED_OBS_KWARGS, never_terminated
from common.experiment import CommonArgs, Run, check_video_support, episode_returns, record_video, seed_everything
from common.progress import Progress

# The paper's per-env settings (jannerm/mbpo examples/config/*/0.py): G updates per env
# step, SAC target entropy, rollout-length schedule [start epoch, end epoch, min k, max k],
# env steps per epoch, random initial steps, model width, and the paper's step budget.
# The docstrings of the None-defaulted Args fields below repeat these numbers for --help
# (tests/test_mbpo.py checks that they agree).
PAPER_CONFIGS = {
    "InvertedPendulum-v5": dict(num_updates=10, target_entropy=-0.05, rollout_schedule=(1, 15, 1, 1),
                                epoch_length=250, random_steps=500, model_hidden=200, budget=20_000),
    "Hopper-v5": dict(num_updates=20, target_entropy=-1.0, rollout_schedule=(20, 150, 1, 15),
                      epoch_length=1000, random_steps=5000, model_hidden=200, budget=125_000),
    "Walker2d-v5": dict(num_updates=20, target_entropy=-3.0, rollout_schedule=(20, 150, 1, 1),
                        epoch_length=1000, random_steps=5000, model_hidden=200, budget=300_000),
    "HalfCheetah-v5": dict(num_updates=40, target_entropy=-3.0, rollout_schedule=(20, 150, 1, 1),
                           epoch_length=1000, random_steps=5000, model_hidden=200, budget=400_000),
    "Ant-v5": dict(num_updates=20, target_entropy=-4.0, rollout_schedule=(20, 100, 1, 25),
                   epoch_length=1000, random_steps=5000, model_hidden=200, budget=300_000),
    "Humanoid-v5": dict(num_updates=20, target_entropy=-2.0, rollout_schedule=(20, 300, 1, 25),
                        epoch_length=1000, random_steps=5000, model_hidden=400, budget=300_000),
}
# The paper's Fig. 2 at its budget (read off the plot; docs/mbpo.md), for the summary line.
PUBLISHED_RETURNS = {"InvertedPendulum-v5": "1000 is the maximum; the paper reaches it by 20k steps",
                     "Hopper-v5": "paper: about 3300 at 125k", "Walker2d-v5": "paper: about 4500 at 300k",
                     "HalfCheetah-v5": "paper: about 10000 at 400k", "Ant-v5": "paper: 5000-6000 at 300k",
                     "Humanoid-v5": "paper: about 6000 at 300k"}
OTHER_ENV = dict(num_updates=20, target_entropy=None, rollout_schedule=(20, 150, 1, 1), epoch_length=1000,
                 random_steps=5000, model_hidden=200, budget=None)  # target entropy None: -act_dim


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "InvertedPendulum-v5"
    """gymnasium env with a Box action space; the paper's settings are used for InvertedPendulum,
    Hopper, Walker2d, HalfCheetah, Ant and Humanoid (-v5), generic ones otherwise"""
    total_timesteps: int = 6_000
    """real env steps, random ones included. The default solves InvertedPendulum-v5: eval return
    1000 by step 3k-5k in each seed of benchmarks/mbpo.py, 4-6 minutes into the run on our shared
    2-core CPU, and 6k steps took 8-10 minutes there (load average 3.5-8.7; an earlier default of
    all 10k steps took 16-17 minutes there, load average 4-7). The paper ran 20k; other envs' paper
    budgets are in PAPER_CONFIGS"""
    eval_interval: int = 1000
    """evaluate the deterministic policy every this many env steps"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    # The fields below left None take the paper's value for --env-id (resolve()).
    num_updates: int | None = None
    """G, SAC updates per env step. None: the paper's per env: InvertedPendulum 10, Hopper 20,
    Walker2d 20, HalfCheetah 40, Ant 20, Humanoid 20; other envs 20"""
    target_entropy: float | None = None
    """SAC's target entropy. None: the paper's per env: InvertedPendulum -0.05, Hopper -1,
    Walker2d -3, HalfCheetah -3, Ant -4, Humanoid -2; other envs -act_dim"""
    rollout_schedule: tuple[int, int, int, int] | None = None
    """rollout length k: [start epoch, end epoch, min k, max k], linear in between. None: the
    paper's per env: InvertedPendulum 1 15 1 1, Hopper 20 150 1 15, Walker2d 20 150 1 1,
    HalfCheetah 20 150 1 1, Ant 20 100 1 25, Humanoid 20 300 1 25; other envs 20 150 1 1"""
    epoch_length: int | None = None
    """env steps per epoch of the schedule and of the model buffer. None: the paper's per env:
    InvertedPendulum 250, Hopper 1000, Walker2d 1000, HalfCheetah 1000, Ant 1000, Humanoid 1000;
    other envs 1000"""
    random_steps: int | None = None
    """[1] uniformly random steps before learning. None: the paper's per env: InvertedPendulum 500,
    Hopper 5000, Walker2d 5000, HalfCheetah 5000, Ant 5000, Humanoid 5000; other envs 5000"""
    model_hidden: int | None = None
    """width of the model's hidden layers. None: the paper's per env: InvertedPendulum 200,
    Hopper 200, Walker2d 200, HalfCheetah 200, Ant 200, Humanoid 400; other envs 200"""
    model_train_freq: int = 250
    """[2] retrain the model (and redo the rollouts) every this many env steps"""
    rollout_batch_size: int = 100_000
    """[3] M, model rollouts branched every model_train_freq steps (400 per env step)"""
    model_retain_epochs: int = 1
    """D_model keeps the rollouts of this many epochs"""
    real_ratio: float = 0.05
    """fraction of real data in each SAC minibatch"""
    ensemble_size: int = 7
    """models in the ensemble"""
    num_elites: int = 5
    """elites (lowest holdout error) used for rollouts"""
    model_layers: int = 4
    """hidden layers of each model"""
    model_lr: float = 1e-3
    """Adam step size of the model"""
    model_max_epochs: int | None = None
    """cap on model training epochs per fit (None: holdout early stopping alone, as the paper)"""
    hidden: int = 256
    """width of the two hidden layers of SAC's actor and critics"""
    batch_size: int = 256
    """SAC minibatch size"""
    lr: float = 3e-4
    """Adam step size of actor, critics and temperature"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """target network Polyak averaging rate"""


class Dims(NamedTuple):
    """Sizes read from the env (static, like Args)."""

    obs_dim: int
    act_dim: int


# Derived numbers (of resolved Args: no field None).
def n_real(args: Args) -> int:
    """Real rows per SAC minibatch: int(batch_size * real_ratio), as jannerm/mbpo."""
    return int(args.batch_size * args.real_ratio)


def rollouts_per_epoch(args: Args) -> int:
    """Branches started per epoch: M every model_train_freq steps."""
    return args.rollout_batch_size * args.epoch_length // args.model_train_freq


def model_size(args: Args, k: int) -> int:
    """D_model's size for rollout length k: the transitions of model_retain_epochs epochs
    of rollouts (jannerm/mbpo's pool-size rule)."""
    return args.model_retain_epochs * rollouts_per_epoch(args) * k


def ensemble_config(args: Args, dims: Dims) -> ens.EnsembleConfig:
    """p_theta(r, s' - s | s, a): inputs (s, a), targets (r, s' - s)."""
    return ens.EnsembleConfig(in_dim=dims.obs_dim + dims.act_dim, out_dim=1 + dims.obs_dim,
                              num_members=args.ensemble_size, num_elites=args.num_elites, hidden=args.model_hidden,
                              num_layers=args.model_layers, lr=args.model_lr,
                              shared_logvar_bounds=True, init="jannerm")  # jannerm bnn.py, fc.py


# ----------------------------------------------------------------------------
# Networks and containers
# ----------------------------------------------------------------------------
class Actor(nn.Module):
    """Gaussian policy on pre-tanh actions: (mean, log_std), log_std clipped to [-20, 2]. One output layer of
    2 act_dim units split in two, as jannerm/mbpo's policy (softlearning/policies/gaussian_policy.py); one
    hidden x 2A matmul instead of two hidden x A ones (1-4% of an update here: benchmarks/sac_fusions.py)."""

    act_dim: int
    hidden: int

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(self.hidden)(obs))
        x = nn.relu(nn.Dense(self.hidden)(x))
        mean, log_std = jnp.split(nn.Dense(2 * self.act_dim)(x), 2, axis=-1)
        return mean, jnp.clip(log_std, -20.0, 2.0)


class QNet(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


# Twin critics as one module: params stacked on a leading axis of 2, output (2, B).
TwinQ = nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                axis_size=2)


class SACState(NamedTuple):
    actor: TrainState
    critic: TrainState
    target_params: dict  # critic's target network (Polyak average)
    alpha: TrainState  # params: {"log_alpha": ()}


def create_sac(key, dims: Dims, args: Args) -> SACState:
    k1, k2 = jax.random.split(key)
    actor, critic = Actor(dims.act_dim, args.hidden), TwinQ(args.hidden)
    obs, act = jnp.zeros((1, dims.obs_dim)), jnp.zeros((1, dims.act_dim))
    critic_params = critic.init(k2, obs, act)
    return SACState(
        TrainState.create(apply_fn=actor.apply, params=actor.init(k1, obs), tx=optax.adam(args.lr)),
        TrainState.create(apply_fn=critic.apply, params=critic_params, tx=optax.adam(args.lr)),
        critic_params,
        TrainState.create(apply_fn=None, params={"log_alpha": jnp.zeros(())}, tx=optax.adam(args.lr)),
    )


def sample_action(actor_apply, actor_params, obs, key):
    """a = tanh(u), u ~ N(mu(s), sigma(s)^2), re-parameterised; actions live in [-1, 1]
    (scaled to the env's bounds only at env.step). Returns a (B, A) and log pi(a|s) (B,):
        log pi(a|s) = log N(u) - sum_j log(1 - tanh(u_j)^2),
    with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) (stable for large |u|)."""
    mean, log_std = actor_apply(actor_params, obs)
    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    logp = jnp.sum(-0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)
    logp = logp - jnp.sum(2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u)), -1)
    return jnp.tanh(u), logp


# ----------------------------------------------------------------------------
# [2] + [3] The model phase: fit the ensemble, branch rollouts from real states
# ----------------------------------------------------------------------------
def rollout_length(schedule, epoch: int) -> int:
    """k(epoch): min_k until start epoch, then linear to max_k at end epoch, then
    max_k; rounded down (jannerm/mbpo `_set_rollout_length`)."""
    start, end, min_k, max_k = schedule
    frac = min(max((epoch - start) / max(end - start, 1), 0.0), 1.0)
    return int(min_k + frac * (max_k - min_k))


def schedule_epoch(args: Args, step: int) -> int:
    """The epoch of env step `step` (1-based) for the rollout schedule: epochs count from the end of the random
    steps, as jannerm/mbpo (softlearning's epoch 0 starts after the initial exploration) and mbrl-lib."""
    return max(step - args.random_steps - 1, 0) // args.epoch_length


def model_rollouts(ens_cfg: ens.EnsembleConfig, term_fn, model_state: ens.EnsembleState, actor_apply,
                   actor_params, model_buf: ReplayBuffer, start_obs, k, key):
    """Branch len(start_obs) rollouts of k (traced) steps: a ~ pi(.|s) (stochastic, as
    jannerm/mbpo), (r, s' - s) ~ a random elite's Gaussian, done = term_fn(s, a, s').
    Every live transition goes to D_model (a terminal one with terminated=True);
    a branch that terminates stops there. start_obs (M, obs_dim).
    Returns D_model and `alive` (M,) bool: the branches that never terminated."""

    def body(_, carry):
        buf, obs, alive, key = carry
        key, k_act, k_model = jax.random.split(key, 3)
        action, _ = sample_action(actor_apply, actor_params, obs, k_act)  # (M, A)
        y = ens.sample(ens_cfg, model_state, k_model, ens.make_inputs(obs, action))  # (M, 1 + obs_dim)
        next_obs, reward = ens.split_targets(obs, y)
        done = jax.vmap(term_fn)(obs, action, next_obs)  # (M,) bool
        buf = buf.add_masked(dict(obs=obs, action=action, reward=reward, next_obs=next_obs,
                                  terminated=done.astype(jnp.float32)), alive)
        return buf, next_obs, alive & ~done, key

    m = start_obs.shape[0]
    buf, _, alive, _ = jax.lax.fori_loop(0, k, body, (model_buf, start_obs, jnp.ones(m, bool), key))
    return buf, alive


rollout_phase = jax.jit(model_rollouts, static_argnames=("ens_cfg", "term_fn", "actor_apply"),
                        donate_argnames=("model_buf",))


def model_phase(args: Args, dims: Dims, term_fn, model: ens.EnsembleState, actor: TrainState,
                real_buf: ReplayBuffer, model_buf: ReplayBuffer, rng: np.random.Generator, k_start, k_roll,
                step: int, timed=lambda phase: contextlib.nullcontext()):
    """[2] Fit p_theta to all of D_env (Alg. 2, line 3), then [3] branch M rollouts of
    length k(epoch) from states of D_env into D_model (lines 6-8). `rng` drives the
    model's holdout split and bootstraps; `timed(phase)` times each half.
    Returns the ensemble, D_model, D_model's current size and the phase's metrics."""
    cfg = ensemble_config(args, dims)
    with timed("model_train"):
        n = int(real_buf.size)
        data = jax.tree.map(lambda x: np.asarray(x)[:n], real_buf.data)  # NumPy: no XLA op per data size
        x = ens.make_inputs(data["obs"], data["action"])  # (N, obs_dim + act_dim)
        y = ens.make_targets(data["obs"], data["reward"], data["next_obs"])  # (N, 1 + obs_dim)
        model, info = ens.train(cfg, model, np.asarray(x), np.asarray(y), rng, max_epochs=args.model_max_epochs)
    check_finite(step, **{"model/holdout_mse": info["holdout_mse"]})
    with timed("rollouts"):
        k = rollout_length(args.rollout_schedule, schedule_epoch(args, step))
        start = real_buf.sample(k_start, args.rollout_batch_size)["obs"]  # (M, obs_dim)
        model_buf, alive = rollout_phase(cfg, term_fn, model, actor.apply_fn, actor.params, model_buf, start, k,
                                         k_roll)
        jax.block_until_ready(model_buf)
    metrics = dict(holdout_mse=np.float64(info["elite_holdout_mse"]), epochs=np.int64(info["epochs"]),
                   rollout_length=np.int64(k), alive_fraction=np.float64(float(alive.mean())))
    return model, model_buf, model_size(args, k), metrics


# ----------------------------------------------------------------------------
# [4] The real env, [5] SAC updates
# ----------------------------------------------------------------------------
def transition(obs, action, reward, next_obs, terminated) -> dict:
    """What D_env stores. `truncated` is deliberately absent: a time-limit cut is not
    terminal, so bootstrapping continues through it (see soft_target)."""
    f32 = lambda x: np.asarray(x, np.float32)
    return dict(obs=f32(obs), action=f32(action), reward=f32(reward), next_obs=f32(next_obs),
                terminated=f32(terminated))


@partial(jax.jit, donate_argnames=("real_buf",))
def store(real_buf: ReplayBuffer, transition: dict):
    """[1], [4] D_env <- D_env + {(s, a, r, s', terminated)} (donated: written in place)."""
    return real_buf.add(jax.tree.map(lambda x: x[None], transition))


@partial(jax.jit, static_argnames=("actor_apply", "deterministic"))
def act(actor_apply, actor_params, obs, key, deterministic: bool = False):
    """pi(.|s) for one observation: a sample, or tanh(mu(s)) for evaluation."""
    if deterministic:
        return jnp.tanh(actor_apply(actor_params, obs)[0])
    return sample_action(actor_apply, actor_params, obs, key)[0]


def soft_target(reward, terminated, next_q, next_logp, alpha, gamma):
    """y = r + gamma (1 - terminated) (min_i Q_targ_i(s', a') - alpha log pi(a'|s')).
    Only termination cuts the bootstrap: at a time-limit truncation the state is
    not terminal and its value is still that of the next state."""
    return reward + gamma * (1.0 - terminated) * (next_q - alpha * next_logp)


def sac_update(args: Args, state: SACState, batch: dict, key):
    """One SAC step on a minibatch (B rows): critic, then actor, then temperature
    (with the alpha of the start of the step), then the target critics."""
    actor, critic = state.actor, state.critic
    alpha = jnp.exp(state.alpha.params["log_alpha"])
    k1, k2 = jax.random.split(key)

    next_a, next_logp = sample_action(actor.apply_fn, actor.params, batch["next_obs"], k1)
    next_q = critic.apply_fn(state.target_params, batch["next_obs"], next_a).min(0)  # (B,)
    y = jax.lax.stop_gradient(soft_target(batch["reward"], batch["terminated"], next_q, next_logp, alpha,
                                          args.gamma))

    def critic_loss(params):
        q = critic.apply_fn(params, batch["obs"], batch["action"])  # (2, B)
        return 0.5 * ((q - y) ** 2).mean(1).sum(), q.mean()

    (q_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(critic.params)
    critic = critic.apply_gradients(grads=grads)

    def actor_loss(params):
        a, logp = sample_action(actor.apply_fn, params, batch["obs"], k2)  # re-parameterised
        q = critic.apply_fn(critic.params, batch["obs"], a).min(0)
        return (alpha * logp - q).mean(), logp

    (pi_loss, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(actor.params)
    actor = actor.apply_gradients(grads=grads)

    def alpha_loss(params):  # gradient sign: alpha grows when entropy -logp < target
        return -(params["log_alpha"] * jax.lax.stop_gradient(logp + args.target_entropy)).mean()

    a_loss, grads = jax.value_and_grad(alpha_loss)(state.alpha.params)
    target = optax.incremental_update(critic.params, state.target_params, args.tau)
    metrics = dict(critic_loss=q_loss, actor_loss=pi_loss, alpha_loss=a_loss, alpha=alpha, q=q_mean,
                   entropy=-logp.mean())
    return SACState(actor, critic, target, state.alpha.apply_gradients(grads=grads)), metrics


@partial(jax.jit, static_argnames=("args",))
def sac_phase(args: Args, state: SACState, real_buf: ReplayBuffer, model_buf: ReplayBuffer, model_size, key):
    """[5] G SAC updates as one lax.scan, each on n_real rows of D_env and B - n_real
    rows of the newest `model_size` rows of D_model. Returns the state and the mean
    metrics over the G updates."""

    def step(state, key):
        k_real, k_model, k_sac = jax.random.split(key, 3)
        real = real_buf.sample(k_real, n_real(args))
        model = model_buf.sample_recent(k_model, args.batch_size - n_real(args), model_size)
        batch = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), real, model)
        return sac_update(args, state, batch, k_sac)

    state, metrics = jax.lax.scan(step, state, jax.random.split(key, args.num_updates))
    return state, jax.tree.map(jnp.mean, metrics)


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
def resolve(args: Args, act_dim: int) -> Args:
    """Fill the fields left None with the paper's values for --env-id."""
    paper = PAPER_CONFIGS.get(args.env_id, OTHER_ENV)
    filled = {name: paper[name] for name in ("num_updates", "target_entropy", "rollout_schedule", "epoch_length",
                                             "random_steps", "model_hidden") if getattr(args, name) is None}
    out = dataclasses.replace(args, **filled)
    if out.target_entropy is None:
        out = dataclasses.replace(out, target_entropy=-float(act_dim))  # the usual SAC heuristic
    return out


def validate(args: Args) -> None:
    """One-line errors for settings that cannot work, before anything heavy."""
    check_ranges(args, at_least_1=("num_updates", "epoch_length", "random_steps", "model_hidden", "model_train_freq",
                                   "rollout_batch_size", "model_retain_epochs", "ensemble_size", "num_elites",
                                   "model_layers", "model_max_epochs", "hidden", "batch_size"),
                 non_negative=("rollout_schedule",), positive=("model_lr", "lr"), probability=("real_ratio",),
                 discount=("gamma",), open_unit=("tau",))
    if args.num_elites > args.ensemble_size:
        fail(f"--num-elites ({args.num_elites}) cannot exceed --ensemble-size ({args.ensemble_size})")
    if args.rollout_schedule is not None:
        start, end, min_k, max_k = args.rollout_schedule
        if min_k < 1 or max_k < min_k or end < start:
            fail(f"--rollout-schedule needs 1 <= min k <= max k and start <= end, got {args.rollout_schedule}")
    check_env_id(args.env_id)
    if args.capture_video:
        check_video_support(args.env_id)
    env = make_env(args.env_id, **TRUNCATED_OBS_KWARGS.get(args.env_id, {}))
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"MBPO (SAC) needs a continuous (Box) action space; '{args.env_id}' has {env.action_space}")
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
        fail(f"MBPO's models need flat (1-D Box) observations; '{args.env_id}' has {env.observation_space}")
    dims = Dims(env.observation_space.shape[0], env.action_space.shape[0])
    a = resolve(args, dims.act_dim)
    if args.total_timesteps <= a.random_steps:
        fail(f"--total-timesteps ({args.total_timesteps}) must exceed --random-steps ({a.random_steps})")
    # Batches against the data they draw from, at the first update: random_steps real
    # rows, and at least M model rows (every branch adds its first step).
    if n_real(a) > a.random_steps:
        fail(f"--batch-size {a.batch_size} x --real-ratio {a.real_ratio} = {n_real(a)} real rows per minibatch, more "
             f"than the {a.random_steps} real rows when learning starts (--random-steps)")
    if a.batch_size - n_real(a) > a.rollout_batch_size:
        fail(f"--batch-size {a.batch_size} asks for {a.batch_size - n_real(a)} model rows per minibatch, more than "
             f"the {a.rollout_batch_size} a model phase adds (--rollout-batch-size)")
    if model_size(a, min_k := a.rollout_schedule[2]) < a.rollout_batch_size:
        fail(f"D_model would hold {model_size(a, min_k)} rows (--model-retain-epochs x --rollout-batch-size x "
             f"--epoch-length / --model-train-freq x k), fewer than the {a.rollout_batch_size} rollouts of one "
             "branch step; raise --epoch-length or --model-retain-epochs")
    # The two buffers (float32 rows of s, a, r, s', terminated), plus one more copy of them
    # while a checkpoint is written (measured: +1x) or read back on --resume.
    row_bytes, d_model = 4 * (2 * dims.obs_dim + dims.act_dim + 2), model_size(a, a.rollout_schedule[3])
    check_memory(2 * (a.total_timesteps + d_model) * row_bytes,
                 f"D_env + D_model ({a.total_timesteps} + {d_model} rows)",
                 "lower --rollout-batch-size, --model-retain-epochs or --total-timesteps")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    env_kwargs = TRUNCATED_OBS_KWARGS.get(args.env_id, {})
    env, eval_env = make_env(args.env_id, **env_kwargs), make_env(args.env_id, **env_kwargs)
    dims = Dims(env.observation_space.shape[0], env.action_space.shape[0])
    args = resolve(args, dims.act_dim)
    run = Run(args)
    progress = Progress(f"MBPO on {args.env_id}", args.total_timesteps, start=run.start_step,
                        every=args.eval_interval, compiling=f"the model and SAC phases (after the "
                        f"{args.random_steps:,} random steps)")
    if args.env_id not in TERMINATION_FUNCTIONS:
        print(f"note: no termination function for {args.env_id}: model rollouts never terminate", flush=True)
    term_fn = TERMINATION_FUNCTIONS.get(args.env_id, never_terminated)
    low, high = env.action_space.low, env.action_space.high
    to_env = lambda a: (low + (np.asarray(a, np.float64) + 1.0) * 0.5 * (high - low)).astype(np.float32)

    # Everything a run needs to continue, as in a fresh run; on --resume, the checkpoint's.
    key = seed_everything(args.seed)
    key, k_model, k_sac = jax.random.split(key, 3)
    rng = np.random.default_rng(args.seed)  # random actions [1], model holdout splits [2]
    env.action_space.seed(args.seed)
    eval_env.reset(seed=args.seed + 10_000)
    obs, _ = env.reset(seed=args.seed)
    example = transition(np.zeros(dims.obs_dim), np.zeros(dims.act_dim), 0.0, np.zeros(dims.obs_dim), 0.0)
    # D_model is allocated once for the largest k; SAC samples from its newest
    # model_size(k_now) rows (ReplayBuffer.sample_recent).
    no_fit_yet = dict(holdout_mse=np.float64(0), epochs=np.int64(0), rollout_length=np.int64(0),
                      alive_fraction=np.float64(0))  # what model_phase returns, before the first one
    state = run.restore(dict(
        sac=create_sac(k_sac, dims, args), model=ens.create(ensemble_config(args, dims), k_model),
        real_buf=ReplayBuffer.create(example, args.total_timesteps),
        model_buf=ReplayBuffer.create(example, model_size(args, args.rollout_schedule[3])),
        model_size=np.int64(0), model_metrics=no_fit_yet, key=key, rng=numpy_rng_state(rng), env=env_state(env),
        obs=np.asarray(obs), ep_return=np.float64(0.0), returns=np.full(10, np.nan), eval_env=env_state(eval_env)))
    sac, model_state, real_buf, model_buf, key = (state[k] for k in ("sac", "model", "real_buf", "model_buf", "key"))
    size, model_metrics = int(state["model_size"]), state["model_metrics"]
    set_numpy_rng_state(rng, state["rng"])
    set_env_state(env, state["env"])
    set_env_state(eval_env, state["eval_env"])
    obs, ep_return = np.asarray(state["obs"]), float(state["ep_return"])
    returns = [float(r) for r in state["returns"] if not np.isnan(r)]  # the last 10 episodes' returns
    del state  # the buffers live in real_buf and model_buf from here on (memory)

    def checkpoint():
        recent = np.full(10, np.nan)
        recent[: len(returns)] = returns
        return dict(sac=sac, model=model_state, real_buf=real_buf, model_buf=model_buf, model_size=np.int64(size),
                    model_metrics=model_metrics, key=key, rng=numpy_rng_state(rng), env=env_state(env),
                    obs=np.asarray(obs), ep_return=np.float64(ep_return), returns=recent,
                    eval_env=env_state(eval_env))

    policy_det = lambda o: to_env(act(sac.actor.apply_fn, sac.actor.params, jnp.asarray(o, jnp.float32), None, True))
    for phase in ("model_train", "rollouts", "sac", "env", "eval"):
        run.timings.setdefault(phase, 0.0)
    history, first_step, t0 = [], run.start_step, time.time()
    for step in range(run.start_step + 1, args.total_timesteps + 1):
        learning = step > args.random_steps
        if learning and (step - args.random_steps - 1) % args.model_train_freq == 0:
            # [2] + [3] Model phase: fit p_theta on D_env, branch k-step rollouts into D_model
            key, k_start, k_roll = jax.random.split(key, 3)
            model_state, model_buf, size, model_metrics = model_phase(
                args, dims, term_fn, model_state, sac.actor, real_buf, model_buf, rng, k_start, k_roll, step,
                run.timed)

        # [4] Act in the real env with the current policy (uniformly random before learning, [1])
        key, k_act = jax.random.split(key)
        if learning:
            action = np.asarray(act(sac.actor.apply_fn, sac.actor.params, jnp.asarray(obs, jnp.float32), k_act))
        else:
            action = rng.uniform(-1.0, 1.0, dims.act_dim).astype(np.float32)
        with run.timed("env"):
            next_obs, reward, terminated, truncated, _ = env.step(to_env(action))
        real_buf = store(real_buf, transition(obs, action, reward, next_obs, terminated))  # ... into D_env
        ep_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            returns = (returns + [ep_return])[-10:]
            ep_return = 0.0
            obs, _ = env.reset()

        if learning:
            # [5] G SAC updates on real_ratio real + rest model data, one lax.scan (Alg. 2, line 10)
            with run.timed("sac"):
                key, k_sac = jax.random.split(key)
                sac, sac_metrics = sac_phase(args, sac, real_buf, model_buf, size, k_sac)
                sac_metrics = jax.device_get(sac_metrics)
            check_finite(step, **{f"sac/{k}": v for k, v in sac_metrics.items()})

        if step % args.eval_interval == 0 or step == args.total_timesteps:
            # [6] Deterministic evaluation
            with run.timed("eval"):
                eval_returns = episode_returns(eval_env, policy_det, args.eval_episodes)
            row = {"eval/return": float(eval_returns.mean()), "eval/return_std": float(eval_returns.std()),
                   "train/episode_return": float(np.mean(returns)) if returns else float("nan"),
                   "sps": (step - first_step) / (time.time() - t0), **{f"time/{k}": v for k, v in run.timings.items()}}
            if size > 0:  # after the first model phase
                row.update({f"model/{k}": v.item() for k, v in model_metrics.items()})
            if learning:
                row.update({f"sac/{k}": float(v) for k, v in sac_metrics.items()})
            run.log(row, step, echo=False)
            progress.update(step, row, ["eval/return", "train/episode_return", "model/holdout_mse",
                                        "model/rollout_length", "sac/critic_loss", "sac/alpha"])
            history.append({"step": step, "time": time.time() - t0, **row})
        if run.checkpoint_due(step):
            run.save(checkpoint(), step)

    if run.start_step < args.total_timesteps:
        run.save(checkpoint(), args.total_timesteps)
    if args.save_model:
        save_checkpoint(run.dir / "mbpo.msgpack", {"actor": sac.actor.params, "critic": sac.critic.params,
                                                     "target": sac.target_params, "alpha": sac.alpha.params,
                                                     "model": model_state.params, "model_norm": model_state.norm,
                                                     "elites": model_state.elites})
    if args.capture_video:
        record_video(make_env(args.env_id, render_mode="rgb_array", **env_kwargs), policy_det, run.dir / "videos")
    if history:
        progress.done("eval/return", history[-1]["eval/return"], reference=PUBLISHED_RETURNS.get(args.env_id))
    run.close()
    return {"history": history, "timings": dict(run.timings), "wall_seconds": time.time() - t0,
            "run_dir": str(run.dir)}


if __name__ == "__main__":
    cli(Args, main)
