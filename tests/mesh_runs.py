"""Runs of the sharded step on CPU meshes, for tests/test_parallel.py.

Run as ``python tests/mesh_runs.py checks BACKEND OUT.npz steps,topk,memory`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: each check saves what it computed
(and the single-device reference) for the test to compare. ``reshard WORK`` and
``train RUN SETTINGS_JSON`` are the resharding and several-process runs.

- ``steps``: a few training steps from one state with dead latents spread unevenly over
  the latents (AuxK runs, in several column buckets) on meshes (1,1), (8,1), (2,4), (1,8),
  beside the replicated one-device step of earlier versions;
- ``topk``: the merged top-K of the sharded encoder on pre-activations full of exact ties,
  beside ``topk_encode`` on the whole matrix;
- ``memory``: per-device sizes (``memory_analysis``) of the compiled step on model = 1..8.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax.model import init_arrays
from hsae_jax.train import TrainConfig
from hsae_jax.train.step import (
    make_mesh,
    make_optimizer,
    make_replicated_step,
    make_train_step,
    takes_replicated_step,
)

MESHES = ("data=1,model=1", "data=8,model=1", "data=2,model=4", "data=1,model=8")
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


def _run(step, tx, start, batches, place, put):
    params, stats = place(jax.tree.map(jnp.copy, start))
    opt_state = place(tx.init(params))
    metrics = []
    for x in batches:
        params, stats, opt_state, m = step(params, stats, opt_state, put(x))
        metrics.append({k: np.asarray(v) for k, v in m.items()})
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
    for shape in MESHES:
        layout = make_layout(shape)
        tx = make_optimizer(tc, layout)
        got = _run(make_train_step(tc.sae, tx, layout, kernels), tx, start, batches,
                   layout.place, lambda x, layout=layout: layout.put_batch(x, tc.batch_size))
        out.update(_flatten(shape, *got))
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
        state, _ = ckpt.restore(abstract_state(layout, tc.sae, tx), step=3)
        ckpt.close()
        out.update({f"{shape}/restored/{k}": np.asarray(v)
                    for k, v in {**state["params"], **state["stats"]}.items()})
        if shape == "data=2,model=4":
            continue
        step = make_train_step(tc.sae, tx, layout, tc.kernels(),  # the step train() takes
                               replicated=takes_replicated_step(tc, layout))
        source = tc.open_source()
        params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
        for i in range(3, 6):
            x = layout.put_batch(np.asarray(source.batch(i)), tc.batch_size)
            params, stats, opt_state, _ = step(params, stats, opt_state, x)
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
    if command == "train":  # one process of a several-process run, or the one-process one
        from hsae_jax.train import train

        train(TrainConfig.from_flat(**json.loads(sys.argv[3])), sys.argv[2], progress=False)
        sys.exit(0)
    assert jax.device_count() == 8, jax.devices()
    if command == "reshard":
        reshard(sys.argv[2])
        sys.exit(0)
    backend, path = sys.argv[2:4]
    checks = {"steps": check_steps, "topk": check_topk, "memory": check_memory}
    result = {}
    for name in sys.argv[4].split(","):
        kwargs = {"steps": 2} if name == "steps" and backend == "interpret" else {}  # slow
        result.update({f"{name}/{k}": v for k, v in checks[name](backend, **kwargs).items()})
    np.savez(path, **result)
