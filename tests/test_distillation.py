"""Policy distillation (algos/distillation.py): the losses against direct
computations, the multi-task heads and action sets, teacher files, the MinAtar
envs, an it-learns distillation from a committed teacher, CLI smoke, resume and
bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import ROOT, cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo

from algos import distillation as D
from common.envs import make_env
from common.envs.minatar import MINATAR, jax_game
from common.experiment import read_metrics

Q_T = np.array([1.0, 1.3, 0.7, 1.29, -4.0], np.float32)  # a teacher's Q-values, 5 actions
Q_S = np.array([0.2, -0.5, 1.1, 0.0, 3.0], np.float32)  # a student's logits


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def small_spec(ids=("Breakout-MinAtar-v0",)):
    games = tuple(jax_game(i) for i in ids)
    return D.Spec(games, max(g.obs_shape[-1] for g in games), max(g.num_actions for g in games), 16)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("n_valid", [5, 3])
def test_each_loss_against_a_direct_computation(n_valid):
    valid = np.arange(5) < n_valid
    qt, qs = Q_T[:n_valid].astype(np.float64), Q_S[:n_valid].astype(np.float64)
    log_ps = np.log(softmax(qs))
    for tau in (0.01, 0.1, 1.0):
        p = softmax(qt / tau)
        kl = np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - log_ps), 0.0))
        assert float(D.kl_loss(Q_T, Q_S, valid, tau)) == pytest.approx(kl, rel=1e-4, abs=1e-5)
        assert float(D.actor_mimic_loss(Q_T, Q_S, valid, tau)) == pytest.approx(-np.sum(p * log_ps), rel=1e-4)
    assert float(D.nll_loss(Q_T, Q_S, valid)) == pytest.approx(-log_ps[np.argmax(qt)], rel=1e-5)
    assert float(D.mse_loss(Q_T, Q_S, valid)) == pytest.approx(np.sum((qt - qs) ** 2), rel=1e-5)
    # through distill_loss, the --loss names pick the same functions
    args = D.Args(tau=0.01)
    for name, want in [("kl", D.kl_loss(Q_T, Q_S, valid, 0.01)), ("nll", D.nll_loss(Q_T, Q_S, valid)),
                       ("mse", D.mse_loss(Q_T, Q_S, valid)), ("actor_mimic", D.actor_mimic_loss(Q_T, Q_S, valid, 1.0))]:
        got = D.distill_loss(dataclasses.replace(args, loss=name), Q_T, Q_S, valid)
        assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_kl_and_actor_mimic_differ_by_the_teacher_entropy_with_the_same_gradient():
    valid = np.ones(5, bool)
    p = softmax(Q_T.astype(np.float64))
    diff = float(D.actor_mimic_loss(Q_T, Q_S, valid, 1.0) - D.kl_loss(Q_T, Q_S, valid, 1.0))
    assert diff == pytest.approx(-np.sum(p * np.log(p)), rel=1e-4)
    g_kl = jax.grad(lambda s: D.kl_loss(Q_T, s, valid, 1.0))(jnp.asarray(Q_S))
    g_am = jax.grad(lambda s: D.actor_mimic_loss(Q_T, s, valid, 1.0))(jnp.asarray(Q_S))
    np.testing.assert_allclose(g_kl, g_am, atol=1e-6)
    np.testing.assert_allclose(g_kl, softmax(Q_S.astype(np.float64)) - p, atol=1e-5)  # d KL / d logits


def test_low_temperature_makes_the_kl_target_one_hot_on_the_argmax():
    valid = np.ones(5, bool)
    # actions 1 and 3 differ by 0.01 in Q: at tau = 1 the target is nearly flat between them
    assert float(D.soft_targets(Q_T, valid, 1.0)[1]) < 0.35
    for tau in (1e-3, 1e-4):
        target = np.asarray(D.soft_targets(Q_T, valid, tau))
        np.testing.assert_allclose(target, np.eye(5)[1], atol=1e-4)
    # so KL at tau -> 0 is the NLL of the teacher's greedy action
    assert float(D.kl_loss(Q_T, Q_S, valid, 1e-4)) == pytest.approx(float(D.nll_loss(Q_T, Q_S, valid)), rel=1e-3)
    assert np.isfinite(float(D.kl_loss(Q_T, Q_S, valid, 1e-6)))


def test_invalid_actions_get_no_target_no_gradient_and_are_never_chosen():
    valid = np.arange(5) < 3
    q_t = Q_T.copy()
    q_t[3:] = 100.0  # huge teacher values beyond the game's actions must not matter
    for name in ("kl", "nll", "mse", "actor_mimic"):
        args = D.Args(loss=name)
        g = jax.grad(lambda s, args=args: D.distill_loss(args, jnp.asarray(q_t), s, valid))(jnp.asarray(Q_S))
        assert np.all(np.asarray(g)[3:] == 0.0), name
        same = D.distill_loss(args, jnp.asarray(Q_T), jnp.asarray(Q_S), valid)
        assert float(D.distill_loss(args, jnp.asarray(q_t), jnp.asarray(Q_S), valid)) == pytest.approx(float(same))
    q = jnp.tile(jnp.asarray([0.0, 0.1, 0.2, 5.0, 9.0]), (2000, 1))
    for eps in (0.0, 0.5, 1.0):
        a = np.asarray(D.eps_greedy(jax.random.PRNGKey(0), q, eps, 3))
        assert a.max() <= 2 and (eps < 1 or len(np.unique(a)) == 3)
        assert eps > 0 or np.all(a == 2)


# ----------------------------------------------------------------------------- multi-task
def test_multi_task_student_routes_each_game_to_its_own_head_and_action_set():
    spec = small_spec(("Breakout-MinAtar-v0", "Asterix-MinAtar-v0", "Freeway-MinAtar-v0"))
    assert spec.channels == 7 and spec.num_actions == 5  # Freeway's 7 channels, Asterix's 5 actions
    args = D.Args(student_channels=4, student_hidden=8)
    net = D.student_net(args, spec)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((10, 10, 7)))
    assert params["params"]["head_w"].shape == (3, 8, 5)
    x = jax.random.bernoulli(jax.random.PRNGKey(1), 0.3, (4, 10, 10, 4)).astype(jnp.float32)
    xp = D.pad_channels(x, 7)
    assert xp.shape == (4, 10, 10, 7) and float(jnp.abs(xp[..., 4:]).sum()) == 0.0
    outs = [net.apply(params, xp, g)[0] for g in range(3)]
    # changing head 1 changes game 1's outputs only; the trunk's features are shared
    p2 = jax.tree.map(lambda a: a, params)
    p2["params"]["head_w"] = params["params"]["head_w"].at[1].add(1.0)
    for g in range(3):
        changed = not np.allclose(net.apply(p2, xp, g)[0], outs[g])
        assert changed == (g == 1), g
    np.testing.assert_allclose(net.apply(params, xp, 0)[1], net.apply(params, xp, 2)[1])
    # the loss of game 0 (Breakout, 3 actions) trains the trunk and head 0 only, never outputs 3-4
    q_t = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    f_t = jnp.zeros((4, 16))
    full = {"net": params, "regress": jnp.zeros((3, 8, 16))}
    for loss in ("kl", "mse"):
        a = dataclasses.replace(args, loss=loss)
        grads = jax.grad(D.student_loss)(full, x, q_t, f_t, a, spec, 0)["net"]["params"]
        gw = np.asarray(grads["head_w"])
        assert np.abs(gw[0, :, :3]).sum() > 0 and np.all(gw[0, :, 3:] == 0) and np.all(gw[1:] == 0), loss
        assert np.abs(np.asarray(grads["Dense_0"]["kernel"])).sum() > 0


def test_actor_mimic_feature_regression_term():
    spec = small_spec()
    args = D.Args(loss="actor_mimic", feature_weight=0.5, student_channels=2, student_hidden=4)
    net = D.student_net(args, spec)
    params = {"net": net.init(jax.random.PRNGKey(0), jnp.zeros((10, 10, 4))),
              "regress": jax.random.normal(jax.random.PRNGKey(1), (1, 4, 16))}
    x = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (6, 10, 10, 4)).astype(jnp.float32)
    q_t, f_t = jax.random.normal(jax.random.PRNGKey(3), (6, 3)), jax.random.normal(jax.random.PRNGKey(4), (6, 16))
    q_s, f_s = net.apply(params["net"], x, 0)
    ce = np.mean([float(D.actor_mimic_loss(q_t[i], q_s[i, :3], np.ones(3, bool), 1.0)) for i in range(6)])
    reg = np.mean(np.sum((np.asarray(f_s @ params["regress"][0]) - np.asarray(f_t)) ** 2, -1))
    got = float(D.student_loss(params, x, q_t, f_t, args, spec, 0))
    assert got == pytest.approx(ce + 0.5 * reg, rel=1e-4)
    off = float(D.student_loss(params, x, q_t, f_t, dataclasses.replace(args, feature_weight=0.0), spec, 0))
    assert off == pytest.approx(ce, rel=1e-4)


# ----------------------------------------------------------------------------- envs
def test_minatar_envs_through_make_env_and_the_jax_path_agree_on_sizes():
    from gymnasium.utils.env_checker import check_env

    sizes = {"Breakout-MinAtar-v0": (4, 3), "SpaceInvaders-MinAtar-v0": (6, 4), "Asterix-MinAtar-v0": (4, 5),
             "Freeway-MinAtar-v0": (7, 3)}
    assert set(sizes) == set(MINATAR)
    for env_id, (c, a) in sizes.items():
        env = make_env(env_id)
        check_env(env.unwrapped, skip_render_check=True)
        obs, _ = env.reset(seed=3)
        assert obs.shape == (10, 10, c) and env.action_space.n == a and set(np.unique(obs)) <= {0.0, 1.0}
        g = jax_game(env_id)
        assert g.obs_shape == (10, 10, c) and g.num_actions == a


def test_jax_game_resets_itself_and_separates_termination_from_truncation():
    g = jax_game("Breakout-MinAtar-v0")
    obs, state = g.reset(jax.random.PRNGKey(0))

    def body(c, k):
        s = c
        o, s, r, te, tr = g.step(k, s, jnp.int32(0))  # never move: the ball is lost quickly
        return s, (r, te, tr, s.time)

    _, (r, te, tr, t) = jax.lax.scan(body, state, jax.random.split(jax.random.PRNGKey(1), 300))
    te, t = np.asarray(te), np.asarray(t)
    assert te.sum() >= 2 and not np.asarray(tr).any()
    ends = np.flatnonzero(te)
    assert np.all(t[ends] == 0)  # the state after an ending is a new episode's first
    assert np.all(np.diff(t)[~te[1:]] == 1)


# ----------------------------------------------------------------------------- teacher files
def test_teacher_round_trip_and_a_wrong_shape_teacher_is_a_one_line_error(tmp_path):
    g = jax_game("Asterix-MinAtar-v0")
    args = D.Args(env_id=g.env_id, teacher_channels=3, teacher_hidden=8)
    params = jax.vmap(lambda k: D.teacher_net(args, g).init(k, jnp.zeros(g.obs_shape)))(
        jax.random.split(jax.random.PRNGKey(0), 2))
    D.save_teacher(D.teacher_file(tmp_path, g.env_id), params, args, g, np.array([1.5, 2.5]))
    back = D.load_teacher(tmp_path, args, g)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit) as e:
        D.load_teacher(tmp_path, dataclasses.replace(args, teacher_hidden=16), g)
    msg = str(e.value.code)
    assert msg.startswith("error: teacher") and "shape" in msg and "\n" not in msg
    with pytest.raises(SystemExit) as e:
        D.load_teacher(tmp_path, args, jax_game("Breakout-MinAtar-v0"))  # no file for this game
    assert "no teacher for Breakout-MinAtar-v0" in str(e.value.code)


def committed_teacher_args(**kw):
    raw = json.loads(json.dumps(D.read_checkpoint(D.teacher_file(ROOT / "benchmarks" / "teachers",
                                                                  "Breakout-MinAtar-v0"))["config"]))
    return D.Args(teacher_dir=str(ROOT / "benchmarks" / "teachers"), teacher_channels=int(raw["channels"]),
                  teacher_hidden=int(raw["hidden"]), **kw)


# ----------------------------------------------------------------------------- it learns
@pytest.mark.slow
def test_a_quarter_size_student_learns_the_breakout_teacher(tmp_path, monkeypatch):
    """KL at tau 0.01, 1000 updates of a ~1/4-size student from the committed Breakout teacher:
    the student reaches 80% of the teacher's greedy score (and started far below it)."""
    monkeypatch.chdir(tmp_path)
    args = committed_teacher_args(distill_updates=1000, distill_eval_interval=1000, eval_episodes=16,
                                  num_envs=8, prefill=1000, replay_size=5000)
    out = D.main(args)
    assert 0.2 < out["student_params"] / out["teacher_params"][0] < 0.3
    teacher = float(out["teacher_score"].mean())
    assert teacher > 3.0
    assert float(out["evals"][-1].mean()) >= 0.8 * teacher, (out["evals"], teacher)
    spec = small_spec()
    carry = D.student_init(jax.random.PRNGKey(args.seed), args, spec)  # the untrained student
    untrained = float(D.student_scores(carry.params, args, spec, jax.random.PRNGKey(5))[0])
    assert untrained < 0.5 * teacher


# ----------------------------------------------------------------------------- CLI
TINY_TEACHER = ["--phase", "teacher", "--total-timesteps", "256", "--eval-interval", "128", "--num-envs", "8",
                "--teacher-channels", "2", "--teacher-hidden", "8", "--learning-starts", "64",
                "--dqn-buffer-size", "512", "--dqn-batch-size", "16", "--eval-episodes", "2"]
TINY_STUDENT = ["--teacher-channels", "2", "--teacher-hidden", "8", "--student-channels", "2",
                "--student-hidden", "4", "--distill-updates", "400", "--distill-eval-interval", "20",
                "--num-envs", "4", "--prefill", "16", "--replay-size", "64", "--eval-episodes", "2",
                "--num-seeds", "2"]


@pytest.mark.slow
def test_cli_teacher_phase_writes_a_teacher_the_student_phase_loads(tmp_path):
    teachers = tmp_path / "teachers"
    res = run_algo("distillation", *TINY_TEACHER, "--teacher-out", str(teachers), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [r for r in read_metrics(next((tmp_path / "runs").iterdir())) if "eval/return" in r]
    assert [r["global_step"] for r in rows] == [128, 256] and all(np.isfinite(r["eval/return"]) for r in rows)
    g = jax_game("Breakout-MinAtar-v0")
    params = D.load_teacher(teachers, D.Args(teacher_channels=2, teacher_hidden=8), g)
    assert params["params"]["head_w"].shape == (1, 1, 8, 3)  # (seeds, heads, hidden, actions)


@pytest.mark.slow
def test_cli_multi_task_student_acting_with_feature_regression_resumes_after_kill(tmp_path):
    teachers = tmp_path / "teachers"
    games = ("Breakout-MinAtar-v0", "SpaceInvaders-MinAtar-v0")
    args = D.Args(teacher_channels=2, teacher_hidden=8)
    for i, env_id in enumerate(games):  # untrained tiny teachers: this test is about the plumbing
        g = jax_game(env_id)
        params = D.teacher_net(args, g).init(jax.random.PRNGKey(i), jnp.zeros(g.obs_shape))
        D.save_teacher(D.teacher_file(teachers, env_id), jax.tree.map(lambda x: x[None], params), args, g, [0.0])
    flags = [*TINY_STUDENT, "--teacher-dir", str(teachers), "--games", *games, "--loss", "actor_mimic",
             "--feature-weight", "0.01", "--student-acts"]
    res = run_algo("distillation", *flags, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "parameters: student" in res.stdout and "2 head(s)" in res.stdout
    rows = [r for r in read_metrics(next((tmp_path / "runs").iterdir())) if "eval/return" in r]
    assert [r["global_step"] for r in rows] == list(range(20, 401, 20))
    assert all(np.isfinite(r["eval/SpaceInvaders-MinAtar-v0/return"]).all() for r in rows)
    # kill -9 after a checkpoint, then --resume: the same rows as the uninterrupted run
    other = tmp_path / "killed"
    other.mkdir()
    run_dir, step = kill_after_checkpoint("distillation", *flags, cwd=other, min_step=20)
    assert 20 <= step < 400
    res = run_algo("distillation", "--resume", str(run_dir), cwd=other)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = [r for r in read_metrics(run_dir) if "eval/return" in r]
    assert comparable(resumed) == comparable(rows)


def test_bad_input_gives_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        ("--env-id", "CartPole-v1"): "MinAtar games",
        ("--env-id", "Breakout-MinAtar-v9"): "unknown env id",
        ("--games", "Breakout-MinAtar-v0", "Breakout-MinAtar-v0"): "twice",
        ("--feature-weight", "0.01"): "needs --loss actor_mimic",
        ("--loss", "l2"): "see --help",
        ("--tau", "0"): "--tau must be > 0",
        ("--act-epsilon", "1.5"): "--act-epsilon must be in [0, 1]",
        ("--prefill", "100", "--replay-size", "50"): "--prefill (100) exceeds",
        ("--phase", "teacher", "--games", "Breakout-MinAtar-v0", "Asterix-MinAtar-v0"): "one game's teacher",
        ("--teacher-dir", str(tmp_path)): "no teacher for Breakout-MinAtar-v0",
        ("--teacher-dir", str(ROOT / "benchmarks" / "teachers"), "--teacher-hidden", "64"): "does not match",
    }
    for argv, expected in cases.items():
        assert expected in cli_error(D, *argv), argv
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_bad_input_through_the_real_entry_point(tmp_path):
    res = run_algo("distillation", "--env-id", "Pong-MinAtar-v0", cwd=tmp_path)
    assert "unknown env id" in one_line_error(res)
