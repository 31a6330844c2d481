"""Speed: backprop through a model's two jitted phases against this CPU's matmul rate (issue #21's speed page).

algos/backprop_through_model.py at its defaults (Pendulum-v1, H = 50, 256 start states, a 2x64 tanh policy,
one 2x128 swish model): the model phase ([2], `fit_model`: 500 Adam steps on minibatches of 128) and the
policy phase ([3], `improve_policy`: 100 Adam steps, each backpropagating through 50 imagined steps of 256
start states), each timed in CPU seconds on one pinned core, their FLOPs counted from the layer sizes (3 x the
forward matmuls: forward, input gradient, weight gradient; XLA's cost analysis counts a loop's body once, so it
cannot count a scanned phase), against XLA's fp32 matmul rate measured in the same process at 2048^2 and at the phases'
largest matmul (256x128 @ 128x128). Both phases are long chains of small matmuls (one imagined step is a few
256-row products of 64 and 128 columns, and the 50 steps are sequential), so the figure to read is how far
they are from the rate, not whether they reach it.

Run:
    python -m benchmarks.backprop_speed --quick     # 20 policy steps, 50 model steps: checks the script
    python -m benchmarks.backprop_speed --save

Writes backprop_speed.json to benchmarks/out/ (with --save: benchmarks/results/).
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial

from benchmarks import harness


def phases(policy_steps: int, model_steps: int, seed: int):
    """The two jitted phases of backprop_through_model.main, built as main builds them, on random data."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training.train_state import TrainState

    from algos import backprop_through_model as bp

    args = dataclasses.replace(bp.Args(), policy_steps=policy_steps, model_steps=model_steps)
    dims = bp.validate(args)
    policy = bp.make_policy(dims.act_dim, args.policy_hidden)
    k_pi, k_model, k_fit, k_pol = jax.random.split(jax.random.PRNGKey(seed), 4)
    policy_state = TrainState.create(apply_fn=policy.apply, params=policy.init(k_pi, jnp.zeros(dims.obs_dim)),
                                     tx=optax.adam(args.policy_lr))
    policy_fn = partial(bp.policy_action, policy, action_scale=dims.action_scale)
    model = bp.MLP(args.model_hidden, dims.obs_dim)
    model_params = jax.vmap(model.init, in_axes=(0, None))(
        jax.random.split(k_model, args.ensemble_size), jnp.zeros(dims.obs_dim + dims.act_dim))
    model_state = TrainState.create(apply_fn=model.apply, params=model_params, tx=optax.adam(args.model_lr))
    rng, n = np.random.default_rng(seed), 1000
    data_np = {"obs": rng.normal(size=(n, dims.obs_dim)).astype(np.float32),
               "action": rng.uniform(-2, 2, (n, dims.act_dim)).astype(np.float32),
               "next_obs": rng.normal(size=(n, dims.obs_dim)).astype(np.float32)}
    norm = bp.normalizer_from(data_np, n)
    data = bp.Data(*(jnp.asarray(data_np[k]) for k in ("obs", "action", "next_obs")))
    model_call = (bp.fit_model, (model, args, model_state, norm, data, n, k_fit))
    policy_call = (bp.improve_policy, (policy_fn, partial(bp.learned_step, model), bp.reward_function(args.env_id),
                                       args, policy_state, (model_params, norm), data.obs, n, k_pol))
    # FLOPs: 3 x the forward matmuls of every row the phase pushes through the networks.
    pol = harness.mlp_flops([dims.obs_dim, args.policy_hidden, args.policy_hidden, dims.act_dim])
    mod = args.ensemble_size * harness.mlp_flops([dims.obs_dim + dims.act_dim, args.model_hidden,
                                                  args.model_hidden, dims.obs_dim])
    flops = {"model": 3 * model_steps * args.model_batch_size * mod,
             "policy": 3 * policy_steps * args.num_start_states * args.horizon * (pol + mod)}
    return args, {"model ([2] fit_model)": (*model_call, flops["model"]),
                  "policy ([3] improve_policy)": (*policy_call, flops["policy"])}


def main(argv=None):
    p = harness.parser("backprop_speed", __doc__, seeds=[0], quick={"policy_steps": 20, "model_steps": 50},
                       seeds_help="seed of the parameters and the random data (the first one is used)")
    p.add_argument("--policy-steps", type=int, default=100, help="K, policy steps per phase (default: the algorithm's)")
    p.add_argument("--model-steps", type=int, default=500, help="model steps per phase (default: the algorithm's)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per phase")
    p.add_argument("--core", type=int, default=0, help="the core to pin to (index into the allowed ones)")
    a = harness.parse(p, argv)
    harness.pin_to_core(a.core)
    args, calls = phases(a.policy_steps, a.model_steps, a.seeds[0])
    m, h = args.num_start_states, args.model_hidden
    shape = f"{m}x{h}@{h}x{h}"
    rates = {shape: harness.layer_matmul_rate(m, h, iters=2000),
             "2048x2048@2048x2048": harness.matmul_rate(2048, clock=time.process_time)}
    rows = {}
    for name, (fn, call_args, flops) in calls.items():
        seconds = harness.timed_call(fn, call_args, a.reps, clock=time.process_time)
        gflops = flops / seconds / 1e9
        rows[name] = {"cpu_seconds_per_phase": seconds, "gflop_per_phase": flops / 1e9, "gflop_per_cpu_second": gflops,
                      "fraction_of_matmul_rate": {k: gflops / v for k, v in rates.items()}}
        print(f"{name:28s} {seconds:7.3f} CPU s, {flops / 1e9:7.2f} GFLOP, {gflops:6.1f} GFLOP/CPU s = "
              f"{100 * gflops / rates[shape]:4.1f}% of {shape}, {100 * gflops / rates['2048x2048@2048x2048']:4.1f}% "
              "of 2048^2", flush=True)
    print("matmul rate, GFLOP per CPU s:", {k: round(v, 1) for k, v in rates.items()})
    harness.save_results("backprop_speed", {
        "setting": f"algos/backprop_through_model.py defaults ({args.env_id}, H {args.horizon}, "
                   f"{args.num_start_states} start states, policy 2x{args.policy_hidden}, model 2x{args.model_hidden}, "
                   f"{a.policy_steps} policy steps, {a.model_steps} model steps of batch {args.model_batch_size}); one "
                   "pinned core; CPU seconds", "phases": rows, "matmul_gflop_per_cpu_second": rates,
        "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
