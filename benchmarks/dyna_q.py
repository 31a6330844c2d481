"""Reproduce Sutton & Barto's Dyna-Q figures and time the whole experiment.

- Fig. 8.2 (Dyna Maze): mean steps per episode over 30 runs for n = 0, 5, 50
  planning steps, 50 episodes each; alpha 0.1, epsilon 0.1, gamma 0.95. The
  wall time of the three 30-run experiments is measured from a cold start
  (compilation included; no persistent compilation cache).
  The same is also run with 300 runs, to show the precise curve.
- Fig. 8.4 (Blocking Maze) and Fig. 8.5 (Shortcut Maze): cumulative reward of
  Dyna-Q and Dyna-Q+, with the settings of the book's companion code
  (ShangtongZhang/reinforcement-learning-an-introduction, chapter08/maze.py):
  blocking: n = 10, alpha 1.0, kappa 1e-4, 3000 steps, change at 1000;
  shortcut: n = 50, alpha 1.0, kappa 1e-3, 6000 steps, change at 3000.

Run:
    python -m benchmarks.dyna_q --quick   # 30 runs, no 300-run curve: 27 s on a 2-core CPU
    python -m benchmarks.dyna_q --save    # the committed figures: about a minute on a 2-core CPU
Writes dyna_q.json and dyna_q_*.png to benchmarks/out/ (with --save: benchmarks/results/
and benchmarks/plots/).
"""

from __future__ import annotations

import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from algos import dyna_q as dq  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import mean_and_stderr, plot_curve, save_figure, save_results  # noqa: E402
from common.jax_envs.mazes import (  # noqa: E402
    BLOCKING_MAZE,
    BLOCKING_MAZE_AFTER,
    DYNA_MAZE,
    SHORTCUT_MAZE,
    SHORTCUT_MAZE_AFTER,
    ChangingMaze,
    Maze,
)

# Fig. 8.2 reference points read from the book's plot (docs/dyna_q.md), mean steps per episode.
BOOK_FIG_8_2 = {0: {2: 1100, 5: 280, 25: "17-25"}, 5: {2: 140, 5: 24, 25: "17-25"},
                50: {2: 40, 5: 18, 25: "17-25"}}
# Independent check of n = 0, episode 2: the book's companion code run here.
COMPANION_N0 = {2: 703, 5: 254, 25: 26.3}


def figure_8_2(num_runs: int, seeds: list[int]):
    """Steps per episode {n: (runs x len(seeds), 50)}: one vmapped batch of num_runs per seed, pooled."""
    env = Maze(DYNA_MAZE)
    args = dq.Args(num_seeds=num_runs, total_timesteps=30_000, eval_interval=500, eval_episodes=1,
                   num_episodes=50)
    dims, schedule = dq.Dims(env.num_states, env.num_actions), dq.schedule_of(env)
    curves, start = {}, time.perf_counter()
    for n in (0, 5, 50):  # n is traced: the three settings share one compiled program
        batches = []
        for seed in seeds:
            _, _, terminals, _, _, steps = jax.block_until_ready(
                dq.experiment(jax.random.PRNGKey(seed), n, schedule, env, args, dims))
            terminals = np.asarray(terminals)[:, : int(steps)]
            lengths = [dq.episode_lengths(t) for t in terminals]
            if min(map(len, lengths)) < 50:
                raise RuntimeError(f"n={n}: a run did not finish 50 episodes in 30,000 steps")
            batches.append(np.array([x[:50] for x in lengths], dtype=float))  # (runs, 50)
        curves[n] = np.concatenate(batches)
    return curves, time.perf_counter() - start


def changing_maze(name: str, layout, layout_after, change_step, total, n, kappa, runs: int, seeds: list[int]):
    env = ChangingMaze(layout, layout_after, change_step)
    out = {}
    for plus in (False, True):
        args = dq.Args(num_seeds=runs, total_timesteps=total, eval_interval=total // 6, eval_episodes=5,
                       alpha=1.0, plus=plus, kappa=kappa)
        rewards, lengths = [], []
        for seed in seeds:
            _, r, _, _, eval_len, _ = jax.block_until_ready(dq.experiment(
                jax.random.PRNGKey(seed), n, dq.schedule_of(env), env, args, dq.Dims(env.num_states, env.num_actions)))
            rewards.append(np.asarray(r))
            lengths.append(np.asarray(eval_len)[-1])
        out["Dyna-Q+" if plus else "Dyna-Q"] = {
            "cumulative_reward": np.cumsum(np.concatenate(rewards), axis=1),  # (runs, total)
            "final_greedy_length": np.concatenate(lengths),  # (runs,)
        }
    return out


def main(argv=None):
    p = harness.parser("dyna_q", __doc__, seeds=[0], quick={"precise_runs": 0},
                       seeds_help="PRNG seeds; each seed is one vmapped batch of --runs runs, pooled")
    p.add_argument("--runs", type=int, default=30, help="runs per seed (the book averages 30)")
    p.add_argument("--precise-runs", type=int, default=300,
                   help="runs of the second, precise Fig. 8.2 curve (seed = first seed + 1); 0 skips it")
    a = harness.parse(p, argv)
    runs = a.runs * len(a.seeds)
    # ---------------------------------------------------------------- Fig. 8.2
    curves, wall = figure_8_2(a.runs, a.seeds)
    if a.precise_runs:
        precise, wall_300 = figure_8_2(a.precise_runs, [a.seeds[0] + 1])
    else:
        precise, wall_300 = None, None
    print(f"Fig. 8.2, {runs} runs x (n = 0, 5, 50), cold start incl. compilation: {wall:.2f} s")
    table = []
    for n in (0, 5, 50):
        for ep in (2, 5, 25):
            m, se = mean_and_stderr(curves[n][:, ep - 1])
            m300, se300 = mean_and_stderr(precise[n][:, ep - 1]) if precise else (np.nan, np.nan)
            table.append({"n": n, "episode": ep, "ours_30": round(m, 1), "se_30": round(se, 1),
                          "ours_300": round(float(m300), 1), "se_300": round(float(se300), 1),
                          "book": BOOK_FIG_8_2[n][ep]})
            more = f"  {m300:7.1f} +- {se300:5.1f} ({a.precise_runs} runs)" if precise else ""
            print(f"  n={n:2d} episode {ep:2d}: {m:7.1f} +- {se:5.1f} ({runs} runs){more}  book {BOOK_FIG_8_2[n][ep]}")

    fig, ax = plt.subplots(figsize=(6, 4))
    episodes = np.arange(2, 51)
    for n in (0, 5, 50):
        plot_curve(ax, episodes, curves[n][:, 1:], f"n = {n}: mean of {runs} runs, band 1 s.e.")
    for n, marker in ((0, "o"), (5, "s"), (50, "^")):
        pts = [(ep, v) for ep, v in BOOK_FIG_8_2[n].items() if not isinstance(v, str)]
        ax.scatter(*zip(*pts, strict=False), marker=marker, color="k", zorder=5, s=18,
                   label="book's Fig. 8.2, read off the plot" if n == 0 else None)
    ax.scatter([2], [COMPANION_N0[2]], marker="x", color="r", zorder=6, label="companion code, n = 0 (250 runs)")
    ax.set(xlabel="episode", ylabel="steps per episode", ylim=(14, 1150), xlim=(1, 50),
           title="Dyna Maze (S&B Fig. 8.2)")
    ax.axhline(14, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    save_figure(fig, "dyna_q_fig8_2")

    # ------------------------------------------------------- Figs. 8.4 and 8.5
    blocking = changing_maze("blocking", BLOCKING_MAZE, BLOCKING_MAZE_AFTER, 1000, 3000, n=10, kappa=1e-4,
                             runs=a.runs, seeds=a.seeds)
    shortcut = changing_maze("shortcut", SHORTCUT_MAZE, SHORTCUT_MAZE_AFTER, 3000, 6000, n=50, kappa=1e-3,
                             runs=a.runs, seeds=a.seeds)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    changing = {}
    for ax, (title, res, change) in zip(axes, (("Blocking Maze (Fig. 8.4)", blocking, 1000),
                                               ("Shortcut Maze (Fig. 8.5)", shortcut, 3000)), strict=False):
        for label, r in res.items():
            steps = np.arange(1, r["cumulative_reward"].shape[1] + 1)
            plot_curve(ax, steps, r["cumulative_reward"], f"{label} (mean, band 1 s.e.)")
            final, se = mean_and_stderr(r["cumulative_reward"][:, -1])
            at_change, _ = mean_and_stderr(r["cumulative_reward"][:, change - 1])
            shortest = float(np.mean(r["final_greedy_length"] <= (10.5 if "Shortcut" in title else 16.5)))
            changing[f"{title.split(' (')[0]} / {label}"] = {
                "cumulative_reward_at_change": round(at_change, 1),
                "cumulative_reward_final": round(final, 1), "se_final": round(se, 1),
                "fraction_of_runs_on_shortest_path_at_end": shortest,
            }
            print(f"  {title} {label}: cumulative reward {at_change:.1f} at the change, {final:.1f} +- {se:.1f}"
                  f" at the end; runs on the new shortest path at the end: {shortest:.0%}")
        ax.axvline(change, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="time steps", ylabel="cumulative reward", title=f"{title}, {runs} runs")
        ax.legend()
    save_figure(fig, "dyna_q_fig8_4_8_5")

    n0_ep2 = next(r for r in table if r["n"] == 0 and r["episode"] == 2)
    found = {k: v["fraction_of_runs_on_shortest_path_at_end"] for k, v in changing.items()}
    save_results("dyna_q", {
        "figure_8_2": {"runs": runs, "wall_seconds_cold": round(wall, 2), "table": table,
                       "mean_steps_per_episode_30_runs": {n: curves[n].mean(0) for n in curves},
                       "wall_seconds_300_runs_warm": None if wall_300 is None else round(wall_300, 2)},
        "changing_mazes": changing,
        "headline": [
            {"algorithm": "Dyna-Q", "setting": "Dyna Maze, n = 50, episode 2 (S&B Fig. 8.2)",
             "metric": f"mean steps per episode, {runs} runs",
             "ours": next(r["ours_30"] for r in table if r["n"] == 50 and r["episode"] == 2),
             "reference": 40, "seeds": runs, "wall_seconds": round(wall, 2)},
            {"algorithm": "Dyna-Q", "setting": "Dyna Maze, n = 0, episode 2 (S&B Fig. 8.2)",
             "metric": f"mean steps per episode, {runs} runs", "ours": n0_ep2["ours_30"],
             "reference": "1100 (book's plot); 703 companion code", "seeds": runs},
            {"algorithm": "Dyna-Q+", "setting": "Shortcut Maze, 6000 steps (S&B Fig. 8.5)",
             "metric": "runs that found the shortcut",
             "ours": found["Shortcut Maze / Dyna-Q+"],
             "reference": f"Dyna-Q+ finds it, Dyna-Q does not (ours: {found['Shortcut Maze / Dyna-Q']:.0%})",
             "seeds": runs},
        ],
    })


if __name__ == "__main__":
    main()
