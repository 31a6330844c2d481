"""Backpropagation through a learned model into the policy (PILCO-style, with a
neural-network model): model-based RL "version 2.0" of CS 285.

Papers and lecture:
- Deisenroth & Rasmussen 2011, "PILCO: A Model-Based and Data-Efficient
  Approach to Policy Search" (ICML), https://mlg.eng.cam.ac.uk/pub/pdf/DeiRas11.pdf:
  analytic policy gradients through a learned (there: Gaussian-process) model.
- CS 285 (Levine), lecture "Model-Based Policy Learning", part 1: the
  "model-based RL version 2.0" box, and why backpropagating through a long
  chain of Jacobians is ill-conditioned (like BPTT, but we cannot choose the
  dynamics as an LSTM chooses its recurrence).
- Parmas et al. 2018, "PIPPS: Flexible Model-Based Policy Search Robust to the
  Curse of Chaos" (ICML): the gradient variance explodes with the horizon.

What is here: a deterministic neural dynamics model (optionally a small
ensemble whose mean is used) predicting normalised state differences, trained
by least squares; a deterministic tanh policy trained by gradient ascent on the
return of imagined trajectories of horizon H, computed exactly by
backpropagation through the model and the task's differentiable reward
(common/envs/model_fns.py). `--dynamics true` backpropagates through the true simulator
instead (gymnasium's JAX pendulum): "if you have a simulator, you can compute
gradients through it". `--grad-clip` clips the policy gradient's global norm.
What is left out: PILCO's Gaussian-process model and moment matching (we use
a deterministic net, so the model's uncertainty is ignored), and termination
functions (the supported envs never terminate).

Run:
    python -m algos.backprop_through_model                      # Pendulum-v1, 5k steps: 79 s (2-core CPU)
    python -m algos.backprop_through_model --dynamics true      # through the simulator
    python -m algos.backprop_through_model --env-id Reacher-v5 --total-timesteps 5000
    python -m algos.backprop_through_model --horizon 200        # watch the gradient norm
    python -m algos.backprop_through_model --resume runs/<run>  # continue a run from its checkpoint

Algorithm (the lecture's box; the numbers mark the code below):
    [1] run a base policy (uniformly random actions) to collect D = {(s, a, s')}
    repeat:
      [2] learn the dynamics model f(s, a) minimising sum_i ||f(s_i, a_i) - s'_i||^2
          (on normalised differences, Adam minibatch steps)
      [3] backpropagate through f into the policy: K Adam steps on
            J(theta) = E_{s_0 ~ D} [ sum_{t<H} gamma^t r(s_t, a_t, s_{t+1}) ],
            a_t = pi_theta(s_t),  s_{t+1} = f(s_t, a_t),
          dJ/dtheta by reverse-mode autodiff through the whole H-step chain
      [4] run pi_theta (plus small Gaussian exploration noise) in the real env,
          append the visited tuples to D
      [5] evaluate the deterministic policy pi_theta (eval_episodes episodes)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from gymnasium.envs.phys2d.pendulum import PendulumFunctional
from jax.flatten_util import ravel_pytree

from common.checkpoints import env_state, numpy_rng_state, save_checkpoint, set_env_state, set_numpy_rng_state
from common.checks import check_finite, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import check_env_id, make_env
from common.envs.model_fns import reward_function
from common.experiment import CommonArgs, Run, check_video_support, episode_returns, record_video, seed_everything
from common.progress import Progress


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "Pendulum-v1"
    """Pendulum-v1 or Reacher-v5 (the envs with a differentiable reward in common/envs/model_fns.py)"""
    total_timesteps: int = 5000
    """total real env steps (random steps included)"""
    eval_interval: int = 200
    """real env steps collected per iteration [4]; the policy is evaluated after each"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per iteration"""
    random_steps: int = 200
    """[1] steps of the uniformly random base policy before the first model fit"""
    dynamics: Literal["learned", "true"] = "learned"
    """learned: backprop through the learned model; true: through the true
    differentiable simulator (Pendulum-v1 only: gymnasium's JAX pendulum)"""
    horizon: int = 50
    """H, length of the imagined trajectories"""
    gamma: float = 0.99
    """discount of the imagined return"""
    num_start_states: int = 256
    """start states s_0 drawn from D for each policy gradient step"""
    policy_steps: int = 100
    """K, policy gradient steps per iteration [3]"""
    policy_lr: float = 1e-3
    """Adam step size of the policy"""
    policy_hidden: int = 64
    """width of the policy's two hidden layers"""
    grad_clip: float = 0.0
    """clip the policy gradient's global norm to this value (0: no clipping)"""
    exploration_noise: float = 0.1
    """std of the Gaussian action noise in [4], as a fraction of the action range half-width"""
    model_hidden: int = 128
    """width of the model's two hidden layers"""
    ensemble_size: int = 1
    """number of models; the prediction is their mean (1: a single model)"""
    model_steps: int = 500
    """[2] Adam minibatch steps of the model per iteration (warm-started)"""
    model_batch_size: int = 128
    """minibatch size of the model fit (at most random_steps)"""
    model_lr: float = 1e-3
    """Adam step size of the model"""


# ----------------------------------------------------------------------------
# Networks and containers
# ----------------------------------------------------------------------------
class MLP(nn.Module):
    """Two hidden layers; swish for the model, tanh for the policy."""

    hidden: int
    out: int
    act: Callable = nn.swish

    @nn.compact
    def __call__(self, x):
        x = self.act(nn.Dense(self.hidden)(x))
        x = self.act(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


class DeltaNormalizer(NamedTuple):
    """Statistics of D, recomputed each iteration. The net sees inputs of unit
    scale and predicts the *normalised difference* (s' - s - mu_d) / sigma_d:
    differences are small next to states, and unit-scale targets keep all state
    dimensions equally weighted in the squared loss."""

    in_mean: jax.Array  # (obs_dim + act_dim,)
    in_std: jax.Array
    delta_mean: jax.Array  # (obs_dim,)
    delta_std: jax.Array


class Data(NamedTuple):
    """D, preallocated to its final size so the jitted phases compile once;
    only the first `n` rows are filled."""

    obs: jax.Array  # (N, obs_dim)
    action: jax.Array  # (N, act_dim)
    next_obs: jax.Array  # (N, obs_dim)


class Dims(NamedTuple):
    """The sizes read from the env (Args holds everything else)."""

    obs_dim: int
    act_dim: int
    action_scale: float  # actions are action_scale * tanh(.), the Box's bound


def make_policy(act_dim: int, hidden: int) -> MLP:
    return MLP(hidden, act_dim, act=nn.tanh)


def policy_action(policy: MLP, params, obs, action_scale: float):
    """pi_theta(s) = a_max tanh(net(s)): deterministic and inside the bounds, so
    the env's torque clip never cuts the gradient."""
    return action_scale * jnp.tanh(policy.apply(params, obs))


# ----------------------------------------------------------------------------
# [2] The dynamics model
# ----------------------------------------------------------------------------
def model_predict(model: MLP, params, norm: DeltaNormalizer, obs, action):
    """f(s, a) = s + mu_d + sigma_d * mean_e net_e((s, a) normalised).

    `params` has a leading ensemble axis E; obs (obs_dim,), action (act_dim,)."""
    x = (jnp.concatenate([obs, action], -1) - norm.in_mean) / norm.in_std
    out = jax.vmap(model.apply, in_axes=(0, None))(params, x)  # (E, obs_dim)
    return obs + norm.delta_mean + norm.delta_std * out.mean(0)


def model_loss(model: MLP, params, norm: DeltaNormalizer, obs, action, next_obs):
    """Mean squared error of every member on normalised differences, summed over
    members (each member is fitted independently). obs (B, obs_dim)."""
    x = (jnp.concatenate([obs, action], -1) - norm.in_mean) / norm.in_std  # (B, in)
    target = (next_obs - obs - norm.delta_mean) / norm.delta_std  # (B, obs_dim)
    pred = jax.vmap(model.apply, in_axes=(0, None))(params, x)  # (E, B, obs_dim)
    return ((pred - target) ** 2).mean(axis=(1, 2)).sum()


@partial(jax.jit, static_argnames=("model", "args"))
def fit_model(model: MLP, args: Args, state: TrainState, norm: DeltaNormalizer, data: Data, n, key):
    """[2] `model_steps` Adam steps on minibatches drawn (with replacement) from
    the first n rows of D: one jitted scan. Returns the state and mean loss."""

    def step(state, k):
        idx = jax.random.randint(k, (args.model_batch_size,), 0, n)
        loss, grads = jax.value_and_grad(partial(model_loss, model))(
            state.params, norm, data.obs[idx], data.action[idx], data.next_obs[idx])
        return state.apply_gradients(grads=grads), loss

    state, losses = jax.lax.scan(step, state, jax.random.split(key, args.model_steps))
    return state, losses.mean()  # summed over members


# ----------------------------------------------------------------------------
# [3] Backpropagation through the model
# ----------------------------------------------------------------------------
def imagined_return(policy_fn, step_fn, reward_fn, policy_params, start_obs, horizon: int,
                    gamma: float):
    """sum_{t<H} gamma^t r(s_t, a_t, s_{t+1}) from ONE start state, a_t = pi(s_t),
    s_{t+1} = step_fn(s_t, a_t) (the learned model or the true simulator).

    jax.grad of this is backpropagation through time: by the chain rule,
      dJ/dtheta = sum_t gamma^t [ dr_t/da_t + dr_t/ds_{t+1} df/da_t ] da_t/dtheta
                  + (terms through ds_t/dtheta),
      ds_{t+1}/dtheta = (df/ds + df/da dpi/ds)|_t ds_t/dtheta + df/da dpi/dtheta|_t,
    so the effect of the action at step k on the reward at step t > k carries the
    product of t - k closed-loop Jacobians M_j = df/ds + df/da dpi/ds. If M_j's
    largest singular value is above 1 (a pendulum near the top: unstable) the
    product, and the gradient, grows like sigma^H: it EXPLODES; below 1 the
    far-future terms VANISH. This is the RNN problem of BPTT, but an RNN
    designer can pick an LSTM whose Jacobians stay near 1; here M_j is whatever
    physics (and the learned model) says it is.
    """

    def body(obs, _):
        action = policy_fn(policy_params, obs)
        next_obs = step_fn(obs, action)
        return next_obs, reward_fn(obs, action, next_obs)

    _, rewards = jax.lax.scan(body, start_obs, None, length=horizon)  # rewards (H,)
    return jnp.sum(gamma ** jnp.arange(horizon) * rewards)


def policy_objective(policy_fn, step_fn, reward_fn, args: Args, policy_params, start_obs):
    """-J: minus the mean imagined return over start states (B, obs_dim)."""
    returns = jax.vmap(imagined_return, in_axes=(None, None, None, None, 0, None, None))(
        policy_fn, step_fn, reward_fn, policy_params, start_obs, args.horizon, args.gamma)
    return -returns.mean()


def per_start_grad_norms(policy_fn, step_fn, reward_fn, args: Args, policy_params, start_obs):
    """||dJ(s_0)/dtheta|| for each start state separately (B,), the quantity of
    the horizon study: its size and spread across s_0 show explosion."""
    grad_one = jax.grad(lambda p, s: imagined_return(policy_fn, step_fn, reward_fn, p, s,
                                                     args.horizon, args.gamma))
    grads = jax.vmap(grad_one, in_axes=(None, 0))(policy_params, start_obs)
    return jax.vmap(optax.global_norm)(grads)


@partial(jax.jit, static_argnames=("policy_fn", "step_fn", "reward_fn", "args"))
def improve_policy(policy_fn, step_fn, reward_fn, args: Args, state: TrainState, step_args,
                   start_pool, n, key):
    """[3] K Adam steps on -J, each on `num_start_states` start states drawn from
    the first n rows of `start_pool` (the states of D): one jitted scan, the
    imagined rollout inside being a scan over H vmapped over start states.

    `step_fn(step_args, s, a)`: step_args are the model's (params, normaliser),
    traced so that new model params do not recompile. Returns the state and the
    per-step mean imagined return and gradient norm (before clipping)."""

    def step(state, k):
        idx = jax.random.randint(k, (args.num_start_states,), 0, n)
        loss, grads = jax.value_and_grad(
            partial(policy_objective, policy_fn, partial(step_fn, step_args), reward_fn, args))(
            state.params, start_pool[idx])
        return state.apply_gradients(grads=grads), (-loss, optax.global_norm(grads))

    state, (returns, norms) = jax.lax.scan(step, state, jax.random.split(key, args.policy_steps))
    return state, returns, norms


# ----------------------------------------------------------------------------
# Step functions: the learned model, or the true simulator
# ----------------------------------------------------------------------------
def learned_step(model: MLP, step_args, obs, action):
    params, norm = step_args
    return model_predict(model, params, norm, obs, action)


def pendulum_true_step(step_args, obs, action):
    """Pendulum-v1's dynamics, differentiable, on observations (cos, sin, thetadot):
    gymnasium's functional JAX pendulum (the same equations as Pendulum-v1, with
    its dt, g, m, l and speed clip) after recovering theta = atan2(sin, cos).
    Note the speed clip at +-8: where it binds, d(thetadot')/d(.) = 0."""
    env = PendulumFunctional()
    state = jnp.stack([jnp.arctan2(obs[1], obs[0]), obs[2]])
    return env.observation(env.transition(state, action), None)


# ----------------------------------------------------------------------------
# Real-environment interaction (the only Python loop: the env is the robot)
# ----------------------------------------------------------------------------
def collect(env, act, obs, episode_return: float, num_steps: int, data_np: dict, n: int):
    """[1]/[4] Step the real env num_steps times with `act(obs) -> action`,
    writing (s, a, s') at rows n.. of D. Truncation (time limit) and termination
    both end the episode; s' is always the true next observation (the final
    one, not the reset one), so the model never learns a jump to a reset.
    An episode may span several calls: its running return is passed in and out.
    Returns the observation and return to continue from, and the returns of
    the episodes that ended."""
    returns = []
    for i in range(num_steps):
        action = np.asarray(act(obs), dtype=np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        data_np["obs"][n + i], data_np["action"][n + i], data_np["next_obs"][n + i] = obs, action, next_obs
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            returns.append(episode_return)
            episode_return = 0.0
            obs, _ = env.reset()
    return obs, episode_return, returns


def explore(act, params, noise: float, action_scale: float, rng, obs):
    """[4] pi_theta(s) + N(0, noise^2), clipped to the action bounds."""
    action = np.asarray(act(params, obs))
    return np.clip(action + noise * rng.standard_normal(action.shape), -action_scale, action_scale)


def normalizer_from(data_np: dict, n: int) -> DeltaNormalizer:
    """Mean and std (floored at 1e-6: constant dimensions such as Reacher's target)
    of the model inputs and of the state differences in the first n rows of D."""
    x = np.concatenate([data_np["obs"][:n], data_np["action"][:n]], 1)
    d = data_np["next_obs"][:n] - data_np["obs"][:n]
    return DeltaNormalizer(jnp.asarray(x.mean(0)), jnp.asarray(np.maximum(x.std(0), 1e-6)),
                           jnp.asarray(d.mean(0)), jnp.asarray(np.maximum(d.std(0), 1e-6)))


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def validate(args: Args) -> Dims:
    """One-line errors for settings that cannot work, before anything heavy.
    Returns the env's sizes."""
    check_ranges(args, at_least_1=("random_steps", "horizon", "num_start_states", "policy_steps", "policy_hidden",
                                   "model_hidden", "ensemble_size", "model_steps", "model_batch_size"),
                 positive=("policy_lr", "model_lr"), non_negative=("grad_clip", "exploration_noise"),
                 discount=("gamma",))
    check_env_id(args.env_id)
    env = make_env(args.env_id)
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        fail(f"backprop through a model needs a continuous (Box) action space; '{args.env_id}' has {space}")
    reward_function(args.env_id)  # fails if there is no differentiable reward
    if args.dynamics == "true" and args.env_id != "Pendulum-v1":
        fail(f"--dynamics true needs a differentiable simulator: only Pendulum-v1 has one here "
             f"(MJX is not installed), not '{args.env_id}'")
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if limit is not None and args.horizon > limit:
        fail(f"--horizon {args.horizon} is longer than {args.env_id}'s episodes ({limit} steps)")
    if args.model_batch_size > args.random_steps:
        fail(f"--model-batch-size ({args.model_batch_size}) is larger than the data at the first "
             f"fit (--random-steps {args.random_steps})")
    if args.total_timesteps < args.random_steps + args.eval_interval:
        fail(f"--total-timesteps ({args.total_timesteps}) must be >= --random-steps + "
             f"--eval-interval ({args.random_steps + args.eval_interval})")
    dims = Dims(env.observation_space.shape[0], space.shape[0], float(space.high[0]))
    # D lives in NumPy, on the device (each iteration) and in the checkpoint: about 3 copies
    check_memory(3 * 4 * args.total_timesteps * (2 * dims.obs_dim + dims.act_dim), "the dataset D",
                 "lower --total-timesteps")
    if args.capture_video:
        check_video_support(args.env_id)
    return dims


def main(args: Args) -> dict:
    dims = validate(args)
    key = seed_everything(args.seed)
    run = Run(args)
    progress = Progress(f"Backprop through a {args.dynamics} model, H = {args.horizon}, on {args.env_id}",
                        args.total_timesteps, start=run.start_step, every=args.eval_interval,
                        compiling="the model fit and the policy phase")
    env, eval_env = make_env(args.env_id), make_env(args.env_id)
    reward_fn = reward_function(args.env_id)
    rng = np.random.default_rng(args.seed)

    # Networks. The policy is trained with Adam, its gradient optionally clipped
    # by global norm (the blunt, standard fix for exploding gradients: it caps
    # the step length but cannot restore a gradient direction that is noise).
    policy = make_policy(dims.act_dim, args.policy_hidden)
    key, k_pi, k_model = jax.random.split(key, 3)
    policy_opt = optax.adam(args.policy_lr)
    if args.grad_clip > 0:
        policy_opt = optax.chain(optax.clip_by_global_norm(args.grad_clip), policy_opt)
    policy_state = TrainState.create(apply_fn=policy.apply, params=policy.init(k_pi, jnp.zeros(dims.obs_dim)),
                                     tx=policy_opt)
    policy_fn = partial(policy_action, policy, action_scale=dims.action_scale)
    act = jax.jit(lambda params, o: policy_fn(params, o))
    model = MLP(args.model_hidden, dims.obs_dim)
    model_params = jax.vmap(model.init, in_axes=(0, None))(
        jax.random.split(k_model, args.ensemble_size), jnp.zeros(dims.obs_dim + dims.act_dim))  # leading axis E
    model_state = TrainState.create(apply_fn=model.apply, params=model_params, tx=optax.adam(args.model_lr))
    step_fn = partial(learned_step, model) if args.dynamics == "learned" else pendulum_true_step

    # D, preallocated (N = total_timesteps rows).
    N = args.total_timesteps
    data_np = {"obs": np.zeros((N, dims.obs_dim), np.float32), "action": np.zeros((N, dims.act_dim), np.float32),
               "next_obs": np.zeros((N, dims.obs_dim), np.float32)}
    obs, _ = env.reset(seed=args.seed)
    env.action_space.seed(args.seed)
    eval_env.reset(seed=args.seed + 10_000)  # evaluation episodes: their own seed stream

    # Everything needed to continue after an iteration: a fresh run's start, or
    # the checkpoint's state on --resume (the envs, made and reset as above,
    # then put back mid-episode).
    state = run.restore({"model": model_state, "policy": policy_state, "data": data_np, "n": np.int64(0),
                         "iteration": np.int64(0), "key": key, "rng": numpy_rng_state(rng), "env": env_state(env),
                         "eval_env": env_state(eval_env), "obs": obs, "episode_return": np.float64(0.0),
                         "eval_return": np.float64(np.nan)})
    model_state, policy_state, key = state["model"], state["policy"], state["key"]
    n, iteration, episode_return = int(state["n"]), int(state["iteration"]), float(state["episode_return"])
    eval_return = float(state["eval_return"])
    if run.start_step:
        data_np, obs = state["data"], state["obs"]
        set_numpy_rng_state(rng, state["rng"])
        set_env_state(env, state["env"])
        set_env_state(eval_env, state["eval_env"])
    else:  # [1] The base policy: uniformly random actions.
        obs, episode_return, _ = collect(env, lambda o: env.action_space.sample(), obs, 0.0, args.random_steps,
                                         data_np, 0)
        n = args.random_steps
    norm = normalizer_from(data_np, n)
    start, start_n, history = time.time(), n, []
    while n < N:
        iteration += 1
        it_start = time.time()
        data = Data(*(jnp.asarray(data_np[k]) for k in ("obs", "action", "next_obs")))
        metrics = {}
        # [2] Fit the model on all of D (warm start from the last iteration's
        # params; the normaliser follows the data, so the net's targets move a
        # little each time, which a few hundred steps absorb).
        norm = normalizer_from(data_np, n)
        if args.dynamics == "learned":
            with run.timed("model"):
                if iteration > 1:  # one-step error on the newest data, before fitting to it: a held-out test
                    new = slice(n - args.eval_interval, n)
                    metrics["model/heldout_loss"] = model_loss(
                        model, model_state.params, norm, data.obs[new], data.action[new],
                        data.next_obs[new]) / args.ensemble_size
                key, k = jax.random.split(key)
                model_state, loss = fit_model(model, args, model_state, norm, data, n, k)
                metrics["model/train_loss"] = jax.block_until_ready(loss / args.ensemble_size)
            check_finite(n, **metrics)
            step_args = (model_state.params, norm)
        else:
            step_args = ()
        # [3] Backpropagate through the model into the policy.
        with run.timed("policy"):
            key, k = jax.random.split(key)
            policy_state, imagined, grad_norms = improve_policy(
                policy_fn, step_fn, reward_fn, args, policy_state, step_args, data.obs, n, k)
            metrics["policy/imagined_return"] = imagined[-1]
            metrics["policy/grad_norm"] = jnp.median(grad_norms)
            metrics["policy/grad_norm_max"] = jax.block_until_ready(grad_norms.max())
        params = policy_state.params
        check_finite(n, **{k: metrics[k] for k in ("policy/imagined_return", "policy/grad_norm")},
                     policy_params=ravel_pytree(params)[0])
        # [4] Run the policy with exploration noise in the real env; append to D.
        with run.timed("collect"):
            noise = args.exploration_noise * dims.action_scale
            steps = min(args.eval_interval, N - n)
            obs, episode_return, returns = collect(
                env, partial(explore, act, params, noise, dims.action_scale, rng), obs, episode_return, steps,
                data_np, n)
            n += steps
        # [5] Evaluate the deterministic policy.
        with run.timed("eval"):
            policy_det = partial(lambda p, o: np.asarray(act(p, o), np.float32), params)
            eval_returns = episode_returns(eval_env, policy_det, args.eval_episodes)
        eval_return = float(eval_returns.mean())
        metrics.update({"eval/return": eval_returns.mean(), "eval/return_std": eval_returns.std(),
                        "iteration": iteration, "iteration_seconds": time.time() - it_start,
                        "sps": (n - start_n) / (time.time() - start)})
        if returns:
            metrics["train/episode_return"] = float(np.mean(returns))
        run.log(metrics, n, echo=False)
        progress.update(n, metrics, ["eval/return", "train/episode_return", "model/heldout_loss",
                                     "policy/imagined_return", "policy/grad_norm"])
        history.append({"step": n, **{k: float(v) for k, v in metrics.items()}})
        state = {"model": model_state, "policy": policy_state, "data": data_np, "n": np.int64(n),
                 "iteration": np.int64(iteration), "key": key, "rng": numpy_rng_state(rng), "env": env_state(env),
                 "eval_env": env_state(eval_env), "obs": obs, "episode_return": np.float64(episode_return),
                 "eval_return": np.float64(eval_return)}
        if run.checkpoint_due(n, n - steps):
            run.save(state, n)
    if run.start_step < n:  # the end, unless the last iteration's checkpoint holds it already
        run.save(state, n)

    summary = {"final_eval_return": eval_return, "wall_seconds": time.time() - start,
               **{f"time/{k}": v for k, v in run.timings.items()}}
    run.log(summary, n, echo=False)
    reference = {"Pendulum-v1": "target -200 by 5,000 steps; SAC (rl-baselines3-zoo) -157 after 20k"}
    progress.done("final eval return", eval_return, reference=reference.get(args.env_id))
    if args.save_model:
        path = save_checkpoint(run.dir / "model.msgpack", {
            "policy": policy_state.params, "model": model_state.params, "normalizer": norm._asdict(),
            "policy_opt_state": policy_state.opt_state, "model_opt_state": model_state.opt_state})
        print(f"saved {path}")
    if args.capture_video:
        folder = record_video(make_env(args.env_id, render_mode="rgb_array"),
                              lambda o: np.asarray(act(policy_state.params, o)), run.dir / "videos",
                              episodes=1, seed=args.seed)
        print(f"video in {folder}")
    run.close()
    return {"history": history, "policy_params": policy_state.params, "model_params": model_state.params,
            "normalizer": norm, "data": {k: v[:n] for k, v in data_np.items()}, "run_dir": run.dir, **summary}


if __name__ == "__main__":
    cli(Args, main)
