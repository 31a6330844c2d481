"""Policy distillation on four MinAtar games: losses, compression and one multi-task student.

Teachers: one DQN per game (algos/distillation.py --phase teacher), kept in
benchmarks/teachers/<id>.msgpack so that the distillations rerun without
retraining (--train-teachers retrains them with --teacher-steps env steps).
Their greedy scores are set beside published MinAtar scores: gymnax's README
(PPO, gymnax-blines: Asterix 15, Breakout 28, Freeway 58, SpaceInvaders 131)
and Young & Tian 2019 (arXiv 1903.03176, Fig. 2: DQN after 5M frames; read off
a plot, so given as ranges and marked unverified in docs/distillation.md).

Then, per game, students distil their teacher (3 seeds vmapped in one program,
teacher acting at eps 0.05, minibatch 32, Adam 1e-3), scored greedily against
the teacher's greedy score measured the same way:
  - the losses at a 1/4-size student (8 filters, 64 units): kl (tau 0.01), nll, mse,
    and actor_mimic (tau 1, the student acting, feature regression 0.01);
  - KL students of 1x (16, 128), 1/4 (8, 64) and 1/16 (4, 32) of the teacher's parameters;
  - one multi-task student (1x trunk, a head per game) on all four games, with
    --updates per game (minibatches one game at a time).
Runs go in priority order (the targets of issue #20 first) and the record is
written after every run, so a run stopped at its time limit keeps its numbers.

Run:
    python -m benchmarks.distillation --quick        # Breakout, kl and mse, 1 seed, 500 updates: about 2 min
    python -m benchmarks.distillation --save         # the CPU setting: 3 seeds, 3000 updates per game
    python -m benchmarks.distillation --save --updates 20000 --teacher-steps 5000000 --train-teachers
                                                     # the full setting (hours on this CPU)
Writes distillation.json and distillation*.png to benchmarks/out/ (with --save:
benchmarks/results/ and benchmarks/plots/); --replot redraws a saved record.
"""

from __future__ import annotations

import dataclasses
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402

GAMES = ["Breakout-MinAtar-v0", "SpaceInvaders-MinAtar-v0", "Asterix-MinAtar-v0", "Freeway-MinAtar-v0"]
# gymnax README (0.0.9 METADATA): PPO returns of gymnax-blines' checkpoints.
GYMNAX_PPO = {"Asterix-MinAtar-v0": 15, "Breakout-MinAtar-v0": 28, "Freeway-MinAtar-v0": 58,
              "SpaceInvaders-MinAtar-v0": 131}
WIDTHS = {"1x": (16, 128), "1/4": (8, 64), "1/16": (4, 32)}
TEACHERS = harness.ROOT / "teachers"


def jobs(games, losses, widths, multi):
    """(name, game ids, Args changes) in priority order: KL at 1/4 (target 1), the other losses
    at 1/4 (target 2), the multi-task student (target 3), then the other widths."""
    out = [(f"{g}|kl|1/4", [g], {"loss": "kl"}) for g in games]
    for loss in losses:
        if loss in ("nll", "mse"):
            out += [(f"{g}|{loss}|1/4", [g], {"loss": loss}) for g in games]
    if multi and len(games) > 1:
        out.append(("multi|kl|1x", list(games), {"loss": "kl", "width": "1x"}))
    for w in widths:
        if w != "1/4":
            out += [(f"{g}|kl|{w}", [g], {"loss": "kl", "width": w}) for g in games]
    if "actor_mimic" in losses:
        out += [(f"{g}|actor_mimic|1/4", [g], {"loss": "actor_mimic", "student_acts": True, "feature_weight": 0.01,
                                               "act_epsilon": 0.1}) for g in games]
    return out


def run_job(D, ids, change, a):
    width = WIDTHS[change.pop("width", "1/4")]
    n_games = len(ids)
    args = D.Args(games=tuple(ids), num_seeds=len(a.seeds), seed=a.seeds[0], teacher_dir=str(TEACHERS),
                  student_channels=width[0], student_hidden=width[1], distill_updates=a.updates * n_games,
                  distill_eval_interval=a.eval_every * n_games, eval_episodes=a.eval_episodes, num_envs=8,
                  exp_name="bench", **change)
    with harness.scratch_dir():
        out = D.main(args)
    return {"games": ids, "args": json.loads(json.dumps(dataclasses.asdict(args))),
            "updates": (np.arange(1, out["evals"].shape[0] + 1) * a.eval_every).tolist(),
            "evals": out["evals"], "teacher_score": out["teacher_score"], "relative": out["relative"],
            "student_params": out["student_params"], "teacher_params": out["teacher_params"],
            "wall_seconds": out["wall_seconds"]}


def train_teachers(D, games, a, record):
    for g in games:
        args = D.Args(phase="teacher", env_id=g, total_timesteps=a.teacher_steps, eval_interval=a.teacher_steps // 4,
                      num_envs=32, teacher_out=str(TEACHERS), exp_name="teacher")
        with harness.scratch_dir():
            out = D.main(args)
        record["teacher_training"][g] = {"env_steps": a.teacher_steps, "wall_seconds": out["wall_seconds"],
                                         "evals": out["evals"]}


def summarise(record) -> dict:
    """The issue's targets from the runs there are."""
    runs, t = record["runs"], {}
    final = {k: np.asarray(r["relative"]).mean(0) for k, r in runs.items()}  # (G,) mean over seeds
    games = [g for g in GAMES if f"{g}|kl|1/4" in runs]
    if games:
        rel = {g: float(final[f"{g}|kl|1/4"][0]) for g in games}
        t["kl_quarter_student_relative"] = rel
        t["target_quarter_student_90pc_every_game"] = bool(all(v >= 0.9 for v in rel.values()))
    wins = {}
    for g in games:
        others = [k for k in (f"{g}|nll|1/4", f"{g}|mse|1/4") if k in runs]
        if others:
            wins[g] = bool(all(final[f"{g}|kl|1/4"][0] > final[k][0] for k in others))
    if wins:
        t["kl_beats_nll_and_mse"] = wins
        t["target_kl_best_on_3_of_4"] = sum(wins.values()) >= 3
    if "multi|kl|1x" in runs:
        rel = final["multi|kl|1x"]
        t["multi_task_relative"] = dict(zip(runs["multi|kl|1x"]["games"], rel.tolist(), strict=True))
        t["multi_task_geo_mean"] = float(np.exp(np.log(np.maximum(rel, 1e-9)).mean()))
        t["target_multi_task_90pc_geo_mean"] = t["multi_task_geo_mean"] >= 0.9
    t["distillation_wall_seconds"] = float(sum(r["wall_seconds"] for r in runs.values()))
    return t


def rescore(D, record, episodes: int):
    """Each teacher's greedy score over `episodes` episodes, and every run's final student score
    (mean over seeds) relative to it; saved into the record."""
    import jax

    tic = time.time()
    for g in record["teachers"]:
        args = D.Args(env_id=g, eval_episodes=episodes, teacher_dir=str(TEACHERS))
        spec = D.Spec((D.jax_game(g),), 0, 0, args.teacher_hidden)
        teachers = (D.load_teacher(TEACHERS, args, spec.games[0]),)
        score = np.asarray(D.teacher_scores(teachers, args, spec, jax.random.PRNGKey(2024)))[0, 0]
        record["teachers"][g][f"greedy_score_{episodes}_episodes"] = float(score)
        print(f"{g}: teacher {score:.2f} over {episodes} greedy episodes", flush=True)
    for r in record["runs"].values():
        final = np.asarray(r["evals"])[-1].mean(0)  # (G,) student score, mean over seeds
        precise = [record["teachers"][g][f"greedy_score_{episodes}_episodes"] for g in r["games"]]
        r["relative_to_rescored_teacher"] = (final / np.maximum(precise, 1e-9)).tolist()
    record["rescore"] = {"episodes": episodes, "wall_seconds": time.time() - tic}
    harness.save_results("distillation", record)


def draw(record):
    runs = record["runs"]
    games = [g for g in GAMES if any(r["games"] == [g] for r in runs.values())]
    if not games:
        return
    fig, axes = plt.subplots(2, len(games), figsize=(4 * len(games), 7), squeeze=False)
    for j, g in enumerate(games):
        for row, (what, keys) in enumerate([("loss (1/4 student)", ["kl|1/4", "nll|1/4", "mse|1/4",
                                                                      "actor_mimic|1/4"]),
                                             ("KL student size", ["kl|1x", "kl|1/4", "kl|1/16"])]):
            ax = axes[row, j]
            for k in keys:
                r = runs.get(f"{g}|{k}")
                if r is None:
                    continue
                rel = np.asarray(r["evals"])[:, :, 0] / np.maximum(np.asarray(r["teacher_score"])[None, :, 0], 1e-9)
                harness.plot_curve(ax, r["updates"], rel.T, k)
            if row == 0 and "multi|kl|1x" in runs:
                m = runs["multi|kl|1x"]
                gi = m["games"].index(g)
                rel = np.asarray(m["evals"])[:, :, gi] / np.maximum(np.asarray(m["teacher_score"])[None, :, gi], 1e-9)
                harness.plot_curve(ax, m["updates"], rel.T, "multi-task (kl, 1x)", linestyle="--")
            ax.axhline(0.9, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{g.split('-')[0]}: {what}", fontsize=9)
            ax.set_xlabel("distillation updates (per game)")
            ax.set_ylabel("student / teacher score")
            ax.legend(fontsize=7)
    fig.suptitle(f"Policy distillation on MinAtar, {len(record['seeds'])} seeds (mean ± s.e.)")
    harness.save_figure(fig, "distillation")
    plt.close(fig)


def main(argv=None):
    p = harness.parser("distillation", __doc__, seeds=[1, 2, 3],
                       quick={"seeds": [1], "updates": 500, "eval_every": 250, "games": ["Breakout-MinAtar-v0"],
                              "losses": ["kl", "mse"], "widths": ["1/4"], "eval_episodes": 8})
    p.add_argument("--games", nargs="+", default=GAMES, help="MinAtar ids (default: all four)")
    p.add_argument("--losses", nargs="+", default=["kl", "nll", "mse", "actor_mimic"], help="losses to compare")
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), help="KL student sizes: 1x 1/4 1/16")
    p.add_argument("--no-multi", action="store_true", help="skip the multi-task student")
    p.add_argument("--updates", type=int, default=3000, help="distillation updates per game (default 3000)")
    p.add_argument("--eval-every", type=int, default=1000, help="updates per game between evaluations")
    p.add_argument("--eval-episodes", type=int, default=16, help="greedy episodes per evaluation and game")
    p.add_argument("--train-teachers", action="store_true", help="retrain the teachers first (writes "
                   "benchmarks/teachers/)")
    p.add_argument("--teacher-steps", type=int, default=400_000, help="env steps per teacher with "
                   "--train-teachers (the committed teachers: 400000)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--replot", action="store_true", help="redraw the saved record, run nothing")
    p.add_argument("--rescore-teachers", type=int, default=None, metavar="EPISODES",
                   help="score the teachers of the saved record again with this many greedy episodes per game "
                        "and add each run's student score relative to that (the runs measure their teacher with "
                        "--eval-episodes episodes, the same for every seed); runs nothing else")
    a = harness.parse(p, argv)
    if a.replot:
        draw(harness.load_results("distillation"))
        return
    from algos import distillation as D

    if a.rescore_teachers:
        rescore(D, harness.load_results("distillation"), a.rescore_teachers)
        return
    record = {"seeds": a.seeds, "setting": {k: v for k, v in vars(a).items() if k not in ("out",)},
              "full_setting": "--updates 20000 --teacher-steps 5000000 --train-teachers (not run on this CPU)",
              "references": {"gymnax_ppo": GYMNAX_PPO}, "teachers": {}, "teacher_training": {}, "runs": {}}
    if a.train_teachers:
        train_teachers(D, a.games, a, record)
    for g in a.games:
        raw = D.read_checkpoint(D.teacher_file(TEACHERS, g), "teacher")
        cfg = raw["config"]
        record["teachers"][g] = {"score_at_training": json.loads(cfg["scores"]), "env_steps": int(cfg["env_steps"]),
                                 "gymnax_ppo": GYMNAX_PPO[g]}
    start = time.time()
    for name, ids, change in jobs(a.games, a.losses, a.widths, not a.no_multi):
        if a.max_minutes is not None and time.time() - start > 60 * a.max_minutes:
            print(f"stopping before {name}: --max-minutes {a.max_minutes} reached", flush=True)
            break
        print(f"=== {name}", flush=True)
        record["runs"][name] = run_job(D, ids, dict(change), a)
        if name.endswith("|kl|1/4") or name.startswith("multi"):
            for g, ts in zip(ids, np.asarray(record["runs"][name]["teacher_score"]).mean(0), strict=True):
                record["teachers"][g]["greedy_score"] = float(ts)
        record["summary"] = summarise(record)
        record["total_wall_seconds"] = time.time() - start
        harness.save_results("distillation", record)  # after every run: a stopped benchmark keeps its numbers
        draw(record)
    print(json.dumps(record.get("summary", {}), indent=1), flush=True)


if __name__ == "__main__":
    main()
