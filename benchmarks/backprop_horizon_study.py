"""The horizon study: exploding / vanishing policy gradients through a model.

For horizons H in {5, 10, 20, 50, 100, 200}, on Pendulum-v1, learned model vs
the true differentiable simulator (gymnasium's JAX pendulum):
  (a) the norm of the per-start-state policy gradient ||dJ_H(s_0)/dtheta||,
      median and 10-90 % spread over start states (from D) and seeds, at two
      fixed policies per seed: a freshly initialised one and the one trained by
      part (b)'s run with the default H = 50 through the learned model, with
      that run's learned model; with the training discount 0.99 and with none
      (gamma = 1: the bare product of Jacobians);
  (b) the evaluation return reached when training with horizon H
      (`--total-timesteps` real steps, each seed);
  (c) the median (over policy steps) norm of the batch gradient met in that
      training, and how often it exceeded 10x its run's median (spikes).

Run:
    python -m benchmarks.backprop_horizon_study --quick   # 1 seed, H in {5, 50}, 1000 steps
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.backprop_horizon_study --save   # 36 runs, ~35 min

Writes backprop_horizon_study.json and .png to benchmarks/out/ (with --save:
benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import os
from functools import partial

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from algos import backprop_through_model as btm  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import mean_and_stderr, save_figure, save_results, scratch_dir, timer  # noqa: E402
from common.envs.model_fns import pendulum_reward  # noqa: E402

HORIZONS = [5, 10, 20, 50, 100, 200]
DYNAMICS = ["learned", "true"]
GAMMAS = [btm.Args.gamma, 1.0]  # the training objective's discount, and none (the bare chain)


def train(seed: int, **kwargs) -> dict:
    with scratch_dir():
        return btm.main(btm.Args(env_id="Pendulum-v1", seed=seed, **kwargs))


@partial(jax.jit, static_argnames=("model", "policy", "horizon", "dynamics", "gamma"))
def grad_norms(model, policy, horizon, dynamics, gamma, policy_params, model_params, norm, start_obs):
    """(B,) per-start-state gradient norms of the H-step imagined return."""
    policy_fn = partial(btm.policy_action, policy, action_scale=2.0)
    if dynamics == "learned":
        step_fn = partial(btm.learned_step, model, (model_params, norm))
    else:
        step_fn = partial(btm.pendulum_true_step, ())
    cfg = btm.Args(horizon=horizon, gamma=gamma, num_start_states=start_obs.shape[0], policy_steps=1)
    return btm.per_start_grad_norms(policy_fn, step_fn, pendulum_reward, cfg, policy_params, start_obs)


def main(argv=None):
    p = harness.parser("backprop_horizon_study", __doc__, seeds=[1, 2, 3],
                       quick={"seeds": [1], "horizons": [5, btm.Args.horizon], "total_timesteps": 1000,
                              "start_states": 64})
    p.add_argument("--total-timesteps", type=int, default=3000,
                   help="real env steps of each training run of part (b)")
    p.add_argument("--start-states", type=int, default=256, help="start states for part (a)")
    p.add_argument("--horizons", nargs="+", type=int, default=HORIZONS,
                   help=f"horizons H to study; must include the default H = {btm.Args.horizon}, whose trained "
                        "policy and model part (a) uses")
    a = harness.parse(p, argv)
    if btm.Args.horizon not in a.horizons:
        p.error(f"--horizons must include {btm.Args.horizon} (part (a) uses that run's policy and model)")
    horizons = sorted(a.horizons)
    args0 = btm.Args()
    model, policy = btm.MLP(args0.model_hidden, 3), btm.make_policy(1, args0.policy_hidden)

    # (b), (c) training with horizon H
    runs = {d: {H: [] for H in horizons} for d in DYNAMICS}
    references = {}  # seed -> the (learned, H = 50) run, whose policy and model part (a) uses
    for d in DYNAMICS:
        for H in horizons:
            for seed in a.seeds:
                out = {}
                with timer(out):
                    res = train(seed, horizon=H, dynamics=d, total_timesteps=a.total_timesteps)
                hist = res["history"]
                if d == "learned" and H == btm.Args.horizon:
                    references[seed] = res
                gn = np.array([h["policy/grad_norm"] for h in hist])
                gmax = np.array([h["policy/grad_norm_max"] for h in hist])
                runs[d][H].append({
                    "seed": seed, "final_eval_return": hist[-1]["eval/return"],
                    "best_eval_return": max(h["eval/return"] for h in hist),
                    "eval_return": [h["eval/return"] for h in hist],
                    "median_grad_norm": float(np.median(gn)), "max_grad_norm": float(gmax.max()),
                    "spike_fraction": float(np.mean(gmax > 10 * np.median(gn))),
                    "wall_seconds": out["wall_seconds"]})
                print(f"train {d:7s} H={H:3d} seed {seed}: final {hist[-1]['eval/return']:.1f}, "
                      f"median grad norm {np.median(gn):.3g}, {out['wall_seconds']:.0f} s", flush=True)

    # (a) gradient norms vs H at fixed policies
    norms = {(d, w, g): {H: [] for H in horizons}
             for d in DYNAMICS for w in ("initial", "trained") for g in GAMMAS}
    for seed in a.seeds:
        ref = references[seed]  # trained with the default H = 50 through the learned model
        data = ref["data"]["obs"]
        idx = np.random.default_rng(seed).integers(0, len(data), a.start_states)
        start_obs = jnp.asarray(data[idx])
        policies = {"initial": policy.init(jax.random.PRNGKey(seed), jnp.zeros(3)),
                    "trained": ref["policy_params"]}
        for (d, w, gamma), table in norms.items():
            for H in horizons:
                g = grad_norms(model, policy, H, d, gamma, policies[w], ref["model_params"], ref["normalizer"],
                               start_obs)
                table[H].append(np.asarray(g))
                print(f"seed {seed} {d:7s} {w:7s} gamma {gamma} H={H:3d}: median grad norm {np.median(g):.3g}",
                      flush=True)

    # Summaries and the figure
    summary_a = {f"{d}/{w}/gamma={g}": {H: {"median": float(np.median(np.concatenate(v))),
                                  "p10": float(np.percentile(np.concatenate(v), 10)),
                                  "p90": float(np.percentile(np.concatenate(v), 90)),
                                  "max": float(np.max(np.concatenate(v)))} for H, v in t.items()}
                 for (d, w, g), t in norms.items()}
    summary_b = {d: {H: {"final_mean": float(np.mean([r["final_eval_return"] for r in rs])),
                         "final_stderr": float(mean_and_stderr([r["final_eval_return"] for r in rs])[1]),
                         "median_grad_norm": float(np.median([r["median_grad_norm"] for r in rs])),
                         "max_grad_norm": float(np.max([r["max_grad_norm"] for r in rs]))}
                     for H, rs in t.items()} for d, t in runs.items()}

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = [axes[0, 0], axes[1, 0], axes[1, 1], axes[0, 1]]  # (a) gamma 0.99, (b), (c), (a') gamma 1
    colors = {"learned": "tab:blue", "true": "tab:orange"}
    for panel, gamma in ((0, GAMMAS[0]), (3, GAMMAS[1])):
        for d in DYNAMICS:
            for w in ("initial", "trained"):
                s = summary_a[f"{d}/{w}/gamma={gamma}"]
                ls = "-" if w == "trained" else "--"
                ax[panel].plot(horizons, [s[H]["median"] for H in horizons], ls, marker="o", color=colors[d],
                               label=f"{d} dynamics, {w} policy")
                ax[panel].fill_between(horizons, [s[H]["p10"] for H in horizons],
                                       [s[H]["p90"] for H in horizons], color=colors[d],
                                       alpha=0.15 if w == "trained" else 0.07, linewidth=0)
        base = summary_a[f"true/trained/gamma={gamma}"][horizons[0]]["median"] / horizons[0]
        ax[panel].plot(horizons, [base * H for H in horizons], ":", color="gray",
                       label="linear in H (no explosion)")
        ax[panel].set(xscale="log", yscale="log", xlabel="horizon H",
                      ylabel="||dJ(s0)/dtheta|| per start state",
                      title=f"({'a' if panel == 0 else 'd'}) gradient norm, gamma = {gamma}: "
                            "median, 10-90% band")
        ax[panel].legend(fontsize=7)
    for d in DYNAMICS:
        mean = [summary_b[d][H]["final_mean"] for H in horizons]
        se = [summary_b[d][H]["final_stderr"] for H in horizons]
        ax[1].errorbar(horizons, mean, yerr=se, marker="o", capsize=3, color=colors[d], label=f"{d} dynamics")
        ax[2].plot(horizons, [summary_b[d][H]["median_grad_norm"] for H in horizons], "-o", color=colors[d],
                   label=f"{d}: median")
        ax[2].plot(horizons, [summary_b[d][H]["max_grad_norm"] for H in horizons], "--x", color=colors[d],
                   label=f"{d}: max")
    ax[1].axhline(-200, color="k", ls="--", lw=1)
    ax[1].set(xscale="log", xlabel="horizon H", ylabel="final eval return (10 episodes)",
              title=f"(b) return after {a.total_timesteps} steps, trained with H")
    ax[1].legend(fontsize=8)
    ax[2].set(xscale="log", yscale="log", xlabel="horizon H", ylabel="batch gradient norm during training",
              title="(c) gradient norms met in training")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, "backprop_horizon_study")
    save_results("backprop_horizon_study", {
        "horizons": horizons, "seeds": a.seeds, "total_timesteps": a.total_timesteps,
        "grad_norms_fixed_policy": summary_a, "training": summary_b,
        "runs": {d: {str(H): rs for H, rs in t.items()} for d, t in runs.items()}})


if __name__ == "__main__":
    main()
