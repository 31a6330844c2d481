"""PEARL: off-policy meta-RL with a probabilistic context variable.

Paper: Rakelly, Zhou, Quillen, Finn, Levine 2019, "Efficient Off-Policy
Meta-Reinforcement Learning via Probabilistic Context Variables",
https://arxiv.org/abs/1903.08254 (Sec. 4: the inference network, Eq. 3-4;
Alg. 1 meta-training, Alg. 2 meta-test). Authors' code: katerakelly/oyster
(configs/*.json, rlkit/torch/sac/{sac,agent}.py, rlkit/core/rl_algorithm.py);
every detail taken from it is listed with its source in docs/pearl.md.
CS 285 meta-RL lecture: "Solution #3: task-belief states".

A task is inferred, not adapted to: an encoder q_phi(z | c) reads a context c
of transitions (s, a, r) from the task and outputs a Gaussian belief over a
latent task variable z (5-D). Each transition gives one Gaussian factor and
the belief is their product, so it does not depend on the order of the
context and sharpens as evidence accumulates. The policy pi(a | s, z), the
twin Q(s, a, z) and V(s, z) are soft actor-critic networks conditioned on a
sample of z. Training is off-policy (SAC), from per-task replay buffers; the
encoder learns from the critic's Bellman error plus an information
bottleneck KL(q(z | c) || N(0, I)). At meta-test time the agent starts from
the prior, acts, and re-infers its belief from its own transitions after each
trajectory: posterior sampling, so it explores like Thompson sampling first
and exploits once the belief is sharp.

What this file implements: the permutation-invariant encoder, oyster's
SAC-v1 (V and target V, twin Q, fixed entropy weight through the reward
scale, mean/log-std regularisers), its data pipeline (per-task RL and encoder
buffers, the encoder buffer cleared when a task is re-collected, independent
context and RL batches, prior / posterior / RL-only collection) and its
meta-test protocol. On the pure-JAX task families (PointRobot-v0,
SparsePointRobot-v0) a whole meta-training iteration (collection of every
sampled task and all gradient steps, a lax.scan) is one jitted call; on the
MuJoCo ones (HalfCheetahVelOyster-v0, HalfCheetahDirOyster-v0,
AntDirOyster-v0) collection and meta-test step a gymnasium vector env (one env
per task collected at once) and the gradient steps are the same jitted scan.
Left out: the recurrent encoder, the deterministic (no information
bottleneck) variant.

Run:
    python -m algos.pearl                                  # dense point robot, the CPU setting: a few minutes
    python -m algos.pearl --env-id SparsePointRobot-v0     # posterior-sampling exploration, sparse reward
    python -m algos.pearl --oyster --num-iterations 500    # oyster's whole point-robot configuration (GPU)
    python -m algos.pearl --env-id HalfCheetahVelOyster-v0 --oyster   # oyster's cheetah-vel (GPU)

Algorithm (numbers mark the code below):
    Initialise encoder q_phi, policy pi_theta, Q_1, Q_2, V, target V.
    [1] For every training task: collect num_initial_steps with z ~ N(0, I)
        into its RL buffer B_i and its encoder buffer E_i.
    Repeat for each iteration:
      [2] for each of num_tasks_sample training tasks i:
            clear E_i;
            prior steps: z ~ N(0, I) per trajectory, into B_i and E_i;
            posterior steps: after each trajectory z ~ q(z | c), c ~ E_i, into B_i and E_i;
            extra RL steps: as posterior steps, into B_i only
      [3] for num_train_steps gradient steps:
            draw a meta-batch of tasks; for each a context c_i ~ E_i and an RL batch b_i ~ B_i
            q(z | c_i) = prod_n N(mu_n, sigma_n^2)  (Eq. 4);  z_i ~ q (reparameterised)
            L_Q  = E (Q_k(s, a, z) - (scale * r + gamma V_target(s', z)))^2   -> Q_1, Q_2 and encoder
            L_KL = kl_lambda * sum_i KL(q(z | c_i) || N(0, I))                 -> encoder
            L_V  = E (V(s, z-) - (min_k Q_k(s, a~pi, z-) - log pi))^2          -> V   (z- = stop_gradient z)
            L_pi = E (log pi(a~ | s, z-) - min_k Q_k(s, a~, z-)) + regularisers -> policy
            V_target <- tau V + (1 - tau) V_target
      [4] meta-test on held-out tasks: z ~ prior; for each trajectory act with
          the deterministic policy, add its transitions to the context, and
          (after num_exp_traj_eval trajectories) re-infer q(z | c), z ~ q;
          headline: the LAST trajectory's return
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from gymnasium import spaces

from common.buffers import ReplayBuffer
from common.checkpoints import save_checkpoint
from common.checks import check_finite_series, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import make_env
from common.envs.mujoco_tasks import VectorTasks, task_family_of
from common.experiment import CommonArgs, Run, seed_everything
from common.jax_envs.adapter import func_env_of, is_task_family
from common.progress import Progress

# oyster's per-env settings (configs/<env>.json over configs/default.py); any Args field left at None takes them.
OYSTER = {
    "default": dict(n_train_tasks=2, n_eval_tasks=2, meta_batch=16, num_iterations=500, num_initial_steps=2000,
                    num_tasks_sample=5, num_steps_prior=400, num_steps_posterior=0, num_extra_rl_steps=400,
                    num_train_steps=2000, num_evals=2, num_steps_per_eval=600, batch_size=256,
                    embedding_batch_size=64, gamma=0.99, reward_scale=5.0, kl_lambda=0.1, num_exp_traj_eval=1,
                    learning_rate=3e-4),
    "PointRobot-v0": dict(n_train_tasks=80, n_eval_tasks=20, num_initial_steps=200, num_steps_prior=200,
                          num_steps_posterior=0, num_extra_rl_steps=200, num_train_steps=1000,
                          num_steps_per_eval=60, reward_scale=100.0, kl_lambda=0.1),
    "SparsePointRobot-v0": dict(n_train_tasks=80, n_eval_tasks=20, num_initial_steps=200, num_tasks_sample=10,
                                num_steps_prior=100, num_steps_posterior=900, num_extra_rl_steps=0,
                                num_train_steps=1000, num_steps_per_eval=400, embedding_batch_size=1024,
                                gamma=0.9, reward_scale=100.0, kl_lambda=1.0, num_exp_traj_eval=5),
    "HalfCheetahVelOyster-v0": dict(n_train_tasks=100, n_eval_tasks=30, num_extra_rl_steps=600, num_evals=1,
                                    num_exp_traj_eval=2, embedding_batch_size=100),
    "HalfCheetahDirOyster-v0": dict(meta_batch=4, num_steps_prior=1000, num_extra_rl_steps=1000, num_evals=4,
                                    num_exp_traj_eval=2, embedding_batch_size=256),
    "AntDirOyster-v0": dict(meta_batch=4, num_extra_rl_steps=600, num_train_steps=4000, num_evals=4,
                            num_exp_traj_eval=2, embedding_batch_size=256),
}
# The default (CPU) setting changes four of oyster's values (five on the dense robot); --oyster restores them all
# (launch_experiment.py: 300-unit networks, a 200-unit encoder). On the dense robot at 64 units and kl_lambda 0.1
# the encoder's means grew to ~10 and the Q loss rose for 29k gradient steps with no learning (docs/pearl.md);
# with kl_lambda 1.0 (oyster's value for the sparse robot) it learns. Elsewhere oyster's KL weight is kept.
CPU_SETTING = dict(net_size=64, encoder_size=64, batch_size=64, num_train_steps=500)
CPU_KL = {"PointRobot-v0": 1.0}
OYSTER_SIZES = dict(net_size=300, encoder_size=200)


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "PointRobot-v0"
    """a task family: pure-JAX PointRobot-v0, SparsePointRobot-v0; MuJoCo (through gymnasium)
    HalfCheetahVelOyster-v0, HalfCheetahDirOyster-v0, AntDirOyster-v0"""
    total_timesteps: int | None = None
    """stop after the iteration that reaches this many env steps (None: --num-iterations decides)"""
    num_iterations: int = 40
    """meta-training iterations (oyster: 500); the default run's 40 take about 3-5 minutes on a 2-core CPU"""
    eval_interval: int = 1
    """meta-test every this many iterations (oyster: every iteration)"""
    checkpoint_interval: int | None = None
    """write the resumable checkpoint every this many iterations (None: at every evaluation)"""
    oyster: bool = False
    """oyster's whole configuration for --env-id (300-unit networks, 200-unit encoder, its batch, gradient steps
    and KL weight); the default is the CPU setting: 64-unit networks and encoder, RL batch 64, 500 gradient
    steps per iteration (and on PointRobot-v0 kl_lambda 1.0), the rest oyster's"""
    net_size: int | None = None
    """units of each of the 3 hidden layers of the policy, Q and V networks (oyster: 300; CPU setting 64)"""
    encoder_size: int | None = None
    """units of each of the 3 hidden layers of the context encoder (oyster: 200; CPU setting 64)"""
    latent_size: int = 5
    """dimension of the task variable z"""
    use_next_obs_in_context: bool = False
    """give the encoder (s, a, r, s') instead of (s, a, r) (oyster: for tasks that change the dynamics)"""
    learning_rate: float | None = None
    """Adam step size of all five optimisers (policy, Q1, Q2, V, encoder) (oyster: 3e-4)"""
    tau: float = 0.005
    """Polyak rate of the target V network"""
    policy_mean_reg: float = 1e-3
    """weight of the policy's mean^2 regulariser"""
    policy_std_reg: float = 1e-3
    """weight of the policy's log_std^2 regulariser"""
    buffer_size: int | None = None
    """RL buffer capacity per task (None: the initial steps plus 3x what a task gets in expectation over the
    run; oyster: 1e6, never reached)"""
    # oyster's per-env settings (None: configs/<env>.json, else configs/default.py)
    n_train_tasks: int | None = None
    """number of meta-training tasks (oyster's fixed list: the first n)"""
    n_eval_tasks: int | None = None
    """number of held-out meta-test tasks (the last n of oyster's list)"""
    meta_batch: int | None = None
    """tasks per gradient step (oyster: 16)"""
    num_initial_steps: int | None = None
    """env steps collected per training task before training, z from the prior"""
    num_tasks_sample: int | None = None
    """training tasks collected for in each iteration"""
    num_steps_prior: int | None = None
    """env steps per collected task with z from the prior (into both buffers)"""
    num_steps_posterior: int | None = None
    """env steps per collected task with z from the posterior (into both buffers)"""
    num_extra_rl_steps: int | None = None
    """env steps per collected task with z from the posterior, into the RL buffer only"""
    num_train_steps: int | None = None
    """gradient steps per iteration (oyster point robot: 1000; CPU setting 500)"""
    batch_size: int | None = None
    """RL batch (transitions) per task per gradient step (oyster: 256; CPU setting 64)"""
    embedding_batch_size: int | None = None
    """context transitions per task per gradient step"""
    gamma: float | None = None
    """discount (oyster: 0.99, sparse robot 0.9)"""
    reward_scale: float | None = None
    """multiplies the reward in the Bellman target (SAC's entropy weight is 1 / reward_scale)"""
    kl_lambda: float | None = None
    """weight of the KL(q(z|c) || N(0, I)) term, summed over the meta-batch's tasks (oyster: 0.1, sparse robot
    1.0; CPU setting on PointRobot-v0 1.0)"""
    num_evals: int | None = None
    """independent meta-test runs per held-out task"""
    num_steps_per_eval: int | None = None
    """env steps per meta-test run (whole trajectories)"""
    num_exp_traj_eval: int | None = None
    """meta-test trajectories before the posterior is first inferred (z resampled from the prior until then)"""


def config(args: Args) -> Args:
    """Args with every None replaced by oyster's value for --env-id (configs/<env>.json over
    configs/default.py), or with --oyster off, the CPU setting's where it has one."""
    table = {**OYSTER["default"], **OYSTER.get(args.env_id, {}), **OYSTER_SIZES}
    if not args.oyster:
        table.update(CPU_SETTING, **{"kl_lambda": CPU_KL[args.env_id]} if args.env_id in CPU_KL else {})
    return dataclasses.replace(args, **{k: v for k, v in table.items() if getattr(args, k) is None})


class Dims(NamedTuple):
    """Sizes read from the task family (static in the jitted functions)."""

    obs_dim: int
    action_dim: int
    horizon: int
    action_low: tuple
    action_high: tuple


def dims_of(env) -> Dims:
    return Dims(int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape)), int(env.horizon),
                tuple(np.asarray(env.action_space.low, float).ravel()),
                tuple(np.asarray(env.action_space.high, float).ravel()))


def trajectories(steps: int, dims: Dims) -> int:
    """oyster collects whole trajectories until at least `steps` transitions: ceil(steps / H)."""
    return -(-steps // dims.horizon)


def context_dim(args: Args, dims: Dims) -> int:
    return dims.obs_dim * (2 if args.use_next_obs_in_context else 1) + dims.action_dim + 1


def steps_per_iteration(args: Args, dims: Dims) -> int:
    per_task = trajectories(args.num_steps_prior, dims) + trajectories(args.num_steps_posterior, dims) \
        + trajectories(args.num_extra_rl_steps, dims)
    return args.num_tasks_sample * per_task * dims.horizon


def initial_steps(args: Args, dims: Dims) -> int:
    return args.n_train_tasks * trajectories(args.num_initial_steps, dims) * dims.horizon


def buffer_capacity(args: Args, dims: Dims) -> int:
    if args.buffer_size is not None:
        return args.buffer_size
    expected = args.num_iterations * steps_per_iteration(args, dims) / args.n_train_tasks
    return int(min(1_000_000, initial_steps(args, dims) // args.n_train_tasks + 3 * expected + dims.horizon))


def encoder_capacity(args: Args, dims: Dims) -> int:
    """E_i holds the initial steps until it is first cleared, then one collection's prior + posterior steps
    (+ 2 trajectories: after early terminations a phase through gymnasium ends up to H - 1 steps over)."""
    return dims.horizon * (2 + max(trajectories(args.num_initial_steps, dims), trajectories(args.num_steps_prior, dims)
                                   + trajectories(args.num_steps_posterior, dims)))


# ----------------------------------------------------------------------------
# Networks (oyster's init: hidden weights U(+-1/sqrt(fan)) with fan = the layer's OUTPUT size, as rlkit's
# fanin_init reads size[0] of a torch weight (out, in); biases 0.1; last layer U(+-init_w))
# ----------------------------------------------------------------------------
def _hidden_init(key, shape, dtype=jnp.float32):  # flax kernels are (in, out)
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _last_init(init_w):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -init_w, init_w)


class MLP(nn.Module):
    """3 hidden ReLU layers, a linear output (rlkit's Mlp / FlattenMlp on the concatenated inputs)."""

    hidden: int
    out: int
    init_w: float = 3e-3

    @nn.compact
    def __call__(self, *inputs):
        h = jnp.concatenate(inputs, -1)
        for _ in range(3):
            h = nn.relu(nn.Dense(self.hidden, kernel_init=_hidden_init, bias_init=nn.initializers.constant(0.1))(h))
        return nn.Dense(self.out, kernel_init=_last_init(self.init_w), bias_init=_last_init(self.init_w))(h)


class Policy(nn.Module):
    """tanh-Gaussian policy on (s, z): mean and log-std heads, log std clipped to [-20, 2]."""

    hidden: int
    action_dim: int

    @nn.compact
    def __call__(self, obs, z):
        h = jnp.concatenate([obs, z], -1)
        for _ in range(3):
            h = nn.relu(nn.Dense(self.hidden, kernel_init=_hidden_init, bias_init=nn.initializers.constant(0.1))(h))
        mean = nn.Dense(self.action_dim, kernel_init=_last_init(1e-3), bias_init=_last_init(1e-3))(h)
        log_std = nn.Dense(self.action_dim, kernel_init=_last_init(1e-3), bias_init=_last_init(1e-3))(h)
        return mean, jnp.clip(log_std, -20.0, 2.0)


def networks(args: Args, dims: Dims):
    return {"encoder": MLP(args.encoder_size, 2 * args.latent_size), "policy": Policy(args.net_size, dims.action_dim),
            "qf1": MLP(args.net_size, 1), "qf2": MLP(args.net_size, 1), "vf": MLP(args.net_size, 1)}


class State(NamedTuple):
    """Everything a run carries (and its checkpoint holds)."""

    params: dict  # encoder, policy, qf1, qf2, vf, target_vf
    opt: dict  # one Adam state per network (oyster: five optimisers)
    rl: ReplayBuffer  # B_i: every leaf (n_train_tasks, capacity, ...)
    enc: ReplayBuffer  # E_i: (n_train_tasks, encoder capacity, ...)
    key: jax.Array


def optimiser(args: Args):
    return optax.adam(args.learning_rate)


@functools.partial(jax.jit, static_argnames=("args", "dims"))  # jitted: every leaf its own buffer (donated later)
def init_state(key, args: Args, dims: Dims) -> State:
    nets, keys = networks(args, dims), jax.random.split(key, 6)
    o, a, z = jnp.zeros(dims.obs_dim), jnp.zeros(dims.action_dim), jnp.zeros(args.latent_size)
    params = {"encoder": nets["encoder"].init(keys[0], jnp.zeros(context_dim(args, dims))),
              "policy": nets["policy"].init(keys[1], o, z), "qf1": nets["qf1"].init(keys[2], o, a, z),
              "qf2": nets["qf2"].init(keys[3], o, a, z), "vf": nets["vf"].init(keys[4], o, z)}
    params["target_vf"] = params["vf"]  # oyster: target_vf = vf.copy()
    opt = {k: optimiser(args).init(params[k]) for k in nets}

    def per_task(capacity):  # one buffer per training task, rows of transitions
        f = jnp.zeros
        one = ReplayBuffer.create({"obs": f(dims.obs_dim), "action": f(dims.action_dim), "reward": f(()),
                                   "dense_reward": f(()), "next_obs": f(dims.obs_dim), "terminal": f(())}, capacity)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (args.n_train_tasks, *x.shape)), one)

    return State(params, opt, per_task(buffer_capacity(args, dims)), per_task(encoder_capacity(args, dims)), keys[5])


# ----------------------------------------------------------------------------
# Pure functions: the encoder and the posterior
# ----------------------------------------------------------------------------
def context_of(batch, args: Args):
    """Context rows (..., context_dim) from transitions: (s, a, r) or (s, a, r, s'); r is the task's reward
    (the sparse one on SparsePointRobot, as oyster's sample_context(sparse_rewards))."""
    parts = [batch["obs"], batch["action"], batch["reward"][..., None]]
    return jnp.concatenate(parts + ([batch["next_obs"]] if args.use_next_obs_in_context else []), -1)


def product_of_gaussians(mu, var, mask=None):
    """Eq. 4: prod_n N(mu_n, var_n) over the context axis -2: (..., N, L) -> (..., L), (..., L).

    The product of Gaussians is Gaussian with precision = sum of precisions and
    mean = precision-weighted mean; rows with mask False are left out (with
    none, the prior N(0, 1)). Variances are clipped at 1e-7 as in oyster."""
    prec = 1.0 / jnp.maximum(var, 1e-7)
    if mask is not None:
        prec = prec * mask[..., None]
    total = prec.sum(-2)
    empty = total == 0
    var_z = 1.0 / jnp.where(empty, 1.0, total)
    mu_z = var_z * (prec * mu).sum(-2)
    return jnp.where(empty, 0.0, mu_z), jnp.where(empty, 1.0, var_z)


def posterior(enc_params, context, args: Args, mask=None):
    """q(z | c): the encoder's per-transition factor (mean, softplus variance), then their product.
    context (..., N, context_dim) -> mean, variance (..., latent)."""
    out = MLP(args.encoder_size, 2 * args.latent_size).apply(enc_params, context)
    mu, var = out[..., :args.latent_size], jax.nn.softplus(out[..., args.latent_size:])
    return product_of_gaussians(mu, var, mask)


def sample_z(key, mu, var):
    """z = mu + sigma eps, reparameterised (gradients reach the encoder through mu and sigma)."""
    return mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape)


def kl_to_prior(mu, var):
    """KL(N(mu, var) || N(0, I)) summed over the latent dims (and every leading axis: oyster sums over tasks)."""
    return 0.5 * (var + mu ** 2 - 1.0 - jnp.log(var)).sum()


# ----------------------------------------------------------------------------
# Pure functions: the policy and oyster's SAC
# ----------------------------------------------------------------------------
def policy_sample(pol_params, obs, z, key, args: Args, dims: Dims):
    """a = tanh(u), u ~ N(mean, std): action in [-1, 1], its log-probability (tanh correction with rlkit's
    1e-6), the mean and the log std."""
    mean, log_std = Policy(args.net_size, dims.action_dim).apply(pol_params, obs, z)
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    a = jnp.tanh(u)
    logp = (-0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
            - jnp.log(1 - a ** 2 + 1e-6)).sum(-1)
    return a, logp, mean, log_std


def policy_mode(pol_params, obs, z, args: Args, dims: Dims):
    """The deterministic policy of oyster's meta-test: tanh(mean)."""
    return jnp.tanh(Policy(args.net_size, dims.action_dim).apply(pol_params, obs, z)[0])


def to_env_action(a, dims: Dims):
    """[-1, 1] -> the action space, clipped (oyster's NormalizedBoxEnv)."""
    lo, hi = jnp.asarray(dims.action_low), jnp.asarray(dims.action_high)
    return jnp.clip(lo + (a + 1.0) * 0.5 * (hi - lo), lo, hi)


@functools.partial(jax.jit, static_argnames=("args", "dims", "deterministic"))
def act(pol_params, obs, z, key, args: Args, dims: Dims, deterministic: bool):
    """The action of both paths' collection ((..., obs) with z (..., latent)): a ~ pi(. | s, z), or tanh(mean) at
    meta-test; returns the [-1, 1] action (stored in the buffers) and the env's."""
    obs = obs.astype(jnp.float32)
    a = policy_mode(pol_params, obs, z, args, dims) if deterministic else \
        policy_sample(pol_params, obs, z, key, args, dims)[0]
    return a, to_env_action(a, dims)


def q_value(params, obs, action, z, args: Args):
    return MLP(args.net_size, 1).apply(params, obs, action, z)[..., 0]


def task_z(enc_params, context, key, args: Args):
    """q(z | c_i) for each task of the meta-batch and one reparameterised sample: context (T, N_c, dim) ->
    z, mu, var (T, latent)."""
    mu, var = posterior(enc_params, context, args)
    return sample_z(key, mu, var), mu, var


def per_row(z, batch, args: Args):
    """One z per task, repeated over the task's RL batch: (T, latent) -> (T, B, latent)."""
    return jnp.broadcast_to(z[:, None], (*batch["reward"].shape, args.latent_size))


def q_loss(q_params, enc_params, context, batch, target_vf, key, args: Args):
    """[3] L_Q + L_KL, a function of (Q1, Q2) and the encoder: the encoder's only gradients.

    context (T, N_c, context_dim), batch leaves (T, B, ...). Returns the loss and (z, mu, var, kl, L_Q)."""
    z, mu, var = task_z(enc_params, context, key, args)
    zb = per_row(z, batch, args)
    # Bellman target on the critic's (dense) reward; no gradient through the target V (torch.no_grad in oyster)
    v_next = jax.lax.stop_gradient(MLP(args.net_size, 1).apply(target_vf, batch["next_obs"], zb)[..., 0])
    target = args.reward_scale * batch["dense_reward"] + (1.0 - batch["terminal"]) * args.gamma * v_next
    # z is NOT detached here: the Bellman error trains the encoder (Sec. 4.2)
    loss = sum(((q_value(q_params[k], batch["obs"], batch["action"], zb, args) - target) ** 2).mean()
               for k in ("qf1", "qf2"))
    kl = kl_to_prior(mu, var)
    return loss + args.kl_lambda * kl, (z, mu, var, kl, loss)


def min_q_new_actions(pol_params, q_params, obs, z, key, args: Args, dims: Dims):
    """min_k Q_k(s, a~, z) with a~ ~ pi(. | s, z) reparameterised; z is DETACHED (oyster's _min_q and the
    policy input, task_z.detach()). Returns min Q, log pi, mean, log std (..., B)."""
    z = jax.lax.stop_gradient(z)
    a_new, logp, mean, log_std = policy_sample(pol_params, obs, z, key, args, dims)
    q = jnp.minimum(q_value(q_params["qf1"], obs, a_new, z, args), q_value(q_params["qf2"], obs, a_new, z, args))
    return q, logp, mean, log_std


def vf_loss(vf_params, pol_params, q_params, obs, z, key, args: Args, dims: Dims):
    """[3] L_V = E (V(s, z-) - (min Q(s, a~, z-) - log pi(a~ | s, z-)))^2, the target held fixed; z- detached."""
    q, logp, _, _ = min_q_new_actions(pol_params, q_params, obs, z, key, args, dims)
    v = MLP(args.net_size, 1).apply(vf_params, obs, jax.lax.stop_gradient(z))[..., 0]
    return ((v - jax.lax.stop_gradient(q - logp)) ** 2).mean()


def policy_loss(pol_params, q_params, obs, z, key, args: Args, dims: Dims):
    """[3] L_pi = E (log pi(a~ | s, z-) - min Q(s, a~, z-)) + 1e-3 (mean^2 + log_std^2); dQ/da flows into the
    policy through the reparameterised a~, z- detached."""
    q, logp, mean, log_std = min_q_new_actions(pol_params, q_params, obs, z, key, args, dims)
    reg = args.policy_mean_reg * (mean ** 2).mean() + args.policy_std_reg * (log_std ** 2).mean()
    return (logp - q).mean() + reg, logp


def adam_step(params, grads, opt_state, args: Args):
    upd, opt_state = optimiser(args).update(grads, opt_state, params)
    return optax.apply_updates(params, upd), opt_state


def gradient_step(state: State, context, batch, args: Args, dims: Dims):
    """[3] One of oyster's _take_step: Q + encoder, then V (and the target), then the policy.

    As in oyster, the V target and the policy loss use the Q networks *after*
    their update, and the new actions and log pi come from the policy before
    its update (the same noise for both losses)."""
    p, opt = dict(state.params), dict(state.opt)
    key, k_z, k_pi = jax.random.split(state.key, 3)
    (_, (z, mu, var, kl, qf_l)), (g_q, g_enc) = jax.value_and_grad(q_loss, argnums=(0, 1), has_aux=True)(
        {"qf1": p["qf1"], "qf2": p["qf2"]}, p["encoder"], context, batch, p["target_vf"], k_z, args)
    for name, g in (("qf1", g_q["qf1"]), ("qf2", g_q["qf2"]), ("encoder", g_enc)):
        p[name], opt[name] = adam_step(p[name], g, opt[name], args)
    zb, obs, q_params = per_row(z, batch, args), batch["obs"], {"qf1": p["qf1"], "qf2": p["qf2"]}
    v_l, g_v = jax.value_and_grad(vf_loss)(p["vf"], p["policy"], q_params, obs, zb, k_pi, args, dims)
    p["vf"], opt["vf"] = adam_step(p["vf"], g_v, opt["vf"], args)
    p["target_vf"] = optax.incremental_update(p["vf"], p["target_vf"], args.tau)
    (pi_l, logp), g_pi = jax.value_and_grad(policy_loss, has_aux=True)(p["policy"], q_params, obs, zb, k_pi,
                                                                       args, dims)
    p["policy"], opt["policy"] = adam_step(p["policy"], g_pi, opt["policy"], args)
    metrics = {"loss/qf": qf_l, "loss/vf": v_l, "loss/policy": pi_l, "loss/kl": kl,
               "z/var": var.mean(), "z/abs_mean": jnp.abs(mu).mean(), "policy/log_pi": logp.mean()}
    return state._replace(params=p, opt=opt, key=key), metrics


def sample_batches(rl: ReplayBuffer, enc: ReplayBuffer, key, args: Args):
    """[3] A meta-batch of tasks (with replacement, as np.random.choice in oyster), then for each an RL batch
    from B_i and, independently, a context batch from E_i (both uniform with replacement)."""
    k_t, k_rl, k_enc = jax.random.split(key, 3)
    tasks = jax.random.randint(k_t, (args.meta_batch,), 0, args.n_train_tasks)
    return tasks, draw(enc, tasks, k_enc, args.embedding_batch_size), draw(rl, tasks, k_rl, args.batch_size)


def draw(buf: ReplayBuffer, tasks, key, n: int):
    """n rows of each task's filled part, uniformly with replacement: leaves (len(tasks), n, ...)."""
    rows = jax.random.randint(key, (len(tasks), n), 0, jnp.maximum(buf.size[tasks], 1)[:, None])
    return jax.tree.map(lambda x: x[tasks[:, None], rows], buf.data)


# ----------------------------------------------------------------------------
# Pure functions: collection and meta-test on a FuncEnv
# ----------------------------------------------------------------------------
def rollout(params, env, task, z, key, args: Args, dims: Dims, deterministic: bool):
    """One trajectory of H steps with a fixed z: transitions (H, ...) and an alive mask (H,) (steps after a
    terminal are dropped, as oyster's rollout breaks there)."""
    k0, key = jax.random.split(key)
    dense_fn = getattr(env, "dense_reward", env.reward)

    def step(carry, k):
        s, alive = carry
        k_a, k_e = jax.random.split(k)
        obs = env.observation(s, k_e, task)
        a, env_a = act(params["policy"], obs, z, k_a, args, dims, deterministic)
        s2 = env.transition(s, env_a, k_e, task)
        r, r_dense, term = env.reward(s, env_a, s2, k_e, task), dense_fn(s, env_a, s2, k_e, task), \
            env.terminal(s2, k_e, task)
        tr = {"obs": obs, "action": a, "reward": r, "dense_reward": r_dense,
              "next_obs": env.observation(s2, k_e, task), "terminal": term.astype(jnp.float32)}
        return (s2, alive & ~term), (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tr), alive)

    _, (traj, alive) = jax.lax.scan(step, (env.initial(k0, task), jnp.bool_(True)),
                                    jax.random.split(key, dims.horizon))
    return traj, alive


def collect_task(params, env, task, rl: ReplayBuffer, enc: ReplayBuffer, key, phases, args: Args, dims: Dims):
    """[1]/[2] oyster's collect_data for one task, phase after phase: phases = ((n_trajectories,
    posterior: bool, into_encoder_buffer: bool), ...). Each phase starts from the prior (clear_z); with
    `posterior`, after each trajectory z ~ q(z | c), c an embedding batch from E_i (the encoder buffer, as
    oyster's sample_context), else z is resampled from the prior."""
    for n, use_post, into_enc in phases:
        if n == 0:
            continue

        def traj(carry, k, use_post=use_post, into_enc=into_enc):
            rl, enc, mu, var = carry
            k_z, k_roll, k_c = jax.random.split(k, 3)
            tr, alive = rollout(params, env, task, sample_z(k_z, mu, var), k_roll, args, dims, False)
            rl = rl.add_masked(tr, alive)
            if into_enc:
                enc = enc.add_masked(tr, alive)
            if use_post:
                mu, var = posterior(params["encoder"], context_of(enc.sample(k_c, args.embedding_batch_size), args),
                                    args)
            return (rl, enc, mu, var), None

        prior = (jnp.zeros(args.latent_size), jnp.ones(args.latent_size))
        (rl, enc, _, _), _ = jax.lax.scan(traj, (rl, enc, *prior), jax.random.split(key, n))
        key = jax.random.fold_in(key, n)
    return rl, enc


def meta_test_task(params, env, task, key, args: Args, dims: Dims):
    """[4] oyster's collect_paths on one task: z ~ prior; for each trajectory, act deterministically, add its
    transitions to the context, and once num_exp_traj_eval trajectories are in, z ~ q(z | all the context so
    far); else z is resampled from the prior. Returns each trajectory's return (K,) (the task's reward:
    sparse on SparsePointRobot) and, per trajectory, the belief it acted under (mu, var (K, latent)) and its
    transitions (K, H, ...)."""
    K, H = trajectories(args.num_steps_per_eval, dims), dims.horizon
    ctx = jnp.zeros((K * H, context_dim(args, dims)))
    mask = jnp.zeros(K * H, bool)

    def traj(carry, kt):
        ctx, mask, mu, var = carry
        k, t = kt
        k_z, k_roll = jax.random.split(k)
        tr, alive = rollout(params, env, task, sample_z(k_z, mu, var), k_roll, args, dims, True)
        ctx = jax.lax.dynamic_update_slice(ctx, context_of(tr, args), (t * H, 0))
        mask = jax.lax.dynamic_update_slice(mask, alive, (t * H,))
        post = posterior(params["encoder"], ctx, args, mask)
        later = t + 1 >= args.num_exp_traj_eval
        mu2, var2 = (jnp.where(later, post[0], mu), jnp.where(later, post[1], var))
        return (ctx, mask, mu2, var2), ((tr["reward"] * alive).sum(), {"mu": mu, "var": var, "traj": tr})

    init = (ctx, mask, jnp.zeros(args.latent_size), jnp.ones(args.latent_size))
    _, (returns, info) = jax.lax.scan(traj, init, (jax.random.split(key, K), jnp.arange(K)))
    return returns, info


# ----------------------------------------------------------------------------
# The jitted programs
# ----------------------------------------------------------------------------
def collect_into(state: State, env, tasks, task_ids, phases, clear_encoder: bool, args: Args, dims: Dims):
    """Collection for the training tasks `task_ids` (distinct), vmapped, written back into the per-task buffers."""
    key, k = jax.random.split(state.key)
    rl, enc = (jax.tree.map(lambda x: x[task_ids], b) for b in (state.rl, state.enc))
    if clear_encoder:  # oyster: enc_replay_buffer.task_buffers[idx].clear() before collecting for task idx
        enc = cleared(enc)
    task = jax.tree.map(lambda x: x[task_ids], tasks)
    rl, enc = jax.vmap(lambda t, r, e, kk: collect_task(state.params, env, t, r, e, kk, phases, args, dims))(
        task, rl, enc, jax.random.split(k, len(task_ids)))
    put = lambda full, part: jax.tree.map(lambda f, x: f.at[task_ids].set(x), full, part)  # noqa: E731
    return state._replace(rl=put(state.rl, rl), enc=put(state.enc, enc), key=key)


def cleared(buf: ReplayBuffer) -> ReplayBuffer:
    return buf.replace(ptr=jnp.zeros_like(buf.ptr), size=jnp.zeros_like(buf.size))


def collect_one_by_one(state: State, env, tasks, task_ids, phases, args: Args, dims: Dims):
    """[2] Collection for the sampled tasks in turn (a lax.scan), each one's encoder buffer cleared first.

    oyster draws the tasks with replacement (np.random.randint per task), so a
    task may come twice in one iteration: it is then cleared and collected
    again, which only a sequential pass over the draws reproduces."""
    def one(state, i):
        return collect_into(state, env, tasks, i[None], phases, True, args, dims), None

    return jax.lax.scan(one, state, task_ids)[0]


@functools.partial(jax.jit, static_argnames=("env", "args", "dims"), donate_argnums=(0,))
def initial_collection(state: State, env, tasks, args: Args, dims: Dims) -> State:
    """[1] num_initial_steps per training task with z from the prior, into both buffers."""
    phases = ((trajectories(args.num_initial_steps, dims), False, True),)
    return collect_into(state, env, tasks, jnp.arange(args.n_train_tasks), phases, False, args, dims)


@functools.partial(jax.jit, static_argnames=("env", "args", "dims"), donate_argnums=(0,))
def iteration(state: State, env, tasks, args: Args, dims: Dims):
    """[2]-[3] One meta-training iteration: collection for num_tasks_sample tasks, then the gradient steps.
    Returns the state and the per-step metrics (num_train_steps,)."""
    key, k_ids = jax.random.split(state.key)
    ids = jax.random.randint(k_ids, (args.num_tasks_sample,), 0, args.n_train_tasks)  # with replacement, as oyster
    phases = ((trajectories(args.num_steps_prior, dims), False, True),
              (trajectories(args.num_steps_posterior, dims), True, True),
              (trajectories(args.num_extra_rl_steps, dims), True, False))
    state = collect_one_by_one(state._replace(key=key), env, tasks, ids, phases, args, dims)
    return gradient_steps(state, args, dims)


def gradient_steps(state: State, args: Args, dims: Dims):
    """[3] num_train_steps gradient steps, a lax.scan: the update of both paths (inside `iteration`, and jitted
    alone as `train_steps` after a collection through gymnasium). Returns the state and per-step metrics."""
    def one(state, _):
        key, k = jax.random.split(state.key)
        _, ctx_batch, rl_batch = sample_batches(state.rl, state.enc, k, args)
        state, metrics = gradient_step(state._replace(key=key), context_of(ctx_batch, args), rl_batch, args, dims)
        return state, metrics

    return jax.lax.scan(one, state, None, length=args.num_train_steps)


train_steps = jax.jit(gradient_steps, static_argnames=("args", "dims"), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("env", "args", "dims"))
def meta_test(params, env, tasks, key, args: Args, dims: Dims):
    """[4] Every held-out task x num_evals runs: returns (tasks, num_evals, K trajectories) and the mean
    belief variance each trajectory acted under (tasks, num_evals, K)."""
    n = jax.tree.leaves(tasks)[0].shape[0]
    keys = jax.random.split(key, (n, args.num_evals))
    one = lambda t, k: meta_test_task(params, env, t, k, args, dims)  # noqa: E731
    returns, info = jax.vmap(lambda t, ks: jax.vmap(lambda k: one(t, k))(ks))(tasks, keys)
    return returns, info["var"].mean(-1)


# ----------------------------------------------------------------------------
# MuJoCo task families: collection and meta-test through a gymnasium vector env, the update `train_steps`
# ----------------------------------------------------------------------------
def gym_round(env: VectorTasks, params, z, key, args: Args, dims: Dims, deterministic: bool):
    """`rollout` in each of the W envs (their tasks set before), z (W, latent) fixed per env: transitions
    (W, H, ...) and the alive mask (W, H), an env's steps after its terminal masked out."""
    k_seed, *keys = jax.random.split(key, dims.horizon + 1)

    def policy(obs, t):  # one jitted call for the W envs
        return tuple(np.asarray(x) for x in act(params["policy"], obs, z, keys[t], args, dims, deterministic))

    tr, alive = env.rollout(policy, jax.random.randint(k_seed, (env.num_envs,), 0, 2 ** 31 - 1))
    return {**tr, "dense_reward": tr["reward"]}, alive


@functools.partial(jax.jit, static_argnames=("into_enc",), donate_argnums=(0,))
def store(state: State, task_ids, traj, alive, clear, into_enc: bool) -> State:
    """Slot w's trajectory (H, ...) into task task_ids[w]'s RL buffer (and encoder buffer, first cleared where
    clear[w]), slot after slot (a lax.scan)."""
    def one(bufs, x):
        i, tr, m, c = x
        rl, enc = (jax.tree.map(lambda b: b[i], buf) for buf in bufs)
        enc = jax.tree.map(lambda e, z: jnp.where(c, z, e), enc, cleared(enc))
        rl, enc = rl.add_masked(tr, m), (enc.add_masked(tr, m) if into_enc else enc)
        put = lambda full, new: jax.tree.map(lambda f, b: f.at[i].set(b), full, new)  # noqa: E731
        return (put(bufs[0], rl), put(bufs[1], enc)), None

    (rl, enc), _ = jax.lax.scan(one, (state.rl, state.enc), (task_ids, traj, alive, clear))
    return state._replace(rl=rl, enc=enc)


@functools.partial(jax.jit, static_argnames=("args",))
def infer_from_buffer(enc_params, enc: ReplayBuffer, task_ids, key, args: Args):
    """q(z | c), c an embedding batch from each slot's E_i (oyster's sample_context in collect_data)."""
    return posterior(enc_params, context_of(draw(enc, task_ids, key, args.embedding_batch_size), args), args)


def gym_collect(state: State, env: VectorTasks, tasks, task_ids, phases, clear: bool, args: Args, dims: Dims):
    """[1]/[2] collect_task through gymnasium for distinct training tasks, W at a time. Each phase (steps,
    posterior, into_encoder_buffer) runs rounds of one trajectory per task until every task has its steps
    (whole trajectories, as oyster: more of them after early terminations). Returns the state, env steps."""
    W, total = env.num_envs, 0
    for lo in range(0, len(task_ids), W):
        slots, active = np.resize(task_ids[lo:lo + W], W), np.arange(W) < len(task_ids[lo:lo + W])  # idle: no data
        env.set_tasks([tasks[i] for i in slots])
        first = clear
        for steps, use_post, into_enc in phases:
            done, mu, var = np.zeros(W, int), jnp.zeros((W, args.latent_size)), jnp.ones((W, args.latent_size))
            while (need := active & (done < steps)).any():
                key, k_z, k_r, k_c = jax.random.split(state.key, 4)
                tr, alive = gym_round(env, state.params, sample_z(k_z, mu, var), k_r, args, dims, False)
                alive &= need[:, None]
                state = store(state._replace(key=key), slots, tr, alive, active & first, into_enc)
                done, total, first = done + alive.sum(1), total + int(alive.sum()), False
                if use_post:  # re-infer after each trajectory (update_post_train = 1)
                    mu, var = infer_from_buffer(state.params["encoder"], state.enc, slots, k_c, args)
    return state, total


def waves(ids) -> list[list[int]]:
    """The iteration's task draws in groups of distinct tasks, a task's k-th draw in group k: collecting a group
    at once is exactly oyster's one task after the other (clear, collect; clear, collect again)."""
    out, seen = [], {}
    for i in map(int, ids):
        seen[i] = seen.get(i, -1) + 1
        out += [[] for _ in range(seen[i] + 1 - len(out))]
        out[seen[i]].append(i)
    return out


def gym_iteration(state: State, env: VectorTasks, tasks, args: Args, dims: Dims):
    """[2]-[3] as `iteration`, the collection through gymnasium, then the same jitted gradient steps. Returns
    the state, the metrics and the env steps collected."""
    key, k_ids = jax.random.split(state.key)
    ids = np.asarray(jax.random.randint(k_ids, (args.num_tasks_sample,), 0, args.n_train_tasks))
    phases = ((args.num_steps_prior, False, True), (args.num_steps_posterior, True, True),
              (args.num_extra_rl_steps, True, False))
    state, total = state._replace(key=key), 0
    for wave in waves(ids):
        state, n = gym_collect(state, env, tasks, wave, phases, True, args, dims)
        total += n
    return *train_steps(state, args, dims), total


def gym_meta_test(params, env: VectorTasks, tasks, key, args: Args, dims: Dims):
    """[4] meta_test_task through gymnasium for W (task, run) pairs at a time; as `meta_test`, returns
    (tasks, num_evals, K) and the belief variance each trajectory acted under."""
    K, H, W = trajectories(args.num_steps_per_eval, dims), dims.horizon, env.num_envs
    pairs = [(i, r) for i in range(len(tasks)) for r in range(args.num_evals)]
    returns, z_var = np.zeros((2, len(tasks), args.num_evals, K))
    for lo in range(0, len(pairs), W):
        chunk = [pairs[j % len(pairs)] for j in range(lo, lo + W)]  # padded with repeats, not recorded
        env.set_tasks([tasks[i] for i, _ in chunk])
        ctx, mask = np.zeros((W, K * H, context_dim(args, dims)), np.float32), np.zeros((W, K * H), bool)
        mu, var = jnp.zeros((W, args.latent_size)), jnp.ones((W, args.latent_size))
        for t in range(K):
            key, k_z, k_r = jax.random.split(key, 3)
            tr, alive = gym_round(env, params, sample_z(k_z, mu, var), k_r, args, dims, True)
            for w, (i, r) in enumerate(chunk[:len(pairs) - lo]):
                returns[i, r, t], z_var[i, r, t] = (tr["reward"][w] * alive[w]).sum(), float(var[w].mean())
            ctx[:, t * H:(t + 1) * H], mask[:, t * H:(t + 1) * H] = context_of(tr, args), alive
            if t + 1 >= args.num_exp_traj_eval:  # z ~ q(z | everything this run has seen)
                mu, var = jit_posterior(params["encoder"], ctx, args, mask)
    return returns, z_var


jit_posterior = jax.jit(posterior, static_argnames=("args",))


# ----------------------------------------------------------------------------
# Set-up: checks
# ----------------------------------------------------------------------------
def make_task_family(env_id: str, width: int = 1):
    """The pure-JAX task family (FuncEnv) of `env_id`, or a MuJoCo one as a vector env of `width` tasks."""
    env = make_env(env_id)
    if task_family_of(env) is not None:
        return VectorTasks(env_id, width)
    func_env = func_env_of(env)
    if func_env is None or not is_task_family(func_env):
        fail(f"PEARL meta-trains across a task family: a pure-JAX one (PointRobot-v0, SparsePointRobot-v0) or a "
             f"MuJoCo one (HalfCheetahVelOyster-v0, HalfCheetahDirOyster-v0, AntDirOyster-v0); '{env_id}' is not one")
    if not isinstance(func_env.action_space, spaces.Box):
        fail(f"PEARL's SAC needs a continuous (Box) action space; '{env_id}' has {func_env.action_space}")
    return func_env


def task_lists(env, args: Args):
    """oyster's fixed train / held-out tasks if the family has them, else a seeded draw (seed 1337)."""
    env = getattr(env, "family", env)
    if hasattr(env, "task_splits"):
        return env.task_splits(args.n_train_tasks, args.n_eval_tasks)
    n = args.n_train_tasks
    tasks = env.sample_tasks(jax.random.PRNGKey(1337), n + args.n_eval_tasks)
    return jax.tree.map(lambda x: x[:n], tasks), jax.tree.map(lambda x: x[n:], tasks)


def validate(args: Args) -> None:
    check_ranges(args, at_least_1=("num_iterations", "eval_interval", "latent_size", "net_size", "encoder_size",
                                   "n_train_tasks", "n_eval_tasks", "meta_batch", "num_tasks_sample",
                                   "num_train_steps", "batch_size", "embedding_batch_size", "num_evals",
                                   "num_steps_per_eval", "num_exp_traj_eval", "buffer_size", "total_timesteps",
                                   "checkpoint_interval"),
                 non_negative=("num_initial_steps", "num_steps_prior", "num_steps_posterior", "num_extra_rl_steps",
                               "kl_lambda", "policy_mean_reg", "policy_std_reg"),
                 positive=("learning_rate", "reward_scale"), discount=("gamma",), open_unit=("tau",))
    if args.num_initial_steps == 0:
        fail("--num-initial-steps must be >= 1: every training task needs data before the first gradient step")
    if args.capture_video:
        fail("--capture-video is not supported by PEARL's point robots")


def check_sizes(args: Args, dims: Dims) -> None:
    rows = 2 * dims.obs_dim + dims.action_dim + 3
    bufs = 4 * args.n_train_tasks * (buffer_capacity(args, dims) + encoder_capacity(args, dims)) * rows
    step = 4 * args.meta_batch * (args.batch_size + args.embedding_batch_size) * max(args.net_size,
                                                                                      args.encoder_size) * 30
    check_memory(3 * bufs + step, "PEARL's per-task buffers and a gradient step",
                 "lower --buffer-size, --batch-size, --meta-batch or --n-train-tasks")


def iterations_to_run(args: Args, dims: Dims) -> int:
    if args.total_timesteps is None:
        return args.num_iterations
    n = -(-(args.total_timesteps - initial_steps(args, dims)) // steps_per_iteration(args, dims))
    if n < 1:
        fail(f"--total-timesteps ({args.total_timesteps}) does not reach past the initial collection "
             f"({initial_steps(args, dims)} env steps) and one iteration")
    return n


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> dict:
    args = config(args)
    validate(args)
    env = make_task_family(args.env_id, args.num_tasks_sample)
    gym_path = isinstance(env, VectorTasks)  # MuJoCo: collection and meta-test in Python, the update jitted
    dims = dims_of(env)
    check_sizes(args, dims)
    train_tasks, test_tasks = task_lists(env, args)
    n_iter, per_iter, init_steps = iterations_to_run(args, dims), steps_per_iteration(args, dims), \
        initial_steps(args, dims)
    key = seed_everything(args.seed)
    k_init, k_eval = jax.random.split(key)
    run = Run(args)
    progress = Progress(f"PEARL on {args.env_id}: {args.n_train_tasks} train / {args.n_eval_tasks} held-out tasks, "
                        f"{n_iter} iterations x ({per_iter} env steps + {args.num_train_steps} gradient steps of "
                        f"{args.meta_batch} tasks x {args.batch_size}), nets {args.net_size}",
                        n_iter, unit="iterations", start=0, every=args.eval_interval,
                        compiling="the collection, the gradient steps and the meta-test")
    K = trajectories(args.num_steps_per_eval, dims)
    template = {"train": init_state(k_init, args, dims), "iteration": np.int64(0),
                "evals": np.full((n_iter, args.n_eval_tasks, args.num_evals, K), np.nan, np.float32),
                "env_steps": np.int64(0)}
    state = run.restore(template)
    done = int(state["iteration"])
    if done == 0 and run.start_step == 0:
        with run.timed("collect"):  # [1]
            if gym_path:
                state["train"], n = gym_collect(state["train"], env, train_tasks, np.arange(args.n_train_tasks),
                                                ((args.num_initial_steps, False, True),), False, args, dims)
            else:
                state["train"], n = initial_collection(state["train"], env, train_tasks, args, dims), init_steps
            state["env_steps"] = np.int64(n)
            jax.block_until_ready(state["train"])
    names = ("loss/qf", "loss/vf", "loss/policy", "loss/kl")
    ckpt_every = args.checkpoint_interval or args.eval_interval
    for it in range(done, n_iter):
        with run.timed("train"):  # [2]-[3] one jitted call (MuJoCo: collection through gymnasium, then one)
            if gym_path:
                train, record, n = gym_iteration(state["train"], env, train_tasks, args, dims)
            else:
                (train, record), n = iteration(state["train"], env, train_tasks, args, dims), per_iter
            jax.block_until_ready((train, record))
        steps = it * args.num_train_steps + np.arange(1, args.num_train_steps + 1)
        check_finite_series(steps, unit="gradient step", **{k: record[k] for k in names})
        state["train"], state["iteration"] = train, np.int64(it + 1)
        state["env_steps"] = np.int64(state["env_steps"] + n)
        env_steps = int(state["env_steps"])
        metrics = {k: float(v.mean()) for k, v in record.items()}
        if (it + 1) % args.eval_interval == 0 or it + 1 == n_iter:
            with run.timed("eval"):  # [4]
                returns, z_var = jax.block_until_ready((gym_meta_test if gym_path else meta_test)(
                    train.params, env, test_tasks, jax.random.fold_in(k_eval, it), args, dims))
            state["evals"][it] = np.asarray(returns)
            per_traj = np.asarray(returns).mean((0, 1))
            metrics.update({"eval/return": float(per_traj[-1]), "eval/first_trajectory_return": float(per_traj[0]),
                            "eval/posterior_var": float(np.asarray(z_var)[..., -1].mean())})
        metrics.update({"iteration": it + 1, "gradient_steps": (it + 1) * args.num_train_steps,
                        "seconds_per_iteration": run.timings["train"] / (it + 1 - done)})
        run.log(metrics, env_steps, echo=False)
        progress.update(it + 1, metrics, ["eval/return", "eval/first_trajectory_return", "loss/qf", "loss/kl",
                                          "z/var"])
        if (it + 1) % ckpt_every == 0 or it + 1 == n_iter:
            run.save(state, env_steps)

    evals = state["evals"]
    last = np.flatnonzero(~np.isnan(evals).all((1, 2, 3)))
    final = evals[last[-1]] if last.size else np.full(evals.shape[1:], np.nan)
    summary = {"wall_seconds": sum(run.timings.values()), "final_return": float(final[..., -1].mean()),
               "final_first_trajectory_return": float(final[..., 0].mean()),
               "final_return_per_trajectory": [float(x) for x in final.mean((0, 1))],
               "env_steps": int(state["env_steps"])}
    run.log({**{k: v for k, v in summary.items() if k != "final_return_per_trajectory"},
             "eval/return": summary["final_return"]}, summary["env_steps"], echo=False)
    progress.done("final_return (last meta-test trajectory, held-out tasks)", summary["final_return"],
                  reference=f"first trajectory, z from the prior: {summary['final_first_trajectory_return']:.3g}")
    params = state["train"].params
    if args.save_model:
        cfg = {**json.loads(json.dumps(dataclasses.asdict(args))), **dims._asdict()}
        print(f"saved {save_checkpoint(run.dir / 'pearl.msgpack', {'params': params, 'config': cfg})}")
    run.close()
    return {"params": params, "evals": evals, "args": args, "dims": dims, "run_dir": run.dir, **summary}


if __name__ == "__main__":
    cli(Args, main)
