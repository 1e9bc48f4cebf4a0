"""Batches on the device before the step asks for them.

:class:`Prefetcher` runs a background thread that reads each step's rows from disk
(``source.host_batch``), starts their copy to the device (``put``) and keeps up to
``depth`` batches ready, so the training step never waits on the disk, on NumPy or on
the host-to-device copy. Sources that make their batches on the device (the synthetic
generator) are called from the consuming thread instead: JAX's asynchronous dispatch
already overlaps them with the step. Rows travel in their stored dtype; the step converts
them on the device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import jax


class Prefetcher:
    """Iterates ``(step, batch)`` for ``steps`` in order, ``depth`` batches ahead.

    source: has ``batch(step)`` (device batches) and, for reading on a background thread,
      ``host_batch(step, process_index, process_count)``.
    put: host rows -> device array (e.g. a ``device_put`` with the batch's sharding, or
      ``jax.make_array_from_process_local_data`` with several processes).
    Errors raised while reading step s (e.g. a batch with non-finite rows) are raised by
    the iterator at step s, after the batches before it. Use as a context manager (or
    call :meth:`close`) so the thread stops when the loop ends early.
    """

    def __init__(self, source, steps: range, put: Callable, *, depth: int = 3,
                 process_index: int = 0, process_count: int = 1):
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        self.source, self.steps, self.put = source, steps, put
        self.process_index, self.process_count = process_index, process_count
        self._threaded = hasattr(source, "host_batch")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = None
        if self._threaded:
            self._thread = threading.Thread(target=self._produce, name="hsae-prefetch",
                                            daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        for step in self.steps:
            if self._stop.is_set():
                return
            try:
                rows = self.source.host_batch(step, self.process_index, self.process_count)
                item = (step, self.put(rows), None)
            except Exception as err:  # noqa: BLE001 - handed to the consumer at this step
                item = (step, None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self) -> Iterator[tuple[int, jax.Array]]:
        if not self._threaded:
            for step in self.steps:
                yield step, self.put(self.source.batch(step))
            return
        for expected in self.steps:
            step, batch, err = self._queue.get()
            if err is not None:
                raise err
            assert step == expected, (step, expected)
            yield step, batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
