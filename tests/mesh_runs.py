"""Runs of the sharded step on CPU meshes, for tests/test_parallel.py.

Run as ``python tests/mesh_runs.py checks BACKEND OUT.npz steps,topk,memory`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: each check saves what it computed
(and the single-device reference) for the test to compare. ``reshard WORK`` and
``train RUN SETTINGS_JSON`` are the resharding and several-process runs.

- ``steps``: a few training steps from one state with dead latents spread unevenly over
  the latents (AuxK runs, in several column buckets) on meshes (1,1), (8,1), (2,4), (1,8),
  beside the replicated one-device step of earlier versions, AuxK's bucket picked on the
  host as the trainer does (and, with xla, found on the device on mesh (2,4));
- ``topk``: the merged top-K of the sharded encoder on pre-activations full of exact ties,
  beside ``topk_encode`` on the whole matrix;
- ``memory``: per-device sizes (``memory_analysis``) of the compiled step on model = 1..8;
- ``auxk``: the sharded AuxK (its value and in-place gradients, and autodiff of its value)
  on meshes (1,1), (2,1), (1,2), (2,2), (1,4), (2,4), (1,8) for several dead sets, beside
  the one-device definition (``auxk_loss_reference``);
- ``mask``: ``merge_top_k_mask`` on values full of exact ties (and -inf), beside
  ``top_k_mask`` on the whole matrix.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax.model import init_arrays
from hsae_jax.train import TrainConfig
from hsae_jax.train.auxk_buckets import METRIC_KEYS, AuxKBuckets
from hsae_jax.train.step import (
    make_mesh,
    make_optimizer,
    make_replicated_step,
    make_train_step,
)

MESHES = ("data=1,model=1", "data=8,model=1", "data=2,model=4", "data=1,model=8")
DYNAMIC_MESH = "data=2,model=4"
DEAD = (1, 2, 3, 9, 17, 40, 41, 42, 43, 44, 45, 46)  # uneven over blocks of 8 and of 16


def tiny(backend: str) -> TrainConfig:
    return TrainConfig.from_flat(d_model=16, n_latents=64, k=4, aux_k=6, batch_size=16,
                                 steps=10, warmup_steps=2, dead_tokens=48, clip_norm=0.3,
                                 backend=backend)


def _start(tc: TrainConfig, batches):
    params, stats = init_arrays(tc.sae, jax.random.key(0), batches[0])
    since = np.zeros(tc.sae.n_latents, np.int32)
    since[list(DEAD)] = 1000
    return params, {**stats, "tokens_since_fired": jnp.asarray(since)}


def _run(step, tx, start, batches, place, put, buckets=None):
    """Steps from ``start``; ``buckets``: an AuxKBuckets that picks each step's static AuxK
    bucket as the trainer does (None: the step without one, as the replicated step)."""
    params, stats = place(jax.tree.map(jnp.copy, start))
    opt_state = place(tx.init(params))
    metrics = []
    for i, x in enumerate(batches):
        bucket = {} if buckets is None else {"auxk_bucket": buckets.bucket(i)}
        params, stats, opt_state, m = step(params, stats, opt_state, put(x), **bucket)
        m = m if buckets is None else buckets.record(i, m)
        metrics.append({k: np.asarray(v) for k, v in m.items() if k not in METRIC_KEYS})
    if buckets is not None:
        buckets.check()  # every step's bucket held its dead latents
    return params, stats, metrics


def _flatten(prefix, params, stats, metrics) -> dict:
    out = {f"{prefix}/{k}": np.asarray(v) for k, v in {**params, **stats}.items()}
    for key in metrics[0]:
        out[f"{prefix}/metric/{key}"] = np.asarray([m[key] for m in metrics])
    return out


def check_steps(backend: str, steps: int = 3) -> dict:
    from hsae_jax.parallel import make_layout

    tc = tiny(backend)
    kernels = tc.kernels()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(tc.batch_size, tc.sae.d_model)).astype(np.float32)
               for _ in range(steps)]
    start = _start(tc, batches)
    tx = make_optimizer(tc)
    ref = _run(make_replicated_step(tc.sae, tx, make_mesh(1), kernels), tx, start, batches,
               lambda t: t, jnp.asarray)
    out = _flatten("reference", *ref)
    runs = [(shape, True) for shape in MESHES]  # AuxK's buckets picked as the trainer does
    if backend == "xla":  # and the bucket found on the device (seven conds), on one mesh
        runs.append((DYNAMIC_MESH, False))
    for shape, host_buckets in runs:
        layout = make_layout(shape)
        tx = make_optimizer(tc, layout)
        buckets = AuxKBuckets(tc.sae, layout.axes, tc.batch_size,
                              start[1]["tokens_since_fired"], 0) if host_buckets else None
        got = _run(make_train_step(tc.sae, tx, layout, kernels), tx, start, batches,
                   layout.place, lambda x, layout=layout: layout.put_batch(x, tc.batch_size),
                   buckets)
        out.update(_flatten(shape if host_buckets else f"dynamic:{shape}", *got))
    return out


def check_topk(backend: str) -> dict:
    """Integer-valued inputs and repeated encoder rows: most pre-activations tie, within
    and across the blocks of latents."""
    from jax.sharding import PartitionSpec as P

    from hsae_jax.encoder import SparseEncoderConfig, topk_encode
    from hsae_jax.encoder.api import make_encoder
    from hsae_jax.parallel import make_layout
    from hsae_jax.parallel.encoder import sharded_topk_encode
    from hsae_jax.parallel.mesh import DATA, MODEL

    rng = np.random.default_rng(1)
    b, f, d, k = 16, 64, 8, 12
    x = rng.integers(-2, 3, size=(b, d)).astype(np.float32)
    w = rng.integers(-1, 2, size=(5, d)).astype(np.float32)[rng.integers(0, 5, size=f)]
    b_enc = rng.integers(-1, 2, size=f).astype(np.float32)
    b_dec = np.zeros(d, np.float32)
    vals, idx = topk_encode(x, w, b_enc, b_dec, k, backend=backend)
    pre = x @ w.T + b_enc
    out = {"pre": pre, "reference/vals": np.asarray(vals), "reference/indices": np.asarray(idx)}
    for shape in ("data=1,model=8", "data=2,model=4", "data=4,model=2", "rows=5"):
        rows = 5 if shape == "rows=5" else None  # 16 rows in blocks of 5, on (1, 8)
        enc = make_encoder(k, backend=backend, config=SparseEncoderConfig(forward_rows=rows))
        layout = make_layout("data=1,model=8" if rows else shape)

        def local(x, w, b_enc, b_dec, layout=layout, enc=enc):
            return sharded_topk_encode(enc, layout.axes, x, w, b_enc, b_dec)

        fn = jax.jit(jax.shard_map(local, mesh=layout.mesh,
                                   in_specs=(P(DATA), P(MODEL), P(MODEL), P()),
                                   out_specs=(P(DATA), P(DATA)), check_vma=False))
        vals, idx = fn(x, w, b_enc, b_dec)
        out[f"{shape}/vals"], out[f"{shape}/indices"] = np.asarray(vals), np.asarray(idx)
    return out


AUXK_MESHES = ("data=1,model=1", "data=2,model=1", "data=1,model=2", "data=2,model=2",
               "data=1,model=4", "data=2,model=4", "data=1,model=8")
# F = 64 latents, aux_k = 6: every path of the sharded AuxK on these meshes (the column
# buckets of a device, its own top aux_k or all its columns, the merge over model)
AUXK_DEAD = {
    "none": [],
    "one": [17],
    "10%": [3, 9, 12, 30, 41, 50, 63],  # more than aux_k, spread over the blocks
    "all": list(range(64)),
    "one block": list(range(40, 48)),  # all on one device of 8 (or of 4, 2)
    "two per block": [b + i for b in range(0, 64, 8) for i in (0, 1)],  # n <= aux_k < m n
}
AUXK_CAPPED = [1, 2, 3, 5, 8, 13, 21, 22, 23, 24, 25, 26, 27, 34, 55, 56, 57, 58, 59, 60]


def _capped(dead, n_latents: int, model: int, fraction: float):
    """The dead latents AuxK takes with ``auxk_max_fraction`` on ``model`` blocks: each
    block's lowest-numbered ones, as many as its largest column bucket."""
    from hsae_jax.auxk import column_buckets
    from hsae_jax.parallel.auxk import bucket_divisors
    from hsae_jax.parallel.mesh import Axes

    block = n_latents // model
    cap = column_buckets(block, fraction, bucket_divisors(Axes(1, model)))[-1]
    return [f for j in range(model) for f in sorted(x for x in dead if x // block == j)[:cap]]


def check_auxk(backend: str) -> dict:
    """Per mesh and dead set: AuxK's value and ``grads`` plus its gradient (in place,
    ``sharded_auxk_loss_and_add_grads``), and the value and gradient of autodiff through
    ``sharded_auxk_loss``, all averaged over ``data``; and the one-device definition."""
    import dataclasses

    from jax.sharding import PartitionSpec as P

    from hsae_jax import KernelSettings, SAEConfig
    from hsae_jax.auxk import auxk_loss_reference
    from hsae_jax.model import encode_arrays, scale_inputs
    from hsae_jax.parallel import PARAM_SPECS, make_layout
    from hsae_jax.parallel.auxk import sharded_auxk_loss, sharded_auxk_loss_and_add_grads
    from hsae_jax.parallel.collectives import grad_psum
    from hsae_jax.parallel.mesh import DATA, MODEL

    kernels = KernelSettings(backend)
    base = SAEConfig(d_model=16, n_latents=64, k=4, aux_k=6)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 16)) * 2 + 0.5, jnp.float32)
    params, stats = init_arrays(base, jax.random.key(2), x)
    params = {**params,
              "W_enc": params["W_enc"] + 0.3 * jnp.asarray(rng.normal(size=(64, 16)), jnp.float32),
              "b_enc": jnp.asarray(rng.normal(size=64) * 0.2, jnp.float32)}
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(base, params, stats, x, kernels=KernelSettings(backend))
    grads = {n: jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32) for n, p in params.items()}
    out = {f"grads/{n}": np.asarray(g) for n, g in grads.items()}

    def mask(dead):
        return jnp.zeros((64,), bool).at[jnp.asarray(dead, jnp.int32)].set(True)

    def reference(cfg, dead, key):
        with jax.default_matmul_precision("highest"):
            value, ref = jax.value_and_grad(lambda p: auxk_loss_reference(
                cfg, p, xs, vals, indices, mask(dead), KernelSettings("xla")))(params)
        out[f"{key}/value"] = np.asarray(value)
        out.update({f"{key}/{n}": np.asarray(g) for n, g in ref.items()})

    cases = [(base, name, dead) for name, dead in AUXK_DEAD.items()]
    capped = dataclasses.replace(base, auxk_max_fraction=0.25)
    cases.append((capped, "capped", AUXK_CAPPED))
    for name, dead in AUXK_DEAD.items():
        reference(base, dead, f"reference/{name}")
    for shape in AUXK_MESHES:
        layout = make_layout(shape)
        axes = layout.axes
        for cfg in (base, capped):
            def local(params, dead, xs, vals, indices, grads, cfg=cfg, axes=axes):
                value, added = sharded_auxk_loss_and_add_grads(cfg, axes, params, xs, vals,
                                                               indices, dead, grads, kernels)
                spec_value, spec = jax.value_and_grad(lambda p: sharded_auxk_loss(
                    cfg, axes, p, grad_psum(p["b_dec"], axes.model), xs, vals, indices, dead,
                    kernels))(params)
                return axes.pmean_data((value, added, spec_value, spec))

            fn = jax.jit(jax.shard_map(
                local, mesh=layout.mesh, check_vma=False,
                in_specs=(PARAM_SPECS, P(MODEL), P(DATA), P(DATA), P(DATA), PARAM_SPECS),
                out_specs=(P(), PARAM_SPECS, P(), PARAM_SPECS)))
            for case_cfg, name, dead in cases:
                if case_cfg is not cfg:
                    continue
                if cfg is capped:  # each block's lowest-numbered dead latents
                    reference(base, _capped(dead, 64, axes.model, 0.25),
                              f"reference/{shape}/{name}")
                with jax.default_matmul_precision("highest"):
                    value, added, spec_value, spec = fn(params, mask(dead), xs, vals, indices,
                                                        grads)
                out[f"{shape}/{name}/value"] = np.asarray(value)
                out[f"{shape}/{name}/spec_value"] = np.asarray(spec_value)
                out.update({f"{shape}/{name}/added/{n}": np.asarray(g) for n, g in added.items()})
                out.update({f"{shape}/{name}/spec/{n}": np.asarray(g) for n, g in spec.items()})
    return out


def check_mask(backend: str) -> dict:
    """``merge_top_k_mask`` with k = 5 and 12 over 64 columns split over 8, 4 and 2 devices
    (a device's own top k compacted, or all its columns when it holds k or fewer), on
    integer values (most of them tie, within and across devices) and some -inf."""
    from jax.sharding import PartitionSpec as P

    from hsae_jax.parallel import make_layout
    from hsae_jax.parallel.collectives import merge_top_k_mask
    from hsae_jax.parallel.mesh import DATA, MODEL
    from hsae_jax.topk import top_k_mask

    rng = np.random.default_rng(3)
    values = rng.integers(-2, 3, size=(16, 64)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = -np.inf
    out = {"values": values}
    for k in (5, 12):
        out[f"reference/{k}"] = np.asarray(top_k_mask(jnp.asarray(values), k, backend=backend))
        for shape in ("data=1,model=8", "data=2,model=4", "data=4,model=2"):
            layout = make_layout(shape)
            fn = jax.jit(jax.shard_map(
                lambda v, k=k, m=layout.axes.model: merge_top_k_mask(v, k, m, backend=backend),
                mesh=layout.mesh, in_specs=P(DATA, MODEL), out_specs=P(DATA, MODEL),
                check_vma=False))
            out[f"{shape}/{k}"] = np.asarray(fn(values))
    return out


def check_memory(backend: str) -> dict:
    """Compiled (not run) at F = 8192, D = 256: each [F, D] float32 matrix is 8 MiB."""
    from hsae_jax.parallel import make_layout
    from hsae_jax.parallel.state import abstract_state

    tc = TrainConfig.from_flat(d_model=256, n_latents=8192, k=16, batch_size=64,
                               backend=backend)
    out = {}
    for m in (1, 2, 8):
        layout = make_layout(f"data=1,model={m}")
        tx = make_optimizer(tc, layout)
        state = abstract_state(layout, tc.sae, tx)
        x = jax.ShapeDtypeStruct((tc.batch_size, tc.sae.d_model), jnp.float32,
                                 sharding=layout.batch_sharding)
        step = make_train_step(tc.sae, tx, layout, tc.kernels())
        compiled = step.lower(state["params"], state["stats"], state["opt_state"], x).compile()
        memory = compiled.memory_analysis()
        out[f"{m}/argument"] = memory.argument_size_in_bytes
        out[f"{m}/temp"] = memory.temp_size_in_bytes
        out[f"{m}/output"] = memory.output_size_in_bytes
        if m == 1:
            out["hlo_one_device"] = np.asarray(compiled.as_text())
    return out


def reshard(work: str) -> None:
    """A run on (2, 4) with checkpoints at steps 3 and 6; copies of it cut back to step 3
    and resumed on (1, 1) and on (8, 1) (``train(resume=True)``), and beside them the
    state of step 3 restored on each mesh and stepped to 6 by hand (the uninterrupted run
    on the new mesh from that checkpoint). Saves what the test compares."""
    import os
    import shutil

    from hsae_jax.parallel import make_layout
    from hsae_jax.parallel.state import abstract_state
    from hsae_jax.train import train
    from hsae_jax.train.checkpoint import Checkpointer

    settings = dict(d_model=16, n_latents=64, k=4, batch_size=32, steps=6, save_every=3,
                    eval_every=6, log_every=3, eval_batches=1, warmup_steps=2,
                    dead_tokens=64, synthetic_features=32, synthetic_active=6.0)
    quiet = dict(progress=False, log=lambda *_: None)
    saved = os.path.join(work, "saved")
    train(TrainConfig.from_flat(**settings, mesh="data=2,model=4"), saved, **quiet)
    out = {}
    for shape in ("data=2,model=4", "data=1,model=1", "data=8,model=1"):
        tc = TrainConfig.from_flat(**settings, mesh=shape)
        layout = make_layout(shape)
        tx = make_optimizer(tc, layout)
        ckpt = Checkpointer(saved)
        state, meta = ckpt.restore(abstract_state(layout, tc.sae, tx), step=3)
        ckpt.close()
        out.update({f"{shape}/restored/{k}": np.asarray(v)
                    for k, v in {**state["params"], **state["stats"]}.items()})
        if shape == "data=2,model=4":
            continue
        step = make_train_step(tc.sae, tx, layout, tc.kernels())  # the step train() takes
        source = tc.open_source()
        params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
        buckets = AuxKBuckets(tc.sae, layout.axes, tc.batch_size,
                              np.asarray(stats["tokens_since_fired"]), 3, meta["auxk_bound"])
        for i in range(3, 6):
            x = layout.put_batch(np.asarray(source.batch(i)), tc.batch_size)
            params, stats, opt_state, m = step(params, stats, opt_state, x,
                                               auxk_bucket=buckets.bucket(i))
            buckets.record(i, m)
        out.update({f"{shape}/stepped/{k}": np.asarray(v) for k, v in params.items()})
        resumed = os.path.join(work, shape.replace(",", "_").replace("=", ""))
        shutil.copytree(saved, resumed)
        shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
        train(tc, resumed, resume=True, **quiet)
        ckpt = Checkpointer(resumed)
        state, _ = ckpt.restore(abstract_state(layout, tc.sae, tx), step=6)
        ckpt.close()
        out.update({f"{shape}/resumed/{k}": np.asarray(v) for k, v in state["params"].items()})
    np.savez(os.path.join(work, "reshard.npz"), **out)


if __name__ == "__main__":
    import json

    command = sys.argv[1]
    if command in ("train", "train-interrupted"):  # one process of several, or the only one
        from hsae_jax.train import train

        settings = TrainConfig.from_flat(**json.loads(sys.argv[3]))
        if command == "train-interrupted" and settings.process_id:  # Ctrl-C opening the data

            def interrupted(self):
                raise KeyboardInterrupt

            TrainConfig.open_source = interrupted
        train(settings, sys.argv[2], progress=False)
        sys.exit(0)
    if command == "resume":  # the same, continuing a run (argv[3]: the changed settings)
        from hsae_jax.train import resume

        resume(sys.argv[2], progress=False, **json.loads(sys.argv[3]))
        sys.exit(0)
    assert jax.device_count() == 8, jax.devices()
    if command == "reshard":
        reshard(sys.argv[2])
        sys.exit(0)
    backend, path = sys.argv[2:4]
    checks = {"steps": check_steps, "topk": check_topk, "memory": check_memory,
              "auxk": check_auxk, "mask": check_mask}
    result = {}
    for name in sys.argv[4].split(","):
        kwargs = {"steps": 2} if name == "steps" and backend == "interpret" else {}  # slow
        result.update({f"{name}/{k}": v for k, v in checks[name](backend, **kwargs).items()})
    np.savez(path, **result)
