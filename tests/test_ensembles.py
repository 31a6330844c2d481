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
