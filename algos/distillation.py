"""Policy distillation: DQN teachers into one small student, single- and multi-task.

Papers:
- Rusu, Colmenarejo, Gulcehre, Desjardins, Kirkpatrick, Pascanu, Mnih,
  Kavukcuoglu, Hadsell 2015, "Policy Distillation", https://arxiv.org/abs/1511.06295
  (Sec. 3: the three losses; Sec. 4.2 compression; Sec. 4.3 multi-task heads).
- Parisotto, Ba, Salakhutdinov 2015, "Actor-Mimic: Deep Multitask and Transfer
  Reinforcement Learning", https://arxiv.org/abs/1511.06342 (Sec. 3.1 the policy
  regression objective at tau = 1 with the student acting; Sec. 3.2 feature regression).
- Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network"
  (soft targets at a temperature).
- CS 285 (Levine), transfer and multi-task lecture: "policy distillation".

A teacher is a DQN trained on one game. Its Q-values on a state say how much
better each action is than the others; the student learns to reproduce that
ranking with a network that can be much smaller, or one network for several
games. Data are states from a replay memory filled by the teacher acting
epsilon-greedily (eps = 0.05, Rusu), or, with --student-acts, by the student
acting (Actor-Mimic; a DAgger-like choice: the states are the ones the student
will visit). The teacher labels every state with its Q-values; the student's
outputs are trained against them with one of four losses (--loss):

    kl           KL(softmax(q_T / tau) || softmax(q_S)), tau = 0.01 (Rusu's best)
    nll          -log softmax(q_S)[argmax_a q_T]         (only the teacher's action)
    mse          sum_a (q_T - q_S)^2                      (regress the Q-values)
    actor_mimic  -sum_a softmax(q_T / 1) log softmax(q_S) (+ feature regression)

Environments: the MinAtar games of gymnax (common/envs/minatar.py), pure JAX, so
the teacher's DQN and the whole distillation are each one jitted program per
evaluation period, vmapped over seeds.

Multi-task (--games with several ids): one student with a shared trunk and one
head per game (Rusu Sec. 4.3); each minibatch comes from one game and trains the
trunk and that game's head; each head has the game's own number of actions
(outputs beyond it are masked out). MinAtar games have 4 to 7 input channels:
the student sees every game zero-padded to the most channels of the set.

Run:
    python -m algos.distillation                                  # Breakout, KL, a 1/4-size student: 55 s (2-core CPU)
    python -m algos.distillation --loss mse --num-seeds 3         # another loss, 3 seeds in one jitted program
    python -m algos.distillation --games Breakout-MinAtar-v0 Asterix-MinAtar-v0   # multi-task: one student, 2 heads
    python -m algos.distillation --phase teacher --env-id Asterix-MinAtar-v0 --teacher-out benchmarks/teachers

Algorithm (numbers mark the code below):
  Teacher phase (DQN, Mnih et al. 2015 at MinAtar's sizes, Young & Tian 2019):
    [T1] step N envs with eps-greedy Q_theta (eps: 1 -> eps_end), store (s, a, r, s', terminated)
    [T2] once the memory holds learning_starts transitions, one minibatch per step of the N envs:
         y = r + gamma (1 - terminated) max_a' Q_target(s', a'); Huber(Q_theta(s, a) - y); Adam
    [T3] every target_interval env steps: target <- theta
    [T4] every eval_interval env steps: greedy evaluation; save the teacher (msgpack)
  Distillation phase, for every game g in turn (a round):
    [D1] the acting policy (teacher g, or the student's head g with --student-acts) takes one
         eps-greedy step in N envs of game g; the states go to game g's replay memory
    [D2] a minibatch of states of game g; the teacher's Q-values q_T on them (fixed)
    [D3] the student's outputs q_S = head_g(trunk(s)) on the game's valid actions
    [D4] loss(q_T, q_S) as above (+ beta ||W_g f_S - f_T||^2 for actor_mimic --feature-weight); Adam
    [D5] every distill_eval_interval updates: greedy evaluation of the student on every game,
         against the teacher's score measured the same way at the start
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from common.checks import check_finite_series, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import check_env_id
from common.envs.minatar import MINATAR, jax_game
from common.experiment import CommonArgs, Run, seed_everything
from common.progress import Progress


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "Breakout-MinAtar-v0"
    """the MinAtar game (Breakout/SpaceInvaders/Asterix/Freeway-MinAtar-v0); --games for several"""
    games: tuple[str, ...] = ()
    """multi-task distillation: one student for all these games (default: --env-id alone)"""
    phase: Literal["teacher", "distill"] = "distill"
    """teacher: train a DQN teacher on --env-id; distill: train a student from saved teachers"""
    num_seeds: int = 1
    """independent runs in one jitted program (vmapped)"""
    num_envs: int = 16
    """N, parallel envs of each game (acting for the replay memory)"""
    eval_episodes: int = 32
    """greedy evaluation episodes (all in parallel), per game"""
    # ---- the teacher (DQN) ----
    total_timesteps: int = 1_000_000
    """--phase teacher: env steps of the teacher's training"""
    eval_interval: int = 100_000
    """--phase teacher: evaluate and checkpoint every this many env steps"""
    teacher_channels: int = 16
    """conv filters of the teacher (MinAtar's DQN: 16 3x3 filters, then 128 units)"""
    teacher_hidden: int = 128
    """units of the teacher's hidden layer"""
    dqn_lr: float = 2.5e-4
    """the teacher's Adam step size (MinAtar's DQN: 2.5e-4, with RMSProp)"""
    dqn_batch_size: int = 64
    """teacher minibatch, one per step of the N envs (2 samples per transition at N = 32)"""
    dqn_buffer_size: int = 100_000
    """the teacher's replay memory (MinAtar: 100k)"""
    learning_starts: int = 5_000
    """transitions in the memory before the teacher's first update (MinAtar: 5000)"""
    target_interval: int = 1_000
    """env steps between target network copies (MinAtar: 1000)"""
    eps_end: float = 0.1
    """final exploration epsilon of the teacher (MinAtar: 0.1)"""
    exploration_fraction: float = 0.1
    """fraction of the training over which epsilon falls linearly from 1 to --eps-end"""
    gamma: float = 0.99
    """discount"""
    teacher_out: str | None = None
    """--phase teacher: also write the teacher to this folder as <env-id>.msgpack"""
    # ---- the student ----
    teacher_dir: str = "benchmarks/teachers"
    """--phase distill: the folder with a teacher <env-id>.msgpack per game"""
    loss: Literal["kl", "nll", "mse", "actor_mimic"] = "kl"
    """distillation loss (see the module docstring)"""
    tau: float = 0.01
    """temperature of the teacher's softmax for --loss kl (Rusu: 0.01)"""
    am_tau: float = 1.0
    """temperature for --loss actor_mimic (Parisotto et al.: 1)"""
    feature_weight: float = 0.0
    """beta of Actor-Mimic's feature regression (Parisotto et al.: 0.01; 0 = off); only with actor_mimic"""
    student_channels: int = 8
    """conv filters of the student (8 with --student-hidden 64: about 1/4 of the teacher's parameters)"""
    student_hidden: int = 64
    """units of the student's hidden layer (its trunk's output, shared by the heads)"""
    distill_updates: int = 20_000
    """student minibatch updates over all games (multi-task: they take turns, one game per minibatch)"""
    distill_eval_interval: int = 5_000
    """evaluate the student and checkpoint every this many updates"""
    distill_lr: float = 1e-3
    """the student's Adam step size"""
    distill_batch_size: int = 32
    """student minibatch, states of one game"""
    replay_size: int = 20_000
    """the student's replay memory per game (states; the teacher labels them when they are sampled)"""
    prefill: int = 2_000
    """states per game collected before the first student update"""
    act_epsilon: float = 0.05
    """epsilon of the policy that fills the student's memory (Rusu: 0.05; Actor-Mimic: 0.1)"""
    student_acts: bool = False
    """the student acts (Actor-Mimic, DAgger-like) instead of the teacher"""


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
class QNet(nn.Module):
    """MinAtar's DQN network (Young & Tian 2019): a 3x3 conv (stride 1, no
    padding, ReLU), a dense layer (ReLU), then `heads` linear heads of
    `num_actions` outputs. Returns (outputs of head `head`, hidden features).

    x: (..., 10, 10, C) -> outputs (..., num_actions), features (..., hidden)."""

    channels: int
    hidden: int
    num_actions: int
    heads: int = 1

    @nn.compact
    def __call__(self, x, head=0):
        h = nn.relu(nn.Conv(self.channels, (3, 3), padding="VALID")(x))  # (..., 8, 8, channels)
        f = nn.relu(nn.Dense(self.hidden)(h.reshape(*h.shape[:-3], -1)))  # (..., hidden)
        w = self.param("head_w", nn.initializers.lecun_normal(batch_axis=(0,)),
                       (self.heads, self.hidden, self.num_actions))
        b = self.param("head_b", nn.initializers.zeros, (self.heads, self.num_actions))
        return f @ w[head] + b[head], f


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Spec(NamedTuple):
    """The sizes of a distillation set-up (static in the jitted functions)."""

    games: tuple  # common.envs.minatar.Game per task
    channels: int  # input channels of the student: the most of any game (others zero-padded)
    num_actions: int  # outputs of each student head: the most of any game (others masked)
    teacher_hidden: int


def pad_channels(obs, channels: int):
    """(..., 10, 10, c) -> (..., 10, 10, channels), zeros in the new channels."""
    extra = channels - obs.shape[-1]
    return jnp.pad(obs, [(0, 0)] * (obs.ndim - 1) + [(0, extra)]) if extra else obs


# ----------------------------------------------------------------------------
# The losses [D4], on one state: q_t, q_s (A,), valid (A,) bool
# ----------------------------------------------------------------------------
NEG = -1e30  # a logit that softmax turns into 0 (not -inf: 0 * -inf would be NaN)


def masked_log_softmax(logits, valid):
    return jnp.where(valid, jax.nn.log_softmax(jnp.where(valid, logits, NEG)), 0.0)


def soft_targets(q_t, valid, tau):
    """softmax(q_T / tau) over the valid actions (Hinton et al.'s soft targets).
    As tau -> 0 it becomes one-hot on argmax q_T; Q-values of a DQN differ by
    little between actions, so a low tau is needed to make their ranking sharp."""
    return jnp.where(valid, jax.nn.softmax(jnp.where(valid, q_t / tau, NEG)), 0.0)


def kl_loss(q_t, q_s, valid, tau):
    """KL(p_T || p_S) with p_T = softmax(q_T / tau), p_S = softmax(q_S) (Rusu eq. 3)."""
    p = soft_targets(q_t, valid, tau)
    log_p = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.sum(p * (log_p - masked_log_softmax(q_s, valid)))


def nll_loss(q_t, q_s, valid):
    """-log p_S(a_T), a_T = argmax_a q_T (Rusu eq. 1: the teacher's action as a label)."""
    a = jnp.argmax(jnp.where(valid, q_t, NEG))
    return -masked_log_softmax(q_s, valid)[a]


def mse_loss(q_t, q_s, valid):
    """sum_a (q_T - q_S)^2 over the valid actions (Rusu eq. 2: the student's outputs are Q-values)."""
    return jnp.sum(jnp.where(valid, (q_t - q_s) ** 2, 0.0))


def actor_mimic_loss(q_t, q_s, valid, tau):
    """-sum_a softmax(q_T / tau)(a) log softmax(q_S)(a) (Parisotto et al. eq. 2, tau = 1).
    Equal to the KL above plus the teacher's entropy: the same gradient at equal tau."""
    return -jnp.sum(soft_targets(q_t, valid, tau) * masked_log_softmax(q_s, valid))


def distill_loss(args: Args, q_t, q_s, valid):
    """The --loss of one state."""
    if args.loss == "kl":
        return kl_loss(q_t, q_s, valid, args.tau)
    if args.loss == "nll":
        return nll_loss(q_t, q_s, valid)
    if args.loss == "mse":
        return mse_loss(q_t, q_s, valid)
    return actor_mimic_loss(q_t, q_s, valid, args.am_tau)


# ----------------------------------------------------------------------------
# Acting and evaluation (pure JAX)
# ----------------------------------------------------------------------------
def eps_greedy(key, q, epsilon, num_valid):
    """(N, A) -> (N,) actions: random among the num_valid actions with prob. epsilon."""
    k1, k2 = jax.random.split(key)
    greedy = jnp.argmax(jnp.where(jnp.arange(q.shape[-1]) < num_valid, q, NEG), -1)
    explore = jax.random.uniform(k1, greedy.shape) < epsilon
    return jnp.where(explore, jax.random.randint(k2, greedy.shape, 0, num_valid), greedy)


def env_step(game, key, states, actions):
    """One step of N envs: (obs, states, reward, terminated, truncated), each (N, ...)."""
    return jax.vmap(game.step)(jax.random.split(key, actions.shape[0]), states, actions)


def env_reset(game, key, n):
    return jax.vmap(game.reset)(jax.random.split(key, n))


def evaluate(q_fn, game, key, episodes):
    """Mean undiscounted return of the greedy policy argmax q_fn(obs) over `episodes`
    episodes run side by side (each stops counting at its first end)."""
    obs, states = env_reset(game, key, episodes)

    def body(carry, k):
        obs, states, ret, alive = carry
        a = jnp.argmax(q_fn(obs)[..., :game.num_actions], -1)
        obs, states, r, term, trunc = env_step(game, k, states, a)
        return (obs, states, ret + alive * r, alive * (1.0 - (term | trunc))), None

    init = (obs, states, jnp.zeros(episodes), jnp.ones(episodes))
    (_, _, ret, _), _ = jax.lax.scan(body, init, jax.random.split(key, game.max_steps))
    return ret.mean()


# ----------------------------------------------------------------------------
# Teacher: DQN [T1]-[T4]
# ----------------------------------------------------------------------------
class Memory(NamedTuple):
    """A circular replay memory; obs stored as uint8 (MinAtar's channels are 0/1)."""

    obs: jax.Array  # (M, 10, 10, C) uint8
    next_obs: jax.Array  # (M, 10, 10, C) uint8 (teacher only; (1, ...) for the student)
    action: jax.Array  # (M,) int32
    reward: jax.Array  # (M,)
    terminated: jax.Array  # (M,)
    ptr: jax.Array  # () int32, next row to write
    size: jax.Array  # () int32, rows filled


def empty_memory(size, obs_shape, transitions=True):
    next_rows = size if transitions else 1
    return Memory(jnp.zeros((size, *obs_shape), jnp.uint8), jnp.zeros((next_rows, *obs_shape), jnp.uint8),
                  jnp.zeros(size, jnp.int32), jnp.zeros(size), jnp.zeros(size), jnp.int32(0), jnp.int32(0))


def memory_add(mem: Memory, obs, next_obs=None, action=None, reward=None, terminated=None) -> Memory:
    """Write N rows at ptr (wrapping around)."""
    n, size = obs.shape[0], mem.obs.shape[0]
    rows = (mem.ptr + jnp.arange(n)) % size
    mem = mem._replace(obs=mem.obs.at[rows].set(obs.astype(jnp.uint8)))
    if next_obs is not None:
        mem = mem._replace(next_obs=mem.next_obs.at[rows].set(next_obs.astype(jnp.uint8)),
                           action=mem.action.at[rows].set(action), reward=mem.reward.at[rows].set(reward),
                           terminated=mem.terminated.at[rows].set(terminated.astype(jnp.float32)))
    return mem._replace(ptr=(mem.ptr + n) % size, size=jnp.minimum(mem.size + n, size))


class TeacherCarry(NamedTuple):
    params: dict
    target: dict
    opt: optax.OptState
    mem: Memory
    obs: jax.Array  # (N, 10, 10, C) current observations of the N envs
    states: object  # the N envs' states
    step: jax.Array  # env steps so far
    key: jax.Array


def teacher_net(args: Args, game) -> QNet:
    return QNet(args.teacher_channels, args.teacher_hidden, game.num_actions)


def teacher_tx(args: Args):
    return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(args.dqn_lr))


def teacher_init(key, args: Args, game) -> TeacherCarry:
    k_net, k_env, key = jax.random.split(key, 3)
    params = teacher_net(args, game).init(k_net, jnp.zeros(game.obs_shape))
    obs, states = env_reset(game, k_env, args.num_envs)
    return TeacherCarry(params, params, teacher_tx(args).init(params),
                        empty_memory(args.dqn_buffer_size, game.obs_shape), obs, states, jnp.int32(0), key)


def dqn_loss(params, target, net, batch, gamma):
    """[T2] Huber(Q(s, a) - y), y = r + gamma (1 - terminated) max_a' Q_target(s', a'):
    terminated (a game over) stops the bootstrap, a truncation at the step cap does not."""
    obs, next_obs, a, r, term = batch
    q = net.apply(params, obs)[0]  # (B, A)
    q_next = jax.lax.stop_gradient(net.apply(target, next_obs)[0].max(-1))
    y = r + gamma * (1.0 - term) * q_next
    q_a = jnp.take_along_axis(q, a[:, None], 1)[:, 0]
    return optax.huber_loss(q_a, y).mean()


def teacher_iteration(carry: TeacherCarry, args: Args, game):
    """[T1]-[T3] One step of the N envs and (after learning_starts) one DQN update."""
    net, tx = teacher_net(args, game), teacher_tx(args)
    key, k_act, k_env, k_batch = jax.random.split(carry.key, 4)
    # [T1] epsilon falls linearly from 1 to eps_end over exploration_fraction of the training
    frac = carry.step / (args.exploration_fraction * args.total_timesteps)
    eps = jnp.maximum(args.eps_end, 1.0 - frac * (1.0 - args.eps_end))
    a = eps_greedy(k_act, net.apply(carry.params, carry.obs)[0], eps, game.num_actions)
    obs, states, r, term, trunc = env_step(game, k_env, carry.states, a)
    # obs is the next episode's first frame where an episode ended; as s' of a
    # terminated step it is masked by (1 - terminated); after a truncation it
    # stands in for the true last frame (the bootstrap then uses a fresh start).
    mem = memory_add(carry.mem, carry.obs, obs, a, r, term)

    # [T2] one minibatch (skipped, with a zero loss, until learning_starts)
    def update(params, opt):
        idx = jax.random.randint(k_batch, (args.dqn_batch_size,), 0, mem.size)
        batch = (mem.obs[idx].astype(jnp.float32), mem.next_obs[idx].astype(jnp.float32), mem.action[idx],
                 mem.reward[idx], mem.terminated[idx])
        loss, grads = jax.value_and_grad(dqn_loss)(params, carry.target, net, batch, args.gamma)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    params, opt, loss = jax.lax.cond(mem.size >= args.learning_starts, update,
                                     lambda p, o: (p, o, jnp.float32(0.0)), carry.params, carry.opt)
    step = carry.step + args.num_envs
    # [T3] target copy whenever a multiple of target_interval env steps is passed
    copy = step // args.target_interval > carry.step // args.target_interval
    target = jax.tree.map(lambda t, p: jnp.where(copy, p, t), carry.target, params)
    return TeacherCarry(params, target, opt, mem, obs, states, step, key), {"loss/td": loss,
                                                                             "train/reward": r.mean()}


@functools.partial(jax.jit, static_argnames=("args", "game", "iterations"))
def teacher_period(carry: TeacherCarry, args: Args, game, iterations: int):
    """[T1]-[T4] `iterations` env-step iterations of every seed (vmapped), then a greedy evaluation."""
    net = teacher_net(args, game)

    def one(carry):
        carry, record = jax.lax.scan(lambda c, _: teacher_iteration(c, args, game), carry, None, iterations)
        k_eval, key = jax.random.split(carry.key)
        score = evaluate(lambda o: net.apply(carry.params, o)[0], game, k_eval, args.eval_episodes)
        return carry._replace(key=key), record, score

    return jax.vmap(one)(carry)


# ----------------------------------------------------------------------------
# Student [D1]-[D5]
# ----------------------------------------------------------------------------
class StudentCarry(NamedTuple):
    params: dict  # {"net": QNet params with one head per game, "regress": (G, H_S, H_T) feature maps}
    opt: optax.OptState
    mems: tuple  # a Memory of states per game
    obs: tuple  # (N, 10, 10, C_g) per game
    states: tuple  # env states per game
    updates: jax.Array
    key: jax.Array


def student_net(args: Args, spec: Spec) -> QNet:
    return QNet(args.student_channels, args.student_hidden, spec.num_actions, heads=len(spec.games))


def student_init(key, args: Args, spec: Spec) -> StudentCarry:
    k_net, k_reg, key = jax.random.split(key, 3)
    net = student_net(args, spec).init(k_net, jnp.zeros((10, 10, spec.channels)))
    regress = 0.01 * jax.random.normal(k_reg, (len(spec.games), args.student_hidden, spec.teacher_hidden))
    params = {"net": net, "regress": regress}
    resets = [env_reset(g, k, args.num_envs)
               for g, k in zip(spec.games, jax.random.split(key, len(spec.games)), strict=True)]
    mems = tuple(empty_memory(args.replay_size, g.obs_shape, transitions=False) for g in spec.games)
    return StudentCarry(params, optax.adam(args.distill_lr).init(params), mems, tuple(o for o, _ in resets),
                        tuple(s for _, s in resets), jnp.int32(0), jax.random.fold_in(key, 1))


def valid_actions(spec: Spec, g: int):
    return jnp.arange(spec.num_actions) < spec.games[g].num_actions


def collect(carry: StudentCarry, teachers, args: Args, spec: Spec, g: int) -> StudentCarry:
    """[D1] One eps-greedy step of game g's N envs by the acting policy; the states go to its memory."""
    game, teacher = spec.games[g], teacher_net(args, spec.games[g])
    key, k_act, k_env = jax.random.split(carry.key, 3)
    obs = carry.obs[g]
    if args.student_acts:
        q = student_net(args, spec).apply(carry.params["net"], pad_channels(obs, spec.channels), g)[0]
    else:
        q = teacher.apply(teachers[g], obs)[0]
    a = eps_greedy(k_act, q, args.act_epsilon, game.num_actions)
    nxt, states, _, _, _ = env_step(game, k_env, carry.states[g], a)
    mems = carry.mems[:g] + (memory_add(carry.mems[g], obs),) + carry.mems[g + 1:]
    return carry._replace(mems=mems, obs=carry.obs[:g] + (nxt,) + carry.obs[g + 1:],
                          states=carry.states[:g] + (states,) + carry.states[g + 1:], key=key)


def student_loss(params, obs, q_t, f_t, args: Args, spec: Spec, g: int):
    """[D3]-[D4] Mean loss over a minibatch of game g: obs (B, 10, 10, C_g), q_t (B, A_g), f_t (B, H_T)."""
    valid = valid_actions(spec, g)
    q_s, f_s = student_net(args, spec).apply(params["net"], pad_channels(obs, spec.channels), g)  # (B, A_max)
    q_t = jnp.pad(q_t, ((0, 0), (0, spec.num_actions - q_t.shape[-1])))  # masked beyond the game's actions
    loss = jax.vmap(lambda t, s: distill_loss(args, t, s, valid))(q_t, q_s).mean()
    if args.loss == "actor_mimic" and args.feature_weight > 0:
        # Actor-Mimic Sec. 3.2: a per-game map W_g predicts the teacher's hidden
        # features from the student's; its error is back-propagated into both.
        loss = loss + args.feature_weight * jnp.sum((f_s @ params["regress"][g] - f_t) ** 2, -1).mean()
    return loss


def student_update(carry: StudentCarry, teachers, args: Args, spec: Spec, g: int):
    """[D2]-[D4] One Adam step on a minibatch of game g's states, labelled by its teacher."""
    key, k_batch = jax.random.split(carry.key)
    mem = carry.mems[g]
    idx = jax.random.randint(k_batch, (args.distill_batch_size,), 0, mem.size)
    obs = mem.obs[idx].astype(jnp.float32)
    # [D2] the fixed teacher's outputs: no gradient flows into it. (Rusu stores
    # them in the memory; computing them on sampling gives the same numbers.)
    q_t, f_t = jax.lax.stop_gradient(teacher_net(args, spec.games[g]).apply(teachers[g], obs))
    loss, grads = jax.value_and_grad(student_loss)(carry.params, obs, q_t, f_t, args, spec, g)
    updates, opt = optax.adam(args.distill_lr).update(grads, carry.opt, carry.params)
    return carry._replace(params=optax.apply_updates(carry.params, updates), opt=opt,
                          updates=carry.updates + 1, key=key), loss


def student_scores(params, args: Args, spec: Spec, key):
    """[D5] Greedy return of each head on its game: (G,)."""
    net = student_net(args, spec)
    return jnp.stack([evaluate(lambda o, g=g: net.apply(params["net"], pad_channels(o, spec.channels), g)[0],
                               game, jax.random.fold_in(key, g), args.eval_episodes)
                      for g, game in enumerate(spec.games)])


@functools.partial(jax.jit, static_argnames=("args", "spec"))
def student_start(carry: StudentCarry, teachers, args: Args, spec: Spec):
    """[D1] Fill every game's memory with `prefill` states (vmapped over seeds)."""
    def one(carry, teachers):
        for g in range(len(spec.games)):
            carry = jax.lax.fori_loop(0, -(-args.prefill // args.num_envs),
                                      lambda _, c, g=g: collect(c, teachers, args, spec, g), carry)
        return carry

    return jax.vmap(one)(carry, teachers)


@functools.partial(jax.jit, static_argnames=("args", "spec", "rounds"))
def student_period(carry: StudentCarry, teachers, args: Args, spec: Spec, rounds: int):
    """[D1]-[D5] `rounds` rounds (one collection step and one update per game each) of every seed
    (vmapped), then the student's scores. Returns carry, losses (seeds, rounds, G), scores (seeds, G)."""
    def one(carry, teachers):
        def round_(carry, _):
            losses = []
            for g in range(len(spec.games)):  # minibatches one game at a time (Rusu Sec. 4.3)
                carry = collect(carry, teachers, args, spec, g)
                carry, loss = student_update(carry, teachers, args, spec, g)
                losses.append(loss)
            return carry, jnp.stack(losses)

        carry, losses = jax.lax.scan(round_, carry, None, rounds)
        k_eval, key = jax.random.split(carry.key)
        return carry._replace(key=key), losses, student_scores(carry.params, args, spec, k_eval)

    return jax.vmap(one)(carry, teachers)


@functools.partial(jax.jit, static_argnames=("args", "spec"))
def teacher_scores(teachers, args: Args, spec: Spec, key):
    """Greedy return of each seed's teacher on its game, measured as the student's: (seeds, G)."""
    def one(teachers):
        return jnp.stack([evaluate(lambda o, g=g: teacher_net(args, spec.games[g]).apply(teachers[g], o)[0], game,
                                   jax.random.fold_in(key, g), args.eval_episodes)
                          for g, game in enumerate(spec.games)])

    return jax.vmap(one)(teachers)


# ----------------------------------------------------------------------------
# Teacher files
# ----------------------------------------------------------------------------
def teacher_file(folder, env_id: str) -> Path:
    return Path(folder) / f"{env_id}.msgpack"


def save_teacher(path, params, args: Args, game, scores) -> Path:
    """A teacher file: params of every seed (leading axis) and the sizes to rebuild it."""
    config = {"env_id": game.env_id, "channels": args.teacher_channels, "hidden": args.teacher_hidden,
              "num_actions": game.num_actions, "env_steps": args.total_timesteps,
              "scores": json.dumps([float(s) for s in np.asarray(scores)])}
    return save_checkpoint(path, {"params": params, "config": config})


def load_teacher(folder, args: Args, game):
    """The params of a saved teacher (seeds, ...), or a one-line error if it is missing or was
    trained with other sizes than --teacher-channels / --teacher-hidden on this game."""
    path = teacher_file(folder, game.env_id)
    if not path.is_file():
        fail(f"no teacher for {game.env_id}: '{path}' does not exist; train one with --phase teacher "
             f"--env-id {game.env_id} --teacher-out {folder}")
    raw = read_checkpoint(path, "teacher")
    if "params" not in raw:
        fail(f"teacher '{path}' holds no params")
    leaves = jax.tree.leaves(raw["params"])
    seeds = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1
    one = teacher_net(args, game).init(jax.random.PRNGKey(0), jnp.zeros(game.obs_shape))
    template = jax.tree.map(lambda x: jnp.zeros((seeds, *x.shape), x.dtype), one)
    return load_checkpoint(path, {"params": template, "config": raw.get("config", {})}, "teacher")["params"]


# ----------------------------------------------------------------------------
# Set-up: checks
# ----------------------------------------------------------------------------
def game_ids(args: Args) -> tuple:
    return args.games or (args.env_id,)


def validate(args: Args) -> None:
    """One-line errors for settings that cannot work (before anything heavy)."""
    check_ranges(args, at_least_1=("num_seeds", "num_envs", "teacher_channels", "teacher_hidden",
                                   "dqn_batch_size", "dqn_buffer_size", "target_interval", "student_channels",
                                   "student_hidden", "distill_updates", "distill_eval_interval",
                                   "distill_batch_size", "replay_size", "prefill"),
                 non_negative=("learning_starts", "feature_weight"),
                 positive=("dqn_lr", "distill_lr", "tau", "am_tau", "exploration_fraction"),
                 probability=("eps_end", "act_epsilon"), discount=("gamma",))
    ids = game_ids(args)
    for env_id in ids:
        check_env_id(env_id)
        if env_id not in MINATAR:
            fail(f"distillation runs on the MinAtar games ({', '.join(MINATAR)}); '{env_id}' is not one")
    if len(set(ids)) < len(ids):
        fail(f"--games names a game twice: {' '.join(ids)}")
    if args.phase == "teacher":
        if len(ids) > 1:
            fail("--phase teacher trains one game's teacher at a time: pass --env-id, not --games")
        if args.learning_starts > args.dqn_buffer_size:
            fail(f"--learning-starts ({args.learning_starts}) exceeds --dqn-buffer-size ({args.dqn_buffer_size})")
        if args.total_timesteps < args.num_envs:
            fail(f"--total-timesteps ({args.total_timesteps}) is less than one step of --num-envs "
                 f"({args.num_envs}) envs")
    else:
        if args.feature_weight > 0 and args.loss != "actor_mimic":
            fail(f"--feature-weight is Actor-Mimic's feature regression: it needs --loss actor_mimic, "
                 f"not {args.loss}")
        if args.prefill > args.replay_size:
            fail(f"--prefill ({args.prefill}) exceeds --replay-size ({args.replay_size})")
    if args.capture_video:
        fail("--capture-video is not supported here: MinAtar's 10x10 frames are not worth filming")


def check_sizes(args: Args, spec: Spec) -> None:
    per_obs = 10 * 10 * spec.channels
    if args.phase == "teacher":
        nbytes = args.num_seeds * 2 * args.dqn_buffer_size * per_obs
    else:
        nbytes = args.num_seeds * len(spec.games) * args.replay_size * per_obs
    check_memory(3 * nbytes, "the replay memories (and their checkpoint copies)",
                 "lower --dqn-buffer-size / --replay-size or --num-seeds")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main_teacher(args: Args, key, game, spec: Spec) -> dict:
    run = Run(args)
    steps_per_eval = max(args.num_envs, args.eval_interval // args.num_envs * args.num_envs)
    iters = steps_per_eval // args.num_envs
    periods = max(1, args.total_timesteps // steps_per_eval)
    total = periods * steps_per_eval
    n = param_count(teacher_net(args, game).init(key, jnp.zeros(game.obs_shape)))
    progress = Progress(f"DQN teacher on {game.env_id} ({n:,} parameters), {args.num_envs} envs, "
                        f"{args.num_seeds} seed(s)", total, start=run.start_step, every=steps_per_eval,
                        compiling="one evaluation period")
    carry = jax.vmap(lambda k: teacher_init(k, args, game))(jax.random.split(key, args.num_seeds))
    state = run.restore({"carry": carry, "evals": np.zeros((periods, args.num_seeds), np.float32)})
    for i in range(run.start_step // steps_per_eval, periods):
        with run.timed("train"):  # [T1]-[T4] one jitted call
            carry, record, score = jax.block_until_ready(teacher_period(state["carry"], args, game, iters))
        step = (i + 1) * steps_per_eval
        check_finite_series(i * steps_per_eval + args.num_envs * np.arange(1, iters + 1),
                            **{k: np.asarray(v).T for k, v in record.items()})
        state["carry"], state["evals"][i] = carry, np.asarray(score)
        metrics = {"eval/return": float(np.mean(score)), "loss/td": float(np.mean(record["loss/td"])),
                   "steps_per_second": step * args.num_seeds / max(run.timings["train"], 1e-9)}
        run.log({**metrics, "eval/return_per_seed": np.asarray(score)}, step, echo=False)
        progress.update(step, metrics, ["eval/return", "loss/td"])
        if run.checkpoint_due(step, i * steps_per_eval):
            run.save(state, step)
    run.save(state, total)
    final = state["evals"][-1]
    params = state["carry"].params
    paths = [save_teacher(run.dir / "teacher.msgpack", params, args, game, final)]
    if args.teacher_out:
        paths.append(save_teacher(teacher_file(args.teacher_out, game.env_id), params, args, game, final))
    progress.done("eval/return", float(final.mean()), reference=f"per seed {np.round(final, 2).tolist()}",
                  extra=f"teacher written to {', '.join(map(str, paths))}")
    run.close()
    return {"params": params, "evals": state["evals"], "run_dir": run.dir, "wall_seconds": run.timings["train"],
            "final_return": float(final.mean())}


def main_distill(args: Args, key, spec: Spec) -> dict:
    G = len(spec.games)
    loaded = [load_teacher(args.teacher_dir, args, g) for g in spec.games]
    # seed s of the student distils seed s mod T of each game's teacher
    teachers = tuple(jax.tree.map(lambda x: x[np.arange(args.num_seeds) % x.shape[0]], t) for t in loaded)
    run = Run(args)
    rounds = max(1, args.distill_eval_interval // G)
    periods = max(1, args.distill_updates // (rounds * G))
    total = periods * rounds * G
    n_teacher = [param_count(jax.tree.map(lambda x: x[0], t)) for t in teachers]
    carry = jax.vmap(lambda k: student_init(k, args, spec))(jax.random.split(key, args.num_seeds))
    n_student = param_count(jax.tree.map(lambda x: x[0], carry.params["net"]))
    print(f"parameters: student {n_student:,} (trunk + {G} head(s)); teacher(s) "
          f"{', '.join(f'{n:,}' for n in n_teacher)}; ratio {n_student / np.mean(n_teacher):.3f} of a teacher",
          flush=True)
    progress = Progress(f"distillation ({args.loss}) of {', '.join(g.env_id for g in spec.games)} into one "
                        f"student, {'student' if args.student_acts else 'teacher'} acting, {args.num_seeds} "
                        f"seed(s)", total, unit="updates", start=run.start_step, every=rounds * G,
                        compiling="the teachers' evaluation, the memories and one period")
    with run.timed("train"):
        teacher_score = np.asarray(teacher_scores(teachers, args, spec, jax.random.fold_in(key, 99)))  # (S, G)
        carry = student_start(carry, teachers, args, spec)
    state = run.restore({"carry": carry, "evals": np.zeros((periods, args.num_seeds, G), np.float32)})
    for i in range(run.start_step // (rounds * G), periods):
        with run.timed("train"):  # [D1]-[D5] one jitted call
            carry, losses, scores = jax.block_until_ready(student_period(state["carry"], teachers, args, spec,
                                                                         rounds))
        step = (i + 1) * rounds * G
        check_finite_series(i * rounds * G + G * np.arange(1, rounds + 1), unit="update",
                            **{f"loss/{args.loss}": np.asarray(losses).transpose(1, 0, 2)})
        state["carry"], state["evals"][i] = carry, np.asarray(scores)
        rel = np.asarray(scores) / np.maximum(teacher_score, 1e-9)
        metrics = {"eval/return": float(np.mean(scores)), "eval/relative": float(np.mean(rel)),
                   f"loss/{args.loss}": float(np.mean(losses)),
                   "updates_per_second": step * args.num_seeds / max(run.timings["train"], 1e-9)}
        per_game = {f"eval/{g.env_id}/return": np.asarray(scores)[:, j] for j, g in enumerate(spec.games)}
        run.log({**metrics, **per_game, "eval/teacher_return": teacher_score}, step, echo=False)
        progress.update(step, metrics, ["eval/return", "eval/relative", f"loss/{args.loss}"])
        # a checkpoint every --checkpoint-interval updates, else every evaluation (Run.checkpoint_due
        # counts in --eval-interval's env steps, the teacher phase's unit)
        every = args.checkpoint_interval or rounds * G
        if step // every > i * rounds * G // every:
            run.save(state, step)
    run.save(state, total)
    final = state["evals"][-1]  # (S, G)
    relative = final / np.maximum(teacher_score, 1e-9)
    geo = float(np.exp(np.log(np.maximum(relative.mean(0), 1e-9)).mean()))
    for j, g in enumerate(spec.games):
        print(f"{g.env_id}: student {final[:, j].mean():.2f} vs teacher {teacher_score[:, j].mean():.2f} "
              f"({100 * relative[:, j].mean():.0f}%)", flush=True)
    progress.done("eval/relative", float(relative.mean()),
                  reference=f"student/teacher score; geometric mean over games {geo:.3f}")
    if args.save_model:
        save_checkpoint(run.dir / "student.msgpack", {"params": state["carry"].params,
                                                      "config": json.dumps(dataclasses.asdict(args))})
    run.close()
    return {"params": state["carry"].params, "evals": state["evals"], "teacher_score": teacher_score,
            "relative": relative, "geo_mean_relative": geo, "run_dir": run.dir,
            "wall_seconds": run.timings["train"], "student_params": n_student, "teacher_params": n_teacher}


def main(args: Args) -> dict:
    validate(args)
    games = tuple(jax_game(i) for i in game_ids(args))
    spec = Spec(games, channels=max(g.obs_shape[-1] for g in games), num_actions=max(g.num_actions for g in games),
                teacher_hidden=args.teacher_hidden)
    check_sizes(args, spec)
    key = seed_everything(args.seed)
    if args.phase == "teacher":
        return main_teacher(args, key, games[0], spec)
    return main_distill(args, key, spec)


if __name__ == "__main__":
    cli(Args, main)
