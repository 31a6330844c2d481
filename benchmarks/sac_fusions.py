"""Speed: where MBPO's SAC update loses to the matmul rate, and what fusing its matmuls buys (issue #21).

One SAC update of algos/mbpo.py at mbrl-lib's `mbpo_halfcheetah` sizes (HalfCheetah's 17-d observations and
6-d actions, SAC 2x512, batch 256, the setting of benchmarks/mbpo_speed.py), 100 updates in one `lax.scan`,
on one pinned core. Reported per variant: milliseconds and GFLOP per CPU second (FLOPs from XLA's cost
analysis of the update as mbpo.py has it), against XLA's fp32 matmul rate measured in the same process at the
update's largest shape (256x512 @ 512x512) and at 2048^2.

Variants (`mbpo` is algos/mbpo.py's update as it is; the others are experiments written here):
- `two_heads`: the update as mbpo.py had it before issue #21, the actor's mean and log-std as two output layers
  of A units (mbpo.py now has one layer of 2A units split in two, as jannerm/mbpo's softlearning policy);
- `actor_fused` (named in issue #21): the actor's two forward passes (on s' for the target, on s for the actor
  loss) as one call on the 2B stacked rows, its backward pulled through that call (`jax.vjp`) with zero
  cotangents for the s' half;
- `critics_fused` (named in issue #21): the target critics on (s', a') and the online critics on (s, a) as one
  4-member call. (The issue's third fusion, both critics' first layers as one matmul, XLA already makes: the
  twin critics' first layers run as one 256 x 23 @ 23 x 1024 product.)
Each variant's parameters after the timed updates from the same state and keys are compared with `mbpo`'s (the
largest absolute difference; 0 means bitwise identical; `two_heads` has other parameters: not compared).

`--profile` also traces one scan of the `mbpo` update (jax.profiler) and splits its time (shares of the traced
wall time) into matmuls XLA
hands to YNNPACK, matmuls left to Eigen (XLA:CPU passes to YNNPACK only dots whose left operand is row-major,
so the weight gradients X^T dY go to Eigen), and the rest (Adam, Polyak averaging, activations, sampling).

Run:
    python -m benchmarks.sac_fusions --quick     # hidden 64, 20 updates: checks the script, numbers meaningless
    python -m benchmarks.sac_fusions --profile --save

Writes sac_fusions.json to benchmarks/out/ (with --save: benchmarks/results/).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time

from benchmarks import harness

OBS_DIM, ACT_DIM, BATCH = 17, 6, 256


def setup(hidden: int, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from algos import mbpo

    cfg = mbpo.Args(num_updates=1, batch_size=BATCH, real_ratio=0.0, gamma=0.99, tau=5e-3, target_entropy=-1.0,
                    hidden=hidden, lr=3e-4)
    state = mbpo.create_sac(jax.random.PRNGKey(seed), mbpo.Dims(OBS_DIM, ACT_DIM), cfg)
    rng = np.random.default_rng(seed)
    batch = dict(obs=rng.normal(size=(BATCH, OBS_DIM)), action=rng.uniform(-1, 1, (BATCH, ACT_DIM)),
                 reward=rng.normal(size=BATCH), next_obs=rng.normal(size=(BATCH, OBS_DIM)),
                 terminated=np.zeros(BATCH))
    return cfg, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), batch)


# ----------------------------------------------------------------------------
# The variants: same maths as mbpo.sac_update, matmuls grouped differently
# ----------------------------------------------------------------------------
def squash(mean, log_std, key):
    """mbpo.sample_action's tanh-Gaussian sample and log-probability from given (mean, log_std)."""
    import jax
    import jax.numpy as jnp

    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    logp = jnp.sum(-0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)
    logp = logp - jnp.sum(2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u)), -1)
    return jnp.tanh(u), logp


def finish(args, state, critic, actor, pi_loss, logp, q_loss, q_mean, alpha):
    """The temperature and target steps, as in mbpo.sac_update."""
    import jax
    import optax

    from algos import mbpo

    def alpha_loss(params):
        return -(params["log_alpha"] * jax.lax.stop_gradient(logp + args.target_entropy)).mean()

    a_loss, grads = jax.value_and_grad(alpha_loss)(state.alpha.params)
    target = optax.incremental_update(critic.params, state.target_params, args.tau)
    metrics = dict(critic_loss=q_loss, actor_loss=pi_loss, alpha_loss=a_loss, alpha=alpha, q=q_mean,
                   entropy=-logp.mean())
    return mbpo.SACState(actor, critic, target, state.alpha.apply_gradients(grads=grads)), metrics


def update_actor_fused(args, state, batch, key):
    import jax
    import jax.numpy as jnp

    from algos import mbpo

    actor, critic = state.actor, state.critic
    alpha = jnp.exp(state.alpha.params["log_alpha"])
    k1, k2 = jax.random.split(key)
    b = batch["obs"].shape[0]
    both = jnp.concatenate([batch["next_obs"], batch["obs"]])  # (2B, obs_dim): s' rows, then s rows
    (mean, log_std), pull = jax.vjp(lambda p: actor.apply_fn(p, both), actor.params)
    next_a, next_logp = squash(mean[:b], log_std[:b], k1)
    next_q = critic.apply_fn(state.target_params, batch["next_obs"], next_a).min(0)
    y = jax.lax.stop_gradient(mbpo.soft_target(batch["reward"], batch["terminated"], next_q, next_logp, alpha,
                                               args.gamma))

    def critic_loss(params):
        q = critic.apply_fn(params, batch["obs"], batch["action"])
        return 0.5 * ((q - y) ** 2).mean(1).sum(), q.mean()

    (q_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(critic.params)
    critic = critic.apply_gradients(grads=grads)

    def actor_loss(m, ls):  # the loss as a function of the actor's outputs on the s rows
        a, logp = squash(m, ls, k2)
        return (alpha * logp - critic.apply_fn(critic.params, batch["obs"], a).min(0)).mean(), logp

    (pi_loss, logp), (g_mean, g_log_std) = jax.value_and_grad(actor_loss, argnums=(0, 1), has_aux=True)(
        mean[b:], log_std[b:])
    zeros = jnp.zeros_like(g_mean)
    (grads,) = pull((jnp.concatenate([zeros, g_mean]), jnp.concatenate([zeros, g_log_std])))
    actor = actor.apply_gradients(grads=grads)
    return finish(args, state, critic, actor, pi_loss, logp, q_loss, q_mean, alpha)


def update_critics_fused(args, state, batch, key):
    import jax
    import jax.numpy as jnp

    from algos import mbpo

    actor, critic = state.actor, state.critic
    alpha = jnp.exp(state.alpha.params["log_alpha"])
    k1, k2 = jax.random.split(key)
    next_a, next_logp = mbpo.sample_action(actor.apply_fn, actor.params, batch["next_obs"], k1)
    obs4 = jnp.stack([batch["next_obs"]] * 2 + [batch["obs"]] * 2)  # (4, B, obs_dim)
    act4 = jnp.stack([next_a] * 2 + [batch["action"]] * 2)
    qnet = mbpo.QNet(critic.params["params"]["Dense_0"]["kernel"].shape[-1])
    four = jax.vmap(lambda p, o, a: qnet.apply(p, o, a))

    def critic_loss(params):  # members 0-1: the target critics (no gradient), 2-3: the online ones
        stacked = jax.tree.map(lambda t, p: jnp.concatenate([jax.lax.stop_gradient(t), p]), state.target_params,
                               params)
        q4 = four(stacked, obs4, act4)  # (4, B)
        y = jax.lax.stop_gradient(mbpo.soft_target(batch["reward"], batch["terminated"], q4[:2].min(0), next_logp,
                                                   alpha, args.gamma))
        q = q4[2:]
        return 0.5 * ((q - y) ** 2).mean(1).sum(), q.mean()

    (q_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(critic.params)
    critic = critic.apply_gradients(grads=grads)

    def actor_loss(params):
        a, logp = mbpo.sample_action(actor.apply_fn, params, batch["obs"], k2)
        return (alpha * logp - critic.apply_fn(critic.params, batch["obs"], a).min(0)).mean(), logp

    (pi_loss, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(actor.params)
    actor = actor.apply_gradients(grads=grads)
    return finish(args, state, critic, actor, pi_loss, logp, q_loss, q_mean, alpha)


def two_head_state(cfg, seed: int):
    """mbpo.create_sac's state with the two-head actor (the same keys: the same initial values as before)."""
    import jax

    from algos import mbpo

    one_head = mbpo.Actor
    mbpo.Actor = TwoHeadActor.module
    try:
        return mbpo.create_sac(jax.random.PRNGKey(seed), mbpo.Dims(OBS_DIM, ACT_DIM), cfg)
    finally:
        mbpo.Actor = one_head


class TwoHeadActor:
    """The actor as algos/mbpo.py had it before issue #21: mean and log-std as two separate output layers."""

    @staticmethod
    def module(act_dim: int, hidden: int):
        import flax.linen as nn
        import jax.numpy as jnp

        class Actor(nn.Module):
            @nn.compact
            def __call__(self, obs):
                x = nn.relu(nn.Dense(hidden)(obs))
                x = nn.relu(nn.Dense(hidden)(x))
                return nn.Dense(act_dim)(x), jnp.clip(nn.Dense(act_dim)(x), -20.0, 2.0)

        return Actor()


VARIANTS = {"mbpo": None, "two_heads": None, "actor_fused": update_actor_fused,
            "critics_fused": update_critics_fused}


# ----------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------
def scan_of(update, cfg, batch, n):
    import jax

    return jax.jit(lambda s, k: jax.lax.scan(lambda s, k: (update(cfg, s, batch, k)[0], None), s,
                                             jax.random.split(k, n))[0])


def cpu_seconds(fn, reps: int) -> list[float]:
    import jax

    out = []
    for _ in range(reps):
        tic = time.process_time()
        jax.block_until_ready(fn())
        out.append(time.process_time() - tic)
    return out


def matmul_rates(hidden: int, reps: int) -> dict:
    """GFLOP per CPU second of the update's largest matmul shape and of one 2048^2 product."""
    return {f"{BATCH}x{hidden}@{hidden}x{hidden}": harness.layer_matmul_rate(BATCH, hidden, reps=reps),
            "2048x2048@2048x2048": harness.matmul_rate(2048, clock=time.process_time)}


def profile(many, state, key) -> dict:
    """Milliseconds per update by kind of XLA:CPU operation, from a jax.profiler trace of one scan."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        jax.block_until_ready(many(state, key))
        jax.profiler.stop_trace()
        events = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.json.gz", recursive=True))[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds, counts = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "end:", "PjitFunction")):
            continue
        kind = ("matmul, YNNPACK" if name.startswith("ynn_fusion") else "matmul, Eigen" if name.startswith("dot")
                else "other (elementwise, copies, reductions, loop)")
        kinds[kind] += e["dur"] / 1e3
        counts[kind] += 1
    return {k: {"ms": v, "ops": counts[k]} for k, v in kinds.items()}


def main(argv=None):
    p = harness.parser("sac_fusions", __doc__, seeds=[0], quick={"hidden": 64, "updates": 20, "reps": 1},
                       seeds_help="seed of the initial SAC state and of the batch (the first one is used)")
    p.add_argument("--hidden", type=int, default=512, help="SAC width (mbrl-lib's mbpo_halfcheetah: 512)")
    p.add_argument("--updates", type=int, default=100, help="SAC updates per timed scan")
    p.add_argument("--reps", type=int, default=5, help="timed scans per variant (the best is kept), interleaved")
    p.add_argument("--core", type=int, default=0, help="the core to pin to (index into the allowed ones)")
    p.add_argument("--profile", action="store_true", help="trace the mbpo update and split its time by kind")
    a = harness.parse(p, argv)
    harness.pin_to_core(a.core)
    import jax
    import numpy as np

    cfg, state, batch = setup(a.hidden, a.seeds[0])
    from algos import mbpo

    flops = harness.xla_flops(jax.jit(mbpo.sac_update, static_argnums=0), (cfg, state, batch, jax.random.PRNGKey(0)))
    scans = {name: scan_of(fn or mbpo.sac_update, cfg, batch, a.updates) for name, fn in VARIANTS.items()}
    states = {name: two_head_state(cfg, a.seeds[0]) if name == "two_heads" else state for name in scans}
    finals = {name: jax.block_until_ready(f(states[name], jax.random.PRNGKey(1))) for name, f in scans.items()}
    times = {name: [] for name in scans}
    for _ in range(a.reps):  # interleaved, so that a change of load hits every variant alike
        for name, f in scans.items():
            times[name] += cpu_seconds(lambda f=f, name=name: f(states[name], jax.random.PRNGKey(2)), 1)
    rates = matmul_rates(a.hidden, max(a.reps, 2))
    ref = f"{BATCH}x{a.hidden}@{a.hidden}x{a.hidden}"
    base = jax.tree.leaves((finals["mbpo"].actor.params, finals["mbpo"].critic.params))
    rows = {}
    for name in scans:
        best = min(times[name])
        leaves = jax.tree.leaves((finals[name].actor.params, finals[name].critic.params))
        diff = None if name == "two_heads" else max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                                    for x, y in zip(leaves, base, strict=True))
        gflops = a.updates * flops / best / 1e9
        rows[name] = {"ms_per_update": 1e3 * best / a.updates, "gflop_per_cpu_second": gflops,
                      "fraction_of_matmul_rate": {k: gflops / v for k, v in rates.items()},
                      "speedup_vs_mbpo": min(times["mbpo"]) / best, "max_abs_param_diff_vs_mbpo": diff,
                      "cpu_seconds": times[name]}
        print(f"{name:14s} {rows[name]['ms_per_update']:7.2f} ms/update  {gflops:6.1f} GFLOP/CPU s  "
              f"{100 * gflops / rates[ref]:5.1f}% of {ref}  x{rows[name]['speedup_vs_mbpo']:.3f}  "
              f"max |param diff| {'-' if diff is None else f'{diff:.2e}'}")
    print("matmul rate, GFLOP per CPU s:", {k: round(v, 1) for k, v in rates.items()})
    record = {"setting": f"SAC 2x{a.hidden}, batch {BATCH}, obs {OBS_DIM}, act {ACT_DIM}, {a.updates} updates in "
                         "one lax.scan, one pinned core, best of the interleaved reps",
              "flops_per_update_xla": flops, "matmul_gflop_per_cpu_second": rates, "variants": rows,
              "load_average": os.getloadavg()}
    if a.profile:
        kinds = profile(scans["mbpo"], state, jax.random.PRNGKey(3))
        total = sum(v["ms"] for v in kinds.values())
        # Trace durations are wall time (inflated when the core is shared) and tracing adds a little to every
        # operation: the shares are the robust figure.
        record["mbpo_profile_per_update"] = {k: {"ms_traced": v["ms"] / a.updates, "share": v["ms"] / total,
                                                 "ops": v["ops"] / a.updates} for k, v in kinds.items()}
        for k, v in record["mbpo_profile_per_update"].items():
            print(f"  {k:48s} {100 * v['share']:5.1f}% of the traced time, {v['ops']:5.0f} ops per update")
    harness.save_results("sac_fusions", record)


if __name__ == "__main__":
    main()
