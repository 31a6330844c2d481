"""Speed against the machine's limit: MAML's outer TRPO step (algos/maml.py, `trpo_step`) on one pinned core.

The setting is the authors' 2-D navigation sizes (cbfinn/maml_rl, maml_trpo_point.py; the policy of their Fig. 5):
20 tasks x 20 episodes x 100 steps before and after one inner step, a 2x100 ReLU policy, TRPO with max KL 0.01,
10 conjugate-gradient iterations and a 15-try line search (0.8 shrink). One meta-iteration's samples are drawn
once (from the seed's initial policy: random goals, one inner step) and held fixed; the outer step on them is then
timed, whole and by its parts, with the process pinned to one core (`os.sched_setaffinity`), in CPU seconds
(`time.process_time`, which other jobs on a shared core do not inflate) with wall seconds beside them.

FLOPs are XLA's cost analysis of each part compiled alone, on ONE task, times the tasks (the outer step runs the
tasks one after another in `lax.map`, and XLA's cost analysis counts a loop's body once, so the whole compiled step
cannot be counted directly): the old post-update policies (the inner step redone at theta), the surrogate's value
and gradient, one Fisher-vector product (`fisher_vector_product`, through the inner step), one line-search
evaluation (surrogate and KL). The step's FLOPs are theirs times how often the step runs each: once, once,
cg_iters, and the line search's tries (from its step coefficient). Each product redoes its task's inner step and
forward pass (the primal of its linearisation: the old policies' FLOPs; keeping them instead, 290 MB at these
sizes, was no faster), so the figure without those is saved too. Against: XLA's fp32 matmul rate measured in
the same process on the same core, per CPU second, at 2048 x 2048 (the most of three measurements: before
and after the step and after the parts) and at the policy's own hidden-layer shape on
one task's rows (L x 100 @ 100 x 100, L = 20 x 100 + 99 = 2099 steps, the step budget plus room for the last
path).

`--compare-src DIR` also times the outer step of another checkout's algos/maml.py (e.g. a frozen copy of the
commit before a change, with its own policy code) on the same samples in the same process, for a before/after
ratio and the relative difference of the two steps.

Run:
    python -m benchmarks.maml_speed --quick     # 2 tasks x 2 episodes, one timed call (tries the script)
    python -m benchmarks.maml_speed --save      # the authors' sizes, 3 timed calls of each part
    python -m benchmarks.maml_speed --compare-src /tmp/maml_before --save

Writes maml_speed.json to benchmarks/out/ (with --save: benchmarks/results/). Runs unchanged with jax[cuda]
(the pinning is then of the host thread only).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

from benchmarks import harness


def load_maml(src: Path | None):
    """algos.maml of this checkout, or that of another one (loaded under another module name)."""
    if src is None:
        from algos import maml

        return maml
    spec = importlib.util.spec_from_file_location("maml_compare", Path(src) / "algos" / "maml.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["maml_compare"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fixed_samples(maml, args, seed: int):
    """One meta-iteration's samples, drawn once: theta (the seed's init), pre (M, 1, P, L, ...) and post."""
    import jax

    env, dims, policy, phases, _, _ = maml.setup(args)
    _, theta, *_ = maml.initial_state(args, env, dims, policy)
    key = jax.random.PRNGKey(seed)
    tasks = env.sample_tasks(jax.random.fold_in(key, 0), args.meta_batch)
    params = maml.broadcast(theta, args.meta_batch)
    pre = phases.sample(params, tasks, jax.random.fold_in(key, 1))
    post = phases.sample(phases.inner(params, pre, args.inner_lr), tasks, jax.random.fold_in(key, 2))
    return policy, phases, theta, jax.tree.map(lambda x: x[:, None], pre), post


def timed(fn, fn_args, reps: int) -> dict:
    """CPU and wall seconds per call (compiled first; the compile's wall seconds too)."""
    import jax

    tic = time.perf_counter()
    jax.block_until_ready(fn(*fn_args))
    compile_s = time.perf_counter() - tic
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*fn_args))
    return {"cpu_seconds": (time.process_time() - cpu) / reps, "wall_seconds": (time.perf_counter() - wall) / reps,
            "first_call_wall_seconds": compile_s, "calls": reps}


def main(argv=None):
    p = harness.parser("maml_speed", __doc__, seeds=[1], quick={"meta_batch": 2, "trajectories": 2, "reps": 1},
                       seeds_help="the seed of the fixed samples (one: the speed is measured once)")
    p.add_argument("--meta-batch", type=int, default=20, help="tasks (the authors' Fig. 5 policy: 20)")
    p.add_argument("--trajectories", type=int, default=20, help="episodes of 100 steps per task and batch")
    p.add_argument("--reps", type=int, default=3, help="timed calls of the step and of each part")
    p.add_argument("--core", type=int, default=0, help="the allowed core (index) to pin to")
    p.add_argument("--compare-src", type=Path, default=None,
                   help="a checkout whose algos/maml.py's outer step is timed too (before/after)")
    a = harness.parse(p, argv)
    core = harness.pin_to_core(a.core)  # before XLA starts its threads

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    maml = load_maml(None)
    args = maml.Args(env_id="PointNav2D-v0", meta_batch=a.meta_batch, trajectories_per_task=a.trajectories,
                     inner_steps=1, seed=a.seeds[0])
    policy, phases, theta, pre, post = fixed_samples(maml, args, a.seeds[0])
    M, L = post.mask.shape[0], post.mask.shape[-1]
    print(f"outer step on {M} tasks x {L} steps (2x100 policy), pinned to core {core}", flush=True)

    # the 2048^2 rate before and after the step (the most of the two is the limit: on a shared machine the rate
    # per CPU second drops when the other core is busy)
    rates_2048 = [harness.matmul_rate(2048, clock=time.process_time)]
    step = timed(phases.outer, (theta, (), pre, post), a.reps)
    rates_2048.append(harness.matmul_rate(2048, clock=time.process_time))
    new_theta, _, info = phases.outer(theta, (), pre, post)
    coef = float(info["step_coef"])
    tries = round(math.log(coef) / math.log(args.backtrack_ratio)) + 1 if coef > 0 else args.backtrack_steps

    # the parts, jitted alone (on all tasks for the time, on one task for XLA's FLOP count)
    flat, unravel = ravel_pytree(theta)
    v = jax.random.normal(jax.random.PRNGKey(0), flat.shape)
    first = lambda tree: jax.tree.map(lambda x: x[:1], tree)
    old_fn = lambda th, pre, post: jax.lax.map(lambda d: maml.post_update_policy(policy.apply, th, *d, args),
                                                (pre, post))
    surr = lambda f, pre, post, old: maml.surrogate_and_kl(policy.apply, unravel(f), theta, pre, post, args, old)
    parts = {
        "old_policies": (old_fn, lambda pre, post: (theta, pre, post), 1),
        "surrogate_value_and_grad": (lambda th, pre, post, old: maml.surrogate_and_kl(
            policy.apply, th, th, pre, post, args, old, grad=True), lambda pre, post: (theta, pre, post,
                                                                                         old_fn(theta, pre, post)), 1),
        "fisher_vector_product": (lambda v, pre, post: maml.fisher_vector_product(policy.apply, theta, pre, post,
                                                                                  args)(v),
                                  lambda pre, post: (v, pre, post), args.cg_iters),
        "line_search_evaluation": (surr, lambda pre, post: (flat, pre, post, old_fn(theta, pre, post)), tries),
    }
    res_parts, total_flops = {}, 0.0
    for name, (fn, make_args, count) in parts.items():
        t = timed(jax.jit(fn), make_args(pre, post), a.reps)
        gflop = M * harness.xla_flops(jax.jit(fn), make_args(first(pre), first(post))) / 1e9
        total_flops += count * gflop
        res_parts[name] = {**t, "gflop": gflop, "per_outer_step": count,
                           "gflop_per_cpu_second": gflop / t["cpu_seconds"]}
        print(f"  {name:26s} x{count:2d}: {t['cpu_seconds'] * 1e3:7.1f} ms CPU, {gflop:6.2f} GFLOP, "
              f"{gflop / t['cpu_seconds']:6.1f} GFLOP per CPU s", flush=True)

    rates_2048.append(harness.matmul_rate(2048, clock=time.process_time))
    rate_2048 = max(rates_2048)
    x = jax.random.normal(jax.random.PRNGKey(1), (L, 100), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(2), (100, 100), jnp.float32)
    rate_layer = 2 * L * 100 * 100 / harness.timed_call(jax.jit(lambda x, w: x @ w), (x, w), 200,
                                                          clock=time.process_time) / 1e9
    achieved = total_flops / step["cpu_seconds"]
    needed = total_flops - args.cg_iters * res_parts["old_policies"]["gflop"]  # without the products' recomputation
    print(f"outer step: {step['cpu_seconds']:.3f} CPU s ({step['wall_seconds']:.3f} wall), {total_flops:.1f} GFLOP "
          f"({tries} line-search tries): {achieved:.1f} GFLOP per CPU s = {100 * achieved / rate_2048:.1f}% of the "
          f"2048^2 matmul rate {rate_2048:.1f}, {100 * achieved / rate_layer:.1f}% of the {L}x100 @ 100x100 rate "
          f"{rate_layer:.1f}; without the products' recomputed primal {needed:.1f} GFLOP, "
          f"{100 * needed / step['cpu_seconds'] / rate_2048:.1f}% of the 2048^2 rate", flush=True)
    res = {"setting": {"env_id": "PointNav2D-v0", "meta_batch": M, "trajectories_per_task": a.trajectories,
                       "steps_per_task": L, "hidden_sizes": list(args.hidden_sizes), "cg_iters": args.cg_iters,
                       "seed": a.seeds[0]},
           "pinned_core": core, "load_average_1min": os.getloadavg()[0],
           "outer_step": {**step, "gflop": total_flops, "line_search_tries": tries,
                          "info": {k: float(v) for k, v in info.items()},
                          "gflop_per_cpu_second": achieved, "share_of_2048_rate": achieved / rate_2048,
                          "share_of_layer_rate": achieved / rate_layer, "gflop_without_recomputation": needed,
                          "share_of_2048_rate_without_recomputation": needed / step["cpu_seconds"] / rate_2048},
           "parts": res_parts, "parts_cpu_seconds_summed": sum(r["cpu_seconds"] * r["per_outer_step"]
                                                               for r in res_parts.values()),
           "matmul_2048_gflops_per_cpu_second": rate_2048, "matmul_2048_measurements": rates_2048,
           f"matmul_{L}x100x100_gflops_per_cpu_second": rate_layer}
    if a.compare_src is not None:
        other = load_maml(a.compare_src)
        other_policy = other.GaussianMLP(policy.action_dim, tuple(args.hidden_sizes))  # its own network code
        other_phases = other.make_phases(other.make_task_env(args.env_id), other_policy,
                                         other.Args(**{f: getattr(args, f) for f in ("env_id", "meta_batch",
                                                     "trajectories_per_task", "inner_steps", "seed")}),
                                         other.Dims(post.obs.shape[-1], post.action.shape[-1], 100))
        before = timed(other_phases.outer, (theta, (), pre, post), a.reps)
        other_theta, _, other_info = other_phases.outer(theta, (), pre, post)
        moved = lambda th: ravel_pytree(th)[0] - flat
        res["compare"] = {"src": str(a.compare_src), "outer_step": before,
                          "cpu_seconds_ratio": before["cpu_seconds"] / step["cpu_seconds"],
                          "info": {k: float(v) for k, v in other_info.items()},
                          "step_relative_difference": float(jnp.linalg.norm(moved(new_theta) - moved(other_theta))
                                                            / jnp.linalg.norm(moved(other_theta)))}
        print(f"{a.compare_src}: {before['cpu_seconds']:.3f} CPU s per outer step, "
              f"{before['cpu_seconds'] / step['cpu_seconds']:.2f}x this checkout's; the steps differ by "
              f"{res['compare']['step_relative_difference']:.2g} (relative, float32)", flush=True)
    harness.save_results("maml_speed", res)
    return res


if __name__ == "__main__":
    main()
