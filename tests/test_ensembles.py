"""common/ensembles.py: NLL training, elites, member independence, normalisation, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import ensembles as ens

SMALL = dict(num_members=4, num_elites=2, hidden=32, num_layers=2, batch_size=64, patience=5)


def known_function(n, rng, noise=0.05):
    """y = (sin(3 x0) + x1^2, x0 x1) + heteroscedastic noise, x in [-1, 1]^2."""
    x = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    y = np.stack([np.sin(3 * x[:, 0]) + x[:, 1] ** 2, x[:, 0] * x[:, 1]], 1)
    y = y + noise * (1 + np.abs(x[:, :1])) * rng.standard_normal(y.shape)
    return x, y.astype(np.float32)


@pytest.mark.parametrize("probabilistic", [True, False])
def test_training_reduces_holdout_error(probabilistic):
    rng = np.random.default_rng(0)
    x, y = known_function(2000, rng)
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, probabilistic=probabilistic, **SMALL)
    state = ens.create(cfg, jax.random.PRNGKey(0))
    x_test, y_test = known_function(1000, np.random.default_rng(1), noise=0.0)
    mse = lambda s: np.asarray(((ens.predict(cfg, s.params, s.norm, jnp.asarray(x_test))[0] - y_test) ** 2)
                               .mean(axis=(1, 2)))
    before = mse(state)
    state, _ = ens.train(cfg, state, x, y, rng, max_epochs=200)
    after = mse(state)
    # Noise-free test error falls by more than 10x for every member.
    assert np.all(after < before / 10), (before, after)
    assert np.all(after < 0.02), after
    if probabilistic:
        # The learned variance is near the true noise variance (0.05^2 (1+|x0|)^2 ~ 0.0025-0.01).
        _, var = ens.predict(cfg, state.params, state.norm, jnp.asarray(x_test))
        assert 1e-4 < float(np.median(var)) < 0.05


def test_early_stopping_stops_before_the_cap():
    rng = np.random.default_rng(0)
    x, y = known_function(500, rng)
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, **SMALL)
    state, info = ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(0)), x, y, rng, max_epochs=2000)
    assert info["epochs"] < 2000


def test_elites_are_lowest_holdout_members():
    rng = np.random.default_rng(0)
    x, y = known_function(1000, rng)
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, **SMALL)
    state = ens.create(cfg, jax.random.PRNGKey(3))
    state, info = ens.train(cfg, state, x, y, rng, max_epochs=3)  # short: members differ a lot
    losses = info["holdout_mse"]
    assert len(set(np.round(losses, 8))) == cfg.num_members
    assert sorted(np.asarray(state.elites).tolist()) == sorted(np.argsort(losses)[: cfg.num_elites].tolist())
    assert losses[np.asarray(state.elites)].max() <= np.delete(losses, np.asarray(state.elites)).min()


def test_members_differ_in_init_and_batches():
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, **SMALL)
    state = ens.create(cfg, jax.random.PRNGKey(0))
    w = state.params["params"]["Dense_0"]["kernel"]  # (E, 2, 32)
    assert not np.allclose(w[0], w[1])
    # Same init for every member: training must still make them differ (own bootstrap/shuffle).
    same = jax.tree.map(lambda p: jnp.broadcast_to(p[:1], p.shape), state.params)
    state = state._replace(params=same, opt_state=ens.optimizer(cfg).init(same))
    rng = np.random.default_rng(0)
    x, y = known_function(1000, rng)
    state, _ = ens.train(cfg, state, x, y, rng, max_epochs=2)
    w = np.asarray(state.params["params"]["Dense_0"]["kernel"])
    assert np.abs(w[0] - w[1]).max() > 1e-4


def test_normalisation_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(500, 3)).astype(np.float32)
    x[:, 2] = 7.0  # constant column: std floored to 1, passes through
    y = rng.normal(-2.0, 0.1, size=(500, 2)).astype(np.float32)
    norm = ens.fit_normalizer(x, y, normalize_outputs=True)
    xn = np.asarray(ens.normalize(norm, jnp.asarray(x)))
    np.testing.assert_allclose(xn[:, :2].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(xn[:, :2].std(0), 1, atol=1e-4)
    np.testing.assert_allclose(xn[:, 2], 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xn * norm.in_std + norm.in_mean), x, rtol=1e-5, atol=1e-5)
    yn = (y - np.asarray(norm.out_mean)) / np.asarray(norm.out_std)
    np.testing.assert_allclose(np.asarray(ens.denormalize_output(norm, jnp.asarray(yn))), y, atol=1e-5)
    obs = rng.normal(size=(10, 4)).astype(np.float32)
    nxt = rng.normal(size=(10, 4)).astype(np.float32)
    r = rng.normal(size=10).astype(np.float32)
    n2, r2 = ens.split_targets(obs, ens.make_targets(obs, r, nxt))
    np.testing.assert_allclose(n2, nxt, atol=1e-6)
    np.testing.assert_allclose(r2, r)


def test_sample_uses_elites_and_their_gaussians():
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, **SMALL)
    state = ens.create(cfg, jax.random.PRNGKey(0))
    state = state._replace(elites=jnp.array([1, 3], jnp.int32))
    x = jnp.ones((10_001, 2)) * 0.3  # odd size: exercises the padding
    means, var = ens.predict(cfg, state.params, state.norm, x[:1])  # (E, 1, 2)
    y = ens.sample(cfg, state, jax.random.PRNGKey(1), x, deterministic=True)
    assert y.shape == (10_001, 2)
    # Deterministic draws equal one of the elites' means, each elite used about half the time.
    d = np.abs(np.asarray(y)[:, None, :] - np.asarray(means[:, 0])[None]).max(-1)  # (B, E)
    who = d.argmin(1)
    assert np.all(d.min(1) < 1e-5)
    assert set(who.tolist()) == {1, 3}
    assert abs((who == 1).mean() - 0.5) < 0.01
    # Stochastic draws: spread equals the mixture of the two elites' Gaussians.
    ys = np.asarray(ens.sample(cfg, state, jax.random.PRNGKey(2), x))
    m, v = np.asarray(means[[1, 3], 0]), np.asarray(var[[1, 3], 0])
    mix_var = v.mean(0) + m.var(0)
    np.testing.assert_allclose(ys.mean(0), m.mean(0), atol=4 * np.sqrt(mix_var / len(ys)).max() + 1e-3)
    np.testing.assert_allclose(ys.var(0), mix_var, rtol=0.1)


# ----------------------------------------------------------------------------
# ME-TRPO's deterministic, shared-data mode (bootstrap=False, same_batches,
# explicit holdout, improvement=0, score_start, eval_every, relu, std_floor)
# ----------------------------------------------------------------------------
DET = dict(num_members=4, num_elites=4, hidden=16, num_layers=2, probabilistic=False, weight_decays=(0.0, 0.0, 0.0))


def identical_members(cfg, key=0):
    """An ensemble whose members all carry member 0's initial weights."""
    state = ens.create(cfg, jax.random.PRNGKey(key))
    same = jax.tree.map(lambda p: jnp.broadcast_to(p[:1], p.shape), state.params)
    return state._replace(params=same, opt_state=ens.optimizer(cfg).init(same))


def member_spread(state) -> float:
    """Largest difference between any member's weights and member 0's."""
    return max(float(jnp.abs(p - p[:1]).max()) for p in jax.tree.leaves(state.params))


@pytest.mark.parametrize("same_batches", [True, False])
def test_shared_data_mode_same_batches_keeps_identical_members_identical(same_batches):
    """bootstrap=False, same_batches=True: every member sees the very same minibatches in the same order, so
    members that start equal stay equal; same_batches=False: each member shuffles the same rows its own way
    (batch 64 of 500 rows: the minibatches differ), so they drift apart."""
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=64, bootstrap=False, same_batches=same_batches,
                             patience=100, **DET)
    rng = np.random.default_rng(0)
    x, y = known_function(500, rng)
    xh, yh = known_function(100, rng)
    state, _ = ens.train(cfg, identical_members(cfg), x, y, rng, max_epochs=3, holdout=(xh, yh))
    if same_batches:
        assert member_spread(state) < 1e-6, member_spread(state)
    else:
        assert member_spread(state) > 1e-3, member_spread(state)


@pytest.mark.parametrize("bootstrap", [False, True])
def test_no_bootstrap_trains_every_member_on_every_row(bootstrap):
    """One minibatch per pass holding the whole training set (batch = N = 256): without bootstrap every member's
    batch is every row once, in its own order, and the mean loss does not depend on the order, so identical
    members stay identical up to rounding even with their own shuffles (same_batches=False). With bootstrap
    each member trains on its own resample (about 37 % of the rows left out) and they differ."""
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=256, bootstrap=bootstrap, same_batches=False,
                             patience=100, **DET)
    rng = np.random.default_rng(1)
    x, y = known_function(256, rng)
    xh, yh = known_function(64, rng)
    state, _ = ens.train(cfg, identical_members(cfg), x, y, rng, max_epochs=5, holdout=(xh, yh))
    if bootstrap:
        assert member_spread(state) > 1e-3, member_spread(state)
    else:
        assert member_spread(state) < 2e-5, member_spread(state)


def overfitting_problem(seed=0):
    """Few noisy training rows and a clean holdout: the holdout curve goes down, then up (a wide net at a high
    step size overfits 48 rows), with its minimum at different passes for different members."""
    rng = np.random.default_rng(seed)
    x, y = known_function(48, rng, noise=0.3)
    xh, yh = known_function(256, rng, noise=0.0)
    return rng, x, y, xh, yh


def test_early_stopping_restores_each_members_own_best():
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=16, bootstrap=False, improvement=0.0, eval_every=1,
                             patience=400, lr=1e-2, normalize_outputs=True, **{**DET, "hidden": 64})
    rng, x, y, xh, yh = overfitting_problem()
    state, info = ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(0)), x, y, rng, max_epochs=150,
                            holdout=(xh, yh))
    curve = info["holdout_curve"]
    assert curve.shape == (150, cfg.num_members)
    best_at = curve.argmin(0)
    # The problem is one where the choice matters: bests come before the end and not all at the same pass.
    assert np.all(best_at < 149) and len(set(best_at.tolist())) > 1, best_at
    np.testing.assert_allclose(info["holdout_mse"], curve.min(0), rtol=1e-5)
    again = ens.holdout_mse(cfg, state.params, state.norm, jnp.asarray(xh), jnp.asarray(yh), jnp.ones(len(xh)))
    np.testing.assert_allclose(np.asarray(again), curve.min(0), rtol=1e-5)


@pytest.mark.parametrize("score_start", [True, False])
def test_score_start_keeps_starting_weights_that_training_cannot_beat(score_start):
    """Warm start from a good fit, then a fit at a step size that wrecks the weights: with score_start the
    starting weights count as each member's best, so the returned holdout MSE never exceeds theirs (and the
    members whose every pass was worse get their starting weights back exactly); without it, the best pass
    of the wrecked run is returned, worse than the start."""
    rng = np.random.default_rng(2)
    x, y = known_function(400, rng)
    xh, yh = known_function(200, rng, noise=0.0)
    good_cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=64, bootstrap=False, patience=100, **DET)
    good, _ = ens.train(good_cfg, ens.create(good_cfg, jax.random.PRNGKey(0)), x, y, rng, max_epochs=60,
                        holdout=(xh, yh))
    cfg = good_cfg._replace(lr=1.0, improvement=0.0, score_start=score_start, eval_every=1)
    start = good._replace(opt_state=ens.optimizer(cfg).init(good.params))
    state, info = ens.train(cfg, start, x, y, rng, max_epochs=5, holdout=(xh, yh))
    ones = jnp.ones(len(xh))
    start_mse = np.asarray(ens.holdout_mse(cfg, good.params, state.norm, jnp.asarray(xh), jnp.asarray(yh), ones))
    curve = info["holdout_curve"]
    assert np.all(curve.min(0) > start_mse), (curve.min(0), start_mse)  # lr = 1 made every pass worse
    if score_start:
        assert np.all(info["holdout_mse"] <= start_mse * (1 + 1e-6)), (info["holdout_mse"], start_mse)
        for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(good.params), strict=True):
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    else:
        assert np.all(info["holdout_mse"] > start_mse), (info["holdout_mse"], start_mse)
        np.testing.assert_allclose(info["holdout_mse"], curve.min(0), rtol=1e-5)


def test_eval_every_scores_every_few_passes():
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=64, bootstrap=False, eval_every=4, patience=1000,
                             **DET)
    rng = np.random.default_rng(3)
    x, y = known_function(200, rng)
    xh, yh = known_function(50, rng)
    _, info = ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(0)), x, y, rng, max_epochs=12, holdout=(xh, yh))
    assert info["epochs"] == 12 and info["holdout_curve"].shape == (3, cfg.num_members)


def test_explicit_holdout_is_the_validation_set():
    """holdout=(x, y): the reported holdout MSE is the one on that set, and every row passed as training data is
    trained on (the normaliser is fitted on all of them, none split off)."""
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=64, bootstrap=False, patience=3, **DET)
    rng = np.random.default_rng(4)
    x, y = known_function(300, rng)
    xh, yh = known_function(77, np.random.default_rng(5), noise=0.0)
    xh = xh + 0.5  # a validation set unlike the training rows: its MSE is not the training MSE
    state, info = ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(0)), x, y, rng, max_epochs=20,
                            holdout=(xh, yh))
    on_set = ens.holdout_mse(cfg, state.params, state.norm, jnp.asarray(xh), jnp.asarray(yh), jnp.ones(len(xh)))
    np.testing.assert_allclose(info["holdout_mse"], np.asarray(on_set), rtol=1e-5)
    on_train = ens.holdout_mse(cfg, state.params, state.norm, jnp.asarray(x), jnp.asarray(y), jnp.ones(len(x)))
    assert not np.allclose(info["holdout_mse"], np.asarray(on_train), rtol=0.05)
    np.testing.assert_allclose(np.asarray(state.norm.in_mean), x.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.norm.in_std), x.std(0), rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "swish"])
def test_activation_is_the_configured_nonlinearity(activation):
    """The members' output recomputed by hand in NumPy with the configured hidden nonlinearity."""
    cfg = ens.EnsembleConfig(in_dim=3, out_dim=2, activation=activation, **DET)
    state = ens.create(cfg, jax.random.PRNGKey(0))
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    f = (lambda z: np.maximum(z, 0)) if activation == "relu" else (lambda z: z / (1 + np.exp(-z)))
    other = (lambda z: z / (1 + np.exp(-z))) if activation == "relu" else (lambda z: np.maximum(z, 0))
    p = jax.tree.map(np.asarray, state.params["params"])

    def by_hand(act, e):
        h = x
        for i in range(cfg.num_layers):
            h = act(h @ p[f"Dense_{i}"]["kernel"][e] + p[f"Dense_{i}"]["bias"][e])
        return h @ p[f"Dense_{cfg.num_layers}"]["kernel"][e] + p[f"Dense_{cfg.num_layers}"]["bias"][e]

    mean, _ = ens.predict(cfg, state.params, state.norm, jnp.asarray(x))
    for e in range(cfg.num_members):
        np.testing.assert_allclose(np.asarray(mean[e]), by_hand(f, e), rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(mean[e]) - by_hand(other, e)).max() > 1e-3


def test_std_floor_floors_the_normaliser():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 0.01, 500), rng.normal(0, 2.0, 500), np.full(500, 3.0)], 1).astype(np.float32)
    y = np.stack([rng.normal(0, 0.02, 500), rng.normal(0, 5.0, 500)], 1).astype(np.float32)
    norm = ens.fit_normalizer(x, y, normalize_outputs=True, std_floor=0.1)
    np.testing.assert_allclose(np.asarray(norm.in_std), [0.1, x[:, 1].std(), 0.1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.out_std), [0.1, y[:, 1].std()], rtol=1e-5)
    plain = ens.fit_normalizer(x, y, normalize_outputs=True)  # no floor: tiny std kept, constant column -> 1
    np.testing.assert_allclose(np.asarray(plain.in_std), [x[:, 0].std(), x[:, 1].std(), 1.0], rtol=1e-5)
    # train() refits the normaliser with the configured floor.
    cfg = ens.EnsembleConfig(in_dim=3, out_dim=2, batch_size=64, normalize_outputs=True, std_floor=0.1, **DET)
    state, _ = ens.train(cfg, ens.create(cfg, jax.random.PRNGKey(0)), x, y, rng, max_epochs=1, holdout=(x, y))
    np.testing.assert_allclose(np.asarray(state.norm.in_std), np.asarray(norm.in_std), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.norm.out_std), np.asarray(norm.out_std), rtol=1e-6)


# ----------------------------------------------------------------------------
# MBPO's details (jannerm/mbpo bnn.py, fc.py): shared log-variance bounds, the weights-only snapshot, the init
# ----------------------------------------------------------------------------
def test_shared_logvar_bounds_get_the_gradient_of_one_variable():
    """With shared_logvar_bounds, each member's copy of max/min_logvar receives the gradient of a single variable
    used by every member: the sum over members of their NLL gradients plus the regulariser's once (0.01)."""
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, shared_logvar_bounds=True, **SMALL)
    state = ens.create(cfg, jax.random.PRNGKey(0))
    x, y = known_function(64, np.random.default_rng(0))
    xb, yb = (jnp.broadcast_to(jnp.asarray(a), (cfg.num_members, *a.shape)) for a in (x, y))
    grads = ens.share_bound_grads(cfg, jax.grad(lambda p: ens.member_losses(cfg, p, state.norm, xb, yb).sum())(
        state.params))

    def one_variable(lv):  # the ensemble's loss as a function of ONE max_logvar (1, out) shared by all members
        p = {**state.params, "params": {**state.params["params"],
                                        "max_logvar": jnp.broadcast_to(lv, (cfg.num_members, cfg.out_dim))}}
        plain = cfg._replace(shared_logvar_bounds=False)
        nll = ens.member_losses(plain, p, state.norm, xb, yb).sum()
        # member_losses (not shared) counts the regulariser E times; the shared variable's loss counts it once
        return nll - (cfg.num_members - 1) * 0.01 * lv.sum()

    want = jax.grad(one_variable)(state.params["params"]["max_logvar"][:1])
    got = grads["params"]["max_logvar"]
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(np.asarray(want), got.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_shared_bounds_stay_one_variable_through_a_fit(shared):
    """A fit with early stopping at best epochs before the last: shared bounds have moved and are equal across
    members; per-member bounds differ between members."""
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, batch_size=16, bootstrap=False, improvement=0.0, patience=400,
                             lr=1e-2, normalize_outputs=True, shared_logvar_bounds=shared, num_members=4,
                             num_elites=2, hidden=64, num_layers=2)
    rng, x, y, xh, yh = overfitting_problem()
    start = ens.create(cfg, jax.random.PRNGKey(0))
    state, info = ens.train(cfg, start, x, y, rng, max_epochs=60, holdout=(xh, yh))
    assert np.all(info["holdout_curve"].argmin(0) < 59)  # every member's best is an earlier epoch
    lv = np.asarray(state.params["params"]["max_logvar"])
    assert np.abs(lv - np.asarray(start.params["params"]["max_logvar"])).max() > 1e-3
    spread = np.abs(lv - lv[:1]).max()
    assert (spread < 1e-6) if shared else (spread > 1e-6), spread


@pytest.mark.parametrize("shared", [True, False])
def test_snapshot_restores_weights_and_biases_only_with_shared_bounds(shared):
    """jannerm bnn.py `_set_state` restores each member's best weights and biases; the bounds keep their final
    values. Per-member bounds (shared=False) come back from the best epoch with the weights."""
    cfg = ens.EnsembleConfig(in_dim=2, out_dim=2, shared_logvar_bounds=shared, **SMALL)
    best = ens.create(cfg, jax.random.PRNGKey(0)).params
    current = jax.tree.map(lambda a: a + 1.0, best)
    out = ens.snapshot_restore(cfg, best, current)["params"]
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        np.testing.assert_array_equal(out[name]["kernel"], best["params"][name]["kernel"])
        np.testing.assert_array_equal(out[name]["bias"], best["params"][name]["bias"])
    for name in ("max_logvar", "min_logvar"):
        np.testing.assert_array_equal(out[name], (current if shared else best)["params"][name])


def test_jannerm_init_is_a_truncated_normal_of_std_one_over_two_sqrt_fan_in():
    cfg = ens.EnsembleConfig(in_dim=10, out_dim=3, hidden=200, num_layers=2, init="jannerm")
    p = ens.create(cfg, jax.random.PRNGKey(0)).params["params"]
    for name, fan_in in (("Dense_0", 10), ("Dense_1", 200), ("Dense_2", 200)):
        w, b = np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"])
        std = 1 / (2 * np.sqrt(fan_in))
        assert np.abs(w).max() <= 2 * std + 1e-7  # truncated at two standard deviations
        assert abs(w.std() / std - 0.880) < 0.03, w.std() / std  # a N(0, 1) cut at +-2 has std 0.880
        assert np.all(b == 0)
    lecun = ens.create(cfg._replace(init="lecun"), jax.random.PRNGKey(0)).params["params"]["Dense_1"]["kernel"]
    assert abs(float(np.asarray(lecun).std()) * np.sqrt(200) - 1.0) < 0.05  # flax's default: std 1 / sqrt(fan_in)
