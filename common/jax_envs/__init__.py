"""Pure-JAX environments written against gymnasium's functional API.

Each environment is a `gymnasium.experimental.functional.FuncEnv`: a bundle of
pure functions `initial`, `transition`, `observation`, `reward`, `terminal`
that take the environment's `params` (the *task*) explicitly. That is what lets
an algorithm put the whole experiment (env steps included) under one `jax.jit`
and `jax.vmap` it over seeds or tasks.

Every env here is also registered as a gymnasium id (common/envs/__init__.py),
so `make_env("DynaMaze-v0")` returns an ordinary `gymnasium.Env` (through
`JaxEnv`, a thin `FunctionalJaxEnv` subclass) that passes gymnasium's
`check_env`. With the gymnasium interface a task is chosen with
`env.reset(options={"task": params})`; it stays until another is given.

Modules (import from them; this package re-exports nothing)
- `adapter`: `JaxEnv` (FuncEnv -> gymnasium Env), `func_env_of`, `is_task_family`.
- `mazes`: Sutton & Barto's grid mazes (`Maze`, `ChangingMaze`, `tabular_model`).
- `bandits_mdps`: `BernoulliBandit` and `RandomMDP`, RL²'s task families.
- `navigation`: `PointNav2D` (MAML's task family) and `PointMass` (GPS's
  linear point mass).

Task families (meta-RL: RL², MAML, PEARL) have `sample_tasks(key, n)`, which
returns n tasks as one `params` pytree with a leading axis of size n, and a
fixed episode length `horizon` (registered as gymnasium's `max_episode_steps`,
so the end of an episode is a truncation, not a terminal).
"""
