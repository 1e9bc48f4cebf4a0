"""What AuxK costs, piece by piece, at several dead fractions (hsae_jax/auxk.py).

Times jit(value_and_grad) of the AuxK loss alone with respect to every parameter, for a
share of dead latents from 1% to 50% (each lands in its column bucket), beside the plain
definition (``auxk_loss_reference``: a second whole encoder pass with top-k over F and the
TopK decoder loss over aux_k rows per token) and the pieces of one bucket: the dead
columns' pre-activations, the top-k selections (row in registers, radix select), the main
reconstruction's residual.
Prints a table and writes JSON.
Usage: python benchmarks/auxk_pieces.py [--batch 4096 --n-latents 65536 --d-model 2304
       --k 64] [--dead 0.01,0.05,0.1,0.25,0.5] [--backend auto] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from hsae_jax import KernelSettings, SAEConfig
from hsae_jax.auxk import auxk_loss, auxk_loss_reference, column_buckets, main_residual
from hsae_jax.bench import common
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.model import encode_arrays, init_arrays, scale_inputs
from hsae_jax.topk import TopKConfig, top_k_mask, top_k_relu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dead", default="0.01,0.05,0.1,0.25,0.5")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="auxk_pieces.json")
    args = parser.parse_args()
    b, f, d = args.batch, args.n_latents, args.d_model
    cfg = SAEConfig(d_model=d, n_latents=f, k=args.k)
    kernels = KernelSettings.create(args.backend)
    key = jax.random.key(0)
    x = jax.random.normal(key, (b, d), jnp.float32)
    params, stats = init_arrays(cfg, jax.random.key(1), x)
    params["W_enc"] = params["W_enc"] + 0.3 * jax.random.normal(jax.random.key(2), (f, d))
    xs = scale_inputs(stats, x)
    vals, indices = jax.jit(functools.partial(encode_arrays, cfg, kernels=kernels))(
        params, stats, x)
    rows = []

    def timed(name, fn, *fn_args, **extra):
        row = {"piece": name, **extra}
        try:
            row.update(common.time_calls(lambda: fn(*fn_args), warmup=2, iters=args.iters))
        except Exception as err:  # noqa: BLE001 - one failure must not stop the table
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(f"  {name} {extra}: {row.get('median_ms', row.get('error'))}", flush=True)
        rows.append(row)

    def dead_mask(fraction):
        n = max(1, int(fraction * f))
        return jnp.zeros((f,), bool).at[jax.random.permutation(jax.random.key(3), f)[:n]].set(
            True)

    for fraction in (float(v) for v in args.dead.split(",")):
        dead = dead_mask(fraction)
        n_dead = int(dead.sum())
        bucket = next(n for n in column_buckets(f) if n >= n_dead)
        for auxk_dtype in ("float32", "bfloat16"):
            on = dataclasses.replace(cfg, auxk_dtype=auxk_dtype)
            grad = jax.jit(jax.value_and_grad(
                lambda p, dead=dead, on=on: auxk_loss(on, p, xs, vals, indices, dead, kernels)))
            timed(f"auxk fwd+bwd, {auxk_dtype} products", grad, params, dead=fraction,
                  columns=bucket)
        if fraction == 0.1:
            ref = jax.jit(jax.value_and_grad(
                lambda p, dead=dead: auxk_loss_reference(cfg, p, xs, vals, indices, dead,
                                                         kernels)))
            timed("auxk reference fwd+bwd", ref, params, dead=fraction)
            pre = jax.random.normal(key, (b, bucket), jnp.float32)
            negative = -jnp.abs(pre)  # no positive entry: the ReLU needs no search
            for select, resident in (("in registers", 16384),
                                     ("radix", 0)):
                config = TopKConfig(resident=resident)
                timed(f"top-k mask, {select}", jax.jit(lambda p, c=config: top_k_mask(
                    p, cfg.resolved_aux_k, config=c)), pre, columns=bucket)
                timed(f"top-k relu, {select}", jax.jit(lambda p, c=config: top_k_relu(
                    p, cfg.resolved_aux_k, config=c)), pre, columns=bucket)
                timed(f"top-k relu, {select}, every entry negative", jax.jit(
                    lambda p, c=config: top_k_relu(p, cfg.resolved_aux_k, config=c)), negative,
                    columns=bucket)
            w = params["W_enc"][:bucket]
            timed("dead-column matmul", jax.jit(lambda a, w: a @ w.T), xs, w, columns=bucket)
            timed("dead-column matmul bf16", jax.jit(lambda a, w: jnp.dot(
                a.astype(jnp.bfloat16), w.T.astype(jnp.bfloat16),
                preferred_element_type=jnp.float32)), xs, w, columns=bucket)
            timed("main residual", jax.jit(main_residual), params, xs, vals, indices)
    payload = {"device": common.device_info(), "workload": dict(batch=b, n_latents=f,
                                                               d_model=d, k=args.k),
               "aux_k": cfg.resolved_aux_k, "rows": rows}
    atomic_write_json(args.out, payload)
    print(common.markdown_table(rows, [
        ("piece", "piece", "s"), ("dead", "dead", ".2f"), ("columns", "columns", "d"),
        ("median_ms", "median ms", ".3f"), ("error", "error", "s")]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
