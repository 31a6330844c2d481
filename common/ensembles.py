"""Ensembles of MLP dynamics models, vmapped over members (PETS / MBPO style).

One set of stacked parameters with a leading member axis E; `jax.vmap` runs
init, apply and the loss over members, so E models cost one program. Each
member maps x = (s, a) to the targets y = (r, s' - s) (`make_targets`):

- probabilistic members output a Gaussian N(mu(x), diag(exp(logvar(x)))),
  trained by Gaussian negative log-likelihood; the log-variance is squashed
  into [min_logvar, max_logvar] by soft bounds that are themselves learned
  (Chua et al. 2018, PETS, App. A.1; the same in jannerm/mbpo `bnn.py`):
      logvar = max_lv - softplus(max_lv - raw)
      logvar = min_lv + softplus(logvar - min_lv)
  plus 0.01 * (sum max_lv - sum min_lv) in the loss, which pulls the bounds
  towards the data instead of letting them drift to +-infinity;
- deterministic members output mu(x) only, trained by squared error.

`train` fits them the way jannerm/mbpo does: a random holdout split
(min(20 %, 5000) points), each member on its own bootstrap resample of the
training part, reshuffled every epoch, minibatches of 256, Adam, L2 weight
decay per layer; after each epoch the holdout MSE of every member; a member's
best parameters are kept when its holdout MSE improves by more than 1 %;
training stops after `patience` epochs with no member improving, the best
parameters are restored, and the `num_elites` members with the lowest holdout
MSE become the elites. Each epoch is one jitted call.

ME-TRPO's deterministic, shared-data mode (Kurutach et al. 2018; thanard/me-trpo
`model_based_rl.py`, `optimize_models`) changes four things through the config:
bootstrap=False (every member trains on all training rows, the authors'
`use_same_dataset`), an explicit validation set passed to `train` (the authors
split by trajectory order, not at random), improvement=0 with score_start (a
member's best is any strictly lower validation loss, and the weights before
training count), and eval_every (validation every few passes). ReLU members
(activation="relu") and a floor on the normaliser's std (std_floor) match their
networks and running statistics.

MB-MPO's mode (Clavera et al. 2018; jonasrothfuss/model_ensemble_meta_learning
`sandbox/ours/dynamics/dynamics_ensemble.py`) adds three fields: member_splits
(each member its own random train/validation split of all rows, the normaliser
fitted on all rows), stopping="rolling" (a member stops, keeping its current
weights, once its rolling validation loss rises; persistence rolling_persistence)
and weight_norm (every dense layer W = g v / ||v||, per output unit).

MBPO's own details (jannerm/mbpo `bnn.py`, `fc.py`) are two more fields:
shared_logvar_bounds (one [1, out] max/min_logvar for the whole ensemble,
whose gradient is the sum over members, its regulariser counted once, and
which the best-epoch snapshot leaves at its final value: the snapshot holds
weights and biases only) and init="jannerm" (kernels truncated normal with
std 1 / (2 sqrt(fan_in)), biases zero).

`sample` draws a next target for every row: a uniformly random elite per row,
then a draw from that elite's Gaussian.

Nothing here knows about any algorithm: the caller builds inputs and targets
(`make_inputs`, `make_targets`) and reads predictions back (`split_targets`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# MBPO's per-layer L2 weight decays (jannerm/mbpo, `construct_model`): the
# four hidden layers, then the output layer.
MBPO_WEIGHT_DECAYS = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)


class EnsembleConfig(NamedTuple):
    """Static description of an ensemble (hashable: used as a jit static arg)."""

    in_dim: int
    out_dim: int  # target dimension (e.g. 1 + obs_dim for (r, s' - s))
    num_members: int = 7
    num_elites: int = 5
    hidden: int = 200
    num_layers: int = 4  # hidden layers
    probabilistic: bool = True
    lr: float = 1e-3
    weight_decays: tuple = MBPO_WEIGHT_DECAYS  # one per layer (hidden layers + output)
    batch_size: int = 256
    holdout_ratio: float = 0.2
    max_holdout: int = 5000
    patience: int = 5  # stop once more than this many epochs have passed since any member improved
    normalize_outputs: bool = False  # MBPO: inputs only; ME-TRPO-style models: both
    activation: str = "swish"  # hidden nonlinearity: "swish" (PETS, MBPO) or "relu" (ME-TRPO, MB-MPO)
    bootstrap: bool = True  # each member on its own resample; False: all members on all training rows
    same_batches: bool = False  # with bootstrap=False: every member gets the very same minibatches
    improvement: float = 0.01  # relative holdout decrease that counts as a member improving (0: any)
    score_start: bool = False  # the weights before training are a candidate best (ME-TRPO)
    eval_every: int = 1  # score the holdout (and decide best / stop) every this many epochs
    std_floor: float = 0.0  # normaliser std = max(std, std_floor) (ME-TRPO's running std: 0.1)
    member_splits: bool = False  # each member its own random holdout_ratio split of all rows (MB-MPO; no max_holdout)
    stopping: str = "best"  # "best": patience on the best loss, best weights restored; "rolling": MB-MPO's rule
    rolling_persistence: float = 0.99  # stopping="rolling": avg <- p avg + (1 - p) loss after every epoch
    weight_norm: bool = False  # weight-normalised dense layers, W = g v / ||v|| (MB-MPO's models)
    shared_logvar_bounds: bool = False  # one max/min_logvar for all members, not snapshotted (MBPO, jannerm bnn.py)
    init: str = "lecun"  # kernel init: flax's lecun normal; "jannerm": truncated normal, std 1/(2 sqrt(fan_in))


class Normalizer(NamedTuple):
    """Affine maps fitted on the training data: the nets see (x - in_mean) / in_std
    and predict (y - out_mean) / out_std (identity when outputs are not normalised)."""

    in_mean: jax.Array  # (in_dim,)
    in_std: jax.Array
    out_mean: jax.Array  # (out_dim,)
    out_std: jax.Array


class EnsembleState(NamedTuple):
    params: dict  # every leaf has leading axis E
    opt_state: optax.OptState
    norm: Normalizer
    elites: jax.Array  # (num_elites,) int32, member indices, best first


# ----------------------------------------------------------------------------
# Data layout
# ----------------------------------------------------------------------------
def _xp(*arrays):
    """NumPy for NumPy inputs (a fit's data: no XLA op compiled for each new data size), else jax.numpy."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def make_inputs(obs, action):
    """x = (s, a): (..., obs_dim + act_dim)."""
    return _xp(obs, action).concatenate([obs, action], -1)


def make_targets(obs, reward, next_obs):
    """y = (r, s' - s): (..., 1 + obs_dim). Differences, not states: a step
    changes the state little, so s' - s has a much smaller range to fit."""
    xp = _xp(obs, reward, next_obs)
    return xp.concatenate([xp.asarray(reward)[..., None], next_obs - obs], -1)


def split_targets(obs, y):
    """Inverse of `make_targets`: (next_obs, reward) from s and y = (r, s' - s)."""
    return obs + y[..., 1:], y[..., 0]


def fit_normalizer(inputs, targets, normalize_outputs: bool = False, std_floor: float = 0.0) -> Normalizer:
    """Mean and std over the rows; std below 1e-12 is set to 1 (as jannerm/mbpo's
    scaler), so constant dimensions pass through unchanged. std_floor > 0 instead
    raises every std to at least std_floor (thanard/me-trpo `running_mean_std.py`:
    sqrt(max(var, 1e-2)), a floor of 0.1)."""
    inputs, targets = np.asarray(inputs, np.float64), np.asarray(targets, np.float64)

    def spread(a):
        std = a.std(0)
        if std_floor > 0:
            return np.maximum(std, std_floor)
        std[std < 1e-12] = 1.0
        return std

    in_std = spread(inputs)
    if normalize_outputs:
        out_mean, out_std = targets.mean(0), spread(targets)
    else:
        out_mean, out_std = np.zeros(targets.shape[1]), np.ones(targets.shape[1])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Normalizer(f32(inputs.mean(0)), f32(in_std), f32(out_mean), f32(out_std))


def normalize(norm: Normalizer, x):
    return (x - norm.in_mean) / norm.in_std


def denormalize_output(norm: Normalizer, y_normalized):
    return y_normalized * norm.out_std + norm.out_mean


# ----------------------------------------------------------------------------
# One member
# ----------------------------------------------------------------------------
class WeightNormDense(nn.Module):
    """Dense layer with weight normalisation (Salimans & Kingma 2016), as rllab's `weight_normalization`: the
    kernel is v scaled to norm g in every output column, g initialised to 1 (not data-dependent)."""

    features: int

    @nn.compact
    def __call__(self, x):
        v = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        g = self.param("scale", nn.initializers.ones, (self.features,))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ (v * (g / jnp.sqrt(jnp.sum(v ** 2, axis=0)))) + b


class Member(nn.Module):
    """MLP, swish (or ReLU) hidden layers. Probabilistic: outputs (mean, logvar)
    with the learned soft bounds of PETS; deterministic: (mean, zeros)."""

    hidden: int
    num_layers: int
    out_dim: int
    probabilistic: bool
    activation: str = "swish"
    weight_norm: bool = False
    init_scheme: str = "lecun"  # EnsembleConfig.init (a Module field may not be called init)

    @nn.compact
    def __call__(self, x):  # x (B, in_dim), normalised
        act = nn.relu if self.activation == "relu" else nn.swish
        kernel_init = jannerm_init if self.init_scheme == "jannerm" else nn.initializers.lecun_normal()
        # Named Dense_i either way, so weight_decay_penalty finds every layer's kernel.
        dense = (lambda n, i: WeightNormDense(n, name=f"Dense_{i}")) if self.weight_norm else (
            lambda n, i: nn.Dense(n, kernel_init=kernel_init))
        for i in range(self.num_layers):
            x = act(dense(self.hidden, i)(x))
        if not self.probabilistic:
            mean = dense(self.out_dim, self.num_layers)(x)
            return mean, jnp.zeros_like(mean)
        out = nn.Dense(2 * self.out_dim, kernel_init=kernel_init)(x)
        mean, raw = out[..., : self.out_dim], out[..., self.out_dim:]
        max_lv = self.param("max_logvar", lambda _: jnp.full((self.out_dim,), 0.5, jnp.float32))
        min_lv = self.param("min_logvar", lambda _: jnp.full((self.out_dim,), -10.0, jnp.float32))
        logvar = max_lv - nn.softplus(max_lv - raw)  # soft upper bound
        logvar = min_lv + nn.softplus(logvar - min_lv)  # soft lower bound
        return mean, logvar


def jannerm_init(key, shape, dtype=jnp.float32):
    """Truncated normal (within 2 std, not rescaled: TF's truncated_normal_initializer) with std 1 / (2 sqrt(fan_in))
    (jannerm/mbpo `fc.py`); shape (fan_in, fan_out)."""
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / (2.0 * np.sqrt(shape[0]))


def member_module(cfg: EnsembleConfig) -> Member:
    return Member(cfg.hidden, cfg.num_layers, cfg.out_dim, cfg.probabilistic, cfg.activation, cfg.weight_norm,
                  cfg.init)


BOUNDS = ("max_logvar", "min_logvar")


def share_bound_grads(cfg: EnsembleConfig, grads):
    """shared_logvar_bounds: every member's copy of max/min_logvar gets the sum of the members' gradients, the
    gradient of one variable used by all of them; with equal starts and Adam elementwise, the copies stay equal."""
    if not (cfg.probabilistic and cfg.shared_logvar_bounds):
        return grads
    p = dict(grads["params"])
    for name in BOUNDS:
        p[name] = jnp.broadcast_to(p[name].sum(0, keepdims=True), p[name].shape)
    return {**grads, "params": p}


def snapshot_restore(cfg: EnsembleConfig, best, current):
    """The parameters a fit ends with: the best epoch's, but (shared_logvar_bounds) the bounds' final values,
    jannerm's snapshot holding weights and biases only (bnn.py `_save_state` / `_set_state`)."""
    if not (cfg.probabilistic and cfg.shared_logvar_bounds):
        return best
    return {**best, "params": {**best["params"], **{name: current["params"][name] for name in BOUNDS}}}


def create(cfg: EnsembleConfig, key) -> EnsembleState:
    """E independently initialised members (one key each), Adam state, identity
    normaliser, and the first num_elites members as elites until trained."""
    module = member_module(cfg)
    keys = jax.random.split(key, cfg.num_members)
    params = jax.vmap(module.init, in_axes=(0, None))(keys, jnp.zeros((1, cfg.in_dim)))
    norm = Normalizer(jnp.zeros(cfg.in_dim), jnp.ones(cfg.in_dim), jnp.zeros(cfg.out_dim), jnp.ones(cfg.out_dim))
    return EnsembleState(params, optimizer(cfg).init(params), norm, jnp.arange(cfg.num_elites, dtype=jnp.int32))


def optimizer(cfg: EnsembleConfig):
    # Adam is elementwise, so one Adam over the stacked params is E independent Adams.
    return optax.adam(cfg.lr)


def apply_members(cfg: EnsembleConfig, params, norm: Normalizer, x):
    """Every member on its own inputs. x (E, B, in_dim) raw -> mean, logvar
    (E, B, out_dim), both in normalised target units."""
    return jax.vmap(member_module(cfg).apply)(params, normalize(norm, x))


def predict(cfg: EnsembleConfig, params, norm: Normalizer, x):
    """Every member on the same inputs. x (B, in_dim) raw -> mean (E, B, out_dim)
    and variance (E, B, out_dim), in target units."""
    xs = jnp.broadcast_to(x, (cfg.num_members, *x.shape))
    mean, logvar = apply_members(cfg, params, norm, xs)
    return denormalize_output(norm, mean), jnp.exp(logvar) * norm.out_std ** 2


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------
def weight_decay_penalty(cfg: EnsembleConfig, params):
    """sum_l decay_l * ||W_l||^2 / 2 (TF's l2_loss, as jannerm/mbpo), per member: (E,)."""
    dense = params["params"]
    total = 0.0
    for i, decay in enumerate(cfg.weight_decays[: cfg.num_layers + 1]):
        w = dense[f"Dense_{i}"]["kernel"]  # (E, fan_in, fan_out)
        total = total + decay * 0.5 * jnp.sum(w ** 2, axis=(1, 2))
    return total


def member_losses(cfg: EnsembleConfig, params, norm: Normalizer, x, y):
    """Training loss of every member on its own batch: x (E, B, in), y (E, B, out) -> (E,).

    Probabilistic: Gaussian NLL up to constants, mean over batch and dims of
        (mu - y)^2 exp(-logvar) + logvar,
    plus 0.01 (sum max_logvar - sum min_logvar) (PETS soft-bound regulariser; with shared_logvar_bounds a 1/E
    share per member, so that the ensemble's summed loss counts it once, as jannerm's).
    Deterministic: mean squared error. Both plus the L2 weight decay."""
    mean, logvar = apply_members(cfg, params, norm, x)
    y_n = (y - norm.out_mean) / norm.out_std
    if cfg.probabilistic:
        loss = jnp.mean((mean - y_n) ** 2 * jnp.exp(-logvar) + logvar, axis=(1, 2))
        p = params["params"]
        share = 1.0 / cfg.num_members if cfg.shared_logvar_bounds else 1.0
        loss = loss + share * 0.01 * (p["max_logvar"].sum(-1) - p["min_logvar"].sum(-1))
    else:
        loss = jnp.mean((mean - y_n) ** 2, axis=(1, 2))
    return loss + weight_decay_penalty(cfg, params)


HOLDOUT_CHUNK = 512  # holdout rows scored per step of holdout_mse's loop


@partial(jax.jit, static_argnames=("cfg",))
def holdout_mse(cfg: EnsembleConfig, params, norm: Normalizer, x, y, mask):
    """Mean squared error of each member's mean on the holdout rows where mask is
    1 (in normalised target units): (E,). The elite and early-stopping score.
    x (H, in) is every member's holdout; x (E, H, in), y (E, H, out): each its own.
    mask (H,) is ones then zeros (`train` pads the holdout to a power of two, so that a
    growing holdout compiles rarely): the rows are scored HOLDOUT_CHUNK at a time, only
    the chunks that hold valid rows, so the padding costs no compute (a 5000-row
    holdout scores 5120 rows, not 8192)."""
    h = mask.shape[0]
    c = min(HOLDOUT_CHUNK, h)
    if h % c:  # a length that is not a power of two: pad it to whole chunks (masked out)
        pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, c - h % c), (0, 0)])
        x, y, mask = pad(x), pad(y), jnp.pad(mask, (0, c - h % c))

    def chunk(i, total):  # total (E,): the summed errors of chunks 0..i-1
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=a.ndim - 2 if a.ndim > 1 else 0)
        xc, yc = rows(x), rows(y)
        if xc.ndim == 3:
            mean = denormalize_output(norm, apply_members(cfg, params, norm, xc)[0])
        else:
            mean, _ = predict(cfg, params, norm, xc)  # (E, c, out)
        err = jnp.mean(((mean - yc) / norm.out_std) ** 2, axis=-1)  # (E, c)
        return total + jnp.sum(err * rows(mask), -1)

    n_valid = jnp.sum(mask)
    n_chunks = (n_valid.astype(jnp.int32) + c - 1) // c
    total = jax.lax.fori_loop(0, n_chunks, chunk, jnp.zeros(cfg.num_members, jnp.float32))
    return total / jnp.maximum(n_valid, 1.0)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("cfg", "score"))
def train_epoch(cfg: EnsembleConfig, params, opt_state, norm, best_params, best_loss, data, key, score=True,
                active=None):
    """One epoch, one jitted call: shuffle each member's bootstrap indices, then a
    loop over ceil(n_train / batch) minibatches (E members in parallel, each on its
    own rows), then (if score) the holdout MSE; members that improved by more than
    cfg.improvement (relative) keep these params as their best.

    data: (x (N, in), y (N, out), boot (E, N) int32 bootstrap row indices into the
    first n_train rows, n_train, x_hold (H, in), y_hold (H, out), hold_mask (H,)).
    N is padded: rows beyond n_train are never used. x_hold may be (E, H, in) (one
    holdout per member, y_hold (E, H, out)). active (E,) bool: members that are False
    keep their params and Adam moments (stopped members, stopping="rolling").
    """
    x, y, boot, n_train, x_hold, y_hold, hold_mask = data
    n_pad = boot.shape[1]
    # Per-member shuffle of the first n_train slots (pad slots sort last); one
    # shared shuffle when every member must see the very same minibatches.
    u = jax.random.uniform(key, (1, n_pad) if cfg.same_batches else boot.shape)
    u = jnp.broadcast_to(u, boot.shape)
    u = jnp.where(jnp.arange(n_pad) < n_train, u, 2.0)
    order = jnp.take_along_axis(boot, jnp.argsort(u, axis=1), axis=1)  # (E, N)
    num_batches = (n_train + cfg.batch_size - 1) // cfg.batch_size
    opt = optimizer(cfg)
    grad_fn = jax.grad(lambda p, xb, yb: member_losses(cfg, p, norm, xb, yb).sum())

    def body(i, carry):
        params, opt_state = carry
        # Last batch may run past n_train: wrap into the valid rows (a few
        # repeated rows, as a fixed shape needs).
        slot = (i * cfg.batch_size + jnp.arange(cfg.batch_size)) % n_train
        rows = order[:, slot]  # (E, batch)
        grads = share_bound_grads(cfg, grad_fn(params, x[rows], y[rows]))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    start = (params, opt_state)
    params, opt_state = jax.lax.fori_loop(0, num_batches, body, (params, opt_state))
    if active is not None:  # leaves with a member axis (params, Adam's moments) go back for stopped members
        keep = lambda new, old: (jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
                                 if new.ndim >= 1 and new.shape[0] == cfg.num_members else new)
        params, opt_state = jax.tree.map(keep, (params, opt_state), start)
    if not score:
        return params, opt_state, best_params, best_loss, best_loss, jnp.zeros((), bool)
    loss = holdout_mse(cfg, params, norm, x_hold, y_hold, hold_mask)  # (E,)
    improved = (best_loss - loss) / best_loss > cfg.improvement  # (E,)
    pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    best_params = jax.tree.map(pick, params, best_params)
    best_loss = jnp.where(improved, loss, best_loss)
    return params, opt_state, best_params, best_loss, loss, improved.any()


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, *a.shape[1:]), np.float32)
    out[: len(a)] = a
    return out


def train(cfg: EnsembleConfig, state: EnsembleState, inputs, targets, rng: np.random.Generator,
          max_epochs: int | None = None, holdout=None) -> tuple[EnsembleState, dict]:
    """Fit the ensemble to (inputs (N, in), targets (N, out)) from its current
    params (warm start, as jannerm/mbpo), with holdout early stopping.

    holdout: None splits off a random holdout (min(holdout_ratio N, max_holdout)
    rows); a pair (x_hold, y_hold) is used as the validation set instead and all
    of (inputs, targets) is trained on (ME-TRPO's split by trajectory order).
    Returns the new state (best params restored, normaliser refitted, elites the
    num_elites lowest holdout MSEs) and info: holdout MSE per member, epochs run,
    and holdout_curve (scored epochs, E): each member's holdout MSE when scored.
    Arrays are padded to the next power of two so that a growing data set
    recompiles `train_epoch` only log2(N) times."""
    inputs, targets = np.asarray(inputs, np.float32), np.asarray(targets, np.float32)
    n = len(inputs)
    if cfg.member_splits and holdout is None:
        return _train_member_splits(cfg, state, inputs, targets, rng, max_epochs)
    if holdout is None:
        n_hold = min(int(n * cfg.holdout_ratio), cfg.max_holdout)
        if n - n_hold < 1:
            raise ValueError(f"need at least one training row, got {n} rows")
        perm = rng.permutation(n)
        hold, tr = perm[:n_hold], perm[n_hold:]
        # No holdout (tiny data or holdout_ratio 0): score on training rows instead.
        x_hold, y_hold = (inputs[hold], targets[hold]) if n_hold > 0 else (inputs[tr[:cfg.max_holdout]],
                                                                            targets[tr[:cfg.max_holdout]])
    else:
        if n < 1 or len(holdout[0]) < 1:
            raise ValueError(f"need training and validation rows, got {n} and {len(holdout[0])}")
        tr = np.arange(n)
        x_hold, y_hold = np.asarray(holdout[0], np.float32), np.asarray(holdout[1], np.float32)
    n_train = len(tr)
    norm = fit_normalizer(inputs[tr], targets[tr], cfg.normalize_outputs, cfg.std_floor)
    n_pad = 1 << int(np.ceil(np.log2(max(n_train, cfg.batch_size))))
    h_pad = 1 << int(np.ceil(np.log2(len(x_hold))))
    # Each member's own bootstrap resample (rows drawn with replacement), fixed
    # for this fit, or (bootstrap=False) every member on all training rows;
    # `train_epoch` reshuffles the order every epoch.
    boot = np.zeros((cfg.num_members, n_pad), np.int32)
    if cfg.bootstrap:
        boot[:, :n_train] = rng.integers(0, n_train, size=(cfg.num_members, n_train))
    else:
        boot[:, :n_train] = np.arange(n_train)
    mask = np.zeros(h_pad, np.float32)
    mask[: len(x_hold)] = 1.0
    data = (jnp.asarray(_pad_rows(inputs[tr], n_pad)), jnp.asarray(_pad_rows(targets[tr], n_pad)),
            jnp.asarray(boot), jnp.int32(n_train), jnp.asarray(_pad_rows(x_hold, h_pad)),
            jnp.asarray(_pad_rows(y_hold, h_pad)), jnp.asarray(mask))
    params, opt_state = state.params, state.opt_state
    # float32 explicitly: a weakly typed 1e10 would make train_epoch compile twice.
    best_params, best_loss = params, jnp.full((cfg.num_members,), 1e10, dtype=jnp.float32)
    if cfg.score_start:  # the starting weights are each member's best until beaten
        best_loss = holdout_mse(cfg, params, norm, data[4], data[5], data[6]).astype(jnp.float32)
    key = jax.random.PRNGKey(int(rng.integers(2 ** 31)))
    epoch, since_update, curve = 0, 0, []
    while max_epochs is None or epoch < max_epochs:
        key, sub = jax.random.split(key)
        score = (epoch + 1) % cfg.eval_every == 0
        params, opt_state, best_params, best_loss, loss, improved = train_epoch(
            cfg, params, opt_state, norm, best_params, best_loss, data, sub, score=score)
        epoch += 1
        if score:
            curve.append(loss)
        since_update = 0 if bool(improved) else since_update + 1
        if since_update > cfg.patience:
            break
    best_params = snapshot_restore(cfg, best_params, params)
    losses = holdout_mse(cfg, best_params, norm, data[4], data[5], data[6])
    elites = jnp.argsort(losses)[: cfg.num_elites].astype(jnp.int32)
    info = {"holdout_mse": np.asarray(losses), "epochs": epoch, "holdout_curve": np.asarray(curve),
            "elite_holdout_mse": float(np.sort(np.asarray(losses))[: cfg.num_elites].mean())}
    return EnsembleState(best_params, opt_state, norm, elites), info


def member_splits(n: int, num_members: int, holdout_ratio: float, rng: np.random.Generator):
    """Each member's own random split of n rows: (train (E, n_train), holdout (E, n - n_train)) row indices,
    n_train = int(n (1 - holdout_ratio)) (jonasrothfuss/model_ensemble_meta_learning `train_test_split`, called
    once per member at every fit)."""
    n_train = int(n * (1 - holdout_ratio))
    perms = np.stack([rng.permutation(n) for _ in range(num_members)])
    return perms[:, :n_train], perms[:, n_train:]


def rolling_stop(avg, loss, persistence: float):
    """MB-MPO's per-member stopping rule after an epoch's validation losses (E,): avg <- p avg + (1 - p) loss,
    and a member stops when its average rose. avg None (the first epoch) starts the average high, 1.5 x the loss
    with 2 x as its predecessor (/1.5 and /2 for a negative loss), so the first epoch cannot stop a member
    (jonasrothfuss/model_ensemble_meta_learning `MLPDynamicsEnsemble.fit`). Returns (new avg, stop (E,) bool)."""
    loss = np.asarray(loss, np.float64)
    if avg is None:
        avg, prev = np.where(loss < 0, loss / 1.5, 1.5 * loss), np.where(loss < 0, loss / 2.0, 2.0 * loss)
    else:
        prev = avg
    new = persistence * avg + (1.0 - persistence) * loss
    return new, prev < new


def _train_member_splits(cfg: EnsembleConfig, state: EnsembleState, inputs, targets, rng, max_epochs):
    """`train` with member_splits: each member trains on its own random (1 - holdout_ratio) of the rows and is
    scored on the rest; the normaliser is fitted on all rows (shared by the members). stopping="rolling" freezes
    each member at its own epoch (`rolling_stop`) and keeps its weights then (no restore); "best" keeps each
    member's best weights and stops after `patience` epochs without an improvement."""
    n = len(inputs)
    train_rows, hold_rows = member_splits(n, cfg.num_members, cfg.holdout_ratio, rng)
    n_train = train_rows.shape[1]
    if n_train < 1 or hold_rows.shape[1] < 1:
        raise ValueError(f"need training and validation rows for every member, got {n} rows")
    norm = fit_normalizer(inputs, targets, cfg.normalize_outputs, cfg.std_floor)
    n_pad = 1 << int(np.ceil(np.log2(max(n, cfg.batch_size))))
    h = hold_rows.shape[1]
    h_pad = 1 << int(np.ceil(np.log2(h)))
    boot = np.zeros((cfg.num_members, n_pad), np.int32)
    boot[:, :n_train] = train_rows  # indices into all n rows: every member its own training rows
    pad_idx = np.zeros((cfg.num_members, h_pad), np.int64)
    pad_idx[:, :h] = hold_rows
    mask = np.zeros(h_pad, np.float32)
    mask[:h] = 1.0
    data = (jnp.asarray(_pad_rows(inputs, n_pad)), jnp.asarray(_pad_rows(targets, n_pad)), jnp.asarray(boot),
            jnp.int32(n_train), jnp.asarray(inputs[pad_idx]), jnp.asarray(targets[pad_idx]), jnp.asarray(mask))
    params, opt_state = state.params, state.opt_state
    best_params, best_loss = params, jnp.full((cfg.num_members,), 1e10, dtype=jnp.float32)
    active = np.ones(cfg.num_members, bool)
    stopped_at = np.full(cfg.num_members, -1)
    key = jax.random.PRNGKey(int(rng.integers(2 ** 31)))
    epoch, since_update, curve, avg = 0, 0, [], None
    while max_epochs is None or epoch < max_epochs:
        key, sub = jax.random.split(key)
        params, opt_state, best_params, best_loss, loss, improved = train_epoch(
            cfg, params, opt_state, norm, best_params, best_loss, data, sub, score=True, active=jnp.asarray(active))
        curve.append(loss)
        if cfg.stopping == "rolling":
            avg, stop = rolling_stop(avg, loss, cfg.rolling_persistence)
            newly = active & (stop | (max_epochs is not None and epoch == max_epochs - 1))
            stopped_at[newly] = epoch
            active = active & ~newly
            epoch += 1
            if not active.any():
                break
        else:
            epoch += 1
            since_update = 0 if bool(improved) else since_update + 1
            if since_update > cfg.patience:
                break
    final = params if cfg.stopping == "rolling" else snapshot_restore(cfg, best_params, params)
    losses = holdout_mse(cfg, final, norm, data[4], data[5], data[6])
    elites = jnp.argsort(losses)[: cfg.num_elites].astype(jnp.int32)
    stopped_at[stopped_at < 0] = epoch - 1
    info = {"holdout_mse": np.asarray(losses), "epochs": epoch, "holdout_curve": np.asarray(curve),
            "member_epochs": stopped_at + 1, "train_rows": train_rows, "holdout_rows": hold_rows,
            "elite_holdout_mse": float(np.sort(np.asarray(losses))[: cfg.num_elites].mean())}
    return EnsembleState(final, opt_state, norm, elites), info


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------
def sample(cfg: EnsembleConfig, state: EnsembleState, key, x, deterministic: bool = False):
    """Draw y ~ N(mu_e(x), var_e(x)) for each row of x (B, in_dim), with e a
    uniformly random elite per row. Returns y (B, out_dim) in target units.

    The rows are randomly permuted and cut into num_elites equal chunks, one per
    elite, so each elite runs only on its own rows (num_elites times cheaper than
    running every elite on every row and picking); every row still gets a
    uniformly random elite (mbrl-lib's "random_model" propagation does the same).
    deterministic=True (or deterministic members) returns the chosen elite's mean."""
    b, k = x.shape[0], cfg.num_elites
    k_perm, k_noise = jax.random.split(key)
    chunk = -(-b // k)  # ceil
    perm = jax.random.permutation(k_perm, b)
    xp = jnp.concatenate([x[perm], jnp.zeros((chunk * k - b, x.shape[1]), x.dtype)])
    elite_params = jax.tree.map(lambda p: p[state.elites], state.params)  # leading axis k
    mean, logvar = apply_members(cfg, elite_params, state.norm, xp.reshape(k, chunk, -1))
    if deterministic or not cfg.probabilistic:  # deterministic members: the mean, no noise
        y = mean
    else:
        y = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_noise, mean.shape)
    y = denormalize_output(state.norm, y.reshape(k * chunk, -1)[:b])
    return jnp.zeros_like(y).at[perm].set(y)  # undo the permutation
