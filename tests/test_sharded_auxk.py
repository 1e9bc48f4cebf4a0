"""The sharded step's AuxK (hsae_jax.parallel.auxk): on a one-device mesh the sharded step is
the replicated step (loss, gradients, updated parameters) with no, one, ~10% and every
latent dead; its in-place AuxK gradients are those of autodiff through the objective and
exactly zero without dead latents; and its compiled program holds no [F, D] buffer or copy
the replicated step does not. Several devices: tests/test_parallel.py (tests/mesh_runs.py).
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hsae_jax import KernelSettings
from hsae_jax.auxk import auxk_loss, column_buckets
from hsae_jax.encoder.api import scores
from hsae_jax.model import (
    encode_arrays,
    init_arrays,
    sae_loss,
    scale_inputs,
)
from hsae_jax.parallel import make_layout, tree_specs
from hsae_jax.parallel.auxk import sharded_auxk_loss_and_add_grads
from hsae_jax.parallel.loss import sharded_sae_loss, sharded_sae_loss_and_grads
from hsae_jax.parallel.mesh import DATA
from hsae_jax.train import TrainConfig
from hsae_jax.train.auxk_buckets import METRIC_KEYS, AuxKBuckets, host_dead_bound
from hsae_jax.train.step import make_mesh, make_optimizer, make_replicated_step, make_train_step

F, D, K, AUX_K, B = 256, 16, 4, 8, 32
KERNELS = KernelSettings("xla")
# Buckets of F = 256 latents: 4, 8, ..., 256. One dead latent: bucket 4 (all of it among a
# token's top aux_k); 26 (~10%): bucket 32 (the top aux_k a mask); all: the blocks themselves.
DEAD = {
    "none": [],
    "one": [77],
    "10%": list(range(3, 256, 10)),
    "all": list(range(F)),
}


def config(**overrides) -> TrainConfig:
    return TrainConfig.from_flat(**{**dict(d_model=D, n_latents=F, k=K, aux_k=AUX_K,
                                           batch_size=B, steps=10, warmup_steps=1,
                                           dead_tokens=10_000, backend="xla"), **overrides})


def start(tc: TrainConfig, dead, seed: int = 0):
    """(params, stats, batches): trained-looking parameters (encoder rows not the
    decoder's, non-zero biases) and the latents ``dead`` dead."""
    rng = np.random.default_rng(seed)
    batches = [jnp.asarray(rng.normal(size=(B, D)) * 2 + 0.5, jnp.float32) for _ in range(2)]
    params, stats = init_arrays(tc.sae, jax.random.key(seed), batches[0])
    params = {**params,
              "W_enc": params["W_enc"] + 0.3 * jnp.asarray(rng.normal(size=(F, D)), jnp.float32),
              "b_enc": jnp.asarray(rng.normal(size=F) * 0.2, jnp.float32)}
    since = np.zeros(F, np.int32)
    since[list(dead)] = tc.sae.dead_tokens
    return params, {**stats, "tokens_since_fired": jnp.asarray(since)}, batches


def run_steps(tx, step, params, stats, batches, **static):
    """The steps on ``batches`` from (params, stats); metrics without the host's AuxK
    reports (the replicated step has none)."""
    state = jax.tree.map(jnp.copy, (params, stats, tx.init(params)))
    metrics = []
    for x in batches:
        *state, m = step(*state, x, **static)
        metrics.append({k: v for k, v in m.items() if k not in METRIC_KEYS})
    return state, metrics


@functools.cache
def both_steps(auxk_max_fraction: float = 1.0):
    """(config, (optimizer, step) replicated, (optimizer, step) sharded on mesh (1, 1)),
    compiled once for every dead set (the counters are data)."""
    tc = config(auxk_max_fraction=auxk_max_fraction)
    layout = make_layout("data=1,model=1", 1)
    tx, sharded_tx = make_optimizer(tc), make_optimizer(tc, layout)
    return tc, (tx, make_replicated_step(tc.sae, tx, make_mesh(1), KERNELS)), (
        sharded_tx, make_train_step(tc.sae, sharded_tx, layout, KERNELS))


@pytest.mark.parametrize("case", list(DEAD))
def test_the_one_device_sharded_step_is_the_replicated_step(case):
    """Two steps from the same state: parameters, counters, Adam moments and every metric
    equal at float32 rounding; AuxK ran exactly when latents were dead."""
    tc, replicated, sharded = both_steps()
    params, stats, batches = start(tc, DEAD[case])
    ref, ref_metrics = run_steps(*replicated, params, stats, batches)
    got, got_metrics = run_steps(*sharded, params, stats, batches)
    chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(got_metrics, ref_metrics, rtol=1e-6, atol=1e-7)
    assert (float(got_metrics[0]["auxk_loss"]) > 0) == bool(DEAD[case])
    assert not np.asarray(got_metrics[-1]["skipped_steps"])


def test_a_capped_auxk_takes_the_same_latents_in_both_steps():
    """auxk_max_fraction = 1/4 with 100 of 256 latents dead (more than the largest bucket,
    64): both steps use the lowest-numbered 64 dead latents."""
    tc, replicated, sharded = both_steps(0.25)
    params, stats, batches = start(tc, range(1, 201, 2), seed=3)
    ref, ref_metrics = run_steps(*replicated, params, stats, batches)
    got, got_metrics = run_steps(*sharded, params, stats, batches)
    assert float(got_metrics[0]["auxk_loss"]) > 0
    chex.assert_trees_all_close((got, got_metrics), (ref, ref_metrics), rtol=1e-6, atol=1e-7)


# ------------------------------------------------- AuxK's bucket chosen on the host


def one_step_reports(step, params, stats, x, bucket):
    """(state, metrics) of one step with the static ``bucket``, reports kept."""
    tx = both_steps()[2][0]
    state = jax.tree.map(jnp.copy, (params, stats, tx.init(params)))
    *state, m = step(*state, x, auxk_bucket=bucket)
    return state, m


def test_a_bucket_chosen_on_the_host_is_the_step_of_the_one_found_on_the_device():
    """26 dead latents (bucket 32 of 4, 8, ..., 256): the step given bucket 32 or any larger
    one (extra columns are padding) ends where the step that finds its bucket does, and
    says its bucket held the dead latents; bucket 16 says it did not."""
    tc, _, (tx, step) = both_steps()
    params, stats, batches = start(tc, DEAD["10%"])
    ref, ref_metrics = run_steps(tx, step, params, stats, batches[:1])
    buckets = column_buckets(F)
    assert buckets[3] == 32
    for which in range(4, len(buckets) + 1):
        got, m = one_step_reports(step, params, stats, batches[0], which)
        assert bool(m["auxk_fits"]), which
        m = {k: v for k, v in m.items() if k not in METRIC_KEYS}
        chex.assert_trees_all_close((got, [m]), (ref, ref_metrics), rtol=1e-6, atol=1e-7)
    _, short = one_step_reports(step, params, stats, batches[0], 3)
    assert not bool(short["auxk_fits"])


def test_bucket_0_with_no_dead_latent_is_the_step_bit_for_bit():
    tc, _, (tx, step) = both_steps()
    params, stats, batches = start(tc, [])
    ref, ref_metrics = run_steps(tx, step, params, stats, batches)
    got, metrics = run_steps(tx, step, params, stats, batches, auxk_bucket=0)
    chex.assert_trees_all_equal((got, metrics), (ref, ref_metrics))


def test_the_step_bounds_the_dead_count_two_steps_on():
    """auxk_bound after step t is the host's count of counters one batch from dead_tokens,
    and holds every latent dead at step t + 2 (firing only revives)."""
    tc = config(dead_tokens=3 * B)  # a latent dies after 3 batches without firing
    layout = make_layout("data=1,model=1", 1)
    tx = make_optimizer(tc, layout)
    step = make_train_step(tc.sae, tx, layout, KERNELS)
    params, stats, _ = start(tc, DEAD["10%"])
    rng = np.random.default_rng(5)
    since = np.asarray(stats["tokens_since_fired"]).copy()
    since[100:180] = rng.integers(0, 3 * B, size=80)  # some latents close to dying
    state = jax.tree.map(jnp.copy, (params, {**stats, "tokens_since_fired": jnp.asarray(since)},
                                    tx.init(params)))
    reported = []
    for i in range(4):
        x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
        before = np.asarray(state[1]["tokens_since_fired"])
        *state, m = step(*state, x)
        after = np.asarray(state[1]["tokens_since_fired"])
        reported.append(int(m["auxk_bound"]))
        axes = layout.axes
        assert reported[-1] == host_dead_bound(tc.sae.dead_tokens, axes, after, B, 1)
        assert reported[-1] >= int(np.sum(after >= tc.sae.dead_tokens))
        if i >= 2:  # the bound step i - 2 reported holds step i's dead latents
            assert reported[i - 2] >= int(np.sum(before >= tc.sae.dead_tokens)), i
        assert bool(m["auxk_fits"])


def test_the_trainers_buckets_follow_the_dead_count_and_refuse_a_short_one():
    """AuxKBuckets: the first two steps from the counters (exact, then one batch ahead),
    then each step's from the bound two steps back; a report of a short bucket raises."""
    tc = config(dead_tokens=100)
    axes = make_layout("data=1,model=1", 1).axes
    since = np.zeros(F, np.int32)
    since[:3] = 100  # 3 dead now
    since[3:40] = 70  # 37 more dead after one more batch of 32
    planner = AuxKBuckets(tc.sae, axes, B, since, start=7)
    assert planner.bucket(7) == 1  # bucket 4 holds 3
    assert planner.bucket(8) == 5  # bucket 64 holds 40
    planner.record(7, {"auxk_bound": jnp.int32(9), "auxk_fits": jnp.bool_(True), "loss": 1})
    planner.record(8, {"auxk_bound": jnp.int32(0), "auxk_fits": jnp.bool_(True)})
    assert planner.bucket(9) == 3 and planner.bucket(10) == 0
    planner.record(9, {"auxk_bound": jnp.int32(1), "auxk_fits": jnp.bool_(False)})
    with pytest.raises(RuntimeError, match="smaller than its dead latents"):
        planner.bucket(11)
    resumed = AuxKBuckets(tc.sae, axes, B, since, start=7, saved_bound=200)
    assert resumed.bucket(7) == len(column_buckets(F))  # the saved bound, larger, counts
    off = AuxKBuckets(config(auxk_coef=0.0).sae, axes, B, since, start=0)
    assert off.bucket(0) == 0 and off.bucket(5) == 0


def test_a_step_with_a_host_bucket_holds_no_conditional():
    """The step the trainer runs (a static bucket) has no AuxK ``conditional`` (each one is
    a round trip to the host on a GPU); the one that finds its bucket has one per bucket.
    (On the CPU optax's non-finite skip compiles to one more, outside AuxK.)"""
    tc = config(n_latents=4096, d_model=48, batch_size=64, k=8, aux_k=None)
    layout = make_layout("data=1,model=1", 1)
    params, stats = init_arrays(tc.sae, jax.random.key(0))
    x = jnp.zeros((tc.batch_size, tc.sae.d_model), jnp.float32)
    tx = make_optimizer(tc, layout)
    step = make_train_step(tc.sae, tx, layout, tc.kernels())
    state = (params, stats, tx.init(params), x)
    conds = re.compile(r"\bconditional\(.*op_name=\"[^\"]*/auxk/")
    found = step.lower(*state).compile().as_text()
    assert len(conds.findall(found)) == len(column_buckets(4096)) == 7
    for which in (0, 3, 7):
        assert not conds.findall(step.lower(*state, auxk_bucket=which).compile().as_text())


def one_device(fn, in_specs, out_specs):
    """``fn`` jitted under ``shard_map`` on the one-device (data, model) mesh, as the step
    runs its per-device code."""
    layout = make_layout("data=1,model=1", 1)
    return jax.jit(jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs,
                                 out_specs=out_specs, check_vma=False))


@functools.cache
def objective_gradients():
    """On mesh (1, 1): (the step's loss, AuxK loss and gradients; the same by autodiff of
    the whole objective; the gradients by autodiff without AuxK)."""
    cfg = config().sae
    axes = make_layout("data=1,model=1", 1).axes
    loss_fn = functools.partial(sharded_sae_loss, cfg, axes, kernels=KERNELS)

    def both(params, stats, x):
        (loss, aux), grads = sharded_sae_loss_and_grads(cfg, axes, params, stats, x, KERNELS)
        (spec_loss, spec_aux), spec = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, x)
        _, bare = jax.value_and_grad(functools.partial(loss_fn, with_auxk=False),
                                     has_aux=True)(params, stats, x)
        return (loss, aux["auxk_loss"], grads), (spec_loss, spec_aux["auxk_loss"], spec), bare

    params, stats = init_arrays(cfg, jax.random.key(0))
    return one_device(both, (tree_specs(params), tree_specs(stats), P(DATA)), P())


@functools.cache
def model_gradients():
    return jax.jit(jax.value_and_grad(functools.partial(sae_loss, config().sae,
                                                        kernels=KERNELS), has_aux=True))


@pytest.mark.parametrize("case", list(DEAD))
def test_in_place_auxk_gradients_are_those_of_the_objective(case):
    """:func:`sharded_sae_loss_and_grads` (autodiff without AuxK, then AuxK added to the dead
    rows) against autodiff of the whole objective :func:`sharded_sae_loss` and of the
    model's own objective :func:`hsae_jax.model.sae_loss`; without dead latents the
    gradients are bit-identical to those of the objective without AuxK."""
    tc = config()
    params, stats, (x, _) = start(tc, DEAD[case], seed=1)
    with jax.default_matmul_precision("highest"):
        got, spec, bare = objective_gradients()(params, stats, x)
        (model_loss, model_aux), model_grads = model_gradients()(params, stats, x)
    chex.assert_trees_all_close(got, spec, rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(got, (model_loss, model_aux["auxk_loss"], model_grads),
                                rtol=2e-5, atol=1e-6)
    assert (float(got[1]) > 0) == bool(DEAD[case])
    if not DEAD[case]:
        assert float(got[1]) == 0.0
        chex.assert_trees_all_equal(got[2], bare)


@functools.cache
def auxk_added(given_scores: bool):
    """On mesh (1, 1): (params, dead, xs, vals, indices, grads) -> (AuxK loss, grads with
    AuxK's gradient added in place); ``given_scores``: with the encoder's pre-activations
    handed over (as the step does), else AuxK computes its columns itself."""
    cfg = config().sae
    axes = make_layout("data=1,model=1", 1).axes

    def added(params, dead, xs, vals, indices, grads):
        pre = (scores(xs - params["b_dec"], params["W_enc"], params["b_enc"]) if given_scores
               else None)
        return sharded_auxk_loss_and_add_grads(cfg, axes, params, xs, vals, indices, dead,
                                               grads, KERNELS, scores=pre)

    params, _ = init_arrays(cfg, jax.random.key(0))
    dead = jnp.zeros((cfg.n_latents,), bool)
    return one_device(added, (tree_specs(params), tree_specs(dead), P(DATA), P(DATA),
                              P(DATA), tree_specs(params)), (P(), tree_specs(params)))


@functools.cache
def auxk_reference():
    """The one-device AuxK's value and gradient (:func:`hsae_jax.auxk.auxk_loss`)."""
    cfg = config().sae
    return jax.jit(jax.value_and_grad(
        lambda p, xs, vals, indices, dead: auxk_loss(cfg, p, xs, vals, indices, dead,
                                                     KERNELS)))


@pytest.mark.parametrize("given_scores", [True, False], ids=["given-scores", "own-columns"])
@pytest.mark.parametrize("case", list(DEAD))
def test_auxk_adds_to_the_dead_rows_only(case, given_scores):
    """:func:`sharded_auxk_loss_and_add_grads` on given gradients: the live latents' rows
    come back bit-identical, the dead ones and b_dec get ``auxk_coef`` times the gradient of
    the one-device :func:`hsae_jax.auxk.auxk_loss`; nothing at all changes without dead
    latents. The same whether AuxK reads its dead columns from the encoder's
    pre-activations or computes them."""
    tc = config()
    cfg = tc.sae
    params, stats, (x, _) = start(tc, DEAD[case], seed=2)
    dead = stats["tokens_since_fired"] >= cfg.dead_tokens
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(cfg, params, stats, x, kernels=KERNELS)
    rng = np.random.default_rng(5)
    grads = {n: jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32) for n, p in params.items()}
    with jax.default_matmul_precision("highest"):
        value, out = auxk_added(given_scores)(params, dead, xs, vals, indices, grads)
        ref, ref_grads = auxk_reference()(params, xs, vals, indices, dead)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    expected = jax.tree.map(lambda g, r: g + cfg.auxk_coef * r, grads, ref_grads)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    live = np.setdiff1d(np.arange(F), DEAD[case])
    for name in ("W_enc", "b_enc", "W_dec"):
        np.testing.assert_array_equal(np.asarray(out[name])[live], np.asarray(grads[name])[live])
    if not DEAD[case]:
        assert float(value) == 0.0
        chex.assert_trees_all_equal(out, grads)
    else:
        rows = DEAD[case]
        assert float(value) > 0
        assert np.any(np.asarray(out["W_enc"])[rows] != np.asarray(grads["W_enc"])[rows])


# ----------------------------------------------------------------------- the compiled step


def compiled(tc, sharded: bool):
    """(compiled HLO text, temporary bytes) of the one-device step (sharded or replicated),
    with latents dead so that every AuxK bucket is compiled in."""
    layout = make_layout("data=1,model=1", 1)
    tx = make_optimizer(tc, layout if sharded else None)
    step = (make_train_step(tc.sae, tx, layout, KERNELS) if sharded else
            make_replicated_step(tc.sae, tx, make_mesh(1), KERNELS))
    params, stats = init_arrays(tc.sae, jax.random.key(0))
    x = jnp.zeros((tc.batch_size, tc.sae.d_model), jnp.float32)
    program = step.lower(params, stats, tx.init(params), x).compile()
    return program.as_text(), program.memory_analysis().temp_size_in_bytes


def test_the_compiled_sharded_step_holds_nothing_more_than_the_replicated_one():
    """F = 4096, D = 64: the one-device sharded step's temporaries are no larger than the
    replicated step's, and XLA copies no more [F, D] arrays in it (the backward of AuxK's
    switch used to save every bucket's residuals and write zero [F, D] gradients even
    without dead latents)."""
    tc = config(n_latents=4096, d_model=64, batch_size=64, k=8, aux_k=None)
    big = re.compile(r"= f32\[4096,64\]\{1,0\} copy\(")
    (sharded_hlo, sharded_temp), (replicated_hlo, replicated_temp) = (
        compiled(tc, True), compiled(tc, False))
    assert sharded_temp <= replicated_temp, (sharded_temp, replicated_temp)
    copies = [len(big.findall(hlo)) for hlo in (sharded_hlo, replicated_hlo)]
    assert copies[0] <= copies[1], copies


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "replicated"])
def test_auxk_adds_no_copy_of_an_f_by_d_array_to_either_step(sharded):
    """AuxK's buckets are one ``lax.cond`` each: through one ``lax.switch`` whose branches
    scatter into the gradients, XLA copied both [F, D] gradients in every branch (the
    no-dead one included); with AuxK on, the compiled step copies no more [F, D] arrays than
    with AuxK off."""
    big = re.compile(r"= f32\[4096,64\]\{1,0\} copy\(")
    counts = []
    for coef in (1 / 32, 0.0):
        tc = config(n_latents=4096, d_model=64, batch_size=64, k=8, aux_k=None,
                    auxk_coef=coef)
        counts.append(len(big.findall(compiled(tc, sharded)[0])))
    assert counts[0] <= counts[1], counts


@pytest.mark.parametrize("settings, per_bucket", [
    ({}, 1), ({"encoder_rows": 32}, 2), ({"auxk_max_fraction": 0.25}, 2)],
    ids=["scores-kept", "encoder-rows", "auxk-capped"])
def test_auxk_reads_the_dead_columns_from_the_encoder_pre_activations(settings, per_bucket):
    """The step hands the encoder's [B, F] pre-activations to AuxK, which gathers its dead
    columns from them: each bucket's only [B, n] product is the activations' gradient.
    With ``--encoder-rows`` (the pre-activations never whole) or ``--auxk-max-fraction``
    below 1 (AuxK's buffers kept small, so the [B, F] scores are not kept alive either)
    AuxK computes its columns, a second [B, n] product per bucket."""
    tc = config(n_latents=4096, d_model=48, batch_size=64, k=8, aux_k=None,  # D: no bucket
                **settings)
    layout = make_layout("data=1,model=1", 1)
    params, stats = init_arrays(tc.sae, jax.random.key(0))
    x = jnp.zeros((tc.batch_size, tc.sae.d_model), jnp.float32)
    buckets = [n for n in column_buckets(tc.sae.n_latents, tc.sae.auxk_max_fraction)
               if n < tc.sae.n_latents]
    tx = make_optimizer(tc, layout)
    step = make_train_step(tc.sae, tx, layout, tc.kernels())
    hlo = step.lower(params, stats, tx.init(params), x).compile().as_text()
    products = re.findall(r"= f32\[64,(\d+)\]\{1,0\} dot\(", hlo)
    assert [products.count(str(n)) for n in buckets] == [per_bucket] * len(buckets), products
