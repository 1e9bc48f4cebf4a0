"""Batches on the device before the step asks for them.

:class:`Prefetcher` reads each step's rows on a pool of background threads
(``source.host_batch``: memory-mapped slices, which release the GIL while they copy),
starts their copy to the device (``put``), converts them to float32 and checks them for
NaN / inf on the device (one small program per local device), and keeps up to ``depth``
batches in flight, so the training step never waits on the disk, on NumPy or on the
host-to-device copy. Each thread reads into the host buffer of a batch already on
the device (fresh [B, D] buffers cost page faults, and large freed ones an unmap, on every
batch). Sources that make their batches on the device (the synthetic
generator) are called from the consuming thread instead: JAX's asynchronous dispatch
already overlaps them with the step. Rows travel in their stored dtype (half the bytes
for float16 / bfloat16 caches); the step always receives float32, so it is compiled once
and no conversion is fused into its matmuls.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import inspect
import queue
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _float32_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # a float32 batch is copied, never forwarded: the host buffer it came from is reused
    converted = jnp.copy(x) if x.dtype == jnp.float32 else x.astype(jnp.float32)
    return converted, jnp.all(jnp.isfinite(x))


def _prepare(batch) -> tuple[jax.Array, bool]:
    """(``batch`` as float32, whether it holds no NaN / inf), shard by shard on this
    process's devices: no computation spans processes (reading threads must not launch
    the collective programs every process has to run in the same order)."""
    converted, flags = _prepare_later(batch)
    return converted, _all_true(flags)


def _prepare_later(batch) -> tuple[jax.Array, list[jax.Array]]:
    """:func:`_prepare` without waiting: (``batch`` as float32, one device bool per shard
    saying it is finite), both still being computed."""
    shards = getattr(batch, "addressable_shards", None)
    if shards is None:  # a host array (a test's put)
        converted, finite = _float32_and_finite(batch)
        return converted, [finite]
    done = [_float32_and_finite(shard.data) for shard in shards]
    return jax.make_array_from_single_device_arrays(
        batch.shape, batch.sharding, [converted for converted, _ in done]), [
        finite for _, finite in done]


def _reads_host_rows(placed, batch):
    """What reads the host rows ``placed`` was put from: the copy to the device itself on
    a GPU (its transfer reads them), else the converted batch (a CPU device may use host
    memory in place, and so may a put that returns the host array)."""
    try:
        on_cpu = any(device.platform == "cpu" for device in placed.devices())
    except AttributeError:  # not a jax.Array
        on_cpu = True
    return batch if on_cpu else placed


def _all_true(flags) -> bool:
    return all(bool(flag) for flag in flags)


def _takes_out(host_batch) -> bool:
    """Whether ``host_batch`` takes ``out=`` (named, or through ``**kwargs``: a wrapper)."""
    parameters = inspect.signature(host_batch).parameters.values()
    return any(p.name == "out" or p.kind is p.VAR_KEYWORD for p in parameters)


class Prefetcher:
    """Iterates ``(step, batch)`` for ``steps`` in order, up to ``depth`` batches ahead.

    Batches read on the threads come out float32 (converted on the device).

    source: has ``batch(step)`` (device batches) and, to be read on background threads,
      ``host_batch(step, process_index, process_count)`` and ``non_finite_error(step,
      rows, process_index, process_count)`` (the exception naming rows with NaN / inf).
    put: host rows -> device array (e.g. a ``device_put`` with the batch's sharding, or
      ``jax.make_array_from_process_local_data`` with several processes).
    workers: reading threads (default: ``min(depth, 4)``).
    Errors raised while reading step s (e.g. a batch with non-finite rows) are raised by
    the iterator at step s, after the batches before it; a batch's NaN / inf with
    ``check_lag`` L > 0: when the iterator hands out step s + L, at :meth:`check_all`, or
    when it ends (the step that took the batch skipped its update: its loss was not
    finite); an earlier batch's NaN / inf always comes before a later step's read error.
    With L > 0 no thread of a GPU run waits for the device to run a batch's conversion and
    check, which is queued behind the steps already dispatched: the threads wait only for
    the copy to the device (on a CPU, which may read the host rows in place, for the
    conversion), and the consumer can dispatch step s while the device still runs step
    s - 1 (with L = 0 it dispatches it only once the device has converted batch s, after
    step s - 1). The rows of a batch found with NaN / inf are read again to name them.
    ``defer_errors``: a batch with NaN / inf is handed out as it is, one that could not be
    read as NaN rows (the step skips its update either way), and the error is kept in
    :attr:`deferred` instead, in step order (a process of several must not leave the
    step's collectives alone: the loop raises it where every process checks). Use as a
    context manager (or call :meth:`close`) so the threads stop when the loop ends early;
    batches not checked yet are not checked then (call :meth:`check_all` first).
    """

    def __init__(self, source, steps: range, put: Callable, *, depth: int = 4,
                 workers: int | None = None, process_index: int = 0, process_count: int = 1,
                 defer_errors: bool = False, check_lag: int = 0):
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        if check_lag < 0:
            raise ValueError(f"check_lag={check_lag} must be >= 0")
        self.source, self.steps, self.put, self.depth = source, steps, put, depth
        self.check_lag = check_lag
        self._unchecked: collections.deque = collections.deque()  # (step, finite flags)
        self.process_index, self.process_count = process_index, process_count
        self.defer_errors = defer_errors
        # (step, error) of batches handed out with NaN / inf, or handed out as NaN rows
        # because they could not be read (``defer_errors``), in step order
        self._deferred: list[tuple[int, Exception]] = []
        self._pool = None
        if hasattr(source, "host_batch"):
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers or min(depth, 4), thread_name_prefix="hsae-prefetch")
        # host buffers of batches already on the device, read into again (sources whose
        # host_batch takes ``out``): at most one per reading thread
        self._buffers: queue.SimpleQueue | None = None
        if self._pool is not None and _takes_out(source.host_batch):
            self._buffers = queue.SimpleQueue()
        self._pending: collections.deque = collections.deque()

    def _read(self, step: int):
        buffer = None
        if self._buffers is not None:
            try:
                buffer = self._buffers.get_nowait()
            except queue.Empty:
                pass
        args = (step, self.process_index, self.process_count)
        try:
            rows = (self.source.host_batch(*args) if buffer is None
                    else self.source.host_batch(*args, out=buffer))
        except Exception as err:
            stand_in = self._stand_in()
            if stand_in is None:
                raise
            return _prepare(self.put(stand_in))[0], None, err
        placed = self.put(rows)
        if self.check_lag:  # checked later, by the consumer
            batch, flags = _prepare_later(placed)
            jax.block_until_ready(_reads_host_rows(placed, batch))  # the host buffer is free
            if self._buffers is not None:
                self._buffers.put(rows)
            return batch, flags, None
        batch, finite = _prepare(placed)  # waits until the device has the rows
        error = None
        if not finite:
            error = self._non_finite_error(step, rows)
            if not self.defer_errors:
                raise error
        if self._buffers is not None:
            self._buffers.put(rows)
        return batch, None, error

    @property
    def deferred(self) -> list[Exception]:
        """The errors kept with ``defer_errors``, in the order of their steps."""
        return [error for _, error in self._deferred]

    def _defer(self, step: int, error: Exception) -> None:
        bisect.insort(self._deferred, (step, error), key=lambda item: item[0])

    def _non_finite_error(self, step: int, rows=None) -> Exception:
        """The error naming step ``step``'s rows with NaN / inf (read again if not given;
        a generic one if that read fails or finds none)."""
        plain = ValueError(f"step {step}'s batch holds NaN or inf")
        check = getattr(self.source, "non_finite_error", None)
        if check is None:
            return plain
        if rows is None:
            try:
                rows = self.source.host_batch(step, self.process_index, self.process_count)
            except Exception as err:  # noqa: BLE001 - the batch's error is what to report
                plain.__cause__ = err
                return plain
            if np.isfinite(np.asarray(rows, np.float32)).all():  # changed since it was read
                return ValueError(f"step {step}'s batch held NaN or inf when it was read, but "
                                  "not when read again to name its rows: did the data change?")
        return check(step, rows, self.process_index, self.process_count)

    def _check(self, through: int) -> None:
        """Checks the batches handed out up to step ``through`` (with ``check_lag``)."""
        while self._unchecked and self._unchecked[0][0] <= through:
            step, flags = self._unchecked.popleft()
            if not _all_true(flags):
                error = self._non_finite_error(step)
                if not self.defer_errors:
                    self._unchecked.clear()
                    raise error
                self._defer(step, error)

    def check_all(self) -> None:
        """Checks every batch handed out so far (with ``check_lag``; nothing to do
        otherwise): raises the error of the first one that holds NaN / inf, or with
        ``defer_errors`` adds it to :attr:`deferred`. Call it before anything that keeps
        the state a batch made (a log, an evaluation, a checkpoint)."""
        self._check(self.steps.stop)

    def _stand_in(self) -> np.ndarray | None:
        """With ``defer_errors``, the NaN rows handed out for a batch that could not be
        read (None: raise instead; also for sources that do not say their batch's shape)."""
        shape = (getattr(self.source, "batch_size", None), getattr(self.source, "d_model", None))
        if not self.defer_errors or None in shape:
            return None
        dtype = getattr(self.source, "host_dtype", np.float32)
        return np.full((shape[0] // self.process_count, shape[1]), np.nan, dtype)

    def __iter__(self) -> Iterator[tuple[int, jax.Array]]:
        if self._pool is None:
            for step in self.steps:
                yield step, self.put(self.source.batch(step))
            return
        upcoming = iter(self.steps)
        for step in upcoming:
            self._pending.append((step, self._pool.submit(self._read, step)))
            if len(self._pending) >= self.depth:
                break
        while self._pending:
            step, future = self._pending.popleft()
            try:
                batch, flags, error = future.result()  # raises what reading it raised
            except BaseException:
                self.check_all()  # an earlier batch's NaN / inf comes first
                raise
            if error is not None:
                self._defer(step, error)
            if flags is not None:
                self._unchecked.append((step, flags))
            self._check(step - self.check_lag)
            nxt = next(upcoming, None)
            if nxt is not None:
                self._pending.append((nxt, self._pool.submit(self._read, nxt)))
            yield step, batch
        self.check_all()

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._unchecked.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
