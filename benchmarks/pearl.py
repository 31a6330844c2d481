"""Benchmark: PEARL (Rakelly, Zhou et al. 2019) on oyster's point robots, beside the oracle, a task-agnostic
policy and random actions, and the speed of a training iteration at oyster's point-robot configuration.

Each (env, seed) runs `python -m algos.pearl` as its own process, pinned to one core (`--parallel` of them at a
time). The meta-test curve (oyster's protocol: held-out goals, 2 runs each, the posterior re-inferred after every
trajectory; the LAST trajectory's return) is read from the run's metrics.jsonl, so a run stopped by
`--max-minutes` still contributes what it finished (marked partial).

Baselines, written here and scored on the same held-out goals with the env's own reward (sparse on
SparsePointRobot-v0), 20-step episodes from the env's start distribution:
    oracle          knows the goal: moves towards it at full speed (0.1 per coordinate)
    task-agnostic   one behaviour for every task: to the centre of the goal distribution (the origin; on the
                    sparse robot the top of the half circle, (0, 1), the best single point for it)
    random          uniform actions in [-0.1, 0.1]^2

Targets (issue #15): dense, the final meta-test return at least 80% of the way from the task-agnostic policy to
the oracle; sparse, at least half the oracle's and well above the task-agnostic policy.

Settings (`--setting`):
    cpu     algos/pearl.py's CPU setting (64-unit networks, RL batch 64, 500 gradient steps per iteration,
            kl_lambda 1; the rest oyster's), --iterations iterations.
    oyster  oyster's whole configuration (configs/point-robot.json, sparse-point-robot.json: 300-unit nets,
            1000 gradient steps of 16 tasks x 256): runs unchanged on a GPU (jax[cuda]); on this CPU only
            `--speed` is practical.

`--cheetah` runs cheetah-vel (HalfCheetahVelOyster-v0: oyster's targets U[0, 3], 100 train / 30 held-out
tasks; collection through gymnasium, the same jitted update) for --seeds, at --setting (oyster: its
configs/cheetah-vel.json over default.py, 300-unit nets, 2000 gradient steps of 16 tasks x 256 per iteration,
500 iterations: a GPU run, unchanged with jax[cuda]; cpu: oyster's configuration with 64-unit networks and
encoder and RL batch 64, i.e. algos/pearl.py's CPU setting with oyster's 2000 gradient steps and KL weight 0.1
put back), and draws the meta-test return
(held-out tasks, last of 3 trajectories) against env steps beside the one-seed reproduction's -37.3 at 0.78M
steps (x35f/meta_rl, ../shared/REFERENCE.md). The curve is read from the run's metrics, so a run stopped by
--max-minutes still reports what it reached (partial).

`--speed` times, in this process, one jitted training iteration (collection of 5 tasks x 400 steps + 1000
gradient steps) at oyster's point-robot configuration, CPU seconds and wall seconds (pin it: `taskset -c 0`),
and one gradient step alone, with its achieved GFLOP/s (counted from the layer sizes) against the XLA fp32
matmul rate measured here. benchmarks/pearl_oyster_speed.py runs oyster itself beside it.

Run:
    python -m benchmarks.pearl --quick                                    # 1 seed, dense, 6 iterations
    python -m benchmarks.pearl --seeds 1 2 3 --parallel 2 --max-minutes 12 --save   # dense + sparse, 3 seeds
    python -m benchmarks.pearl --speed
    python -m benchmarks.pearl --cheetah --setting oyster --iterations 500 --save           # GPU
    python -m benchmarks.pearl --cheetah --setting cpu --seeds 1 --iterations 120 --eval-interval 2 --save
    python -m benchmarks.pearl --replot                                   # redraw pearl.png from pearl.json

Writes pearl.json (pearl_partial.json while running, pearl_speed.json) and pearl.png to benchmarks/out/
(with --save: benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402

ENVS = ("PointRobot-v0", "SparsePointRobot-v0")


# ----------------------------------------------------------------------------
# Baselines on the held-out goals
# ----------------------------------------------------------------------------
def baseline_returns(env_id: str, episodes_per_task: int = 200, seed: int = 0) -> dict:
    """Mean return of the oracle, the task-agnostic policy and random actions on oyster's held-out goals."""
    import jax
    import jax.numpy as jnp

    from common.jax_envs.point_robot import PointRobot, SparsePointRobot

    env = SparsePointRobot() if env_id.startswith("Sparse") else PointRobot()
    _, test = env.task_splits(80, 20)
    goals = jnp.repeat(test.goal, episodes_per_task, axis=0)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(goals))
    centre = jnp.array([0.0, 1.0]) if env_id.startswith("Sparse") else jnp.zeros(2)

    def episode(goal, key, kind):
        task = type(test)(goal)
        k0, key = jax.random.split(key)

        def step(s, k):
            if kind == "oracle":
                a = jnp.clip(goal - s, -0.1, 0.1)
            elif kind == "agnostic":
                a = jnp.clip(centre - s, -0.1, 0.1)
            else:
                a = jax.random.uniform(k, (2,), minval=-0.1, maxval=0.1)
            s2 = env.transition(s, a, k, task)
            return s2, env.reward(s, a, s2, k, task)

        return jax.lax.scan(step, env.initial(k0, task), jax.random.split(key, env.horizon))[1].sum()

    return {kind: float(jax.jit(jax.vmap(lambda g, k, kind=kind: episode(g, k, kind)))(goals, keys).mean())
            for kind in ("oracle", "agnostic", "random")}


# ----------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------
def flags(env_id: str, a) -> list[str]:
    out = ["--env-id", env_id, "--num-iterations", str(a.iterations), "--eval-interval", str(a.eval_interval)]
    return out + (["--oyster"] if a.setting == "oyster" else [])


def run_curves(a) -> dict:
    jobs = {(env_id, s): (flags(env_id, a) + ["--seed", str(s), "--exp-name", "bench"], {"env_id": env_id, "seed": s})
            for env_id in a.envs for s in a.seeds}
    keys = {"eval_return": "eval/return", "first_trajectory_return": "eval/first_trajectory_return",
            "iteration": "iteration", "wall_seconds": "time", "seconds_per_iteration": "seconds_per_iteration"}
    save = lambda done: harness.save_results(a.name + "_partial", {"setting": a.setting,  # noqa: E731
                                                                   "runs": list(done.values())})
    return harness.run_pinned(jobs, "algos.pearl", a.parallel, a.max_minutes, keys, "pearl_bench_", save)


def per_iteration(run: dict) -> dict:
    """The run's curve at its meta-tests only (rows with an iteration and an eval return; not the summary row)."""
    keep = [i for i, (it, r) in enumerate(zip(run["iteration"], run["eval_return"], strict=True))
            if it is not None and r is not None]
    return {**run, **{k: [run[k][i] for i in keep] for k in ("steps", "iteration", "eval_return",
                                                              "first_trajectory_return", "wall_seconds",
                                                              "seconds_per_iteration")}}


def summarise(a, done: dict, baselines: dict) -> dict:
    """Per env: the mean curve over the seeds up to the last meta-test all reached, finals, targets."""
    results = {"setting": a.setting, "iterations": a.iterations, "seeds": a.seeds, "baselines": baselines,
               "runs": [{**r, "env_id": k[0]} for k, r in done.items()], "envs": {}}
    headline = []
    for env_id in a.envs:
        runs = [per_iteration(done[(env_id, s)]) for s in a.seeds if (env_id, s) in done]
        b = baselines[env_id]
        n = min((len(r["steps"]) for r in runs), default=0)
        if n == 0:
            continue
        curves = np.asarray([r["eval_return"][:n] for r in runs], float)
        first = np.asarray([r["first_trajectory_return"][:n] for r in runs], float)
        partial, finals = not all(r["finished"] for r in runs), curves[:, -1]
        if env_id.startswith("Sparse"):
            target = 0.5 * b["oracle"]
            met = bool(finals.mean() >= target and finals.mean() > b["agnostic"] + 2.0)
            rule = "at least half the oracle's and well above the task-agnostic policy (+2)"
        else:
            target = b["agnostic"] + 0.8 * (b["oracle"] - b["agnostic"])
            met = bool(finals.mean() >= target)
            rule = "at least 80% of the way from the task-agnostic policy to the oracle"
        e = results["envs"][env_id] = {
            "steps": runs[0]["steps"][:n], "iterations": runs[0]["iteration"][:n], "curves": curves.tolist(),
            "first_trajectory_curves": first.tolist(), "final_env_steps": int(runs[0]["steps"][n - 1]),
            "final_iteration": int(runs[0]["iteration"][n - 1]), "finals": finals.tolist(),
            "first_trajectory_finals": first[:, -1].tolist(), "partial": partial, **harness.final_mean_std(finals),
            "fraction_of_gap": float((finals.mean() - b["agnostic"]) / (b["oracle"] - b["agnostic"])),
            "target": target, "target_rule": rule, "target_met": met,
            "wall_seconds": [float(r["wall_seconds"][n - 1]) for r in runs],
            "seconds_per_iteration": [float(r["seconds_per_iteration"][n - 1]) for r in runs]}
        print(f"{env_id}: final {finals.mean():.2f} (seeds {np.round(finals, 2).tolist()}) at {e['final_env_steps']} "
              f"env steps, iteration {e['final_iteration']}; oracle {b['oracle']:.2f}, task-agnostic "
              f"{b['agnostic']:.2f}, random {b['random']:.2f}; target {target:.2f}: {'met' if met else 'missed'}",
              flush=True)
        headline.append({"algorithm": "PEARL", "setting": f"{env_id}, {e['final_env_steps'] // 1000}k env steps "
                                                          f"({a.setting} setting){', partial' if partial else ''}",
                         "metric": "meta-test return, last trajectory, held-out goals",
                         "ours": f"{finals.mean():.1f} (min {finals.min():.1f}, max {finals.max():.1f})",
                         "reference": f"oracle {b['oracle']:.1f}, task-agnostic {b['agnostic']:.1f}, random "
                                      f"{b['random']:.1f}",
                         "seeds": len(runs), "wall_seconds": round(float(np.mean(e["wall_seconds"])))})
    results["headline"] = headline
    harness.save_results(a.name, results)
    draw(results, a.name)
    return results


def draw(record: dict, name: str = "pearl") -> None:
    envs = list(record["envs"]) or list(record["baselines"])
    fig, axes = plt.subplots(1, len(envs), figsize=(6.5 * len(envs), 4.2), squeeze=False)
    for ax, env_id in zip(axes[0], envs, strict=True):
        b, e = record["baselines"][env_id], record["envs"].get(env_id)
        if e is not None:
            x, curves = np.asarray(e["steps"]), np.asarray(e["curves"])
            tag = " (partial)" if e["partial"] else ""
            harness.plot_curve(ax, x, curves, f"PEARL, last trajectory: {len(curves)} seeds, 1 s.e.{tag}",
                               color="C0")
            harness.plot_curve(ax, x, np.asarray(e["first_trajectory_curves"]),
                               "PEARL, first trajectory (z from the prior)", color="C1", ls=":")
            for c in curves:
                ax.plot(x, c, lw=0.5, alpha=0.35, color="C0")
        for kind, style in (("oracle", "--"), ("agnostic", "-."), ("random", ":")):
            ax.axhline(b[kind], color="k", ls=style, lw=1, label=f"{kind} {b[kind]:.1f}")
        ax.set_title(f"{env_id} ({record['setting']} setting; thin lines: each seed)")
        ax.set_xlabel("env steps")
        ax.set_ylabel("meta-test return (held-out goals)")
        ax.legend(fontsize=7)
    harness.save_figure(fig, name)


# ----------------------------------------------------------------------------
# Cheetah-vel
# ----------------------------------------------------------------------------
CHEETAH_REFERENCE = {"return": -37.3, "env_steps": 780_000, "source": "one-seed reproduction, x35f/meta_rl tfevents "
                                                                     "(automatic entropy tuning)"}


def cheetah(a) -> dict:
    env_id, name = "HalfCheetahVelOyster-v0", f"{a.name}_cheetah_vel_{a.setting}"
    extra = ["--checkpoint-interval", "100000"]  # the buffers (~100 tasks x 20k rows) only at the end
    if a.setting == "cpu":
        extra += ["--num-train-steps", "2000", "--kl-lambda", "0.1"]
    jobs = {s: (flags(env_id, a) + extra + ["--seed", str(s), "--exp-name", "bench"], {"env_id": env_id, "seed": s})
            for s in a.seeds}
    keys = {"eval_return": "eval/return", "first_trajectory_return": "eval/first_trajectory_return",
            "iteration": "iteration", "wall_seconds": "time", "seconds_per_iteration": "seconds_per_iteration"}
    record = {"env_id": env_id, "setting": a.setting, "iterations": a.iterations, "seeds": a.seeds,
              "reference": CHEETAH_REFERENCE, "runs": []}
    save = lambda done: harness.save_results(name + "_partial", {**record, "runs": list(done.values())})  # noqa: E731
    done = harness.run_pinned(jobs, "algos.pearl", a.parallel, a.max_minutes, keys, "pearl_cheetah_", save)
    record["runs"] = [per_iteration(r) for r in done.values()]
    record["headline"] = []
    for r in record["runs"]:
        if not r["eval_return"]:
            continue
        i = int(np.argmax(r["eval_return"]))
        print(f"seed {r['seed']}: last meta-test {r['eval_return'][-1]:.1f} at {r['steps'][-1]} env steps "
              f"(iteration {r['iteration'][-1]}; best {r['eval_return'][i]:.1f} at {r['steps'][i]}); reference "
              f"{CHEETAH_REFERENCE['return']} at {CHEETAH_REFERENCE['env_steps']}", flush=True)
        record["headline"].append({
            "algorithm": "PEARL", "setting": f"{env_id}, {r['steps'][-1] // 1000}k env steps ({a.setting} setting)"
                                             f"{'' if r['finished'] else ', partial'}",
            "metric": "meta-test return, last trajectory, 30 held-out velocities",
            "ours": f"{r['eval_return'][-1]:.1f}",
            "reference": f"{CHEETAH_REFERENCE['return']} at 0.78M steps (reproduction)", "seeds": 1,
            "wall_seconds": round(float(r["wall_seconds"][-1]))})
    harness.save_results(name, record)
    draw_cheetah(record, name)
    return record


def draw_cheetah(record: dict, name: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in record["runs"]:
        ax.plot(r["steps"], r["eval_return"], color="C0", label=f"PEARL seed {r['seed']}, last trajectory"
                f"{'' if r['finished'] else ' (partial)'}")
        ax.plot(r["steps"], r["first_trajectory_return"], color="C1", ls=":", label="first trajectory (prior z)")
    ref = record["reference"]
    ax.plot([ref["env_steps"]], [ref["return"]], "k*", ms=10, label=f"reproduction {ref['return']} at 0.78M")
    ax.set_title(f"{record['env_id']} ({record['setting']} setting)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("meta-test return (held-out velocities)")
    ax.legend(fontsize=7)
    harness.save_figure(fig, name)


# ----------------------------------------------------------------------------
# Speed at oyster's point-robot configuration
# ----------------------------------------------------------------------------
def speed(a) -> dict:
    """CPU and wall seconds of one jitted training iteration ([2]-[3]) at oyster's point-robot sizes, and of one
    gradient step with its GFLOP/s counted from the layer sizes (forward + backward = 3x the forward)."""
    import jax

    from algos import pearl as p

    args = p.config(p.Args(env_id="PointRobot-v0", oyster=True, num_train_steps=a.speed_train_steps or None))
    env = p.make_task_family(args.env_id)
    dims = p.dims_of(env)
    train, _ = p.task_lists(env, args)
    state = p.initial_collection(p.init_state(jax.random.PRNGKey(0), args, dims), env, train, args, dims)
    state, _ = jax.block_until_ready(p.iteration(state, env, train, args, dims))  # compile + warm up
    res = {"config": {k: getattr(args, k) for k in ("net_size", "encoder_size", "meta_batch", "batch_size",
                                                     "embedding_batch_size", "num_train_steps", "num_tasks_sample",
                                                     "num_steps_prior", "num_extra_rl_steps")},
           "threads": os.environ.get("XLA_FLAGS", ""), "affinity": sorted(os.sched_getaffinity(0))}
    reps = []
    for _ in range(a.reps):
        c0, t0 = time.process_time(), time.perf_counter()
        state, _ = jax.block_until_ready(p.iteration(state, env, train, args, dims))
        reps.append((time.process_time() - c0, time.perf_counter() - t0))
    res["iteration"] = {"cpu_seconds": float(np.mean([r[0] for r in reps])),
                        "wall_seconds": float(np.mean([r[1] for r in reps])), "reps": reps,
                        "cpu_per_wall": float(sum(r[0] for r in reps) / sum(r[1] for r in reps))}
    # one gradient step alone
    _, ctx, batch = p.sample_batches(state.rl, state.enc, jax.random.PRNGKey(1), args)
    step = jax.jit(lambda s, c, b: p.gradient_step(s, p.context_of(c, args), b, args, dims))
    sec = harness.timed_call(step, (state, ctx, batch), 20)
    o, act, L, H, He = dims.obs_dim, dims.action_dim, args.latent_size, args.net_size, args.encoder_size
    rows, crow = args.meta_batch * args.batch_size, args.meta_batch * args.embedding_batch_size
    q = harness.mlp_flops([o + act + L, H, H, H, 1])
    v = harness.mlp_flops([o + L, H, H, H, 1])
    pi = harness.mlp_flops([o + L, H, H, H, 2 * act])
    enc = harness.mlp_flops([o + act + 1, He, He, He, 2 * L])
    # Q loss: encoder fwd+bwd, 2 Q fwd+bwd, target V fwd; V loss: policy fwd, 2 Q fwd, V fwd+bwd;
    # policy loss: policy fwd+bwd, 2 Q fwd+bwd (through the action)
    flop = crow * 3 * enc + rows * (2 * 3 * q + v) + rows * (pi + 2 * q + 3 * v) + rows * (3 * pi + 2 * 3 * q)
    res["gradient_step"] = {"seconds": sec, "gflop": flop / 1e9, "gflop_per_s": flop / 1e9 / sec}
    peak = res["matmul_gflop_per_s"] = harness.matmul_rate()
    res["gradient_step"]["fraction_of_matmul"] = res["gradient_step"]["gflop_per_s"] / peak
    print(f"oyster point-robot configuration: one iteration {res['iteration']['cpu_seconds']:.1f} CPU s, "
          f"{res['iteration']['wall_seconds']:.1f} wall s; one gradient step {sec * 1000:.1f} ms, "
          f"{flop / 1e9:.2f} GFLOP, {flop / 1e9 / sec:.1f} GFLOP/s = {flop / 1e9 / sec / peak:.0%} of the XLA fp32 "
          f"matmul rate here ({peak:.1f} GFLOP/s)", flush=True)
    harness.save_results(a.name + "_speed", res)
    return res


def main(argv=None):
    p = harness.parser("pearl", __doc__, seeds=[1, 2, 3],
                       quick={"seeds": [1], "iterations": 6, "envs": ["PointRobot-v0"]})
    p.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS, help="task families to run")
    p.add_argument("--setting", choices=("cpu", "oyster"), default="cpu", help="see the docstring")
    p.add_argument("--iterations", type=int, default=40, help="meta-training iterations per run")
    p.add_argument("--eval-interval", type=int, default=1, help="meta-test every this many iterations")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, each pinned to its own core")
    p.add_argument("--max-minutes", type=float, default=None, help="stop a run after this long (keeps its curve)")
    p.add_argument("--cheetah", action="store_true", help="run cheetah-vel instead (see the docstring)")
    p.add_argument("--speed", action="store_true", help="time one training iteration instead (see the docstring)")
    p.add_argument("--reps", type=int, default=1, help="--speed: timed iterations after the warm-up one")
    p.add_argument("--speed-train-steps", type=int, default=0, help="--speed: gradient steps (0: oyster's 1000)")
    p.add_argument("--name", default="pearl", help="results name")
    p.add_argument("--replot", action="store_true", help="redraw the saved record's plot, run nothing")
    a = harness.parse(p, argv)
    if a.replot:
        return draw(harness.load_results(a.name), a.name)
    if a.cheetah:
        return cheetah(a)
    if a.speed:
        return speed(a)
    baselines = {env_id: baseline_returns(env_id) for env_id in a.envs}
    for env_id, b in baselines.items():
        print(f"{env_id} baselines on the held-out goals: " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()),
              flush=True)
    return summarise(a, run_curves(a), baselines)


if __name__ == "__main__":
    main()
