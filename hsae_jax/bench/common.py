"""Timing, bandwidth and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def block(x):
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int, iters: int,
               sync: Callable[[Any], Any] = block) -> dict:
    """Median / p10 / p90 wall time in ms of ``fn()``, synchronised after every call."""
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p10_ms": samples[int(0.1 * (len(samples) - 1))],
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "iters": iters,
    }


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of ``tree``."""
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def compiled_extra_bytes(jitted, *args) -> int | None:
    """Device bytes a call of ``jitted(*args)`` needs beyond its arguments, by XLA's plan
    of the compiled program: temporaries plus outputs not aliased to (donated) arguments.
    None where the backend does not report it."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - a figure missing from a table, not a failure
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes)


def step_memory(step, state, x) -> dict:
    """The memory figures of one training step ``step(*state, x)``: ``state_bytes`` (the
    state kept between steps) and ``extra_bytes`` (:func:`compiled_extra_bytes`)."""
    return {"state_bytes": tree_bytes(state),
            "extra_bytes": compiled_extra_bytes(step, *state, x)}


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus written."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    stats = time_calls(lambda: copy(x), warmup=2, iters=iters)
    return 2 * nbytes / (stats["median_ms"] * 1e-3)


def device_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    # versions from package metadata: importing Triton here would fix its
    # compile/interpret mode for the whole process (see hsae_jax.backends)
    for name in ("triton", "jax-triton", "torch"):
        try:
            info[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def compiled_temp_bytes(jitted, *args) -> int | None:
    """XLA's temporary allocation for ``jitted(*args)`` (None where not reported)."""
    try:
        return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backends without memory analysis
        return None


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); missing values print as '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_indices(key: jax.Array, b: int, f: int, k: int, distribution: str) -> jax.Array:
    """[B, K] int32 distinct latents per row: ``uniform`` or ``zipf`` (p_f ~ 1/(f+1)).

    Sampled without replacement with the Gumbel top-k trick.
    """
    logits = jnp.zeros((f,))
    if distribution == "zipf":
        logits = -jnp.log1p(jnp.arange(f, dtype=jnp.float32))
    elif distribution != "uniform":
        raise ValueError(f"distribution={distribution!r} must be 'uniform' or 'zipf'")
    gumbel = jax.random.gumbel(key, (b, f))
    return jax.lax.top_k(logits + gumbel, k)[1].astype(jnp.int32)
