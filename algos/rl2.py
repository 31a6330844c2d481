"""RL²: a recurrent policy trained across tasks learns to learn.

Papers:
- Duan, Schulman, Chen, Bartlett, Sutskever, Abbeel 2016, "RL²: Fast
  Reinforcement Learning via Slow Reinforcement Learning",
  https://arxiv.org/abs/1611.02779 (Sec. 2.2 the formulation, Fig. 1; Sec. 3.1
  bandits, Table 1; Sec. 3.2 tabular MDPs, Table 2).
- Wang et al. 2016, "Learning to Reinforcement Learn",
  https://arxiv.org/abs/1611.05763 (the same idea, with A2C).
- CS 285 (Levine), meta-RL lecture: "meta-RL with recurrent policies".

A task (a bandit, an MDP) is drawn from a distribution; the agent interacts
with it for a *trial* of n episodes. The policy is a recurrent network (a GRU)
whose input at each step is (observation, previous action, previous reward,
done flag). Its hidden state is reset at the start of a trial and *kept across
the episode boundaries inside it*, so it can carry what was learnt about the
task (which arm pays, where the rewards are) into the next episode. The
"slow" outer RL algorithm (here PPO; Duan et al. used TRPO) maximises the
total reward of the whole trial; the "fast" RL algorithm it discovers is the
recurrent network's state update. No gradient step happens at test time.

What this file implements: the GRU actor and critic, trial rollouts on pure-
JAX task families (common/jax_envs/: BernoulliBandit* and RandomMDP in
bandits_mdps.py, PointNav2D in navigation.py), GAE over the whole trial, and
PPO (clipped objective, minibatches of whole trials, back-propagation through
the whole trial), with the value targets, trial-start inputs and (as an
option, the benchmark's "duan" recipes) the KL control of Duan et al.'s own
code (rllab-curriculum, sandbox/rocky/neural_learner; docs/rl2.md gives each
detail's source). Everything, sampling included, is jitted: one call per
evaluation period (`run_period`: `lax.scan` over its PPO iterations, `vmap`
over the meta-batch of tasks, `lax.map` over seeds), with a checkpoint
between periods. Left out:
TRPO (PPO is the issue's choice and the usual one since), the paper's
vision-based maze (Sec. 3.3). The hand-written baselines (UCB1, Thompson
sampling, PSRL, ...) live in benchmarks/rl2.py.

Run:
    python -m algos.rl2                                        # 5 arms, n = 10, 512k steps: 6.58 per trial, 65 CPU s
    python -m algos.rl2 --total-timesteps 1024000              # the benchmark's budget for this setting
    python -m algos.rl2 --env-id BernoulliBandit10-v0 --episodes-per-trial 100
    python -m algos.rl2 --env-id RandomMDP-v0 --episodes-per-trial 10
    python -m algos.rl2 --num-seeds 3                          # 3 seeds in each jitted call

Algorithm (numbers mark the code below):
    Initialise the GRU policy pi_theta and value V_phi.
    Repeat for each PPO iteration:
      [1] sample a meta-batch of B tasks M_i ~ p(M)
      [2] for each task, run one trial of n episodes (T = n * H steps):
            h_0 = 0 (reset between trials, never inside one)
            x_t = (obs_t, a_{t-1}, r_{t-1}, d_{t-1})      (no action, r = 0, d = 1 at t = 0)
            h_{t+1}, pi(.|h), V(h) = GRU(h_t, x_t);  a_t ~ pi
            step the env; at the end of an episode reset the env but NOT h
      [3] GAE over the whole trial: an episode boundary is not a terminal
          for the meta-learner (its return runs to the end of the trial)
            V_t = m + s v_t  (the value head v predicts normalised returns)
            delta_t = r_t + gamma V_{t+1} - V_t,  V_T = 0
            A_t = sum_l (gamma lambda)^l delta_{t+l}, normalised over the batch
          value targets (Duan): G_t = sum_l gamma^l r_{t+l} to the trial's end;
            the running moments (m, s) move 90% towards the batch's, y = (G - m) / s
      [4] for K epochs (--update-epochs), for minibatches of whole trials:
            re-run the GRU over each trial from h_0 = 0 (backprop through time),
            L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
                + c_v (v - y)^2 - c_H entropy,  rho = pi_new / pi_old;  Adam step
            (--anneal: the step size and c_H decay linearly to 0 over training)
          with --target-kl (Duan's PPO): keep the epoch with the lowest surrogate
            among those within the mean-KL bound, then halve the policy's step
            while the batch's KL(pi_old || pi) is above it
      [5] every eval_interval env steps: mean total reward per trial on new tasks
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from gymnasium import spaces

from common.checkpoints import save_checkpoint
from common.checks import check_finite_series, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import make_env
from common.experiment import CommonArgs, Run, seed_everything
from common.jax_envs.adapter import func_env_of, is_task_family
from common.progress import Progress


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "BernoulliBandit5-v0"
    """a pure-JAX task family: BernoulliBandit{2,5,10,50}-v0, RandomMDP-v0, PointNav2D-v0"""
    total_timesteps: int = 512_000
    """env steps of training per seed (all tasks together); on 5 arms, n = 10, the trial reward is within a few
    percent of its final value by then (benchmarks/rl2.py's curve); --total-timesteps 1024000 as the benchmark"""
    eval_interval: int = 128_000
    """evaluate on new tasks every this many env steps (rounded to whole PPO iterations)"""
    eval_episodes: int = 1000
    """trials per evaluation, each on a newly sampled task (Duan et al.: 1000)"""
    num_seeds: int = 1
    """independent training runs, in one jitted program"""
    episodes_per_trial: int = 10
    """n, episodes per trial on the same task (hidden state kept across them)"""
    meta_batch: int = 256
    """B, trials (tasks) sampled per PPO iteration"""
    hidden_size: int = 256
    """GRU units of the policy and of the value network (Duan et al.: 256)"""
    learning_rate: float = 1e-3
    """Adam step size"""
    gamma: float = 0.99
    """discount over the whole trial"""
    gae_lambda: float = 0.3
    """GAE lambda (a low value: the value network sees the whole history)"""
    clip_coef: float = 0.2
    """PPO ratio clipping epsilon"""
    ent_coef: float = 0.0
    """entropy bonus coefficient (at the start of training, see --anneal)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, applied to the policy and to the value network separately"""
    grad_clip_value: float = 0.0
    """if > 0, clip each gradient element to [-c, c] instead of the norm clip (Duan et al.'s TBPTTOptimizer: 40)"""
    update_epochs: int = 4
    """PPO epochs over each batch of trials"""
    num_minibatches: int = 4
    """minibatches of whole trials per epoch"""
    value_target: Literal["mc", "gae"] = "mc"
    """what the value network regresses on: "mc", Duan et al.'s Monte-Carlo discounted returns of the trial,
    normalised by a running mean and std (their l2_rnn_baseline); "gae", the GAE(lambda) returns on the raw
    reward scale (this file before issue #22)"""
    return_norm_rate: float = 0.9
    """weight of each new batch in the running mean and std of the returns (Duan: moments_update_rate 0.9)"""
    adv_norm: Literal["batch", "minibatch"] = "batch"
    """normalise the advantages over the whole batch of trials (Duan's sample processor) or per minibatch"""
    target_kl: float = 0.0
    """Duan's KL control if > 0 (his step size 0.01): after the epochs keep the policy of the epoch with the lowest
    surrogate loss among those whose mean KL(pi_old || pi) is at most target_kl, then halve the step back towards
    the old policy (up to --backtracks times) while the batch's mean KL exceeds it; 0: off"""
    backtracks: int = 10
    """most halvings of the policy's step with --target-kl (Duan: max_backtracks 10)"""
    start_done: bool = True
    """the first input of a trial has done = 1, as if an episode had just ended (Duan's MultiEnv.reset); False:
    done = 0 there (this file before issue #22)"""
    anneal: bool = False
    """decay the learning rate and the entropy coefficient linearly to 0 over training"""
    time_input: bool = False
    """also give the GRU the step within the episode, t_ep / H (not in Duan et al.'s inputs)"""
    eval_greedy: bool = False
    """evaluate the most likely action instead of sampling (the policy's own
    randomness is part of the exploration it learnt, so the default samples)"""


class Dims(NamedTuple):
    """The sizes read from the task family (static in the jitted functions)."""

    obs_dim: int  # size of the encoded observation
    discrete_obs: bool
    action_dim: int  # number of actions, or size of a continuous action
    discrete_action: bool
    horizon: int  # H, steps per episode


def dims_of(env) -> Dims:
    obs_space, act_space = env.observation_space, env.action_space
    discrete_obs, discrete_action = isinstance(obs_space, spaces.Discrete), isinstance(act_space, spaces.Discrete)
    return Dims(obs_dim=int(obs_space.n) if discrete_obs else int(np.prod(obs_space.shape)),
                discrete_obs=discrete_obs,
                action_dim=int(act_space.n) if discrete_action else int(np.prod(act_space.shape)),
                discrete_action=discrete_action, horizon=int(env.horizon))


# The numbers derived from Args and Dims.
def trial_len(args: Args, dims: Dims) -> int:
    """T = n * H, steps per trial."""
    return args.episodes_per_trial * dims.horizon


def input_dim(args: Args, dims: Dims) -> int:
    """obs, previous action, previous reward, done flag (, time)."""
    return dims.obs_dim + dims.action_dim + 2 + int(args.time_input)


def steps_per_update(args: Args, dims: Dims) -> int:
    """Env steps of one PPO iteration: B trials of T steps."""
    return args.meta_batch * trial_len(args, dims)


def updates_per_eval(args: Args, dims: Dims) -> int:
    """PPO iterations per evaluation period (at least one)."""
    return max(1, args.eval_interval // steps_per_update(args, dims))


def num_evals(args: Args, dims: Dims) -> int:
    """Evaluation periods of the whole training (at least one)."""
    return max(1, args.total_timesteps // (updates_per_eval(args, dims) * steps_per_update(args, dims)))


def total_grad_steps(args: Args, dims: Dims) -> int:
    """Adam steps over the whole training."""
    return num_evals(args, dims) * updates_per_eval(args, dims) * args.update_epochs * args.num_minibatches


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
class RecurrentActorCritic(nn.Module):
    """Two GRUs reading the same inputs: one for the policy, one for the value.

    Separate networks keep the value regression (targets up to tens or
    hundreds on MDPs) from swamping the policy's features. The carry is both
    hidden states side by side: (..., 2 * hidden_size).
    """

    action_dim: int
    hidden_size: int
    discrete_action: bool

    @nn.compact
    def __call__(self, h, x):
        h_pi, h_v = jnp.split(h, 2, axis=-1)
        h_pi, y_pi = nn.GRUCell(self.hidden_size, name="policy_gru")(h_pi, x)
        h_v, y_v = nn.GRUCell(self.hidden_size, name="value_gru")(h_v, x)
        # logits (discrete) or mean (continuous); small init = near-uniform start
        out = nn.Dense(self.action_dim, kernel_init=nn.initializers.orthogonal(0.01), name="policy")(y_pi)
        value = nn.Dense(1, name="value")(y_v)[..., 0]
        if not self.discrete_action:
            log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
            out = jnp.concatenate([out, jnp.broadcast_to(log_std, out.shape)], axis=-1)
        return jnp.concatenate([h_pi, h_v], axis=-1), out, value


class Categorical(NamedTuple):
    """The policy over discrete actions, from the head's logits (..., A)."""

    logits: jax.Array

    def log_prob(self, a):
        return jnp.take_along_axis(jax.nn.log_softmax(self.logits), a[..., None], -1)[..., 0]

    def entropy(self):
        logp_all = jax.nn.log_softmax(self.logits)
        return -(jnp.exp(logp_all) * logp_all).sum(-1)

    def sample(self, key):
        return jax.random.categorical(key, self.logits)

    def mode(self):
        return jnp.argmax(self.logits, -1)

    def kl(self, other):
        """KL(self || other), exact: sum_a p(a) (log p(a) - log q(a))."""
        logp, logq = jax.nn.log_softmax(self.logits), jax.nn.log_softmax(other.logits)
        return (jnp.exp(logp) * (logp - logq)).sum(-1)


class DiagGaussian(NamedTuple):
    """The policy over continuous actions: mean and log std (..., action_dim)."""

    mean: jax.Array
    log_std: jax.Array

    def log_prob(self, a):
        return (-0.5 * ((a - self.mean) / jnp.exp(self.log_std)) ** 2 - self.log_std
                - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)

    def entropy(self):
        return (self.log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)).sum(-1)

    def sample(self, key):
        return self.mean + jnp.exp(self.log_std) * jax.random.normal(key, self.mean.shape)

    def mode(self):
        return self.mean

    def kl(self, other):
        """KL(self || other) of two diagonal Gaussians, closed form."""
        var, var_o = jnp.exp(2 * self.log_std), jnp.exp(2 * other.log_std)
        return (other.log_std - self.log_std + (var + (self.mean - other.mean) ** 2) / (2 * var_o) - 0.5).sum(-1)


class Trajectory(NamedTuple):
    """One trial (leading axes (T,), or (B, T) for a meta-batch)."""

    x: jax.Array  # (T, input_dim) the GRU inputs, so the loss can re-run it
    action: jax.Array  # (T,) int32 or (T, action_dim)
    logp: jax.Array  # (T,) log pi_old(a_t | h_t)
    dist: jax.Array  # (T, out) pi_old's head output (logits, or mean and log std), for the exact KL
    value: jax.Array  # (T,) the value head's output (in units of the return normaliser with --value-target mc)
    reward: jax.Array  # (T,)
    done: jax.Array  # (T,) bool, an episode ended at this step (not the trial)


class Carry(NamedTuple):
    """One seed's training state (and what the checkpoint holds per seed)."""

    train_state: TrainState  # params, both optimisers' states, the Adam step count (the schedules')
    ret_stats: jax.Array  # (2,) running mean and std of the returns (stay (0, 1) with --value-target gae)
    key: jax.Array


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------
def make_network(args: Args, dims: Dims) -> RecurrentActorCritic:
    return RecurrentActorCritic(dims.action_dim, args.hidden_size, dims.discrete_action)


def distribution(out, dims: Dims) -> Categorical | DiagGaussian:
    """The policy of the head's output: logits, or mean and log std side by side."""
    if dims.discrete_action:
        return Categorical(out)
    return DiagGaussian(*jnp.split(out, 2, axis=-1))


def encode_action(action, dims: Dims) -> jax.Array:
    """An action as a GRU input: one-hot if discrete, the vector itself if continuous."""
    return jax.nn.one_hot(action, dims.action_dim) if dims.discrete_action else jnp.asarray(action, jnp.float32)


def encode_input(obs, prev_action, prev_reward, prev_done, args: Args, dims: Dims, t_ep=0) -> jax.Array:
    """x_t = (obs_t, a_{t-1}, r_{t-1}, d_{t-1}) as one vector (input_dim,) (Duan Sec. 2.2).

    `prev_action` is already encoded (`encode_action`; zeros at the start of a
    trial, when there is no previous action). Discrete observations are
    one-hot. d_{t-1} = 1 says "obs_t is the first observation of a new episode
    of the same task": the network must not forget, but may re-plan. With
    `args.time_input`, t_ep / H (t_ep the step within the episode) is appended:
    the steps left matter to a finite-horizon plan, and the GRU would
    otherwise have to count them itself."""
    o = jax.nn.one_hot(obs, dims.obs_dim) if dims.discrete_obs else jnp.reshape(obs, (dims.obs_dim,))
    extra = [prev_reward, prev_done] + ([jnp.asarray(t_ep) / dims.horizon] if args.time_input else [])
    return jnp.concatenate([o, prev_action, jnp.stack(extra).astype(jnp.float32)])


def rollout_trial(params, env, task, key, args: Args, dims: Dims, greedy: bool = False,
                  record_hidden: bool = False):
    """[2] One trial of n episodes on `task` (T = n * H steps).

    The hidden state starts at zero and is carried through every step of the
    trial, across episode boundaries; only the env is reset when an episode
    ends. Returns a `Trajectory` (T, ...) and, if `record_hidden`, the hidden
    state *entering* each step (T, 2 * hidden_size), for tests.
    """
    net = make_network(args, dims)
    k_init, key = jax.random.split(key)
    state = env.initial(k_init, task)

    def step(carry, _):
        state, obs, h, prev_a, prev_r, prev_d, t_ep, key = carry
        key, k_act, k_env, k_reset = jax.random.split(key, 4)
        x = encode_input(obs, prev_a, prev_r, prev_d, args, dims, t_ep)
        h_next, out, value = net.apply(params, h, x)
        pi = distribution(out, dims)
        a = pi.mode() if greedy else pi.sample(k_act)
        next_state = env.transition(state, a, k_env, task)
        r = env.reward(state, a, next_state, k_env, task).astype(jnp.float32)
        # An episode ends on a terminal state or after H steps of its own (time limit); an env that ends
        # episodes early (PointNav2D at its goal) just starts more of them within the T steps of the trial.
        done = env.terminal(next_state, k_env, task) | (t_ep + 1 == dims.horizon)
        reset = env.initial(k_reset, task)
        next_state = jax.tree.map(lambda a_, b_: jnp.where(done, a_, b_), reset, next_state)
        next_obs = env.observation(next_state, k_env, task)
        traj = Trajectory(x, a, pi.log_prob(a), out, value, r, done)
        next_carry = (next_state, next_obs, h_next, encode_action(a, dims), r, done.astype(jnp.float32),
                      jnp.where(done, 0, t_ep + 1), key)
        return next_carry, (traj, h)

    h0 = jnp.zeros(2 * args.hidden_size)  # reset between trials
    no_action = jnp.zeros(dims.action_dim)  # no previous action at t = 0: zeros, not a one-hot
    # d_{-1} = 1: the trial opens like a new episode (Duan's MultiEnv.reset sets last_terminal = 1)
    init = (state, env.observation(state, k_init, task), h0, no_action, jnp.float32(0.0),
            jnp.float32(args.start_done), jnp.int32(0), key)
    _, (traj, hidden) = jax.lax.scan(step, init, jnp.arange(trial_len(args, dims)))
    return (traj, hidden) if record_hidden else traj


def gae(rewards, values, gamma: float, lam: float):
    """[3] GAE over one whole trial: rewards, values (T,) -> advantages, returns (T,).

    Episode boundaries inside the trial are deliberately *not* cut: for the
    meta-learner the trial is one episode, and exploring in episode 1 pays
    off in episodes 2..n. Only the trial's end is terminal (V_T = 0).
    """
    next_values = jnp.append(values[1:], 0.0)
    deltas = rewards + gamma * next_values - values

    def backward(adv, delta):
        adv = delta + gamma * lam * adv
        return adv, adv

    _, adv = jax.lax.scan(backward, jnp.float32(0.0), deltas, reverse=True)
    return adv, adv + values


def unroll(params, x, args: Args, dims: Dims):
    """Re-run the GRU over trials from h_0 = 0: x (M, T, in) -> out (M, T, .), values (M, T)."""
    net = make_network(args, dims)

    def step(h, x_t):  # x_t (M, in): all trials of the minibatch advance together
        h, out, value = net.apply(params, h, x_t)
        return h, (out, value)

    h0 = jnp.zeros((x.shape[0], 2 * args.hidden_size))
    _, (out, values) = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))  # time-major inside
    return jnp.swapaxes(out, 0, 1), jnp.swapaxes(values, 0, 1)


def discounted_returns(rewards, gamma: float):
    """[3] Monte-Carlo discounted returns of one whole trial: G_t = sum_l gamma^l r_{t+l} (T,) -> (T,)."""
    def backward(g, r):
        g = r + gamma * g
        return g, g

    return jax.lax.scan(backward, jnp.float32(0.0), rewards, reverse=True)[1]


def update_return_stats(stats, returns, rate: float):
    """[3] Duan's running moments of the returns (l2_rnn_baseline.f_update_stats): mean and std move a fraction
    `rate` of the way to the batch's, the batch's spread measured about the *old* running mean. stats (2,)."""
    mean, std = stats
    batch_mean = returns.mean()
    batch_std = jnp.sqrt(((returns - mean) ** 2).mean())
    return jnp.stack([(1 - rate) * mean + rate * batch_mean, (1 - rate) * std + rate * batch_std])


def normalise(x):
    return (x - x.mean()) / (x.std() + 1e-8)


def ppo_loss(params, batch: Trajectory, adv, targets, args: Args, dims: Dims, ent_coef=None):
    """[4] PPO clipped surrogate + value regression - entropy bonus, on whole trials.

    `targets` are what the value head regresses on (normalised returns with
    --value-target mc). The gradient flows through the GRU over all T steps
    of each trial (backprop through time), so the policy learns what to
    remember."""
    out, values = unroll(params, batch.x, args, dims)
    pi = distribution(out, dims)
    logp = pi.log_prob(batch.action)
    log_ratio = logp - batch.logp
    ratio = jnp.exp(log_ratio)
    if args.adv_norm == "minibatch":
        adv = normalise(adv)
    pg_loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef) * adv).mean()
    v_loss = 0.5 * ((values - targets) ** 2).mean()
    ent = pi.entropy().mean()
    ent_coef = args.ent_coef if ent_coef is None else ent_coef
    loss = pg_loss + args.vf_coef * v_loss - ent_coef * ent
    approx_kl = ((ratio - 1) - log_ratio).mean()  # Schulman's low-variance KL estimator
    kl = distribution(batch.dist, dims).kl(pi).mean()  # exact mean KL(pi_old || pi), Duan's MeanKL
    return loss, {"loss/policy": pg_loss, "loss/value": v_loss, "loss/entropy": ent,
                  "loss/approx_kl": approx_kl, "loss/kl": kl, "loss/surrogate": -(ratio * adv).mean()}


def ent_coef_at(step, args: Args, dims: Dims):
    """The entropy coefficient at Adam step `step`: with --anneal it decays
    linearly from ent_coef to 0 over training, like the step size (early on
    the bonus keeps the policy from settling on an arm before it has learnt
    to explore; at the end nothing pulls the policy away from the return)."""
    return args.ent_coef * (1.0 - step / total_grad_steps(args, dims)) if args.anneal else args.ent_coef


def is_value_param(name: str) -> bool:
    """The value network's top-level params ("value_gru", "value"); the rest is the policy's."""
    return name.startswith("value")


def mix_policy(new, old, frac):
    """The policy's params a fraction `frac` of the way from `old` to `new`; the value network's from `new`."""
    return {"params": {name: sub if is_value_param(name) else jax.tree.map(
        lambda n, o: o + frac * (n - o), sub, old["params"][name]) for name, sub in new["params"].items()}}


def batch_kl(params, traj: Trajectory, args: Args, dims: Dims):
    """Mean KL(pi_old || pi_params) over a whole batch of trials (its stored inputs and old head outputs)."""
    out, _ = unroll(params, traj.x, args, dims)
    return distribution(traj.dist, dims).kl(distribution(out, dims)).mean()


def kl_control(ts: TrainState, old_params, best, traj: Trajectory, args: Args, dims: Dims):
    """[4] Duan's KL control (pposgd_clip_ratio.optimize_policy, use_line_search): the policy of the best
    epoch within the KL bound (if any), then back-tracking by halves towards the old policy while the batch's
    mean KL is above --target-kl. The value network keeps its last epoch; Adam's moments are not rewound
    (as in Duan's code). Returns the train state, the final KL and the fraction of the step kept."""
    best_params, best_loss = best
    found = jnp.isfinite(best_loss)  # some epoch kept the KL within the bound
    params = {"params": {name: sub if is_value_param(name) else jax.tree.map(
        lambda b, last: jnp.where(found, b, last), best_params["params"][name], sub)
        for name, sub in ts.params["params"].items()}}

    def too_far(c):
        frac, kl, n = c
        return (kl > args.target_kl) & (n < args.backtracks)

    def halve(c):
        frac, _, n = c
        return frac / 2, batch_kl(mix_policy(params, old_params, frac / 2), traj, args, dims), n + 1

    frac, kl, _ = jax.lax.while_loop(too_far, halve, (jnp.float32(1.0), batch_kl(params, traj, args, dims), 0))
    return ts.replace(params=mix_policy(params, old_params, frac)), kl, frac


def ppo_iteration(carry: Carry, env, args: Args, dims: Dims):
    """[1]-[4] One PPO iteration on a fresh meta-batch of tasks."""
    ts, ret_stats, key = carry
    key, k_task, k_roll, k_perm = jax.random.split(key, 4)
    B, M = args.meta_batch, args.meta_batch // args.num_minibatches
    # [1] a meta-batch of tasks, one trial each
    tasks = env.sample_tasks(k_task, B)
    # [2] trials, vmapped over tasks: every leaf (B, T, ...)
    traj = jax.vmap(lambda task, k: rollout_trial(ts.params, env, task, k, args, dims))(
        tasks, jax.random.split(k_roll, B))
    # [3] GAE over each whole trial, with the value in reward units (the head predicts normalised returns)
    values = traj.value * ret_stats[1] + ret_stats[0]
    adv, gae_returns = jax.vmap(lambda r, v: gae(r, v, args.gamma, args.gae_lambda))(traj.reward, values)
    if args.value_target == "mc":
        # Duan: the value regresses on the discounted Monte-Carlo returns, normalised by running moments
        # updated with this batch before the fit (the advantages above used the old ones)
        returns = jax.vmap(lambda r: discounted_returns(r, args.gamma))(traj.reward)
        ret_stats = update_return_stats(ret_stats, returns, args.return_norm_rate)
        targets = (returns - ret_stats[0]) / ret_stats[1]
    else:
        targets = gae_returns
    if args.adv_norm == "batch":
        adv = normalise(adv)  # over all B x T steps (Duan's center_adv)

    # [4] epochs of minibatches of whole trials (never cut a trial: the GRU needs its start)
    def epoch(c, k):
        ts, best = c
        perm = jax.random.permutation(k, B).reshape(args.num_minibatches, M)

        def minibatch(ts, idx):
            grads, info = jax.grad(ppo_loss, has_aux=True)(
                ts.params, jax.tree.map(lambda x: x[idx], traj), adv[idx], targets[idx], args, dims,
                ent_coef_at(ts.step, args, dims))
            return ts.apply_gradients(grads=grads), info

        ts, info = jax.lax.scan(minibatch, ts, perm)
        # Duan's epoch diagnostics: the means over its minibatches (each measured before its step)
        surr, kl = info["loss/surrogate"].mean(), info["loss/kl"].mean()
        better = (kl <= args.target_kl) & (surr < best[1])
        best = jax.tree.map(lambda n, o: jnp.where(better, n, o), (ts.params, surr), best)
        return (ts, best), info

    best0 = (ts.params, jnp.float32(jnp.inf))
    old_params = ts.params
    (ts, best), info = jax.lax.scan(epoch, (ts, best0), jax.random.split(k_perm, args.update_epochs))
    metrics = {k: v.mean() for k, v in info.items()}
    if args.target_kl > 0:
        ts, metrics["kl/final"], metrics["kl/step_kept"] = kl_control(ts, old_params, best, traj, args, dims)
    metrics["train/trial_reward"] = traj.reward.sum(1).mean()
    return Carry(ts, ret_stats, key), metrics


def evaluate(params, env, key, args: Args, dims: Dims):
    """[5] Trials on new tasks: total reward of each episode of each trial (eval_episodes, n); for an env
    whose episodes may end early, of each block of H steps."""
    trials = args.eval_episodes
    k_task, k_roll = jax.random.split(key)
    tasks = env.sample_tasks(k_task, trials)
    traj = jax.vmap(lambda task, k: rollout_trial(params, env, task, k, args, dims, greedy=args.eval_greedy))(
        tasks, jax.random.split(k_roll, trials))
    return traj.reward.reshape(trials, args.episodes_per_trial, dims.horizon).sum(-1)


def init_carry(key, args: Args, dims: Dims) -> Carry:
    k_net, key = jax.random.split(key)
    params = make_network(args, dims).init(k_net, jnp.zeros(2 * args.hidden_size), jnp.zeros(input_dim(args, dims)))
    # Two optimisers, one per network, each with its own gradient-norm clip: a
    # single global clip would let the value gradient (returns of 10-100 on
    # MDPs, so a large regression error early on) shrink the policy's step.
    lr = (optax.linear_schedule(args.learning_rate, 0.0, total_grad_steps(args, dims)) if args.anneal
          else args.learning_rate)

    def adam():
        clip = (optax.clip(args.grad_clip_value) if args.grad_clip_value > 0
                else optax.clip_by_global_norm(args.max_grad_norm))
        return optax.chain(clip, optax.adam(lr, eps=1e-5))

    def label(p):
        return {"params": {name: "value" if is_value_param(name) else "policy" for name in p["params"]}}

    tx = optax.multi_transform({"policy": adam(), "value": adam()}, label)
    # The return normaliser starts at mean 0, std 1 (Duan's return_mean / return_std variables)
    return Carry(TrainState.create(apply_fn=None, params=params, tx=tx), jnp.array([0.0, 1.0]), key)


# ----------------------------------------------------------------------------
# The jitted chunks: the start and one evaluation period, over all seeds
# ----------------------------------------------------------------------------
jit_static = functools.partial(jax.jit, static_argnames=("env", "args", "dims"))


@jit_static
def start(key, env, args: Args, dims: Dims):
    """Every seed's fresh carry (leading axis: seed) and the evaluation of the
    untrained policies (seeds, eval_episodes, n)."""
    carry = jax.vmap(lambda k: init_carry(k, args, dims))(jax.random.split(key, args.num_seeds))
    k_eval0 = jax.random.fold_in(key, 7)
    return carry, jax.lax.map(lambda p: evaluate(p, env, k_eval0, args, dims), carry.train_state.params)


@jit_static
def run_period(carry: Carry, env, args: Args, dims: Dims):
    """[1]-[5] One evaluation period of every seed: updates_per_eval PPO
    iterations, then an evaluation on new tasks.

    Returns the carry, the per-iteration metrics (seeds, updates_per_eval),
    with "params" the global norm of the params after each iteration (non-finite
    from the iteration they went bad), the evaluation (seeds, eval_episodes, n)
    and the progress metrics (means over seeds and iterations)."""

    def iteration(carry, _):
        carry, metrics = ppo_iteration(carry, env, args, dims)
        return carry, {**metrics, "params": optax.global_norm(carry.train_state.params)}

    def one(carry):  # one seed
        carry, record = jax.lax.scan(iteration, carry, None, length=updates_per_eval(args, dims))
        k_eval, key = jax.random.split(carry.key)
        return carry._replace(key=key), record, evaluate(carry.train_state.params, env, k_eval, args, dims)

    # Seeds one after another inside the program (lax.map). jax.vmap would
    # batch them, which only pays on an accelerator, and on XLA:CPU (jax
    # 0.10.2) the vmapped program hung at meta-batch 256 x 256 units on our
    # 2-core machine.
    carry, record, ev = jax.lax.map(one, carry)
    progress = {"eval/trial_reward": ev.sum(-1).mean(),
                **{k: v.mean() for k, v in record.items() if k != "params"}}
    return carry, record, ev, progress


# ----------------------------------------------------------------------------
# Set-up: checks
# ----------------------------------------------------------------------------
def make_task_family(env_id: str):
    """The pure-JAX task family behind `env_id`, or a one-line error saying why not."""
    func_env = func_env_of(make_env(env_id))
    if func_env is None or not is_task_family(func_env):
        fail(f"RL² trains across a distribution of tasks and needs a pure-JAX task family with "
             f"sample_tasks (BernoulliBandit5-v0, RandomMDP-v0, PointNav2D-v0, ...); '{env_id}' is not one")
    return func_env


def validate(args: Args) -> None:
    """One-line errors for settings that cannot work (before anything heavy)."""
    check_ranges(args, at_least_1=("episodes_per_trial", "meta_batch", "hidden_size", "update_epochs",
                                   "num_minibatches", "num_seeds"),
                 positive=("learning_rate", "clip_coef", "max_grad_norm"),
                 non_negative=("ent_coef", "vf_coef", "grad_clip_value", "target_kl", "backtracks"),
                 discount=("gamma",), probability=("gae_lambda",), open_unit=("return_norm_rate",))
    if args.meta_batch % args.num_minibatches:
        fail(f"--meta-batch ({args.meta_batch}) must be a multiple of --num-minibatches "
             f"({args.num_minibatches}): minibatches hold whole trials")
    if args.capture_video:
        fail("--capture-video is not supported by RL²: a trial of a task family has nothing worth filming")


def check_sizes(args: Args, dims: Dims) -> None:
    """Training must reach one PPO iteration, and its largest arrays must fit in memory."""
    if args.total_timesteps < steps_per_update(args, dims):
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one PPO iteration "
             f"(meta-batch {args.meta_batch} x {args.episodes_per_trial} episodes x {dims.horizon} steps "
             f"= {steps_per_update(args, dims)})")
    if updates_per_eval(args, dims) * steps_per_update(args, dims) > args.total_timesteps:
        fail(f"--eval-interval ({args.eval_interval}) is more than --total-timesteps ({args.total_timesteps}): "
             f"the first evaluation would come after the training")
    T, width = trial_len(args, dims), input_dim(args, dims) + dims.action_dim + 5
    batch = 4 * args.meta_batch * T * width  # the meta-batch of trials
    bptt = 4 * (args.meta_batch // args.num_minibatches) * T * 2 * args.hidden_size * 8  # GRU activations kept
    evals = 4 * args.eval_episodes * T * width + 4 * (num_evals(args, dims) + 1) * args.num_seeds \
        * args.eval_episodes * args.episodes_per_trial
    check_memory(2 * (batch + bptt + evals), "RL²'s trials and back-propagation through them",
                 "lower --meta-batch, --episodes-per-trial or --eval-episodes, or raise --num-minibatches")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    env = make_task_family(args.env_id)
    dims = dims_of(env)
    check_sizes(args, dims)
    key = seed_everything(args.seed)
    run = Run(args)
    U, E, step_size = updates_per_eval(args, dims), num_evals(args, dims), steps_per_update(args, dims)
    progress = Progress(f"RL² on {args.env_id}: trials of n = {args.episodes_per_trial} episodes x H = "
                        f"{dims.horizon} steps, meta-batch {args.meta_batch}, {E * U} PPO iterations x {step_size} "
                        f"env steps, {args.num_seeds} seed(s)", E * U * step_size, start=run.start_step,
                        every=U * step_size, compiling="the first evaluation and one evaluation period")
    with run.timed("train"):
        carry, eval0 = start(key, env, args, dims)
    # The checkpoint: every seed's carry (params, both optimisers' states and the
    # Adam step count the schedules read, key), the evaluations so far (the
    # first before any training) and the per-iteration metrics.
    evals = np.zeros((E + 1, *eval0.shape), np.float32)
    evals[0] = eval0
    metric_names = ("loss/policy", "loss/value", "loss/entropy", "loss/approx_kl", "loss/kl", "train/trial_reward")
    state = run.restore({"carry": carry, "evals": evals,
                         "metrics": {k: np.zeros((E * U, args.num_seeds), np.float32) for k in metric_names}})
    for i in range(run.start_step // (U * step_size), E):
        # [1]-[5] one jitted call: U PPO iterations of every seed, then the evaluation
        with run.timed("train"):
            carry, record, ev, metrics = jax.block_until_ready(run_period(state["carry"], env, args, dims))
        iterations = i * U + np.arange(1, U + 1)
        check_finite_series(iterations * step_size, **{k: v.T for k, v in record.items()})
        state["carry"], state["evals"][i + 1] = carry, np.asarray(ev)
        for k in metric_names:
            state["metrics"][k][i * U:(i + 1) * U] = np.asarray(record[k]).T
        step = (i + 1) * U * step_size
        metrics = {**metrics, "steps_per_second": step * args.num_seeds / max(run.timings["train"], 1e-9)}
        run.log(metrics, step, echo=False)
        progress.update(step, metrics, ["eval/trial_reward", "train/trial_reward", "loss/entropy", "loss/approx_kl"])
        if run.checkpoint_due(step, i * U * step_size):
            run.save(state, step)
    steps = E * U * step_size
    run.save(state, steps)

    evals = state["evals"]  # (num_evals + 1, seeds, trials, n)
    final = evals[-1].sum(-1)  # (seeds, trials) total reward per trial
    per_seed = final.mean(1)
    summary = {
        "wall_seconds": run.timings["train"],
        "final_trial_reward": float(per_seed.mean()),
        "final_trial_reward_stderr": float(final.std() / np.sqrt(final.size)) if args.num_seeds == 1
        else float(per_seed.std(ddof=1) / np.sqrt(args.num_seeds)),
        "initial_trial_reward": float(evals[0].sum(-1).mean()),
    }
    run.log(summary, steps, echo=False)
    per_episode = evals[-1].mean((0, 1))
    shown = ", ".join(f"{x:.3g}" for x in per_episode[:10])
    print(f"final policy, mean reward of episode 1..{min(10, args.episodes_per_trial)} of a trial: {shown}",
          flush=True)
    progress.done("final_trial_reward", summary["final_trial_reward"],
                  reference=f"± {summary['final_trial_reward_stderr']:.2g}; the untrained policy: "
                            f"{summary['initial_trial_reward']:.3g}")
    params = state["carry"].train_state.params
    if args.save_model:  # params of every seed (leading axis) and the sizes to rebuild the network
        config = {**json.loads(json.dumps(dataclasses.asdict(args))), **dims._asdict()}
        path = save_checkpoint(run.dir / "rl2.msgpack", {"params": params, "config": config})
        print(f"saved {path}")
    run.close()
    return {"params": params, "metrics": state["metrics"], "evals": evals, "args": args, "dims": dims,
            "run_dir": run.dir, **summary}


if __name__ == "__main__":
    cli(Args, main)
