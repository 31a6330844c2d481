"""Tabular task families for meta-RL as pure-JAX FuncEnvs (Duan et al. 2016,
"RL²", Sec. 3).

Each has `sample_tasks(key, n)`, which returns n tasks as one `params` pytree
with a leading axis of size n, and a fixed episode length `horizon`
(registered as gymnasium's `max_episode_steps`, so the end of an episode is a
truncation, not a terminal):
- `BernoulliBandit`: k arms with means uniform in [0, 1]; one pull is one
  episode (Sec. 3.1). Registered as BernoulliBandit{2,5,10,50}-v0.
- `RandomMDP`: random tabular MDPs, 10 states, 5 actions, horizon 10, mean
  rewards N(1, 1) with unit-variance reward noise, transitions Dirichlet(1),
  episodes start in state 0 (Sec. 3.2). Registered as RandomMDP-v0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv


class BanditParams(NamedTuple):
    """The task of a Bernoulli bandit: the arms' success probabilities."""

    means: jax.Array  # (k,) float32


class BernoulliBandit(FuncEnv):
    """k-armed Bernoulli bandit; a pull of arm a pays 1 with probability means[a].

    Following Duan et al. (2016, Sec. 3.1), one pull is one episode: the
    observation is a constant 0 (Discrete(1)) and the state only records
    whether the arm was pulled (terminal then). A "trial" of n pulls is n
    episodes on the same task.
    """

    horizon = 1

    def __init__(self, num_arms: int = 5):
        self.num_arms = int(num_arms)
        super().__init__()
        self.observation_space = spaces.Discrete(1)
        self.action_space = spaces.Discrete(self.num_arms)

    def sample_tasks(self, key, n: int) -> BanditParams:
        """n tasks, arm means i.i.d. uniform in [0, 1]: means (n, k)."""
        return BanditParams(jax.random.uniform(key, (n, self.num_arms)))

    def get_default_params(self, **kwargs) -> BanditParams:
        return jax.tree.map(lambda x: x[0], self.sample_tasks(jax.random.PRNGKey(0), 1))

    def _params(self, params):
        return self.default_params if params is None else params

    def initial(self, rng, params=None):
        return jnp.int32(0)  # 0: not pulled yet, 1: pulled

    def transition(self, state, action, rng, params=None):
        return jnp.int32(1)

    def observation(self, state, rng, params=None):
        return jnp.int32(0)

    def terminal(self, state, rng, params=None):
        return state == 1

    def reward(self, state, action, next_state, rng, params=None):
        p = self._params(params).means[action]
        return jax.random.bernoulli(rng, p).astype(jnp.float32)

    # Rendering (numpy only): one bar per arm, as tall as its mean.
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, size: int = 64):
        means = np.asarray(self._params(params).means)
        img = np.full((size, 8 * self.num_arms, 3), 235, dtype=np.uint8)
        for a, m in enumerate(means):
            img[size - int(m * size):, 8 * a + 1: 8 * a + 7] = (40, 90, 220)
        return render_state, img

    def render_close(self, render_state, params=None):
        pass


class MDPParams(NamedTuple):
    """The task of a tabular MDP."""

    transitions: jax.Array  # (S, A, S) P(s' | s, a)
    mean_rewards: jax.Array  # (S, A) E[r | s, a]


class RandomMDP(FuncEnv):
    """Random tabular MDPs as in Duan et al. (2016, Sec. 3.2).

    Per task: P(. | s, a) ~ Dirichlet(1, ..., 1) (a flat Dirichlet) and mean
    rewards mu(s, a) ~ N(1, 1); a step pays mu(s, a) + N(0, 1). Every episode
    starts in state 0 and lasts `horizon` steps; there is no terminal state.
    The observation is the state index (Discrete(S)).
    """

    def __init__(self, num_states: int = 10, num_actions: int = 5, horizon: int = 10):
        self.num_states, self.num_actions, self.horizon = int(num_states), int(num_actions), int(horizon)
        super().__init__()
        self.observation_space = spaces.Discrete(self.num_states)
        self.action_space = spaces.Discrete(self.num_actions)

    def sample_tasks(self, key, n: int) -> MDPParams:
        """n tasks: transitions (n, S, A, S), mean rewards (n, S, A)."""
        k_p, k_r = jax.random.split(key)
        S, A = self.num_states, self.num_actions
        P = jax.random.dirichlet(k_p, jnp.ones(S), (n, S, A))
        return MDPParams(P, 1.0 + jax.random.normal(k_r, (n, S, A)))

    def get_default_params(self, **kwargs) -> MDPParams:
        return jax.tree.map(lambda x: x[0], self.sample_tasks(jax.random.PRNGKey(0), 1))

    def _params(self, params):
        return self.default_params if params is None else params

    def initial(self, rng, params=None):
        return jnp.int32(0)

    def transition(self, state, action, rng, params=None):
        p = self._params(params).transitions[state, action]
        return jax.random.choice(rng, self.num_states, p=p).astype(jnp.int32)

    def observation(self, state, rng, params=None):
        return state

    def terminal(self, state, rng, params=None):
        return jnp.bool_(False)

    def reward(self, state, action, next_state, rng, params=None):
        noise = jax.random.normal(jax.random.fold_in(rng, 1))  # independent of the transition's draw
        return self._params(params).mean_rewards[state, action] + noise

    # Rendering (numpy only): a row of states, the current one in blue.
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, cell: int = 24):
        img = np.full((1, self.num_states, 3), 235, dtype=np.uint8)
        img[0, int(state)] = (40, 90, 220)
        return render_state, np.kron(img, np.ones((cell, cell, 1), dtype=np.uint8))

    def render_close(self, render_state, params=None):
        pass
