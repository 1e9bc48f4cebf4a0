"""What the decoder-loss walks cost without their arithmetic: the floor of the fused kernel.

Three kernels with the fused kernel's tiling, grid order and step loads
(``walk_kernels._tile`` / ``_load_step``), each doing only part of its work:
- gather: walk k = 0..K-1, load each step's rows, sum ``vals * rows`` (one FMA), store [B, D];
- scatter: walk K steps, atomically add ``vals * g`` (g a [B, D] tile in registers) to
  dW[indices] (float32, zeroed): the backward walk's scatter alone;
- gather + scatter: both in one walk (the least a backward walk does).
Beside them: the fused kernel itself (loss and every gradient) and zeroing dW alone.
The rows of the loss table that these explain are in benchmarks/NOTES.md.
Usage: python benchmarks/loss_floor.py [--ks 32,128] [--distributions uniform,zipf]
       [--dtypes float32,bfloat16] [--configs 4x64x2x4,4x128x4x4] [--backend triton|interpret]
       [--batch 4096 --n-latents 65536 --d-model 2304] [--out FILE]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import TritonLossConfig, WalkConfig, backends, hierarchical_sae_loss
from hsae_jax._shapes import cdiv
from hsae_jax.bench import common
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.triton_launch import launch


def make_kernels(backend: str):
    """Defines the floor kernels with Triton in the mode ``backend`` needs."""
    global GATHER, SCATTER, GATHER_SCATTER, tile, load_step
    triton = backends.import_triton_for(backend)
    import triton.language as tl

    from hsae_jax.loss import walk_kernels

    tile, load_step = walk_kernels._tile, walk_kernels._load_step

    @triton.jit
    def gather(indices_ptr, weight_ptr, vals_ptr, out_ptr, B: tl.constexpr, F: tl.constexpr,
               D: tl.constexpr, K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
               LOOP_NUM_STAGES: tl.constexpr):
        rows, row_mask, cols, col_mask, offsets, mask = tile(B, D, BLOCK_B, BLOCK_D)
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
            _, _, val, weight_tile = load_step(indices_ptr, vals_ptr, weight_ptr, rows,
                                               row_mask, cols, col_mask, t, F, D, K)
            acc += weight_tile * val[:, None]
        tl.store(out_ptr + offsets, acc, mask=mask)

    @triton.jit
    def scatter(indices_ptr, vals_ptr, g_ptr, weight_grad_ptr, B: tl.constexpr,
                F: tl.constexpr, D: tl.constexpr, K: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_D: tl.constexpr, LOOP_NUM_STAGES: tl.constexpr):
        rows, row_mask, cols, col_mask, offsets, mask = tile(B, D, BLOCK_B, BLOCK_D)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0)
        for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
            idx = tl.load(indices_ptr + rows * K + t, mask=row_mask, other=0).to(tl.int64)
            row_ok = row_mask & (idx >= 0) & (idx < F)
            val = tl.load(vals_ptr + rows * K + t, mask=row_mask, other=0.0).to(tl.float32)
            tl.atomic_add(weight_grad_ptr + idx[:, None] * D + cols[None, :], g * val[:, None],
                          mask=row_ok[:, None] & col_mask[None, :], sem="relaxed")

    @triton.jit
    def gather_scatter(indices_ptr, weight_ptr, vals_ptr, g_ptr, out_ptr, weight_grad_ptr,
                       B: tl.constexpr, F: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                       LOOP_NUM_STAGES: tl.constexpr):
        rows, row_mask, cols, col_mask, offsets, mask = tile(B, D, BLOCK_B, BLOCK_D)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0)
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
            idx, row_ok, val, weight_tile = load_step(indices_ptr, vals_ptr, weight_ptr, rows,
                                                      row_mask, cols, col_mask, t, F, D, K)
            acc += weight_tile * val[:, None]
            tl.atomic_add(weight_grad_ptr + idx[:, None] * D + cols[None, :], g * val[:, None],
                          mask=row_ok[:, None] & col_mask[None, :], sem="relaxed")
        tl.store(out_ptr + offsets, acc, mask=mask)

    GATHER, SCATTER, GATHER_SCATTER = gather, scatter, gather_scatter


def floor_calls(backend, cfg: WalkConfig, indices, weight, vals, g):
    """name -> jitted function of (weight, vals) for each floor kernel."""
    (b, k), (f, d) = indices.shape, weight.shape
    grid = (cdiv(b, cfg.block_b), cdiv(d, cfg.block_d))
    meta = dict(grid=grid, backend=backend, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                B=b, F=f, D=d, K=k, BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d,
                LOOP_NUM_STAGES=cfg.loop_num_stages)
    bd = jax.ShapeDtypeStruct((b, d), jnp.float32)
    fd = jax.ShapeDtypeStruct((f, d), jnp.float32)
    return {
        "gather": lambda w, v: launch(GATHER, indices, w, v, out_shape=[bd], **meta),
        "scatter": lambda w, v: launch(SCATTER, indices, v, g, out_shape=[fd],
                                       zeroed_outputs=(0,), **meta),
        "gather + scatter": lambda w, v: launch(GATHER_SCATTER, indices, w, v, g,
                                                out_shape=[bd, fd], zeroed_outputs=(1,),
                                                **meta),
        "zero dW": lambda w, v: jnp.zeros((f, d), jnp.float32) + v[0, 0],
        "fused loss + gradients": jax.value_and_grad(
            lambda w, v: hierarchical_sae_loss(
                indices, w, v, jnp.zeros((d,), w.dtype), g.astype(w.dtype), backend=backend,
                config=TritonLossConfig(variant="fused", fused=cfg)), argnums=(0, 1)),
    }


def parse_config(text: str) -> WalkConfig:
    """``BBxBDxWARPSxSTAGES`` -> WalkConfig."""
    bb, bd, warps, stages = (int(x) for x in text.split("x"))
    return WalkConfig(block_b=bb, block_d=bd, num_warps=warps, loop_num_stages=stages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", default="32,128")
    parser.add_argument("--distributions", default="uniform,zipf")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--configs", default="4x64x2x4")
    parser.add_argument("--backend", default="triton", choices=["triton", "interpret"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="loss_floor.json")
    args = parser.parse_args()
    make_kernels(args.backend)
    b, f, d = args.batch, args.n_latents, args.d_model
    key = jax.random.key(0)
    g = jax.random.normal(jax.random.fold_in(key, 1), (b, d))
    rows = []
    for dtype in args.dtypes.split(","):
        weight = (jax.random.normal(key, (f, d)) / np.sqrt(d)).astype(dtype)
        for k in (int(s) for s in args.ks.split(",")):
            vals = jax.random.uniform(jax.random.fold_in(key, 2), (b, k)).astype(dtype)
            for dist in args.distributions.split(","):
                indices = common.sample_indices(jax.random.fold_in(key, k), b, f, k, dist)
                for text in args.configs.split(","):
                    calls = floor_calls(args.backend, parse_config(text), indices, weight, vals,
                                        g)
                    for name, fn in calls.items():
                        step = jax.jit(fn)
                        row = dict(dtype=dtype, k=k, distribution=dist, config=text, kernel=name)
                        row.update(common.time_calls(lambda s=step, w=weight, v=vals: s(w, v),
                                                     warmup=2, iters=args.iters))
                        row["gbytes_per_s_gathered"] = (
                            b * k * d * weight.dtype.itemsize / row["median_ms"] / 1e6)
                        print(row, flush=True)
                        rows.append(row)
    print(common.markdown_table(rows, [
        ("dtype", "weights", "s"), ("k", "K", "d"), ("distribution", "indices", "s"),
        ("config", "BBxBDxWxST", "s"), ("kernel", "kernel", "s"),
        ("median_ms", "median ms", ".3f"), ("p90_ms", "p90 ms", ".3f")]))
    atomic_write_json(args.out, {"rows": rows, **common.device_info()})


if __name__ == "__main__":
    main()
