"""Checks of the decoder loss's arguments, made in Python before anything runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
INDEX_DTYPES = (jnp.dtype(jnp.int32), jnp.dtype(jnp.int64))


def _shape_dtype(name: str, x) -> tuple[tuple[int, ...], np.dtype]:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape), jnp.dtype(x.dtype)


def _check_rank(name: str, shape: tuple[int, ...], spec: str) -> None:
    rank = spec.count(",") + 1
    if len(shape) != rank:
        raise ValueError(f"{name} must have shape {spec}, got rank {len(shape)} shape {shape}")


def _check_float(name: str, dtype: np.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {dtype}; expected float32, bfloat16 or float16"
        )


def check_loss_inputs(indices, weight, vals, bias, target, prefix_weights=None) -> None:
    """Validates shapes and dtypes (ValueError / TypeError naming the argument)."""
    idx_shape, idx_dtype = _shape_dtype("indices", indices)
    w_shape, w_dtype = _shape_dtype("weight", weight)
    v_shape, v_dtype = _shape_dtype("vals", vals)
    b_shape, b_dtype = _shape_dtype("bias", bias)
    t_shape, t_dtype = _shape_dtype("target", target)

    _check_rank("indices", idx_shape, "[B, K]")
    _check_rank("weight", w_shape, "[F, D]")
    _check_rank("vals", v_shape, "[B, K]")
    _check_rank("bias", b_shape, "[D]")
    _check_rank("target", t_shape, "[B, D]")
    b, k = idx_shape
    f, d = w_shape
    for name, size in (("B", b), ("K", k), ("F", f), ("D", d)):
        if size < 1:
            raise ValueError(
                f"{name}={size} must be >= 1 (indices.shape={idx_shape}, "
                f"weight.shape={w_shape})"
            )
    if v_shape != (b, k):
        raise ValueError(f"vals.shape={v_shape} must equal indices.shape (B, K)={(b, k)}")
    if b_shape != (d,):
        raise ValueError(f"bias.shape={b_shape} must be (D,)={(d,)} (D from weight [F, D])")
    if t_shape != (b, d):
        raise ValueError(
            f"target.shape={t_shape} must be (B, D)={(b, d)} (B from indices, D from weight)"
        )

    if idx_dtype not in INDEX_DTYPES:
        raise TypeError(f"indices has dtype {idx_dtype}; expected int32 or int64")
    for name, dtype in (("weight", w_dtype), ("vals", v_dtype), ("bias", b_dtype),
                        ("target", t_dtype)):
        _check_float(name, dtype)

    if prefix_weights is not None:
        pw_shape, pw_dtype = _shape_dtype("prefix_weights", prefix_weights)
        if pw_shape != (k,):
            raise ValueError(f"prefix_weights.shape={pw_shape} must be (K,)={(k,)}")
        if not jnp.issubdtype(pw_dtype, jnp.floating):
            raise TypeError(f"prefix_weights has dtype {pw_dtype}; expected a float dtype")
        if not isinstance(prefix_weights, jax.core.Tracer):
            w = np.asarray(prefix_weights, dtype=np.float64)
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(
                    "prefix_weights must be finite and non-negative with a positive sum, "
                    f"got {w.tolist() if w.size <= 16 else w}"
                )
