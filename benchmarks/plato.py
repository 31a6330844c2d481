"""PLATO vs DAgger vs behaviour cloning on ObstacleField-v0: crashes during training, held-out success.

Kahn, Zhang, Levine, Abbeel 2017 (arXiv 1603.00622) claim that PLATO, whose
data come from an adaptive MPC teacher (cost + lambda KL to the learner),
crashes far less often during training than DAgger (the learner acts) and
ends with a learner at least as good, and better than behaviour cloning (the
MPC acts). Here, on the 2-D obstacle corridor of common/jax_envs/obstacles.py,
each arm of algos/plato.py is run with the same settings and seeds (one
process, the seeds vmapped in one program per arm):
  - plato (lambda = 1), dagger (beta = 0), dagger with beta = 0.5 mixing, bc;
  - a lambda sweep of PLATO (lambda = 0.1, 0.3, 1, 3, 10);
and reported: crashes per training iteration and cumulative (iterations
1..K; iteration 0, where the unconstrained MPC acts, is the same for all),
the learner's success rate and cost on 50 held-out layouts after every
iteration, 95% confidence intervals over seeds (t distribution), the ratio of
PLATO's cumulative crashes to DAgger's (bootstrap CI over seeds), the
unconstrained MPC's own held-out success (the teacher's ceiling), and wall
time per arm (compilation included).

Targets (issue #16): PLATO's training crashes <= 1/3 of DAgger's at equal
iterations; PLATO's final held-out success within DAgger's seed spread or
better, and clearly better than BC's; the whole benchmark under 30 minutes.

Run:
    python -m benchmarks.plato --quick   # 2 seeds, 3 iterations, plato/dagger/bc only: 141 s (2-core CPU, load 7-10)
    python -m benchmarks.plato --save    # 5 seeds, 10 iterations, every arm and the sweep: 464 s (load 7-12)
    python -m benchmarks.plato --replot  # redraw benchmarks/plots/plato.png from the saved JSON
Writes plato.json and plato.png to benchmarks/out/ (with --save: benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from algos import plato  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import load_results, save_figure, save_results, scratch_dir  # noqa: E402

# name -> the arm's flags (plato.Args fields)
ARMS = {
    "plato": {"arm": "plato", "lam": 1.0},
    "dagger": {"arm": "dagger"},
    "dagger_beta0.5": {"arm": "dagger", "beta": 0.5},
    "bc": {"arm": "bc"},
    "plato_lam0.1": {"arm": "plato", "lam": 0.1},
    "plato_lam0.3": {"arm": "plato", "lam": 0.3},
    "plato_lam3": {"arm": "plato", "lam": 3.0},
    "plato_lam10": {"arm": "plato", "lam": 10.0},
}
CORE = ("plato", "dagger", "bc")


def ci95(x):
    """Mean and half-width of the 95% t confidence interval over axis 0 (seeds)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    half = stats.t.ppf(0.975, n - 1) * x.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(x[0])
    return x.mean(0), half


def ratio_ci(a, b, reps: int = 10_000, seed: int = 0):
    """mean(a) / mean(b) and its 95% bootstrap interval (seeds resampled independently in a and in b)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, float), np.asarray(b, float)
    ra = rng.choice(a, (reps, a.size)).mean(1)
    rb = rng.choice(b, (reps, b.size)).mean(1)
    r = ra / np.maximum(rb, 1e-9)
    return float(a.mean() / max(b.mean(), 1e-9)), [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]


def mpc_reference(args: plato.Args) -> float:
    """The unconstrained MPC's success rate on the held-out layouts (what a perfect imitator could reach)."""
    env = plato.make_task(args)
    params = plato.make_policy(args).init(jax.random.PRNGKey(0), np.zeros(env.observation_space.shape, np.float32))
    layouts = env.test_tasks(args.eval_episodes)
    keys = jax.random.split(jax.random.PRNGKey(0), args.eval_episodes)  # the starts of plato.evaluate
    ep = jax.jit(jax.vmap(lambda lay, k: plato.run_episode(params, lay, k, env, args, "mpc")))(layouts, keys)
    return float(np.asarray(ep.success).any(-1).mean())


def run_arm(name: str, base: dict, seeds: list[int]) -> dict:
    args = plato.Args(**base, **ARMS[name], seed=seeds[0], num_seeds=len(seeds), exp_name=f"bench_{name}")
    t0 = time.perf_counter()
    with scratch_dir():
        out = plato.main(args)
    wall = time.perf_counter() - t0
    m = {k: np.asarray(v).T for k, v in out["metrics"].items()}  # (seeds, K + 1)
    return {"flags": ARMS[name], "wall_seconds": round(wall, 1),
            "crashes": m["train/crashes"].tolist(), "successes": m["train/successes"].tolist(),
            "eval_success": m["eval/success"].tolist(), "eval_crash": m["eval/crash"].tolist(),
            "eval_cost": m["eval/cost"].tolist(), "action_gap": m["train/action_gap"].tolist(),
            "kl": m["train/kl"].tolist(), "label_gap": m["train/label_gap"].tolist(),
            "eval0_success": np.asarray(out["eval0"]["eval/success"]).tolist(),
            "eval0_cost": np.asarray(out["eval0"]["eval/cost"]).tolist()}


def summarise(arms: dict) -> dict:
    """Final and cumulative figures with 95% CIs, and the targets."""
    table = {}
    for name, r in arms.items():
        crashes = np.asarray(r["crashes"])[:, 1:]  # iterations 1..K
        cum, cum_ci = ci95(crashes.sum(1))
        succ, succ_ci = ci95(np.asarray(r["eval_success"])[:, -1])
        cost, cost_ci = ci95(np.asarray(r["eval_cost"])[:, -1])
        episodes = crashes.shape[1] * r["episodes_per_iteration"]
        table[name] = {"training_crashes": round(float(cum), 2), "training_crashes_ci95": round(float(cum_ci), 2),
                       "training_crash_rate": round(float(cum) / episodes, 4),
                       "final_success": round(float(succ), 3), "final_success_ci95": round(float(succ_ci), 3),
                       "final_success_per_seed": np.asarray(r["eval_success"])[:, -1].round(3).tolist(),
                       "final_cost": round(float(cost), 2), "final_cost_ci95": round(float(cost_ci), 2),
                       "wall_seconds": r["wall_seconds"]}
    targets = {}
    if "plato" in arms and "dagger" in arms:
        ratio, ci = ratio_ci(np.asarray(arms["plato"]["crashes"])[:, 1:].sum(1),
                             np.asarray(arms["dagger"]["crashes"])[:, 1:].sum(1))
        p, d = table["plato"], table["dagger"]
        targets["crash_ratio_plato_over_dagger"] = {"value": round(ratio, 3), "ci95": [round(c, 3) for c in ci],
                                                    "target": "<= 1/3", "met": ratio <= 1 / 3}
        spread = min(d["final_success_per_seed"])
        targets["plato_final_vs_dagger"] = {
            "plato": p["final_success"], "dagger": d["final_success"], "dagger_worst_seed": spread,
            "target": "PLATO's mean >= DAgger's worst seed (within its spread) or better",
            "met": p["final_success"] >= spread}
    if "plato" in arms and "bc" in arms:
        p, b = table["plato"], table["bc"]
        targets["plato_final_vs_bc"] = {
            "plato": p["final_success"], "bc": b["final_success"],
            "target": "clearly better: the 95% intervals do not overlap",
            "met": p["final_success"] - p["final_success_ci95"] > b["final_success"] + b["final_success_ci95"]}
    return {"table": table, "targets": targets}


def draw(record: dict):
    arms, K = record["arms"], record["iterations"]
    its = np.arange(K + 1)
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.9))
    colours = {"plato": "C0", "dagger": "C3", "dagger_beta0.5": "C1", "bc": "C2", "plato_lam0.1": "C9",
               "plato_lam0.3": "C8", "plato_lam3": "C5", "plato_lam10": "C4"}
    for name, r in arms.items():
        c, ls = colours.get(name), "--" if name.startswith("plato_lam") else "-"
        crashes = np.asarray(r["crashes"], float)
        crashes[:, 0] = 0  # iteration 0 (the MPC acts, the same for every arm) is left out of the counts
        for ax, y in ((axes[0], crashes), (axes[1], crashes.cumsum(1)),
                      (axes[2], np.asarray(r["eval_success"])), (axes[3], np.asarray(r["eval_cost"]))):
            mean, half = ci95(y)
            ax.plot(its, mean, ls, color=c, label=name, marker="o", ms=3)
            ax.fill_between(its, mean - half, mean + half, color=c, alpha=0.15, linewidth=0)
        # the trade-off: training crashes against the final learner's held-out success, 95% CIs both ways
        cx, hx = ci95(np.asarray(r["crashes"])[:, 1:].sum(1))
        sy, hy = ci95(np.asarray(r["eval_success"])[:, -1])
        axes[4].errorbar(cx, sy, xerr=hx, yerr=hy, fmt="o", color=c, capsize=3)
        axes[4].annotate(name.replace("plato_lam", "lambda "), (cx, sy), xytext=(4, 4), textcoords="offset points",
                         fontsize=7, color=c)
    axes[4].set(xlabel=f"training crashes per seed (iterations 1..{K})", ylabel="final held-out success")
    if record.get("mpc_success") is not None:
        axes[2].axhline(record["mpc_success"], color="k", ls=":", lw=1, label="unconstrained MPC")
    n = len(record["seeds"])
    for ax, title in zip(axes[:4], ("crashes per iteration", "cumulative training crashes", "held-out success rate",
                                "held-out cost (distance to go, m s)"), strict=True):
        ax.set(xlabel="training iteration", title=title)
    axes[0].set_ylabel(f"of {record['episodes_per_iteration']} episodes")
    axes[4].set_title("crashes vs final success (lambda sweep)")
    axes[2].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"PLATO / DAgger / BC on ObstacleField-v0: mean of {n} seeds, 95% CI bands; "
                 f"{record['eval_episodes']} held-out layouts", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = harness.parser("plato", __doc__, seeds=[1, 2, 3, 4, 5],
                       quick={"seeds": [1, 2], "iterations": 3, "arms": list(CORE)},
                       seeds_help="seeds, consecutive (vmapped in one program per arm: run i is --seed seeds[0] + i)")
    p.add_argument("--iterations", type=int, default=10, help="K, training iterations after iteration 0")
    p.add_argument("--episodes-per-iteration", type=int, default=8)
    p.add_argument("--eval-episodes", type=int, default=50, help="held-out layouts")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--replot", action="store_true", help="redraw the plot from the saved JSON")
    a = harness.parse(p, argv)
    if a.replot:
        return save_figure(draw(load_results("plato")), "plato")
    if a.seeds != list(range(a.seeds[0], a.seeds[0] + len(a.seeds))):
        p.error("--seeds must be consecutive (run i of a vmapped program is seed seeds[0] + i)")
    base = {"total_timesteps": a.iterations * a.episodes_per_iteration * 60,
            "episodes_per_iteration": a.episodes_per_iteration, "eval_episodes": a.eval_episodes}
    record = {"env_id": "ObstacleField-v0", "seeds": a.seeds, "iterations": a.iterations,
              "episodes_per_iteration": a.episodes_per_iteration, "eval_episodes": a.eval_episodes,
              "settings": {k: v for k, v in vars(plato.Args(**base)).items() if k not in ("resume",)},
              "arms": {}}
    t_all = time.perf_counter()
    record["mpc_success"] = mpc_reference(plato.Args(**base))
    print(f"unconstrained MPC on the held-out layouts: success {record['mpc_success']:.2f}", flush=True)
    for name in a.arms:  # one arm after another; the record is written after each (partial results survive)
        r = run_arm(name, base, a.seeds)
        r["episodes_per_iteration"] = a.episodes_per_iteration
        record["arms"][name] = r
        record.update(summarise(record["arms"]))
        record["wall_seconds_total"] = round(time.perf_counter() - t_all, 1)
        t = record["table"][name]
        print(f"{name}: training crashes {t['training_crashes']} +- {t['training_crashes_ci95']} per seed, "
              f"final held-out success {t['final_success']} +- {t['final_success_ci95']}, cost {t['final_cost']}, "
              f"{t['wall_seconds']} s", flush=True)
        tab = record["table"]
        record["headline"] = [{
            "algorithm": "PLATO", "setting": f"ObstacleField-v0, {a.iterations} iterations x "
                                             f"{a.episodes_per_iteration} episodes",
            "metric": "training crashes per seed / final held-out success",
            "ours": f"{tab['plato']['training_crashes']} / {tab['plato']['final_success']}",
            "reference": "DAgger " + (f"{tab['dagger']['training_crashes']} / {tab['dagger']['final_success']}"
                                      if "dagger" in tab else "-")
                         + (f", BC {tab['bc']['training_crashes']} / {tab['bc']['final_success']}"
                            if "bc" in tab else ""),
            "seeds": len(a.seeds), "wall_seconds": tab["plato"]["wall_seconds"]}] if "plato" in tab else []
        save_results("plato", record)
        fig = draw(record)
        save_figure(fig, "plato")
        plt.close(fig)
    for k, v in record.get("targets", {}).items():
        print(f"target {k}: {v}", flush=True)
    print(f"whole benchmark: {record['wall_seconds_total']:.0f} s", flush=True)
    return record


if __name__ == "__main__":
    main()
