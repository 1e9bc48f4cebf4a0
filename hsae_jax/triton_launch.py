"""Launching a Triton kernel from JAX: compiled (jax-triton) or interpreted (CPU).

Both launchers take the arguments in jax-triton's order: the kernel receives every
input (arrays and Python scalars, in order) first and then one pointer per output.
Constexpr parameters are passed by keyword.

- ``backend="triton"``: ``jax_triton.triton_call``, on jax-triton 0.3.x (Triton 3.6) and
  0.4.x (Triton >= 3.7). No launch aliases an input to an output: the two versions
  disagree on how an aliased output reaches the kernel (0.3.x passes it as its own
  pointer, 0.4.x only through the input's), so a kernel that updates a buffer reads it
  as an input and writes a fresh output.
- ``backend="interpret"``: ``jax.pure_callback`` running the same kernel function under
  Triton's interpreter on torch CPU tensors. Outputs not listed in ``zeroed_outputs``
  are poisoned (NaN, or -1 for integers) before the launch, so an element a kernel
  forgets to write shows up in every test. Under ``jax.vmap`` the callback runs once
  per batch element (``vmap_method="sequential"``).

A kernel launch has no derivative of its own (the ops' custom_vjp rules and
``hierarchical_sae_prefix_sse``'s custom_jvp provide them): on ``"interpret"``,
forward-mode differentiation that reaches a launch (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian`` of an op whose backward runs kernels) raises an error naming the backend
and suggesting ``backend="xla"``, which supports every transformation; on ``"triton"``
jax-triton refuses it itself (the compiled launch is jax-triton's call, unwrapped).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from hsae_jax import backends


def launch(
    kernel,
    *args: Any,
    out_shape: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...],
    backend: str,
    zeroed_outputs: Sequence[int] = (),
    num_warps: int = 4,
    num_stages: int = 2,
    **constexprs: Any,
) -> list[jax.Array]:
    """Runs ``kernel`` on ``grid`` and returns its outputs (a list, one per out_shape).

    zeroed_outputs: indices of outputs zeroed before the launch (accumulated with
    atomics); the interpreter fills every other output with NaN (or -1) first.
    """
    out_shape = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shape]
    grid = tuple(int(g) for g in grid)
    if any(g < 1 for g in grid):
        raise ValueError(f"{grid=} must be positive")
    if backend not in backends.KERNEL_BACKENDS:
        raise ValueError(f"{backend=} does not launch Triton kernels")
    if backend == "triton":
        return _launch_compiled(kernel, args, out_shape, grid, tuple(zeroed_outputs),
                                num_warps, num_stages, constexprs)
    positions = [i for i, a in enumerate(args) if not isinstance(a, (int, float, bool))]

    @jax.custom_jvp
    def run(*arrays):
        call_args = list(args)
        for position, value in zip(positions, arrays, strict=True):
            call_args[position] = value
        return tuple(_launch_interpreted(kernel, call_args, out_shape, grid,
                                         tuple(zeroed_outputs), constexprs))

    @run.defjvp
    def _no_forward_mode(primals, tangents):
        raise NotImplementedError(
            f"backend={backend!r}: the Triton kernel {kernel.__name__} has no forward-mode "
            "derivative (jax.jvp, jax.jacfwd, jax.hessian, or a derivative of an op's "
            "gradient); use backend='xla', which supports every JAX transformation")

    return list(run(*[args[i] for i in positions]))


def _launch_compiled(kernel, args, out_shape, grid, zeroed_outputs, num_warps, num_stages,
                     constexprs):
    jt = backends.import_jax_triton()
    version = tuple(int(p) for p in jt.__version__.split(".")[:2])
    shape_kw = "out_shape" if version < (0, 4) else "out_type"
    with warnings.catch_warnings():
        # 0.4.x deprecates zeroed_outputs in favour of Ref arguments; 0.3.x has no Refs.
        warnings.simplefilter("ignore", DeprecationWarning)
        outs = jt.triton_call(
            *args,
            kernel=kernel,
            grid=grid,
            name=kernel.__name__,
            num_warps=num_warps,
            num_stages=num_stages,
            zeroed_outputs=zeroed_outputs,
            **{shape_kw: out_shape},
            **constexprs,
        )
    return list(outs)


# --------------------------------------------------------------------------- interpret


def _to_torch(array: np.ndarray):
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == jax.numpy.bfloat16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _to_numpy(tensor, dtype) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(jax.numpy.bfloat16)
    return tensor.numpy().astype(dtype, copy=False)


def _torch_dtype(dtype):
    import torch

    return {
        np.dtype("float32"): torch.float32,
        np.dtype("float64"): torch.float64,
        np.dtype("float16"): torch.float16,
        np.dtype(jax.numpy.bfloat16): torch.bfloat16,
        np.dtype("int32"): torch.int32,
        np.dtype("int64"): torch.int64,
    }[np.dtype(dtype)]


# Triton's interpreter patches triton.language while a kernel runs: launches from several
# threads at once (one per device of a CPU mesh) must take turns
_INTERPRETER_LOCK = threading.Lock()


def _launch_interpreted(kernel, args, out_shape, grid, zeroed_outputs, constexprs):
    import torch

    array_positions = [i for i, a in enumerate(args) if not isinstance(a, (int, float, bool))]
    arrays = [args[i] for i in array_positions]

    def host(*host_arrays):
        call_args = list(args)
        for position, value in zip(array_positions, host_arrays, strict=True):
            call_args[position] = _to_torch(np.asarray(value))
        outputs = []
        for index, spec in enumerate(out_shape):
            dtype = _torch_dtype(spec.dtype)
            if index in zeroed_outputs:
                outputs.append(torch.zeros(spec.shape, dtype=dtype))
            elif dtype.is_floating_point:
                outputs.append(torch.full(spec.shape, float("nan"), dtype=dtype))
            else:
                outputs.append(torch.full(spec.shape, -1, dtype=dtype))
        with _INTERPRETER_LOCK:
            kernel[grid](*call_args, *outputs, **constexprs)
        return tuple(_to_numpy(o, s.dtype) for o, s in zip(outputs, out_shape, strict=True))

    return list(jax.pure_callback(host, tuple(out_shape), *arrays, vmap_method="sequential"))
