"""Training sources: activations from files or a cache (:class:`RowSource`), or synthetic.

A source has ``d_model``, ``describe()``, ``batch(step)`` ([B, D] on the device) and
``eval_batches(count)``. A :class:`RowSource` also reads on the host
(``host_batch(step)``), which the prefetching loader (loader.py) does on a background
thread; rows keep their stored dtype (float16 / bfloat16 / float32) until the device
converts them.
"""

from __future__ import annotations

import jax
import numpy as np

from hsae_jax.data.rows import open_rows
from hsae_jax.data.sampler import RowSampler
from hsae_jax.data.synthetic import SyntheticActivations, SyntheticConfig

EVAL_STEP_OFFSET = 2**30  # synthetic evaluation batches come from steps no run reaches
MAX_AUTO_EVAL_FRACTION = 0.1


class NonFiniteRowsError(ValueError):
    """A batch read from the data holds NaN or inf."""


def _non_finite(rows: np.ndarray) -> np.ndarray:
    """[n] bool: rows holding NaN or inf, from the exponent bits (no float conversion)."""
    kind = {2: np.uint16, 4: np.uint32, 8: np.uint64}[rows.dtype.itemsize]
    exponent = {  # all-ones exponent <=> inf or NaN
        np.dtype(np.float16): 0x7C00, np.dtype(np.float32): 0x7F800000,
        np.dtype(np.float64): 0x7FF0000000000000}.get(rows.dtype, 0x7F80)  # bfloat16
    bits = rows.view(kind) & kind(exponent)
    return np.any(bits == kind(exponent), axis=1)


class RowSource:
    """Batches of rows from activations on disk, mixed across all of them.

    rows: what :func:`hsae_jax.data.rows.open_rows` returns (a cache, files).
    batch_size: B. seed: the data order. eval_fraction: share of the rows held out for
      evaluation (None: enough for ``eval_batches`` batches, at most 10%; 0: none, and
      evaluation reads training rows). eval_rows: another ``open_rows`` result to
      evaluate on instead (nothing is held out then). block_rows: consecutive rows read
      together (see :class:`RowSampler`).
    """

    def __init__(self, rows, batch_size: int, *, seed: int = 0, eval_fraction: float | None = None,
                 eval_batches: int = 4, eval_rows=None, block_rows: int = 16):
        self.rows = rows
        self.batch_size = batch_size
        self.d_model = rows.d_model
        self.dtype = rows.dtype
        self.eval_source = eval_rows
        if eval_rows is not None:
            if eval_rows.d_model != rows.d_model:
                raise ValueError(f"--eval-data has D={eval_rows.d_model}; --data has "
                                 f"D={rows.d_model}")
            held_out = 0
        elif eval_fraction is None:
            held_out = min(eval_batches * batch_size,
                           int(MAX_AUTO_EVAL_FRACTION * rows.n_rows))
        else:
            held_out = int(round(eval_fraction * rows.n_rows))
        self.sampler = RowSampler(rows.n_rows, batch_size, seed=seed, eval_rows=held_out,
                                  block_rows=block_rows)

    # ------------------------------------------------------------------ training rows

    def _share(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        share = self.batch_size // process_count
        return self.sampler.batch_rows(step, process_index * share,
                                       (process_index + 1) * share)

    @property
    def host_dtype(self) -> np.dtype:
        """The dtype of :meth:`host_batch`'s rows: the stored one (float32 for float64)."""
        return np.dtype(np.float32) if self.dtype == np.float64 else np.dtype(self.dtype)

    def host_batch(self, step: int, process_index: int = 0, process_count: int = 1,
                   out: np.ndarray | None = None) -> np.ndarray:
        """This process's share [B / process_count, D] of step ``step``'s batch, of
        :attr:`host_dtype`: written into ``out`` (such an array, returned; the loader
        passes back the buffers of batches already on the device) when given. Not checked
        for NaN / inf here: the loader checks on the device and calls
        :meth:`non_finite_error` when it must."""
        ids = self._share(step, process_index, process_count)
        if self.dtype != np.float64:
            return self.rows.take(ids, out=out)
        x = self.rows.take(ids).astype(np.float32)
        if out is None:
            return x
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"host_batch: out must be a {x.shape} float32 array, got "
                             f"{out.shape} {out.dtype}")
        out[...] = x
        return out

    def non_finite_error(self, step: int, rows: np.ndarray, process_index: int = 0,
                         process_count: int = 1) -> NonFiniteRowsError:
        """The error naming the files and rows of ``rows`` (step ``step``'s host batch)
        that hold NaN or inf."""
        ids = self._share(step, process_index, process_count)
        return NonFiniteRowsError(self._describe_rows(ids[_non_finite(rows)],
                                                      f"step {step}'s batch"))

    def batch(self, step: int) -> jax.Array:
        """Step ``step``'s [B, D] batch on the default device (stored dtype); raises
        NonFiniteRowsError naming the rows if it holds NaN or inf."""
        rows = self.host_batch(step)
        if _non_finite(rows).any():
            raise self.non_finite_error(step, rows)
        return jax.device_put(rows)

    def _describe_rows(self, ids: np.ndarray, where: str) -> str:
        ids = np.sort(ids)
        places = [self.rows.locate(int(i)) for i in ids[:5]]
        listed = ", ".join(f"{file} row {row}" for file, row in places)
        more = f" and {ids.size - 5} more" if ids.size > 5 else ""
        return (f"{ids.size} row(s) of {where} hold NaN or inf: {listed}{more}. Remove or fix "
                "them (the cache writer refuses such rows)")

    # ---------------------------------------------------------------- evaluation rows

    def eval_batches(self, count: int) -> list[jax.Array]:
        """Up to ``count`` batches of rows no training step reads (of --eval-data when
        given); evaluation reads training rows only when eval_fraction is 0."""
        if self.eval_source is not None:
            n = min(count * self.batch_size, self.eval_source.n_rows)
            ids, rows = np.arange(n), self.eval_source
        elif self.sampler.eval_rows:
            ids, rows = self.sampler.held_out_rows()[:count * self.batch_size], self.rows
        else:
            return [self.batch(step) for step in range(count)]
        out = []
        for start in range(0, ids.size, self.batch_size):
            chunk = rows.take(ids[start:start + self.batch_size])
            if _non_finite(chunk).any():
                raise NonFiniteRowsError(self._describe_rows(
                    ids[start:start + self.batch_size][_non_finite(chunk)],
                    "the evaluation rows"))
            out.append(jax.device_put(chunk.astype(np.float32) if chunk.dtype == np.float64
                                      else chunk))
        return out

    def split(self) -> dict:
        """How the rows are used (recorded in cfg.json)."""
        return {"rows": self.rows.n_rows, "train_rows": self.sampler.train_rows,
                "held_out_rows": 0 if self.eval_source is not None else self.sampler.eval_rows,
                "eval_data_rows": None if self.eval_source is None else self.eval_source.n_rows,
                "block_rows": self.sampler.block_rows, "dtype": str(self.dtype)}

    def describe(self) -> str:
        held = (f"evaluated on {self.eval_source.describe()}" if self.eval_source is not None
                else f"{self.sampler.eval_rows} rows held out for evaluation"
                if self.sampler.eval_rows else "no rows held out (evaluation reads training rows)")
        return f"{self.rows.describe()}; {held}"


def open_source(data: str | None, batch_size: int, *, seed: int = 0,
                data_key: str | None = None, synthetic: SyntheticConfig | None = None,
                eval_fraction: float | None = None, eval_batches: int = 4,
                eval_data: str | None = None, block_rows: int = 16):
    """The activation source for ``data`` (a cache directory, a file or a glob of files),
    or the synthetic generator when ``data`` is None."""
    if data:
        eval_rows = open_rows(eval_data, tensor=data_key) if eval_data else None
        return RowSource(open_rows(data, tensor=data_key), batch_size, seed=seed,
                         eval_fraction=eval_fraction, eval_batches=eval_batches,
                         eval_rows=eval_rows, block_rows=block_rows)
    return SyntheticActivations(synthetic or SyntheticConfig(seed=seed), batch_size)


def eval_batches(source, count: int) -> list[jax.Array]:
    """``count`` batches for evaluation: synthetic ones no training step draws, the
    source's own (``source.eval_batches``: a RowSource's held-out rows), or else its
    first training batches."""
    if isinstance(source, SyntheticActivations):
        return [source.batch(EVAL_STEP_OFFSET + i) for i in range(count)]
    if hasattr(source, "eval_batches"):
        return source.eval_batches(count)
    return [source.batch(i) for i in range(count)]
