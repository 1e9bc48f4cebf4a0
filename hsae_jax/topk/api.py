"""``top_k``: exact row-wise top-k with a Triton kernel, the interpreter, or lax.top_k."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import _shapes, backends
from hsae_jax.backends import Backend
from hsae_jax.topk.config import TopKConfig
from hsae_jax.triton_launch import launch

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _keys(b: int, n: int) -> jax.ShapeDtypeStruct:
    """n int64 keys per row, held as int32 pairs (int64 arrays need jax_enable_x64)."""
    return jax.ShapeDtypeStruct((b, 2 * n), jnp.int32)


@dataclasses.dataclass(frozen=True)
class _KernelTopK:
    backend: str
    config: TopKConfig
    k: int

    def __call__(self, x):  # [B, F] -> ([B, K] x.dtype, [B, K] int32)
        cfg = self.config.resolve(x.shape[1], self.k)
        backends.import_triton_for(self.backend)
        from hsae_jax.topk import kernels as module

        opts = dict(backend=self.backend, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.method == "threshold":
            return self._threshold(module, cfg, opts, x)
        return self._bitonic(module, cfg, opts, x)

    def _outputs(self, x):
        b = x.shape[0]
        return [jax.ShapeDtypeStruct((b, self.k), x.dtype),
                jax.ShapeDtypeStruct((b, self.k), jnp.int32)]

    def _threshold(self, module, cfg, opts, x):
        b, f = x.shape
        kp = max(2, _shapes.next_power_of_2(self.k))
        keys, count = launch(
            module.topk_select_kernel, x,
            out_shape=[_keys(b, cfg.candidates), jax.ShapeDtypeStruct((b,), jnp.int32)],
            grid=(b,), F=f, K=self.k, K_POW2=kp, GROUPS=cfg.groups,
            ROWS=cfg.block // cfg.groups, CANDIDATES=cfg.candidates, **opts)
        values, indices = launch(module.topk_sort_kernel, keys, count,
                                 out_shape=self._outputs(x), grid=(b,), K=self.k, K_POW2=kp,
                                 CANDIDATES=cfg.candidates, **opts)
        return values, indices

    def _bitonic(self, module, cfg, opts, x):
        b, f = x.shape
        kp = max(2, _shapes.next_power_of_2(self.k))  # tl.topk needs k >= 2 on older Triton
        n_chunks = _shapes.cdiv(f, cfg.chunk)
        (keys,) = launch(module.topk_chunk_kernel, x, out_shape=[_keys(b, n_chunks * kp)],
                         grid=(b, n_chunks), F=f, K_POW2=kp, CHUNK=cfg.chunk,
                         N_CHUNKS=n_chunks, **opts)
        n = n_chunks * kp
        while n > cfg.group:
            n_groups = _shapes.cdiv(n, cfg.group)
            (keys,) = launch(module.topk_merge_kernel, keys, out_shape=[_keys(b, n_groups * kp)],
                             grid=(b, n_groups), N=n, K_POW2=kp, GROUP=cfg.group,
                             N_GROUPS=n_groups, **opts)
            n = n_groups * kp
        values, indices = launch(module.topk_final_kernel, keys, out_shape=self._outputs(x),
                                 grid=(b,), N=n, K=self.k, K_POW2=kp,
                                 GROUP=_shapes.next_power_of_2(n), **opts)
        return values, indices


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_top_k(impl, x):
    return impl(x)


@_kernel_top_k.defjvp
def _kernel_top_k_jvp(impl, primals, tangents):
    """The values' tangent is the input's at the selected positions (linear, so reverse
    mode transposes it into a scatter-add); the indices have none."""
    (x,), (dx,) = primals, tangents
    values, indices = _kernel_top_k(impl, x)
    dvalues = jnp.take_along_axis(dx, indices, axis=-1)
    return (values, indices), (dvalues, np.zeros(indices.shape, jax.dtypes.float0))


def check_top_k_inputs(x, k) -> int:
    """Validates ``x`` [..., F] and ``k``; returns F."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if len(x.shape) < 1:
        raise ValueError(f"x must have shape [..., F], got a scalar (shape {tuple(x.shape)})")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {jnp.dtype(x.dtype)}; expected float32, bfloat16 or float16")
    f = x.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if not 1 <= k <= f:
        raise ValueError(f"k={k} must be in [1, F={f}] (x.shape={tuple(x.shape)})")
    return f


def top_k(
    x: jax.Array,  # [..., F]
    k: int,
    *,
    backend: Backend = "auto",
    config: TopKConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of ``x`` and their column indices.

    Args:
      x: [..., F] float32, bfloat16 or float16.
      k: 1 <= k <= F, a Python int.
      backend: ``"auto"``, ``"triton"``, ``"interpret"``, ``"xla"`` (``jax.lax.top_k``) or
        ``"reference"`` (the same).
      config: :class:`TopKConfig` for the kernel backends (the xla backend takes none).

    Returns:
      (values [..., k] in x.dtype, indices [..., k] int32): values sorted descending,
      exact; equal values come in order of their index (lower first). Values are ranked
      in float total order, as ``lax.top_k`` ranks them: a NaN with the sign bit clear
      above +inf, one with the sign bit set (``0.0 / 0.0`` on x86 CPUs) below -inf, and
      -0.0 below +0.0. Differentiable in ``x``: the gradient scatters into the selected
      positions.
    """
    f = check_top_k_inputs(x, k)
    concrete, config = backends.resolve(backend, config, kernel_config=TopKConfig)
    if concrete in ("xla", "reference"):
        values, indices = jax.lax.top_k(x, k)  # a list: return the documented tuple
        return values, indices
    lead = x.shape[:-1]
    rows = 1
    for size in lead:
        rows *= size
    impl = _KernelTopK(concrete, config, k)
    impl.config.resolve(f, k)  # bad settings fail here, before anything runs
    if rows == 0:  # nothing to launch a kernel for
        return jnp.zeros((*lead, k), x.dtype), jnp.zeros((*lead, k), jnp.int32)
    values, indices = _kernel_top_k(impl, x.reshape(rows, f))
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """float -> int32 keys in float total order (the kernels' ``_ordered``)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    sign = jnp.int32(-(2**31))
    return jnp.where(bits < 0, ~bits, bits ^ sign) ^ sign


def top_k_mask(
    x: jax.Array,  # [B, F]
    k: int,
    *,
    backend: Backend = "auto",
    config: TopKConfig | None = None,
) -> jax.Array:
    """[B, F] bool: the entries :func:`top_k` selects (each row's k largest, ties to the
    lower column, float total order), without sorting them.

    On the kernel backends ``topk_kth_key_kernel`` finds each row's k-th largest key (a radix
    select: four histogram passes over the row, or, for rows of at most
    ``config.resident`` columns, bisection in registers; any k), and XLA marks the entries
    above it plus the first ties (a cumsum over the rows only when some row must leave
    ties out); on ``"xla"`` / ``"reference"`` it is ``lax.top_k`` and a
    scatter. Not differentiable (it is a selection).
    """
    f = check_top_k_inputs(x, k)
    if len(x.shape) != 2:
        raise ValueError(f"x must have shape [B, F], got {tuple(x.shape)}")
    concrete, config = backends.resolve(backend, config, kernel_config=TopKConfig)
    x = jax.lax.stop_gradient(x)
    b = x.shape[0]
    if concrete in ("xla", "reference"):
        _, indices = jax.lax.top_k(x, k)
        return jnp.zeros((b, f), jnp.bool_).at[jnp.arange(b)[:, None], indices].set(True)
    cfg = config.resolve(f, k)
    if b == 0:  # nothing to launch a kernel for
        return jnp.zeros((0, f), jnp.bool_)
    backends.import_triton_for(concrete)
    from hsae_jax.topk import kernels

    kth, ties = launch(kernels.topk_kth_key_kernel, x,
                       out_shape=[jax.ShapeDtypeStruct((b,), jnp.int32)] * 2, grid=(b,),
                       backend=concrete, F=f, K=k, **cfg.select_launch(f))
    keys = _ordered_keys(x)
    above = keys > kth[:, None]
    equal = keys == kth[:, None]

    def first_ties():  # a row takes only the first ``ties`` of its entries equal to kth
        return above | (equal & (jnp.cumsum(equal, axis=1) <= ties[:, None]))

    # usually every row takes all its entries equal to kth (no value repeats at the cut):
    # then no [B, F] cumsum
    takes_all = jnp.all(jnp.sum(equal, axis=1, dtype=jnp.int32) <= ties)
    return jax.lax.cond(takes_all, lambda: above | equal, first_ties)


def top_k_relu(
    x: jax.Array,  # [B, F]
    k: int,
    *,
    backend: Backend = "auto",
    config: TopKConfig | None = None,
) -> jax.Array:
    """[B, F] in x.dtype: ``relu(x)`` at the entries :func:`top_k_mask` selects (each row's
    k largest, ties to the lower column), 0 elsewhere (AuxK's activations).

    On the kernel backends one launch (``topk_relu_kernel``: the select of
    :func:`top_k_mask`'s kernel, then the row written) replaces the mask, its tie count and
    the selects that apply it; on ``"xla"`` / ``"reference"`` it is
    ``where(top_k_mask(x, k), relu(x), 0)``.
    Differentiable in ``x`` (forward and reverse mode): the gradient passes where the
    output is positive (the kept entries above 0), as the definition's does.
    """
    check_top_k_inputs(x, k)
    if len(x.shape) != 2:
        raise ValueError(f"x must have shape [B, F], got {tuple(x.shape)}")
    concrete, config = backends.resolve(backend, config, kernel_config=TopKConfig)
    if concrete in ("xla", "reference"):
        mask = top_k_mask(x, k, backend=concrete, config=config)
        return jnp.where(mask, jax.nn.relu(x), jnp.zeros((), x.dtype))
    cfg = config.resolve(x.shape[1], k)  # bad settings fail here, before anything runs
    if x.shape[0] == 0:  # nothing to launch a kernel for
        return jnp.zeros_like(x)
    return _kernel_top_k_relu(_KernelTopKReLU(concrete, cfg, k), x)


@dataclasses.dataclass(frozen=True)
class _KernelTopKReLU:
    backend: str
    config: TopKConfig  # resolved
    k: int

    def __call__(self, x):
        backends.import_triton_for(self.backend)
        from hsae_jax.topk import kernels

        b, f = x.shape
        (out,) = launch(kernels.topk_relu_kernel, jax.lax.stop_gradient(x),
                        out_shape=[jax.ShapeDtypeStruct((b, f), x.dtype)], grid=(b,),
                        backend=self.backend, F=f, K=self.k, **self.config.select_launch(f))
        return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_top_k_relu(impl, x):
    return impl(x)


@_kernel_top_k_relu.defjvp
def _kernel_top_k_relu_jvp(impl, primals, tangents):
    """The tangent passes where the output is positive (linear, so reverse mode transposes
    it into the same select)."""
    (x,), (dx,) = primals, tangents
    out = _kernel_top_k_relu(impl, x)
    return out, jnp.where(out > 0, dx, jnp.zeros((), dx.dtype))
