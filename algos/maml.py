"""MAML for RL (with TRPO in the outer loop), and ProMP as an option.

Papers:
- Finn, Abbeel, Levine 2017, "Model-Agnostic Meta-Learning for Fast
  Adaptation of Deep Networks", https://arxiv.org/abs/1703.03400 (Sec. 3.3
  Alg. 3, reinforcement learning; Sec. 5.3, 2-D navigation and locomotion;
  Fig. 5 the adaptation curves). Facts from the authors' code
  (cbfinn/maml_rl, maml_examples/maml_trpo_point.py, test_maml_point.py):
  2x100 ReLU Gaussian policy, inner step 0.5 on 2-D navigation (0.25 after
  the first step at meta-test), batches of whole paths until 20 x 100 steps
  per task (rllab's step budget; 40 x 100 at meta-test), meta-batch 40
  tasks (20 for the policy of Fig. 5), horizon 100, an episode ends within
  0.01 of the goal, outer TRPO with max KL 0.01, linear feature baseline,
  actions normalised to [-1, 1] (rllab's `normalize`). The "pretrained"
  baseline (use_maml=False): one Adam step (1e-3) per iteration on the
  multi-task policy-gradient loss.
- Rothfuss, Lee, Clavera, Asfour, Abbeel 2018, "ProMP: Proximal Meta-Policy
  Search", https://arxiv.org/abs/1810.06784 (Sec. 5 the low-variance
  curvature (LVC) estimator, Sec. 6 the clipped meta-objective, Alg. 1).

Meta-RL learns an *initialisation* theta from which one (or a few) vanilla
policy-gradient steps on a new task's own samples give a good policy:

    max_theta  E_{T ~ p(T)} [ J_T( theta'_T ) ],
    theta'_T = theta + alpha * grad_theta J_T(theta)   (the inner step, on
                                                        samples of pi_theta)

The outer gradient flows *through* the inner step: d theta'/d theta =
I + alpha * Hessian of J_T. That Hessian is the second-order term;
`--first-order` drops it (treats the inner gradient as a constant).

Run:
    python -m algos.maml                                  # 2-D navigation, 20 meta-iterations: 47 s (one core)
    python -m algos.maml --total-timesteps 8000000        # the authors' 100 meta-iterations
    python -m algos.maml --first-order                    # first-order MAML
    python -m algos.maml --estimator promp                # ProMP
    python -m algos.maml --inner-steps 0                  # the paper's "pretrained" baseline (Adam, no inner step)
    python -m algos.maml --inner-steps 0 --pretrain-optimizer trpo   # the same with TRPO (an extra)
    python -m algos.maml --env-id HalfCheetahDir-v0 --meta-batch 40 --total-timesteps 320000000
    python -m algos.maml --resume runs/<run>                # continue from its last checkpoint

Algorithm (Alg. 3 of the paper; numbers mark the code below):
    [1] sample a meta-batch of tasks T_i ~ p(T)
    for each task, for inner step j = 0 .. K-1:
      [2] sample D_ij with pi_{theta'_ij} (theta'_i0 = theta): whole paths
          until N x horizon steps (rllab's step budget)
      [3] fit the linear feature baseline to D_ij; advantages A = R - b(s, t)
      [4] inner step: theta'_i,j+1 = theta'_ij + alpha grad L_in(theta'_ij; D_ij)
          maml:  L_in = mean_t log pi(a_t|s_t) A_t
          promp: L_in = mean_t [pi(a_t|s_t) / pi_sampling(a_t|s_t)] A_t (LVC)
    [5] sample post-update paths D'_i with pi_{theta'_iK} (same budget); advantages
    [6] outer step on theta, the D_ij and D'_i held fixed, the theta'_iK
        recomputed as functions of theta (autodiff through [4]):
          maml:  TRPO on S(theta) = mean_i mean_t r_t(theta) A'_t,
                 r_t = pi_{theta'_i(theta)}(a_t|s_t) / pi_{theta'_i(theta_old)}(a_t|s_t),
                 s.t. mean_i KL(pi_{theta'_i(theta_old)} || pi_{theta'_i(theta)}) <= delta:
                 conjugate gradient on Fisher-vector products, then a
                 backtracking line search that checks the KL and the surrogate
          promp: a few Adam steps on mean_i clip-objective(r_t, A'_t)
                 - eta KL(pi_theta_old || pi_theta) on the pre-update states
          pretrained baseline (K = 0): one Adam step on -mean_i mean_t log pi_theta A_t
    [7] every eval_interval steps: meta-test on new tasks, the return before
        adaptation and after 1, 2, 3 inner steps (Fig. 5)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from gymnasium import spaces
from jax.flatten_util import ravel_pytree

from common.checkpoints import env_state, load_checkpoint, save_checkpoint, set_env_state
from common.checks import check_finite, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import make_env
from common.envs.mujoco_tasks import TaskFamily, VectorTasks, task_family_of
from common.experiment import CommonArgs, Run, seed_everything
from common.jax_envs.adapter import func_env_of, is_task_family
from common.progress import Progress


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "PointNav2D-v0"
    """a task family: PointNav2D-v0 (pure JAX), HalfCheetahDir-v0, HalfCheetahVel-v0, AntDir-v0 (MuJoCo)"""
    total_timesteps: int = 1_600_000
    """env steps of meta-training, rounded down to whole iterations (at least one): one iteration is meta_batch x
    trajectories x horizon x (inner_steps + 1) = 80,000 on 2-D navigation, so 20 iterations (the authors' 100:
    --total-timesteps 8000000)"""
    eval_interval: int = 800_000
    """meta-test every this many env steps (rounded down to whole iterations, at least one)"""
    eval_episodes: int = 40
    """meta-test tasks (new goals); the paper's test script uses 40"""
    meta_batch: int = 20
    """tasks per meta-iteration (authors' 2-D code: 40; the policy of their Fig. 5 was trained with 20)"""
    trajectories_per_task: int = 20
    """N: each batch of a task (per inner step, and after adaptation) holds whole paths until it has at least
    N x horizon steps (rllab's step budget; more, shorter paths when episodes end early)"""
    eval_trajectories: int = 40
    """N at meta-test: whole paths until N x horizon steps per task (the authors' test script: 4000 steps = 40 x 100)"""
    inner_steps: int = 1
    """K, inner policy-gradient steps in meta-training (0: the multi-task "pretrained" baseline, see
    --pretrain-optimizer)"""
    pretrain_optimizer: Literal["adam", "trpo"] = "adam"
    """with --inner-steps 0: adam = the paper's pretrained baseline (the authors' use_maml=False: one Adam step of
    --adam-lr per meta-iteration on the multi-task policy-gradient loss); trpo = TRPO on the same samples (an extra)"""
    adam_lr: float = 1e-3
    """the pretrained baseline's Adam step size (the authors' FirstOrderOptimizer default)"""
    inner_lr: float = 0.5
    """alpha, inner step size (authors' 2-D navigation code: 0.5)"""
    first_order: bool = False
    """drop the second-order term (first-order MAML)"""
    estimator: Literal["maml", "promp"] = "maml"
    """maml: VPG inner step, TRPO outer step; promp: LVC inner step, clipped outer objective"""
    hidden_sizes: tuple[int, ...] = (100, 100)
    """policy MLP widths (ReLU), as in the paper"""
    gamma: float = 0.99
    """discount of the returns used for advantages"""
    max_kl: float = 0.01
    """TRPO trust region delta (mean KL of the post-update policies)"""
    cg_iters: int = 10
    """conjugate gradient iterations"""
    cg_damping: float = 1e-5
    """damping added to the Fisher-vector product (rllab: 1e-5)"""
    backtrack_ratio: float = 0.8
    """line-search shrink factor"""
    backtrack_steps: int = 15
    """line-search tries"""
    promp_steps: int = 5
    """ProMP: Adam steps per meta-iteration"""
    promp_lr: float = 1e-3
    """ProMP: Adam step size"""
    promp_clip: float = 0.3
    """ProMP: likelihood-ratio clip epsilon"""
    promp_kl_coef: float = 5e-4
    """ProMP: eta, penalty on KL(pi_theta_old || pi_theta) at the pre-update states"""
    test_steps: int = 3
    """meta-test: inner steps after which the return is measured (Fig. 5: 3)"""
    init_params: str | None = None
    """start from a policy.msgpack written by --save-model (e.g. to meta-test it)"""


class Dims(NamedTuple):
    """The sizes read from the env (Args holds everything else)."""

    obs_dim: int
    action_dim: int
    horizon: int


def steps_per_iteration(args: Args, dims: Dims) -> int:
    """Env steps of one meta-iteration, counted as rllab does (the step budgets): K pre-update batches and one
    post-update batch of N x horizon steps per task (a batch's last path may run up to horizon - 1 steps over)."""
    return args.meta_batch * args.trajectories_per_task * dims.horizon * (args.inner_steps + 1)


# ----------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------
class GaussianMLP(nn.Module):
    """pi(a|s) = N(mu(s), diag(exp(log_std))^2), a state-independent log std. The actions live in [-1, 1]^d
    (rescaled to the env's bounds when stepping)."""

    action_dim: int
    hidden_sizes: Sequence[int] = (100, 100)

    @nn.compact
    def __call__(self, obs):
        # (P, L) as one axis of rows: XLA's CPU dots need no transposes then (Fisher-vector products 1.3x faster)
        x = obs.reshape(-1, obs.shape[-1])
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        mean = nn.Dense(self.action_dim, kernel_init=nn.initializers.variance_scaling(0.01, "fan_in", "normal"))(x)
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        mean = mean.reshape(*obs.shape[:-1], self.action_dim)
        return mean, jnp.broadcast_to(log_std, mean.shape)


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, exp(log_std)^2), summed over action dims: (...,)."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(p || q) of diagonal Gaussians, summed over action dims: (...,)."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    return jnp.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5, axis=-1)


class Batch(NamedTuple):
    """The samples of one task: leading axes (P, L), P lanes of L steps; (M, P, L) for a meta-batch. A lane holds
    whole paths one after another: pure-JAX families have P = 1 lane of L = N H + H - 1 steps (the step budget N H
    and room to finish the last path, see `rollouts`), MuJoCo families P = N lanes of one path of L = H steps."""

    obs: jax.Array  # (P, L, obs_dim)
    action: jax.Array  # (P, L, action_dim), in [-1, 1]-space, before clipping
    reward: jax.Array  # (P, L), 0 where mask is 0
    mask: jax.Array  # (P, L) 1 on the steps of the paths kept in the batch, else 0
    logp: jax.Array  # (P, L) log-prob under the policy that sampled it
    advantage: jax.Array  # (P, L) filled by `with_advantages`
    step: jax.Array  # (P, L) the step's index within its path (0 at a path's first step)
    last: jax.Array  # (P, L) 1 at the last step of a path (the goal reached or the horizon), else 0


# ----------------------------------------------------------------------------
# Sampling [2] (a pure-JAX task family, or MuJoCo's), returns, baseline and advantages [3]
# ----------------------------------------------------------------------------
def rollouts(apply_fn, params, task, key, env, args: Args, dims: Dims) -> Batch:
    """[2] rllab's sampling by a step budget: whole paths of pi_params on one task, one after another, until the
    batch holds at least B = N H steps (rllab's batch_size counts steps; the authors give it as N trajectories x H).

    A path ends when the env says so (2-D navigation: the goal reached) or after H steps; the env is then reset and
    the next path starts. A path is kept when it starts before step B (the steps collected so far are < B), and is
    then kept whole, as rllab's sampler keeps the path that crosses the budget (rllab/sampler/parallel_sampler.py,
    sample_paths; sandbox/rocky/tf/samplers/vectorized_sampler.py keeps only finished paths). The last kept path
    starts at step B - 1 at the latest and so ends by step B + H - 2: one scan of L = B + H - 1 steps (a fixed shape
    for jit) holds every kept path, and `mask` marks them. Paths that never end early give exactly N paths of H
    steps. Returns one lane: arrays (1, L, ...)."""
    low, high = env.action_space.low, env.action_space.high
    budget = args.trajectories_per_task * dims.horizon  # B
    k_init, k_steps = jax.random.split(key)

    def step(carry, x):
        state, t, start = carry  # env state, step within the path, index at which the path started
        i, k = x
        k_act, k_env, k_reset = jax.random.split(k, 3)
        obs = env.observation(state, k_env, task)
        mean, log_std = apply_fn(params, obs)
        action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
        # rllab's `normalize`: the policy acts in [-1, 1], the env in [low, high]
        env_action = low + (jnp.clip(action, -1, 1) + 1) * 0.5 * (high - low)
        nxt = env.transition(state, env_action, k_env, task)
        reward = env.reward(state, env_action, nxt, k_env, task)
        last = env.terminal(nxt, k_env, task) | (t + 1 == dims.horizon)
        kept = (start < budget).astype(jnp.float32)
        out = (obs, action, reward * kept, kept, gaussian_log_prob(mean, log_std, action), t, last * kept)
        # auto-reset: after a path's last step the next path starts from the env's initial state
        state = jax.tree.map(lambda a, b: jnp.where(last, a, b), env.initial(k_reset, task), nxt)
        return (state, jnp.where(last, 0, t + 1), jnp.where(last, i + 1, start)), out

    length = budget + dims.horizon - 1  # L
    init = (env.initial(k_init, task), jnp.int32(0), jnp.int32(0))
    _, (obs, act, rew, mask, logp, t, last) = jax.lax.scan(
        step, init, (jnp.arange(length), jax.random.split(k_steps, length)))
    lane = lambda x: x[None]  # (L, ...) -> (1, L, ...)
    return Batch(lane(obs), lane(act), lane(rew), lane(mask), lane(logp), lane(jnp.zeros_like(rew)),
                 lane(t.astype(jnp.float32)), lane(last.astype(jnp.float32)))


class GymTaskSampler:
    """[2] for a MuJoCo task family (common/envs/mujoco_tasks.py): M x N copies of the env stepped in lockstep
    (`VectorTasks`), each given its task; one jitted policy call per time step for all of them, N paths of at most H
    steps per task (a fixed number of paths: the step budget of `rollouts` only differs from it when paths end
    early). Returns a `Batch` of N lanes of H steps. Its state (for checkpoints, `state()` and `set_state()`): the
    reset-seed counter and the sub-envs' states."""

    def __init__(self, env_id: str, apply_fn, args: Args, dims: Dims, seed: int):
        self.args, self.dims, self.seed = args, dims, seed
        self.tasks = VectorTasks(env_id, args.meta_batch * args.trajectories_per_task, horizon=dims.horizon)
        self.envs = self.tasks.vec
        self.low, self.high = self.envs.single_action_space.low, self.envs.single_action_space.high

        @jax.jit
        def act(params, obs, key):  # params (M, ...), obs (M, N, obs_dim)
            mean, log_std = jax.vmap(apply_fn)(params, obs)
            action = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
            return action, gaussian_log_prob(mean, log_std, action)

        self.act = act

    def state(self) -> dict:
        return {"seed": np.int64(self.seed), "envs": env_state(self.envs)}

    def set_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        set_env_state(self.envs, state["envs"])

    def __call__(self, params_per_task, tasks, key) -> Batch:
        M, N, T = self.args.meta_batch, self.args.trajectories_per_task, self.dims.horizon
        self.tasks.set_tasks([t for t in np.asarray(tasks) for _ in range(N)])
        self.seed += 1
        logps = []

        def policy(obs, t):  # -> (the action stored, the action scaled to the env's bounds)
            action, logp = self.act(params_per_task, jnp.asarray(obs).reshape(M, N, -1), jax.random.fold_in(key, t))
            action = np.asarray(action).reshape(M * N, -1)
            logps.append(np.asarray(logp, np.float32).reshape(-1))
            return action, self.low + (np.clip(action, -1, 1) + 1) * 0.5 * (self.high - self.low)

        paths, alive = self.tasks.rollout(policy, self.seed + np.arange(M * N))  # env i reset with seed + i
        mask = alive.astype(np.float32)  # (M N, T)
        arrays = dict(obs=paths["obs"], action=paths["action"], reward=paths["reward"] * mask, mask=mask,
                      logp=np.stack(logps, 1), step=np.broadcast_to(np.arange(T, dtype=np.float32), mask.shape),
                      last=np.maximum(mask * paths["terminal"], np.arange(T) == T - 1))  # terminated, or at H
        arrays = {k: jnp.asarray(v.reshape(M, N, T, *v.shape[2:]), jnp.float32) for k, v in arrays.items()}
        return Batch(advantage=jnp.zeros_like(arrays["reward"]), **arrays)


def discounted_returns(reward, last, gamma):
    """R_t = sum_{l >= 0} gamma^l r_{t+l} up to the end of t's path (a lane holds paths one after another, `last`
    marks each path's final step): (P, L)."""

    def back(acc, x):
        r, end = x
        acc = r + gamma * acc * (1.0 - end)  # a path's last step does not see the next path
        return acc, acc

    _, ret = jax.lax.scan(back, jnp.zeros(reward.shape[0]), (reward.T, last.T), reverse=True)
    return ret.T


def baseline_features(obs, step, mask):
    """rllab's LinearFeatureBaseline features [o, o^2, t, t^2, t^3, 1] with t = (step within the path) / 100 and
    o clipped to [-10, 10]: (P, L, 2 obs_dim + 4)."""
    o = jnp.clip(obs, -10, 10)
    t = (step / 100.0)[..., None]
    return jnp.concatenate([o, o**2, t, t**2, t**3, jnp.ones_like(t)], axis=-1) * mask[..., None]


def fit_linear_baseline(features, returns, mask, reg: float = 1e-5):
    """Ridge regression of returns on features over the valid steps: w = (X^T X + reg I)^-1 X^T y. As rllab's
    LinearFeatureBaseline.fit does, a solve that gives NaNs (X^T X singular in float32, e.g. two identical features)
    is retried with the regulariser x10, up to 5 tries. Returns the fitted values (P, L)."""
    X = features.reshape(-1, features.shape[-1])
    y = (returns * mask).reshape(-1)
    A, b = X.T @ X, X.T @ y
    tries = jnp.stack([jnp.linalg.solve(A + reg * 10.0**k * jnp.eye(X.shape[1]), b) for k in range(5)])  # (5, F)
    w = tries[jnp.argmax(jnp.all(jnp.isfinite(tries), axis=1))]  # the first finite one (else the first)
    return features @ w


def with_advantages(batch: Batch, gamma: float) -> Batch:
    """[3] A = R - b(s, t), then normalised to mean 0, std 1 over the valid steps (rllab's center_adv)."""
    ret = discounted_returns(batch.reward, batch.last, gamma)
    features = baseline_features(batch.obs, batch.step, batch.mask)
    adv = (ret - fit_linear_baseline(features, ret, batch.mask)) * batch.mask
    n = jnp.maximum(batch.mask.sum(), 1.0)
    mean = adv.sum() / n
    std = jnp.sqrt(((adv - mean) ** 2 * batch.mask).sum() / n)
    return batch._replace(advantage=(adv - mean) / (std + 1e-8) * batch.mask)


def masked_mean(x, mask):
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def average_return(batch: Batch):
    """rllab's AverageReturn: the undiscounted return per path, averaged over each task's paths (a task that
    reaches its goal sooner has more, shorter paths), then over the tasks. Leading axes (M, ..., P, L)."""
    per_task = lambda x: x.reshape(x.shape[0], -1).sum(-1)
    return (per_task(batch.reward) / jnp.maximum(per_task(batch.last * batch.mask), 1.0)).mean()


# ----------------------------------------------------------------------------
# Inner step, and the adapted parameters as a function of theta
# ----------------------------------------------------------------------------
def inner_objective(apply_fn, params, batch: Batch, args: Args):
    """L_in, the objective the inner step climbs (a per-task policy gradient).

    maml:  mean log pi(a|s) A. Its gradient is the policy gradient; its Hessian lacks the term from the sampling
           distribution's dependence on theta (the pre-update samples are treated as fixed data).
    promp: mean pi(a|s) / pi_sampling(a|s) A (LVC). Same gradient at the sampling parameters, but its Hessian
           contains the missing term in a low-variance form (ProMP, Sec. 5)."""
    mean, log_std = apply_fn(params, batch.obs)
    logp = gaussian_log_prob(mean, log_std, batch.action)
    if args.estimator == "promp":
        return masked_mean(jnp.exp(logp - batch.logp) * batch.advantage, batch.mask)
    return masked_mean(logp * batch.advantage, batch.mask)


def inner_step(apply_fn, params, batch: Batch, args: Args, lr=None):
    """[4] theta' = theta + alpha grad L_in(theta). With --first-order the gradient is a constant to the outer
    derivative (stop_gradient)."""
    # THE SECOND-ORDER TERM COMES FROM HERE. The outer step differentiates theta' = theta + alpha grad L_in(theta)
    # with respect to theta: d theta'/d theta = I + alpha Hessian L_in(theta), so the meta-gradient
    # (d theta'/d theta)^T grad J(theta') contains the Hessian of the inner objective. Autodiff gets it by
    # differentiating through this jax.grad (reverse-over-reverse); stop_gradient drops it (first-order MAML).
    grad = jax.grad(inner_objective, argnums=1)(apply_fn, params, batch, args)
    if args.first_order:
        grad = jax.lax.stop_gradient(grad)
    lr = args.inner_lr if lr is None else lr
    return jax.tree.map(lambda p, g: p + lr * g, params, grad)


def adapt(apply_fn, theta, pre: Batch, args: Args):
    """theta'_K(theta) for one task, from its K fixed pre-update batches (leading axis K). This is the function the
    outer step differentiates."""
    for j in range(args.inner_steps):
        theta = inner_step(apply_fn, theta, jax.tree.map(lambda x, j=j: x[j], pre), args)
    return theta


# ----------------------------------------------------------------------------
# Outer step: the meta-objective, TRPO and ProMP
# ----------------------------------------------------------------------------
def post_update_policy(apply_fn, theta, pre_i: Batch, post_i: Batch, args: Args):
    """pi_theta'_i(theta) for one task at its post-update states: (mean, log_std), (P, L, A) each."""
    return apply_fn(adapt(apply_fn, theta, pre_i, args), post_i.obs)


def task_sum(fn, *per_task):
    """sum_i fn(task i's slices of per_task). On a CPU one task after another (lax.map): its activations (L x 100
    floats, 0.8 MB at the authors' sizes) stay in the core's cache, where a vmap makes every intermediate M times
    larger (2x slower on a core; benchmarks/maml_speed.py). On an accelerator all at once (vmap), which fills it."""
    one_by_one = jax.default_backend() == "cpu"
    out = jax.lax.map(lambda xs: fn(*xs), per_task) if one_by_one else jax.vmap(fn)(*per_task)
    return jax.tree.map(lambda x: x.sum(0), out)


def surrogate_and_kl(apply_fn, theta, theta_old, pre: Batch, post: Batch, args: Args, old=None, grad=False):
    """S(theta) = the mean over all tasks' post-update steps of r_t A'_t, and the mean over tasks of KL(pi_theta'_i
    (theta_old) || pi_theta'_i(theta)), task by task. `old` may hold the old policies (M, P, L, A) (they do not
    depend on theta). With grad=True: S and dS/dtheta (flat), the gradient summed task by task."""
    if old is None:
        old = jax.lax.map(lambda d: post_update_policy(apply_fn, theta_old, *d, args), (pre, post))
    flat, unravel = ravel_pytree(theta)
    n = jnp.maximum(post.mask.sum(), 1.0)

    def shares(f, pre_i, post_i, old_i):  # task i's: sum_t r_t A'_t / n and KL_i / M
        new = post_update_policy(apply_fn, unravel(f), pre_i, post_i, args)
        ratio = jnp.exp(gaussian_log_prob(*new, post_i.action) - post_i.logp)
        return ((ratio * post_i.advantage * post_i.mask).sum() / n,
                masked_mean(gaussian_kl(*jax.lax.stop_gradient(old_i), *new), post_i.mask) / post.mask.shape[0])

    if grad:
        return task_sum(lambda *d: jax.value_and_grad(lambda f: shares(f, *d)[0])(flat), pre, post, old)
    return task_sum(lambda *d: shares(flat, *d), pre, post, old)


def fisher_vector_product(apply_fn, theta, pre: Batch, post: Batch, args: Args):
    """v -> F v, F the Hessian at theta of the mean KL(pi_theta'_i(theta) || pi_theta'_i(.)): the Fisher information
    (the KL is minimal, zero, at theta, so its Hessian is E[-d^2 log pi] = E[grad log pi grad log pi^T]) of the
    post-update policies, pulled back through the inner step. With y_i(theta) task i's post-update (mean, log_std),
    Hessian = sum_i J_i^T H_i J_i + sum_i (dKL/dy_i) d^2 y_i, and dKL/dy_i = 0 at theta: so F v = sum_i J_i^T H_i
    J_i v exactly (Gauss-Newton form), a Jacobian-vector product through the inner step and the policy, the KL's
    Hessian in y (elementwise) and the transposed product; 0.65x the FLOPs of a jvp of the KL's gradient."""
    flat, unravel = ravel_pytree(theta)

    def one_task(v, pre_i, post_i):
        y_old, jvp = jax.linearize(lambda f: post_update_policy(apply_fn, unravel(f), pre_i, post_i, args), flat)
        kl = lambda y: masked_mean(gaussian_kl(*y_old, *y), post_i.mask) / post.mask.shape[0]  # KL_i / M
        HJv = jax.jvp(jax.grad(kl), (y_old,), (jvp(v),))[1]  # H_i (J_i v)
        return jax.linear_transpose(jvp, flat)(HJv)[0]  # J_i^T H_i J_i v

    return lambda v: task_sum(lambda pre_i, post_i: one_task(v, pre_i, post_i), pre, post)


def conjugate_gradient(matvec, b, iters: int, tol: float = 1e-10):
    """Solve F x = b for a symmetric positive definite F given only x -> F x. Returns x and F x, the latter summed
    from the products made (F x = sum_k alpha_k F p_k), so that TRPO's step size needs no extra product."""

    def body(_, c):
        x, Fx, r, p, rr = c
        Fp = matvec(p)
        alpha = rr / (p @ Fp + 1e-12)
        x, Fx, r = x + alpha * p, Fx + alpha * Fp, r - alpha * Fp
        rr_new = r @ r
        beta = jnp.where(rr > tol, rr_new / (rr + 1e-12), 0.0)
        return x, Fx, r, r + beta * p, rr_new

    return jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(b), jnp.zeros_like(b), b, b, b @ b))[:2]


class LineSearch(NamedTuple):
    """The backtracking line search's state: try i uses the step coef = ratio^(i-1)."""

    tries: jax.Array  # tries made so far
    coef: jax.Array  # step fraction of the last try
    surrogate: jax.Array  # S(theta_old + coef * step)
    kl: jax.Array  # mean KL at that point


def trpo_step(apply_fn, theta, pre: Batch, post: Batch, args: Args):
    """[6] maml: one natural-gradient step with a KL-checked line search."""
    flat, unravel = ravel_pytree(theta)
    old = jax.lax.map(lambda d: post_update_policy(apply_fn, theta, *d, args), (pre, post))  # computed once
    objective = lambda f: surrogate_and_kl(apply_fn, unravel(f), theta, pre, post, args, old)
    surr_old, g = surrogate_and_kl(apply_fn, theta, theta, pre, post, args, old, grad=True)
    fvp = fisher_vector_product(apply_fn, theta, pre, post, args)
    x, Fx = conjugate_gradient(lambda v: fvp(v) + args.cg_damping * v, g, args.cg_iters)  # x ~ F^-1 g
    # The largest step along x with quadratic KL model 1/2 s^T F s = delta: s = sqrt(2 delta / (x^T F x)) x
    # (Schulman et al. 2015, TRPO, Appendix C).
    step = jnp.sqrt(2 * args.max_kl / (x @ Fx + 1e-12)) * x

    # Backtracking line search: shrink the step until the KL is within delta and the surrogate improves; after
    # backtrack_steps failures, do not move.
    ok = lambda ls: (ls.kl <= args.max_kl) & (ls.surrogate > surr_old)

    def shrink(ls: LineSearch) -> LineSearch:
        coef = args.backtrack_ratio**ls.tries
        return LineSearch(ls.tries + 1, coef, *objective(flat + coef * step))

    ls = jax.lax.while_loop(lambda ls: (ls.tries < args.backtrack_steps) & ~ok(ls), shrink,
                            shrink(LineSearch(0, 0.0, 0.0, 0.0)))
    accepted = ok(ls)
    coef = jnp.where(accepted, ls.coef, 0.0)
    info = {"surrogate_gain": jnp.where(accepted, ls.surrogate - surr_old, 0.0),
            "kl": jnp.where(accepted, ls.kl, 0.0), "step_coef": coef, "grad_norm": jnp.linalg.norm(g)}
    return unravel(flat + coef * step), info


def promp_objective(apply_fn, theta, theta_old, pre: Batch, post: Batch, args: Args):
    """ProMP's meta-objective (Sec. 6): clipped ratio objective of the post-update policies, minus eta
    KL(pi_theta_old || pi_theta) measured on the pre-update states (to keep the pre-update policy close as well)."""
    new = jax.vmap(lambda p, q: post_update_policy(apply_fn, theta, p, q, args))(pre, post)
    ratio = jnp.exp(gaussian_log_prob(*new, post.action) - post.logp)
    clipped = jnp.minimum(ratio * post.advantage,
                          jnp.clip(ratio, 1 - args.promp_clip, 1 + args.promp_clip) * post.advantage)
    old = jax.lax.stop_gradient(apply_fn(theta_old, pre.obs))
    kl = masked_mean(gaussian_kl(*old, *apply_fn(theta, pre.obs)), pre.mask)
    return masked_mean(clipped, post.mask) - args.promp_kl_coef * kl


def promp_step(apply_fn, theta, pre: Batch, post: Batch, args: Args):
    """[6] promp: a few Adam steps on the clipped meta-objective. Adam starts afresh at every meta-iteration (as in
    ProMP's code), so no optimiser state outlives the step."""
    opt = optax.adam(args.promp_lr)
    loss = lambda th: -promp_objective(apply_fn, th, theta, pre, post, args)

    def body(carry, _):
        th, opt_state = carry
        value, grad = jax.value_and_grad(loss)(th)
        updates, opt_state = opt.update(grad, opt_state, th)
        return (optax.apply_updates(th, updates), opt_state), value

    (new, _), values = jax.lax.scan(body, (theta, opt.init(theta)), None, length=args.promp_steps)
    return new, {"objective_first": -values[0], "objective_last": -values[-1]}


def pretrain_loss(apply_fn, theta, batch: Batch):
    """The multi-task policy-gradient loss of the pretrained baseline: minus the mean over tasks of each task's mean
    log pi(a|s) A (the authors' surrogate of step 0 with use_maml=False, sandbox/rocky/tf/algos/maml_npo.py)."""
    per_task = jax.vmap(lambda b: masked_mean(gaussian_log_prob(*apply_fn(theta, b.obs), b.action) * b.advantage,
                                              b.mask))(batch)
    return -per_task.mean()


def pretrain_adam_step(apply_fn, theta, opt_state, post: Batch, args: Args):
    """[6] --inner-steps 0 with --pretrain-optimizer adam: ONE Adam step on the whole batch (max_epochs 1, batch_size
    None in the authors' FirstOrderOptimizer). Unlike ProMP's, this Adam's moments live on from one meta-iteration to
    the next (one TF optimiser built once), so they are part of the checkpoint."""
    opt = optax.adam(args.adam_lr)
    loss, grad = jax.value_and_grad(lambda th: pretrain_loss(apply_fn, th, post))(theta)
    updates, opt_state = opt.update(grad, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, {"loss": loss, "grad_norm": optax.global_norm(grad)}


# ----------------------------------------------------------------------------
# Meta-training phases and meta-test
# ----------------------------------------------------------------------------
class Phases(NamedTuple):
    """The jitted phases of a meta-iteration, and the MuJoCo sampler (None for a pure-JAX family) whose state a
    checkpoint keeps."""

    sample: Callable  # (params per task, tasks, key) -> Batch with advantages   [2], [3], [5]
    inner: Callable  # (params per task, batch, lr) -> adapted params           [4]
    outer: Callable  # (theta, opt_state, pre, post) -> theta, opt_state, info  [6]
    sampler: GymTaskSampler | None


def make_phases(env, policy: GaussianMLP, args: Args, dims: Dims, seed: int = 0) -> Phases:
    """The phases of a meta-iteration (one jitted function per phase)."""
    apply_fn = policy.apply
    advantages = jax.jit(jax.vmap(lambda b: with_advantages(b, args.gamma)))
    gym_sampler = None
    if isinstance(env, TaskFamily):  # MuJoCo: a vector env steps, JAX acts
        gym_sampler = GymTaskSampler(args.env_id, apply_fn, args, dims, seed)
        sample = lambda params_per_task, tasks, key: advantages(gym_sampler(params_per_task, tasks, key))
    else:  # pure JAX: all tasks and trajectories in one jitted, vmapped scan

        @jax.jit
        def sample(params_per_task, tasks, key):
            """[2]/[5] N trajectories per task with per-task params, + advantages."""
            batch = jax.vmap(lambda p, t, k: rollouts(apply_fn, p, t, k, env, args, dims))(
                params_per_task, tasks, jax.random.split(key, args.meta_batch))
            return advantages(batch)

    # [4] one inner step per task (values only: the outer step redoes it)
    inner = jax.jit(jax.vmap(lambda p, b, lr: inner_step(apply_fn, p, b, args, lr), in_axes=(0, 0, None)))
    # [6] the outer update; pre has axes (M, K, P, L, ...). Only the pretrained baseline's Adam has a state.
    if uses_adam(args):
        outer = jax.jit(lambda theta, opt_state, pre, post: pretrain_adam_step(apply_fn, theta, opt_state, post, args))
    else:
        outer_step = promp_step if args.estimator == "promp" else trpo_step

        @jax.jit
        def outer(theta, opt_state, pre, post):
            theta, info = outer_step(apply_fn, theta, pre, post, args)
            return theta, opt_state, info
    return Phases(sample, inner, outer, gym_sampler)


def broadcast(params, n: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), params)


def uses_adam(args: Args) -> bool:
    """The paper's pretrained baseline: no inner step, one Adam step per meta-iteration."""
    return args.inner_steps == 0 and args.pretrain_optimizer == "adam"


def init_opt_state(theta, args: Args):
    """The outer optimiser's state: Adam's moments for the pretrained baseline, else nothing (TRPO has none,
    ProMP's Adam restarts every meta-iteration)."""
    return optax.adam(args.adam_lr).init(theta) if uses_adam(args) else ()


def meta_iteration(theta, opt_state, tasks, key, phases: Phases, args: Args):
    """[2]-[6] one meta-iteration. Returns the new theta and outer optimiser state, and the mean return before and
    after adaptation (rllab's AverageReturn) with the outer step's diagnostics."""
    params, pre = broadcast(theta, args.meta_batch), []
    for j in range(args.inner_steps):
        batch = phases.sample(params, tasks, jax.random.fold_in(key, j))  # [2], [3]
        pre.append(batch)
        params = phases.inner(params, batch, args.inner_lr)  # [4]
    post = phases.sample(params, tasks, jax.random.fold_in(key, args.inner_steps))  # [5]
    if pre:
        pre = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *pre)  # (M, K, P, L, ...)
    else:  # no adaptation: the "pre-update" batch is the post-update one
        pre = jax.tree.map(lambda x: x[:, None], post)
    theta, opt_state, info = phases.outer(theta, opt_state, pre, post)  # [6]
    info = {**info, "return/pre_update": average_return(jax.tree.map(lambda x: x[:, 0], pre)),
            "return/post_update": average_return(post)}
    return theta, opt_state, info


def meta_test(theta, tasks, key, phases: Phases, args: Args, steps: int):
    """[7] Fig. 5: mean return on new tasks before adaptation and after each of `steps` inner steps, each step on
    fresh samples of the adapted policy: rllab's AverageReturn of each task's batch, averaged over the tasks. The
    authors' test script (maml_examples/test_maml_point.py) steps with alpha first, then alpha / 2. `args.meta_batch`
    is the number of test tasks and `args.trajectories_per_task` the test batch (see `setup`)."""
    params, curve = broadcast(theta, args.meta_batch), []
    for j in range(steps + 1):
        batch = phases.sample(params, tasks, jax.random.fold_in(key, j))
        curve.append(float(average_return(batch)))
        if j < steps:
            params = phases.inner(params, batch, args.inner_lr if j == 0 else args.inner_lr / 2)
    return curve


def make_task_env(env_id: str):
    """The task family behind env_id (a pure-JAX FuncEnv, or a MuJoCo TaskFamily wrapper), or a one-line error."""
    env = make_env(env_id)
    family = func_env_of(env)
    if family is None or not is_task_family(family):
        family = task_family_of(env)
    if family is None:
        fail(f"MAML needs a task family (an env with sample_tasks); '{env_id}' is not one "
             f"(try PointNav2D-v0, HalfCheetahDir-v0, HalfCheetahVel-v0, AntDir-v0)")
    if not isinstance(family.action_space, spaces.Box):
        fail(f"this MAML uses a Gaussian policy and needs a Box action space; '{env_id}' has {family.action_space}")
    return family


def validate(args: Args):
    """One-line errors for settings that cannot work, before anything heavy. Returns the task family and its sizes."""
    check_ranges(args, at_least_1=("meta_batch", "trajectories_per_task", "eval_trajectories", "cg_iters",
                                   "backtrack_steps", "promp_steps", "hidden_sizes"),
                 non_negative=("inner_steps", "test_steps", "cg_damping", "promp_kl_coef"),
                 positive=("inner_lr", "max_kl", "promp_lr", "promp_clip", "adam_lr"), discount=("gamma",),
                 open_unit=("backtrack_ratio",))
    if args.backtrack_ratio >= 1:
        fail(f"--backtrack-ratio must be < 1 (the line search shrinks the step), got {args.backtrack_ratio}")
    if args.estimator == "promp" and args.inner_steps == 0:
        fail("--estimator promp needs --inner-steps >= 1")
    if args.capture_video:
        fail("--capture-video is not supported by MAML: its evaluation is a batched meta-test over many "
             "tasks (drop the flag)")
    env = make_task_env(args.env_id)
    dims = Dims(env.observation_space.shape[0], env.action_space.shape[0], env.horizon)
    per_iter = steps_per_iteration(args, dims)
    if args.total_timesteps < per_iter:
        fail(f"--total-timesteps {args.total_timesteps} is less than one meta-iteration: --meta-batch x "
             f"--trajectories-per-task x horizon ({dims.horizon}) x (--inner-steps + 1) = {per_iter} env steps")
    # the sample batches of one iteration (obs, action, reward, mask, logp, advantage, step, last; (N + 1) x horizon
    # steps per task at most), in float32, held as NumPy/device copies and stacked: about 3 copies
    largest = max(args.meta_batch * args.trajectories_per_task * (args.inner_steps + 1),
                  args.eval_episodes * args.eval_trajectories)
    check_memory(3 * 4 * largest * dims.horizon * (1 + 1 / min(args.trajectories_per_task, args.eval_trajectories))
                 * (dims.obs_dim + dims.action_dim + 6), "the trajectory batches",
                 "lower --meta-batch, --eval-episodes, --trajectories-per-task or --eval-trajectories")
    return env, dims


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def setup(args: Args):
    """Env, sizes, policy and the jitted phases for training and for the meta-test (whose args have
    meta_batch = eval_episodes, the test tasks, and trajectories_per_task = eval_trajectories)."""
    env, dims = validate(args)
    policy = GaussianMLP(dims.action_dim, tuple(args.hidden_sizes))
    test_args = dataclasses.replace(args, meta_batch=args.eval_episodes, trajectories_per_task=args.eval_trajectories)
    return (env, dims, policy, make_phases(env, policy, args, dims, args.seed), test_args,
            make_phases(env, policy, test_args, dims, args.seed + 10_000))


def initial_state(args: Args, env, dims: Dims, policy: GaussianMLP):
    """The run's starting point from its seed: the key for training, theta (random init, or --init-params), and
    the meta-test's key and new tasks (the same at every meta-test)."""
    key = seed_everything(args.seed)
    key, k_init, k_test = jax.random.split(key, 3)
    theta = policy.init(k_init, jnp.zeros(dims.obs_dim))
    if args.init_params and not args.resume:
        theta = load_checkpoint(args.init_params, theta, what="--init-params")
    return key, theta, k_test, env.sample_tasks(k_test, args.eval_episodes)


def main(args: Args) -> dict:
    env, dims, policy, phases, test_args, test_phases = setup(args)
    per_iter = steps_per_iteration(args, dims)
    iterations, eval_every = args.total_timesteps // per_iter, max(1, args.eval_interval // per_iter)
    key, theta, k_test, test_tasks = initial_state(args, env, dims, policy)
    opt_state = init_opt_state(theta, args)
    run = Run(args)

    # Everything needed to continue after a meta-iteration: theta, the iteration counter, the key, the pretrained
    # baseline's Adam moments and (MuJoCo) the samplers' seeds and envs. ProMP's Adam restarts at every iteration.
    samplers = {name: p.sampler for name, p in (("train", phases), ("test", test_phases)) if p.sampler is not None}
    checkpoint = lambda theta, opt_state, key, it: {
        "theta": theta, "key": key, "iteration": np.int64(it), **({"opt_state": opt_state} if opt_state else {}),
        "samplers": {name: s.state() for name, s in samplers.items()}}
    state = run.restore(checkpoint(theta, opt_state, key, 0))
    theta, key, start_it = state["theta"], state["key"], int(state["iteration"])
    opt_state = state.get("opt_state", opt_state)
    name = "ProMP" if args.estimator == "promp" else ("first-order MAML" if args.first_order else "MAML")
    if args.inner_steps == 0:
        name = f"pretrained multi-task policy ({args.pretrain_optimizer})"
    budget = args.trajectories_per_task * dims.horizon
    progress = Progress(f"{name} on {args.env_id}: {args.meta_batch} tasks x {budget} steps, {per_iter:,} env "
                        "steps per meta-iteration", iterations,
                        unit="meta-iterations", start=start_it, compiling="the inner and outer steps")
    for name, sampler in samplers.items() if start_it else ():
        sampler.set_state(state["samplers"][name])
    start, curves = time.time(), []
    for it in range(start_it + 1, iterations + 1):
        step = it * per_iter
        key, k_tasks, k_iter = jax.random.split(key, 3)
        tasks = env.sample_tasks(k_tasks, args.meta_batch)  # [1]
        with run.timed("meta_iteration"):
            theta, opt_state, info = meta_iteration(theta, opt_state, tasks, k_iter, phases, args)  # [2]-[6]
            info = jax.device_get(info)
        check_finite(step, **info)
        metrics = {**{k: float(v) for k, v in info.items()}, "sps": (it - start_it) * per_iter / (time.time() - start)}
        if it % eval_every == 0 or it == iterations:  # [7]
            with run.timed("meta_test"):
                curve = meta_test(theta, test_tasks, jax.random.fold_in(k_test, it), test_phases, test_args,
                                  args.test_steps)
            curves.append({"step": step, "returns": curve})
            evals = {f"eval/return_after_{j}_steps": r for j, r in enumerate(curve)}
            check_finite(step, **evals)
            metrics.update(evals)
        run.log(metrics, step, echo=False)
        progress.update(it, metrics, ["return/pre_update", "return/post_update", "eval/return_after_0_steps",
                                      "eval/return_after_1_steps"])
        if run.checkpoint_due(step, step - per_iter) or it == iterations:
            run.save(checkpoint(theta, opt_state, key, it), step)
    if args.save_model:
        print(f"saved {save_checkpoint(run.dir / 'policy.msgpack', theta)}")
    if curves:
        final = curves[-1]["returns"]
        progress.done("eval/return_after_1_steps", final[1] if len(final) > 1 else final[0],
                      reference=f"before adaptation {final[0]:.1f}, on {args.eval_episodes} new tasks",
                      extra=f"{iterations * per_iter:,} env steps")
    run.close()
    return {"theta": theta, "curves": curves, "run_dir": run.dir, "wall_seconds": time.time() - start,
            "test_tasks": test_tasks, "test_key": k_test, "timings": dict(run.timings)}


if __name__ == "__main__":
    cli(Args, main)
