"""Whole-training-step benchmark, and per-piece timings that show where a step's time goes.

Steps timed at (B, F, D) for each K, side by side in one process:
- ``hsae``: hsae-jax's own trainer step (Triton top-k, sparse encoder backward, fused
  decoder loss, clip + Adam, decoder renorm, dead-latent counters), float32 inputs
  (TF32 matmuls), no latent dead; ``hsae-auxk``: the same with 10% of the latents dead in
  every step, so AuxK runs (what a real run pays once latents die), ``hsae-auxk-bf16``
  the same with AuxK's matmuls on bfloat16 operands (``--auxk-dtype bfloat16``);
  ``hsae-bf16`` (bf16 encoder/decoder inputs, float32 masters);
- ``naive-jax``: the textbook JAX step: dense autodiff through the encoder matmul,
  ``jax.lax.top_k``, the seed's two kernels (through jax-triton) for the loss, Adam;
- ``torch``: PyTorch with ``torch.topk``, the seed's own kernel and fused Adam (with
  ``seed_module`` and a CUDA torch).

Memory, the same two figures for every row: ``state_bytes``, the training state the
step keeps between calls (parameters, optimizer state, dead-latent counters), and
``extra_bytes``, what one step needs on top of that state and the batch: XLA's plan of
the compiled step for the JAX rows (temporaries plus outputs not aliased to donated
inputs), the allocator's peak over a warm step for torch.

Pieces (``pieces=True``): the encoder matmul, top-k (ours, ``lax.top_k``, ``torch.topk``
for k up to 256), the fused decoder loss forward + backward, the sparse encoder
backward and the optimizer update, each alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hsae_jax import backends
from hsae_jax.bench import common
from hsae_jax.encoder import topk_encode
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.loss import TritonLossConfig, hierarchical_sae_loss
from hsae_jax.model import SAEConfig, init_arrays, sae_loss_and_grads
from hsae_jax.parallel import Layout, MeshShape, make_layout
from hsae_jax.parallel.state import init_state
from hsae_jax.topk import top_k
from hsae_jax.train.auxk_buckets import AuxKBuckets
from hsae_jax.train.config import TrainConfig
from hsae_jax.train.step import (
    apply_gradients,
    make_mesh,
    make_optimizer,
    make_train_step,
)

STEP_IMPLS = ("hsae", "hsae-auxk", "hsae-auxk-bf16", "hsae-bf16", "naive-jax",
              "torch")
DEAD_FRACTION = 0.1  # hsae-auxk: this share of the latents is dead in every timed step
# the hsae rows: (compute dtype, dead fraction, more trainer settings)
HSAE_STEPS = {"hsae": ("float32", 0.0, {}),
              "hsae-auxk": ("float32", DEAD_FRACTION, {}),
              "hsae-auxk-bf16": ("float32", DEAD_FRACTION, {"auxk_dtype": "bfloat16"}),
              "hsae-bf16": ("bfloat16", 0.0, {})}


@dataclasses.dataclass
class StepBenchSettings:
    batch: int = 4096
    n_latents: int = 65536
    d_model: int = 2304
    ks: tuple[int, ...] = (32, 64, 128)
    impls: tuple[str, ...] = STEP_IMPLS
    pieces: bool = True
    topk_ks: tuple[int, ...] = (32, 64, 128, 256)
    warmup: int = 3
    iters: int = 20
    seed_module: str | None = None
    out: str = "bench_step.json"

    @classmethod
    def tiny(cls, **overrides) -> StepBenchSettings:
        base = dict(batch=64, n_latents=256, d_model=32, ks=(8,), topk_ks=(8,), iters=3,
                    warmup=1, impls=("hsae", "hsae-auxk", "naive-jax"))
        return cls(**{**base, **overrides})


class BucketStep(NamedTuple):
    """A trainer step with its static AuxK bucket bound (called and lowered alike)."""

    jitted: Callable
    auxk_bucket: int

    def __call__(self, *args):
        return self.jitted(*args, auxk_bucket=self.auxk_bucket)

    def lower(self, *args):
        return self.jitted.lower(*args, auxk_bucket=self.auxk_bucket)


class TrainerStep(NamedTuple):
    """The trainer's step, ready to time: ``run(x)`` takes one step on the batch x [B, D]
    (placed by ``put(x)`` on the step's mesh first) and returns its loss; ``step`` is the
    jitted step and ``state`` the current [params, stats, opt_state] it takes (for
    lowering); ``tc`` its settings."""

    run: Callable
    step: Callable
    state: list
    tc: TrainConfig
    put: Callable = lambda x: x


def trainer_step(b, f, d, k, dtype: str = "float32", dead_fraction: float = 0.0,
                 backend: str = "auto", mesh: str | None = None, **settings) -> TrainerStep:
    """hsae-jax's trainer step (``make_train_step``, as ``hsae train`` builds it) at
    B, F, D, K; with ``dead_fraction`` that share of the latents is dead (AuxK runs) in
    every call: the dead-latent counters are not carried between calls. ``mesh`` (e.g.
    ``"data=2,model=1"``, of this process's first devices): the step on that mesh, B rows
    in all (default: one device). ``settings``: more ``hsae train`` settings (e.g.
    ``param_dtype``, ``update_blocks``), made as the trainer makes them."""
    if settings and mesh is None:
        mesh = "data=1,model=1"
    tc = TrainConfig.from_flat(d_model=d, n_latents=f, k=k, compute_dtype=dtype, batch_size=b,
                               steps=10_000, backend=backend, mesh=mesh, **settings)
    cfg = tc.sae
    put = lambda x: x  # noqa: E731
    if mesh is None:  # the step the trainer takes for these settings on one device
        tx = make_optimizer(tc)
        layout = Layout(make_mesh(1))
        step = make_train_step(cfg, tx, layout, tc.kernels())
        params, stats = init_arrays(cfg, jax.random.key(0))
        opt_state = tx.init(params)
    else:
        shape = MeshShape.parse(mesh)
        layout = make_layout(shape, int(np.prod(shape.resolve(jax.device_count()))))
        layout.check(cfg, b)
        tx = make_optimizer(tc, layout)
        step = make_train_step(cfg, tx, layout, tc.kernels(), update=tc.row_blocks())
        sample = np.asarray(jax.random.normal(jax.random.key(3), (min(b, 256), d)))
        state = init_state(layout, cfg, tx, 0, sample, tc.param_dtype)
        params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
        put = functools.partial(layout.put_batch, batch_size=b)
    dead = jax.random.permutation(jax.random.key(1), f)[:int(dead_fraction * f)]
    stats["tokens_since_fired"] = stats["tokens_since_fired"].at[dead].set(cfg.dead_tokens)
    state = [params, stats, opt_state]
    # AuxK's bucket as the trainer picks it (on the host, no conditional in the step): the
    # counters are fixed with dead latents; without, none dies in a benchmark's few steps
    bucket = AuxKBuckets(cfg, layout.axes, b, np.asarray(stats["tokens_since_fired"]), 0).bucket(0)
    step = BucketStep(step, bucket)

    def run(x):
        fixed = jax.tree.map(jnp.copy, stats) if dead_fraction else state[1]
        state[0], carried, state[2], metrics = step(state[0], fixed, state[2], x)
        if not dead_fraction:
            state[1] = carried
        return metrics["loss"]

    return TrainerStep(run, step, state, tc, put)


def _hsae_step(b, f, d, k, dtype: str, dead_fraction: float = 0.0, **settings):
    """(run, memory) of :func:`trainer_step`; ``memory(x)``: :func:`common.step_memory`."""
    run, step, state, *_ = trainer_step(b, f, d, k, dtype, dead_fraction, **settings)
    return run, functools.partial(common.step_memory, step, state)


def _naive_step(b, f, d, k):
    cfg = SAEConfig(d_model=d, n_latents=f, k=k)
    params, _ = init_arrays(cfg, jax.random.key(0))
    tx = optax.adam(1e-4)
    loss_backend = "triton" if backends.triton_available() else "reference"
    loss_config = TritonLossConfig(variant="two_pass") if loss_backend == "triton" else None

    def loss_fn(p, x):
        vals, idx = topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], k, backend="reference")
        return hierarchical_sae_loss(idx, p["W_dec"], vals, p["b_dec"], x,
                                     backend=loss_backend, config=loss_config)

    @jax.jit
    def step(p, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        p["W_dec"] = p["W_dec"] / jnp.linalg.norm(p["W_dec"], axis=1, keepdims=True)
        return p, opt_state, loss

    state = [params, tx.init(params)]

    def run(x):
        state[0], state[1], loss = step(*state, x)
        return loss

    return run, functools.partial(common.step_memory, step, state)


def _torch_step(seed_kernels, b, f, d, k):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda"
    w_dec = torch.nn.functional.normalize(torch.randn(f, d, device=dev), dim=1)
    w_enc = torch.nn.Parameter(w_dec.clone())
    w_dec = torch.nn.Parameter(w_dec)
    b_enc = torch.nn.Parameter(torch.zeros(f, device=dev))
    b_dec = torch.nn.Parameter(torch.zeros(d, device=dev))
    params = [w_enc, b_enc, w_dec, b_dec]
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)

    def run(x):
        pre = (x - b_dec) @ w_enc.T + b_enc
        vals, idx = pre.topk(k, dim=1, sorted=True)
        loss = seed_kernels.triton_hierarchical_sae_loss(idx, w_dec, torch.relu(vals), b_dec,
                                                         x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = w_dec.grad
            g -= (g * w_dec).sum(dim=1, keepdim=True) * w_dec
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=1, keepdim=True))
        return loss

    def memory(x):
        """The allocator's peak over one warm step, less the state and the batch."""
        state = sum(p.nbytes for p in params) + sum(
            t.nbytes for group in opt.state.values() for t in group.values()
            if isinstance(t, torch.Tensor))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run(x)
        torch.cuda.synchronize()
        return {"state_bytes": state,
                "extra_bytes": torch.cuda.max_memory_allocated() - state - x.nbytes}

    return run, memory


def _torch_sync(out):
    import torch

    torch.cuda.synchronize()
    return out


def run_steps(settings: StepBenchSettings, log=print) -> list[dict]:
    b, f, d = settings.batch, settings.n_latents, settings.d_model
    seed_kernels = None
    impls = [i for i in settings.impls if i != "torch"]
    if "torch" in settings.impls and settings.seed_module and backends.cuda_available():
        from hsae_jax.bench.loss import load_seed_module

        seed_kernels = load_seed_module(settings.seed_module)
        impls.append("torch")
    x = jax.random.normal(jax.random.key(1), (b, d), jnp.float32)
    rows = []
    for k in settings.ks:
        for name in impls:
            row = {"k": k, "impl": name}
            try:
                if name == "torch":
                    import torch

                    xt = torch.from_dlpack(x).clone()
                    run, memory = _torch_step(seed_kernels, b, f, d, k)
                    stats = common.time_calls(lambda r=run, xt=xt: r(xt), warmup=settings.warmup,
                                              iters=settings.iters, sync=_torch_sync)
                    row.update(memory(xt))
                    del run, memory
                    torch.cuda.empty_cache()
                else:
                    if name == "naive-jax":
                        run, memory = _naive_step(b, f, d, k)
                    else:
                        dtype, dead, more = HSAE_STEPS[name]
                        run, memory = _hsae_step(b, f, d, k, dtype, dead, **more)
                    stats = common.time_calls(lambda r=run: r(x), warmup=settings.warmup,
                                              iters=settings.iters)
                    row.update(memory(x))
                    del run, memory
                row.update(stats)
                row["tokens_per_s"] = b / (row["median_ms"] * 1e-3)
                if row.get("extra_bytes") is not None:
                    row["total_bytes"] = row["state_bytes"] + row["extra_bytes"] + x.nbytes
                for part in ("state", "extra", "total"):
                    if row.get(f"{part}_bytes") is not None:
                        row[f"{part}_gb"] = row[f"{part}_bytes"] / 1e9
            except Exception as err:  # noqa: BLE001 - one failure must not stop the table
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"  step K={k} {name}: {row.get('median_ms', row.get('error'))}")
            rows.append(row)
    return rows


def run_pieces(settings: StepBenchSettings, log=print) -> list[dict]:
    b, f, d = settings.batch, settings.n_latents, settings.d_model
    key = jax.random.key(2)
    x = jax.random.normal(key, (b, d), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (f, d), jnp.float32) / np.sqrt(d)
    rows = []

    def timed(piece, fn, *args, sync=common.block, **extra):
        row = {"piece": piece, **extra}
        try:
            row.update(common.time_calls(lambda: fn(*args), warmup=settings.warmup,
                                         iters=settings.iters, sync=sync))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        log(f"  {piece} {extra}: {row.get('median_ms', row.get('error'))}")
        rows.append(row)

    for dtype in ("float32", "bfloat16"):
        timed("encoder matmul", jax.jit(lambda x, w: x @ w.T), x.astype(dtype), w.astype(dtype),
              dtype=dtype)
    pre = x @ w.T
    kernel_backend = "triton" if backends.triton_available() else "xla"
    torch_pre = None
    if backends.cuda_available():
        try:
            import torch

            torch_pre = torch.from_dlpack(pre).clone()
        except ImportError:
            pass
    for k in settings.topk_ks:
        timed("top-k hsae", jax.jit(lambda p, k=k: top_k(p, k, backend=kernel_backend)), pre,
              k=k)
        timed("top-k lax", jax.jit(lambda p, k=k: jax.lax.top_k(p, k)), pre, k=k)
        if torch_pre is not None:
            timed("top-k torch", lambda k=k: torch_pre.topk(k, dim=1), sync=_torch_sync, k=k)
    for k in settings.ks:
        vals, idx = jax.lax.top_k(pre, k)
        vals = jax.nn.relu(vals)
        loss = jax.jit(jax.value_and_grad(
            lambda w, v, i: hierarchical_sae_loss(i, w, v, jnp.zeros((d,)), x), argnums=(0, 1)))
        timed("decoder loss fwd+bwd", loss, w, vals, idx, k=k)

        def enc_grad(w, x, k=k):
            return jax.grad(lambda w: jnp.sum(topk_encode(x, w, jnp.zeros((f,)),
                                                          jnp.zeros((d,)), k)[0]))(w)

        timed("encoder fwd+sparse bwd", jax.jit(enc_grad), w, x, k=k)
        for dtype in ("float32", "bfloat16"):
            cfg = SAEConfig(d_model=d, n_latents=f, k=k, compute_dtype=dtype)
            p0, s0 = init_arrays(cfg, jax.random.key(0))
            grads = jax.jit(functools.partial(sae_loss_and_grads, cfg))
            timed("loss and gradients (trainer)", grads, p0, s0, x, k=k, dtype=dtype)
            del p0, s0
        timed("encoder fwd+dense bwd", jax.jit(lambda w, x, k=k: jax.grad(
            lambda w: jnp.sum(topk_encode(x, w, jnp.zeros((f,)), jnp.zeros((d,)), k,
                                          backend="reference")[0]))(w)), w, x, k=k)
    params = {"W_enc": w, "W_dec": w + 0.0, "b_enc": jnp.zeros((f,)), "b_dec": jnp.zeros((d,))}
    tx = make_optimizer(TrainConfig.from_flat(d_model=d, n_latents=f, k=8, batch_size=b,
                                              steps=10_000))
    opt_state = tx.init(params)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
    timed("clip + Adam update", update, params, opt_state, params)
    # everything the trainer does after the gradients (projection, finite checks, clip,
    # Adam, renormalisation, the grad-norm metric); params are not donated here
    tail = jax.jit(lambda g, s, p: apply_gradients(tx, p, s, dict(g), jnp.float32(1.0)))
    timed("after-gradient tail (trainer)", tail, params, opt_state, params)
    return rows


def run(settings: StepBenchSettings, log=print) -> dict:
    b, f, d = settings.batch, settings.n_latents, settings.d_model
    log(f"training step: B={b} F={f} D={d}, K={settings.ks}")
    steps = run_steps(settings, log)
    pieces = run_pieces(settings, log) if settings.pieces else []
    payload = {"benchmark": "training_step", "device": common.device_info(),
               "workload": dict(batch=b, n_latents=f, d_model=d), "steps": steps,
               "pieces": pieces}
    atomic_write_json(settings.out, payload)
    log("")
    log(common.markdown_table(steps, [
        ("k", "K", "d"), ("impl", "step", "s"), ("median_ms", "median ms", ".2f"),
        ("p90_ms", "p90 ms", ".2f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("state_gb", "state GB", ".2f"), ("extra_gb", "step extra GB", ".2f"),
        ("total_gb", "total GB", ".2f"), ("error", "error", "s")]))
    log("memory: state = parameters, optimizer state, counters kept between steps; step "
        "extra = what one step needs beyond the state and the batch (XLA's plan of the "
        "compiled step; torch: its allocator's peak over a warm step); total = both + batch")
    if pieces:
        log("")
        log(common.markdown_table(pieces, [
            ("piece", "piece", "s"), ("k", "k", "d"), ("dtype", "dtype", "s"),
            ("median_ms", "median ms", ".3f"), ("error", "error", "s")]))
    log(f"\nwrote {settings.out}")
    return payload
