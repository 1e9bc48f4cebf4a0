"""Rows of activation matrices stored in files, read by id from memory maps.

:class:`MappedRows` puts one or more ``[rows, D]`` matrices end to end (the shards of an
activation cache, a glob of files, or one file) and reads any rows by global id without
loading a whole file. :func:`open_rows` opens what ``--data`` names: a cache directory,
a file, or a glob of files.
"""

from __future__ import annotations

import collections
import glob
import os
import threading
from typing import NamedTuple

import numpy as np

from hsae_jax.data.layout import array_layout


class Segment(NamedTuple):
    file: str
    offset: int  # bytes before the first element
    rows: int


class MappedRows:
    """Segments of one dtype and width, end to end; rows read from memory maps.

    Calls may come from any thread (the table of open maps is locked). Rows come back
    in the stored dtype.
    """

    def __init__(self, segments: list[Segment], dtype: np.dtype, d_model: int,
                 max_open: int = 64):
        self.segments = list(segments)
        self._dtype = np.dtype(dtype)
        self._d_model = int(d_model)
        self._starts = np.concatenate(
            [[0], np.cumsum([s.rows for s in segments])]).astype(np.int64)  # [S + 1]
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._max_open = max(1, max_open)
        self._lock = threading.Lock()

    @property
    def n_rows(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def describe(self) -> str:
        where = (self.segments[0].file if len(self.segments) == 1
                 else f"{len(self.segments)} files from {self.segments[0].file}")
        return f"{where}: {self.n_rows} x {self.d_model} {self._dtype}"

    def locate(self, row: int) -> tuple[str, int]:
        """(file, row within that file) of global row ``row``."""
        index = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.segments[index].file, int(row - self._starts[index])

    def _map(self, index: int) -> np.ndarray:
        with self._lock:
            array = self._open.get(index)
            if array is not None:
                self._open.move_to_end(index)
                return array
            seg = self.segments[index]
            array = np.memmap(seg.file, dtype=self._dtype, mode="r", offset=seg.offset,
                              shape=(seg.rows, self._d_model))
            self._open[index] = array
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
            return array

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start <= i < stop`` as a new [stop - start, D] array of :attr:`dtype`."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"read({start}, {stop}): need 0 <= start <= stop <= n_rows="
                             f"{self.n_rows}")
        out = np.empty((stop - start, self._d_model), self._dtype)
        self._read_into(out, start, stop)
        return out

    def _read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Copies rows ``start <= i < stop`` (checked by the caller) into ``out``."""
        index = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            first = int(self._starts[index])
            end = min(stop, int(self._starts[index + 1]))
            out[pos - start:end - start] = self._map(index)[pos - first:end - first]
            pos, index = end, index + 1

    def take(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows by global id: ``rows`` [n] integers in [0, n_rows), any order, repeats
        allowed -> [n, D] of :attr:`dtype`, in the given order: written into ``out`` (an
        [n, D] array of :attr:`dtype`, returned) when given, else a new array.

        Ids that come in runs of consecutive rows (a training batch's blocks) are copied
        one slice per run; otherwise they are sorted, grouped by segment and gathered from
        each segment's memory map. Reusing ``out`` spares a batch the page faults of fresh
        memory (and the unmapping of a large freed one) on every read.
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise TypeError(f"take: rows must be a 1-D integer array, got {rows.dtype} "
                            f"shape {rows.shape}")
        want = (rows.size, self._d_model)
        if out is None:
            out = np.empty(want, self._dtype)
        elif out.shape != want or out.dtype != self._dtype or not out.flags.writeable:
            raise ValueError(f"take: out must be a writeable {want} array of {self._dtype}, "
                             f"got {out.shape} {out.dtype}"
                             f"{'' if out.flags.writeable else ' (read-only)'}")
        if rows.size == 0:
            return out
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        if cuts.size < rows.size // 4:  # runs of 4 rows or more on average: slice per run
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= self.n_rows:
                raise IndexError(f"take: row {lo if lo < 0 else hi} is outside [0, n_rows="
                                 f"{self.n_rows})")
            bounds = np.concatenate([[0], cuts, [rows.size]])
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=False):
                self._read_into(out[a:b], int(rows[a]), int(rows[a]) + b - a)
            return out
        order = np.argsort(rows, kind="stable")
        ids = rows[order].astype(np.int64)
        if ids[0] < 0 or ids[-1] >= self.n_rows:
            bad = ids[0] if ids[0] < 0 else ids[-1]
            raise IndexError(f"take: row {bad} is outside [0, n_rows={self.n_rows})")
        segment_of = np.searchsorted(self._starts, ids, side="right") - 1
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(segment_of)) + 1, [ids.size]])
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            index = int(segment_of[a])
            local = ids[a:b] - self._starts[index]
            data = self._map(index)
            lo, hi = int(local[0]), int(local[-1]) + 1
            if hi - lo == b - a and np.all(np.diff(local) == 1):
                out[order[a:b]] = data[lo:hi]
            else:
                out[order[a:b]] = data[local]
        return out


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def open_rows(spec: str, *, tensor: str | None = None, allow_incomplete: bool = False):
    """The rows ``spec`` names: an activation cache directory (docs/activation-cache.md),
    a ``.npy`` / ``.safetensors`` file, or a glob of such files (sorted by name, end to
    end). Every file's header is checked first; files of one glob must agree in width and
    dtype. Raises FileNotFoundError / ValueError naming the file and what is wrong.
    """
    from hsae_jax.data.cache import ActivationCache, is_cache

    if os.path.isdir(spec):
        if not is_cache(spec):
            raise ValueError(f"{spec}: is a directory without manifest.json: not an "
                             "activation cache (docs/activation-cache.md); name a file, a "
                             "glob such as 'acts/*.npy', or a cache directory")
        return ActivationCache(spec, allow_incomplete=allow_incomplete)
    files = sorted(glob.glob(spec)) if _is_glob(spec) else [spec]
    if not files:
        raise FileNotFoundError(f"--data {spec!r}: no file matches")
    segments, first = [], None
    for file in files:
        layout = array_layout(file, tensor)
        if first is None:
            first = (file, layout)
        elif layout.shape[1] != first[1].shape[1] or layout.dtype != first[1].dtype:
            raise ValueError(
                f"{file}: {layout.shape[1]} columns of {layout.dtype}, but {first[0]} has "
                f"{first[1].shape[1]} of {first[1].dtype}: the files of one --data must agree")
        if layout.shape[0]:
            segments.append(Segment(file, layout.offset, layout.shape[0]))
    if not segments:
        raise ValueError(f"--data {spec!r}: no rows (every file is empty)")
    return MappedRows(segments, first[1].dtype, first[1].shape[1])
