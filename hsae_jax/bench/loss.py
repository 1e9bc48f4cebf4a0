"""Decoder-loss benchmark: forward + backward of every implementation side by side.

For each K, weight dtype and index distribution it times ``jit(value_and_grad)`` of
the loss with respect to weight, vals and bias (median over many runs after warm-up),
reports the time against the memory-traffic floor (one gather of the selected rows,
one float32 scatter into the weight gradient, its initialisation and one read of the
target, at the measured copy bandwidth), the temporary memory, and the relative error
of the loss and weight gradient against the jnp reference where it ran.

Implementations: ``triton`` (hsae-jax's fused one-pass kernel), ``triton-two_pass``
(the seed's kernels through jax-triton), ``triton-deterministic`` (the fused kernel
without float atomics: bitwise reproducible), ``xla``, ``reference`` and, with
``seed_module``, ``seed-torch`` (the seed's own torch + Triton kernel, same data).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import backends
from hsae_jax.bench import common
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.loss import TritonLossConfig, hierarchical_sae_loss

IMPLS = ("reference", "triton", "triton-two_pass", "triton-deterministic", "xla", "seed-torch")


@dataclasses.dataclass
class LossBenchSettings:
    batch: int = 4096
    n_latents: int = 65536
    d_model: int = 2304
    ks: tuple[int, ...] = (32, 64, 128)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    distributions: tuple[str, ...] = ("uniform", "zipf")
    impls: tuple[str, ...] = IMPLS
    warmup: int = 3
    iters: int = 30
    seed_module: str | None = None
    check_errors: bool = True
    out: str = "bench_loss.json"

    @classmethod
    def tiny(cls, **overrides) -> LossBenchSettings:
        """A CPU-sized smoke run (what CI executes)."""
        base = dict(batch=64, n_latents=512, d_model=64, ks=(8, 16), iters=3, warmup=1,
                    impls=("reference", "xla"))
        return cls(**{**base, **overrides})


def _jax_impl(name: str) -> Callable:
    backend, config = {
        "triton": ("triton", TritonLossConfig()),
        "triton-two_pass": ("triton", TritonLossConfig(variant="two_pass")),
        "triton-deterministic": ("triton", TritonLossConfig(deterministic=True)),
        "xla": ("xla", None),
        "reference": ("reference", None),
    }[name]

    def loss(weight, vals, bias, indices, target):
        return hierarchical_sae_loss(indices, weight, vals, bias, target, backend=backend,
                                     config=config)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def load_seed_module(path: str):
    """Imports the seed's ``hierarchical_kernels.py`` from a file path."""
    spec = importlib.util.spec_from_file_location("hsae_seed_kernels", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"seed_module={path!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed_torch_runner(seed_kernels, weight, vals, bias, indices, target):
    import torch

    def t(x):
        return torch.from_dlpack(x)

    w = t(weight).detach().clone().requires_grad_()
    v = t(vals).detach().clone().requires_grad_()
    b = t(bias).detach().clone().requires_grad_()
    idx, tgt = t(indices).to(torch.int64), t(target)

    def run():
        loss = seed_kernels.triton_hierarchical_sae_loss(idx, w, v, b, tgt)
        grads = torch.autograd.grad(loss, (w, v, b))
        return loss, grads

    def sync(out):
        torch.cuda.synchronize()
        return out

    def peak_bytes():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def as_jax(out):
        loss, (dw, _, _) = out
        return float(loss), np.asarray(dw.float().cpu())

    return run, sync, peak_bytes, as_jax


def floor_bytes(b: int, k: int, f: int, d: int, weight_itemsize: int, target_itemsize: int):
    """One gather of the selected rows, one float32 scatter, dW init, one target read."""
    return b * k * d * (weight_itemsize + 4) + f * d * 4 + b * d * target_itemsize


def available_impls(requested) -> list[str]:
    impls = []
    for name in requested:
        if name.startswith("triton") and not backends.triton_available():
            continue
        if name == "seed-torch":
            continue  # added by run() when a seed module is given and CUDA is present
        impls.append(name)
    return impls


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(settings: LossBenchSettings, log=print) -> dict:
    """Runs the benchmark, prints a markdown table, writes JSON; returns the payload."""
    impls = available_impls(settings.impls)
    seed_kernels = None
    if settings.seed_module and "seed-torch" in settings.impls and backends.cuda_available():
        seed_kernels = load_seed_module(settings.seed_module)
        impls.append("seed-torch")
    bandwidth = common.copy_bandwidth(min(1 << 30, 64 << 20) if not backends.cuda_available()
                                      else 1 << 30)
    b, f, d = settings.batch, settings.n_latents, settings.d_model
    log(f"decoder loss fwd+bwd: B={b} F={f} D={d}; copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; impls {impls}")
    rows = []
    key = jax.random.key(0)
    for dtype_name in settings.dtypes:
        dtype = jnp.dtype(dtype_name)
        weight = (jax.random.normal(jax.random.fold_in(key, 1), (f, d)) / np.sqrt(d)).astype(dtype)
        bias = (0.1 * jax.random.normal(jax.random.fold_in(key, 2), (d,))).astype(dtype)
        target = jax.random.normal(jax.random.fold_in(key, 3), (b, d)).astype(dtype)
        for k in settings.ks:
            for dist in settings.distributions:
                indices = common.sample_indices(jax.random.fold_in(key, 10 + k), b, f, k, dist)
                vals = jnp.sort(jax.random.uniform(jax.random.fold_in(key, 20 + k), (b, k),
                                                   minval=0.1, maxval=2.0), axis=1)[:, ::-1]
                vals = vals.astype(dtype)
                args = (weight, vals, bias, indices, target)
                ref = None
                for name in impls:
                    row = dict(k=k, dtype=dtype_name, distribution=dist, impl=name)
                    try:
                        if name == "seed-torch":
                            fn, sync, peak, as_np = _seed_torch_runner(seed_kernels, *args)
                            stats = common.time_calls(fn, warmup=settings.warmup,
                                                      iters=settings.iters, sync=sync)
                            row["extra_bytes"] = peak()
                            out_loss, out_dw = as_np(fn())
                        else:
                            jitted = _jax_impl(name)
                            stats = common.time_calls(lambda j=jitted, a=args: j(*a),
                                                      warmup=settings.warmup,
                                                      iters=settings.iters)
                            row["extra_bytes"] = common.compiled_temp_bytes(jitted, *args)
                            out = jitted(*args)
                            out_loss, out_dw = float(out[0]), out[1][0]
                        row.update(stats)
                        if settings.check_errors:
                            if name == "reference":
                                ref = (out_loss, np.asarray(out_dw, np.float32))
                            elif ref is not None:
                                row["loss_rel_err"] = abs(out_loss - ref[0]) / abs(ref[0])
                                row["dweight_rel_err"] = _rel(np.asarray(out_dw, np.float32),
                                                              ref[1])
                    except Exception as err:  # noqa: BLE001 - one failure must not stop the table
                        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    fb = floor_bytes(b, k, f, d, dtype.itemsize, dtype.itemsize)
                    row["floor_ms"] = fb / bandwidth * 1e3
                    if "median_ms" in row:
                        row["floor_fraction"] = row["floor_ms"] / row["median_ms"]
                        row["achieved_GBps"] = fb / (row["median_ms"] * 1e-3) / 1e9
                    log(_row_line(row))
                    rows.append(row)
    payload = {
        "benchmark": "decoder_loss_fwd_bwd",
        "device": common.device_info(),
        "workload": dict(batch=b, n_latents=f, d_model=d),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "results": rows,
    }
    atomic_write_json(settings.out, payload)
    log("")
    log(table(rows))
    log(f"\nwrote {settings.out}")
    return payload


def _row_line(row: dict) -> str:
    if "error" in row:
        return f"  K={row['k']} {row['dtype']} {row['distribution']} {row['impl']}: {row['error']}"
    return (f"  K={row['k']} {row['dtype']} {row['distribution']} {row['impl']}: "
            f"{row['median_ms']:.3f} ms")


def table(rows) -> str:
    return common.markdown_table(rows, [
        ("k", "K", "d"), ("dtype", "weights", "s"), ("distribution", "indices", "s"),
        ("impl", "impl", "s"), ("median_ms", "median ms", ".3f"), ("p90_ms", "p90 ms", ".3f"),
        ("floor_ms", "floor ms", ".3f"), ("floor_fraction", "floor/time", ".2f"),
        ("achieved_GBps", "GB/s", ".0f"), ("extra_bytes", "extra bytes", ",d"),
        ("loss_rel_err", "loss err", ".1e"), ("dweight_rel_err", "dW err", ".1e"),
        ("error", "error", "s"),
    ])
