"""The sharded activation cache (``docs/activation-cache.md``): a writer and a reader.

A cache is a directory with ``manifest.json`` and shards ``shard-NNNNNN.npy`` /
``.safetensors``, each a ``[rows, d_model]`` matrix of one dtype (float16, bfloat16 or
float32). :class:`CacheWriter` appends rows and writes each full shard atomically;
a killed writer leaves a valid, incomplete cache that a new writer resumes.
:class:`ActivationCache` validates a cache up front and reads rows by range
(:meth:`~ActivationCache.read`) or by id (:meth:`~ActivationCache.take`) from
memory-mapped shards, never loading a whole shard.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any

import numpy as np

from hsae_jax.data.layout import array_layout, numpy_dtype
from hsae_jax.data.rows import MappedRows, Segment
from hsae_jax.io_utils import atomic_write, atomic_write_json

FORMAT = "hsae-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
TENSOR_NAME = "activations"  # the one tensor of a .safetensors shard
SHARD_FORMATS = ("npy", "safetensors")
MANIFEST_KEYS = ("format", "version", "dtype", "d_model", "rows_per_shard", "total_rows",
                 "shards", "complete", "provenance", "writer_state")
# files a writer owns: shards, their temporaries and the manifest's temporaries
_OWNED = re.compile(r"^(shard-.*|manifest\.json\.tmp-.*)$")


def cache_dtype(name: str) -> np.dtype:
    """The numpy dtype of a cache dtype name (bfloat16 is ``ml_dtypes.bfloat16``)."""
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype {name!r} is not one of float16, bfloat16, float32")
    return numpy_dtype(name)


def shard_name(index: int, shard_format: str) -> str:
    return f"shard-{index:06d}.{shard_format}"


def is_cache(path: str) -> bool:
    """Whether ``path`` is a directory holding a ``manifest.json``."""
    return os.path.isfile(os.path.join(path, MANIFEST))


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str) -> dict:
    """The parsed, checked ``manifest.json`` of the cache at ``path`` (shards not opened).

    Raises FileNotFoundError (no directory / no manifest) or ValueError, one line each,
    naming the file and what is wrong.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"activation cache {path} does not exist (or is not a directory)")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path}: no {MANIFEST}: not an activation cache")
    with open(mpath) as f:
        text = f.read()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{mpath}: not valid JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno})") from None
    _check_manifest(mpath, manifest)
    return manifest


def _check_manifest(mpath: str, m: Any) -> None:
    if not isinstance(m, dict):
        raise ValueError(f"{mpath}: must hold a JSON object, got {type(m).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise ValueError(f"{mpath}: missing keys {missing}")
    if m["format"] != FORMAT:
        raise ValueError(f"{mpath}: format is {m['format']!r}, expected {FORMAT!r}")
    if m["version"] != VERSION:
        raise ValueError(f"{mpath}: version is {m['version']!r}; this reader knows version "
                         f"{VERSION}")
    if m["dtype"] not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"{mpath}: dtype {m['dtype']!r} is not one of float16, bfloat16, "
                         "float32")

    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    for key, low in (("d_model", 1), ("rows_per_shard", 1), ("total_rows", 0)):
        if not is_int(m[key], low):
            raise ValueError(f"{mpath}: {key} is {m[key]!r}, expected an integer >= {low}")
    if not isinstance(m["complete"], bool):
        raise ValueError(f"{mpath}: complete is {m['complete']!r}, expected true or false")
    for key in ("provenance", "writer_state"):
        if not isinstance(m[key], dict):
            raise ValueError(f"{mpath}: {key} must be a JSON object, got {m[key]!r}")
    if not isinstance(m["shards"], list):
        raise ValueError(f"{mpath}: shards must be a list, got {type(m['shards']).__name__}")
    seen = set()
    for i, entry in enumerate(m["shards"]):
        if (not isinstance(entry, dict) or not isinstance(entry.get("file"), str)
                or not is_int(entry.get("rows"), 0)):
            raise ValueError(f"{mpath}: shards[{i}] is {entry!r}, expected "
                             '{"file": NAME, "rows": N}')
        name = entry["file"]
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{mpath}: shards[{i}] file {name!r} must be a plain file name "
                             "inside the cache directory")
        if not name.endswith((".npy", ".safetensors")):
            raise ValueError(f"{mpath}: shards[{i}] file {name!r} must end in .npy or "
                             ".safetensors")
        if name.endswith(".npy") and m["dtype"] == "bfloat16":
            raise ValueError(f"{mpath}: shards[{i}] file {name!r}: bfloat16 shards must be "
                             ".safetensors (.npy has no bfloat16)")
        if name in seen:
            raise ValueError(f"{mpath}: shards[{i}] file {name!r} is listed twice")
        seen.add(name)
        last = i == len(m["shards"]) - 1
        if entry["rows"] > m["rows_per_shard"] or (not last
                                                   and entry["rows"] != m["rows_per_shard"]):
            raise ValueError(f"{mpath}: shards[{i}] ({name}) lists {entry['rows']} rows; every "
                             f"shard but the last holds rows_per_shard={m['rows_per_shard']} "
                             "and the last at most that")
    counted = sum(e["rows"] for e in m["shards"])
    if counted != m["total_rows"]:
        raise ValueError(f"{mpath}: the shards' rows add up to {counted}, but total_rows is "
                         f"{m['total_rows']}")


# ------------------------------------------------------------------------------- shards


def _check_shard(path: str, dtype: np.dtype, rows: int, d_model: int) -> int:
    """Checks one shard against its manifest entry; returns the data offset."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (listed in {MANIFEST})")
    got_dtype, shape, offset = array_layout(
        path, TENSOR_NAME if path.endswith(".safetensors") else None)
    if shape[1] != d_model:
        raise ValueError(f"{path}: {shape[1]} columns, expected d_model={d_model}")
    if shape[0] != rows:
        raise ValueError(f"{path}: {shape[0]} rows, the manifest lists {rows}")
    if got_dtype != dtype:
        raise ValueError(f"{path}: dtype {got_dtype}, the manifest says {dtype}")
    return offset


# ------------------------------------------------------------------------------- reader


class ActivationCache(MappedRows):
    """Read access to a sharded activation cache.

    Everything is checked when the object is made (manifest keys and values, every
    shard's header: file present, 2-D, ``d_model`` columns, the listed rows, the dtype;
    counts adding up; ``complete``), so a broken cache fails before any work. Rows come
    back in the stored dtype (:attr:`dtype`: float16, float32, or ``ml_dtypes.bfloat16``,
    which is ``jnp.bfloat16``), read from memory-mapped shards (:class:`MappedRows`:
    ``read(start, stop)``, ``take(ids)``): one call touches only the rows it returns.

    Args:
      path: the cache directory.
      allow_incomplete: read a cache whose writer has not closed it (a running or
        killed harvest): the rows of the shards written so far.
      max_open_shards: memory maps kept open at once (least recently used are closed).
    """

    def __init__(self, path: str, allow_incomplete: bool = False, max_open_shards: int = 64):
        self.path = path
        manifest = read_manifest(path)
        mpath = os.path.join(path, MANIFEST)
        if not manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"{mpath}: incomplete cache (complete: false; {manifest['total_rows']} rows "
                f"in {len(manifest['shards'])} shards so far): its writer is running or was "
                "killed; resume the harvest, or pass allow_incomplete=True")
        if manifest["total_rows"] == 0:
            raise ValueError(f"{mpath}: empty cache (no rows)")
        self.manifest = manifest
        dtype = cache_dtype(manifest["dtype"])
        segments = []
        for entry in manifest["shards"]:
            file = os.path.join(path, entry["file"])
            offset = _check_shard(file, dtype, entry["rows"], manifest["d_model"])
            if entry["rows"]:
                segments.append(Segment(file, offset, entry["rows"]))
        self.shard_rows = tuple(entry["rows"] for entry in manifest["shards"])
        super().__init__(segments, dtype, manifest["d_model"], max_open=max_open_shards)

    @property
    def provenance(self) -> dict:
        return self.manifest["provenance"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def describe(self) -> str:
        more = "" if self.complete else " (incomplete)"
        return (f"{self.path}: {self.n_rows} x {self.d_model} {self.dtype} in "
                f"{len(self.shard_rows)} shards{more}")


# ------------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes an activation cache, one atomically renamed shard at a time.

    ``append(rows, state)`` converts rows to the cache dtype and buffers them; each full
    shard of ``rows_per_shard`` rows is written to a temporary name and renamed, then
    the manifest (``complete: false``) is rewritten atomically. :meth:`close` writes the
    last, partial shard and sets ``complete: true``. Used as a context manager, it
    closes on success and leaves the cache incomplete (resumable) on an exception.

    Resuming. ``state`` (anything JSON-serialisable, e.g. ``{"next_context": 12}``)
    says where the source stands after the rows of that call. With every shard the
    manifest's ``writer_state`` records ``{"state": S, "rows_after_state": r}``: S from
    the last ``append`` whose rows all lie in written shards, r the written rows that
    came after it. Re-opening an incomplete cache (``resume=True``) removes leftover
    shard files, keeps the listed shards and sets :attr:`resume_state` = S: restart the
    source there and append as before; the first r rows appended (:attr:`rows_to_skip`,
    already stored) are dropped by the writer, so the cache ends as if never stopped.

    Args:
      path: the cache directory (created if absent).
      d_model: D, the width of every row.
      dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
      rows_per_shard: rows in every shard but the last.
      shard_format: ``"npy"`` or ``"safetensors"``; default ``.npy`` for float16/float32,
        ``.safetensors`` for bfloat16 (which ``.npy`` cannot hold).
      provenance: JSON-serialisable dict of where the rows come from (saved with every
        manifest; :meth:`update_provenance` changes it).
      overwrite: replace an existing cache (complete or not) or write into a directory
        that holds other files; only the cache's own files (``manifest.json``,
        ``shard-*``) are removed, nothing else.
      resume: continue an incomplete cache at ``path`` (its dtype, d_model, rows_per_shard
        and shard format must match). False: an incomplete cache is refused like a
        complete one unless ``overwrite``.
    """

    def __init__(self, path: str, d_model: int, *, dtype: str = "float16",
                 rows_per_shard: int = 65536, shard_format: str | None = None,
                 provenance: dict | None = None, overwrite: bool = False,
                 resume: bool = True):
        self.path = path
        self.dtype_name = dtype
        self.dtype = cache_dtype(dtype)
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"CacheWriter: d_model={d_model!r} must be an integer >= 1")
        if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise ValueError(f"CacheWriter: rows_per_shard={rows_per_shard!r} must be an "
                             "integer >= 1")
        shard_format = shard_format or ("safetensors" if dtype == "bfloat16" else "npy")
        if shard_format not in SHARD_FORMATS:
            raise ValueError(f"CacheWriter: shard_format={shard_format!r} must be one of "
                             f"{SHARD_FORMATS}")
        if shard_format == "npy" and dtype == "bfloat16":
            raise ValueError("CacheWriter: bfloat16 shards must be safetensors (.npy has no "
                             "bfloat16)")
        self.d_model, self.rows_per_shard, self.shard_format = d_model, rows_per_shard, \
            shard_format
        self.provenance = dict(provenance or {})
        _json_check(self.provenance, "provenance")

        self._shards: list[dict] = []
        self._written = 0                 # rows in written shards
        self._state = None                # state at the last append boundary <= _written
        self._state_end = 0               # ... and the row count at that boundary
        self._pending: collections.deque = collections.deque()  # (row count, state) pairs
        self._buffer: np.ndarray | None = None
        self._fill = 0
        self._closed = False
        self.resumed = False
        self.resume_state: Any = None
        self.rows_to_skip = 0

        if os.path.isfile(os.path.join(path, MANIFEST)) and not overwrite:
            self._open_existing(resume)
        else:
            self._create(overwrite)

    # -- opening
    def _create(self, overwrite: bool) -> None:
        if os.path.isdir(self.path):
            entries = os.listdir(self.path)
            foreign = [e for e in entries if e != MANIFEST and not _OWNED.match(e)]
            if foreign and not overwrite:
                raise FileExistsError(f"{self.path} exists and is not an activation cache (it "
                                      f"holds {sorted(foreign)[:3]}...): choose another "
                                      "directory or pass overwrite=True")
            for e in entries:
                if e == MANIFEST or _OWNED.match(e):
                    os.remove(os.path.join(self.path, e))
        elif os.path.exists(self.path):
            raise FileExistsError(f"{self.path} exists and is not a directory")
        os.makedirs(self.path, exist_ok=True)
        self._write_manifest(complete=False)

    def _open_existing(self, resume: bool) -> None:
        manifest = read_manifest(self.path)
        mpath = os.path.join(self.path, MANIFEST)
        if manifest["complete"]:
            raise FileExistsError(f"{self.path} already holds a complete activation cache "
                                  f"({manifest['total_rows']} rows): pass overwrite=True to "
                                  "replace it, or choose another directory")
        if not resume:
            raise FileExistsError(f"{self.path} holds an incomplete activation cache: pass "
                                  "resume=True to continue it or overwrite=True to replace it")
        theirs = {"dtype": manifest["dtype"], "d_model": manifest["d_model"],
                  "rows_per_shard": manifest["rows_per_shard"]}
        ours = {"dtype": self.dtype_name, "d_model": self.d_model,
                "rows_per_shard": self.rows_per_shard}
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        formats = {e["file"].rsplit(".", 1)[1] for e in manifest["shards"]}
        if formats - {self.shard_format}:
            diff["shard_format"] = (sorted(formats), self.shard_format)
        if diff:
            raise ValueError(f"{mpath}: cannot resume: the cache was started with different "
                             "settings (cache, now): " + ", ".join(
                                 f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        listed = {e["file"] for e in manifest["shards"]}
        for entry in os.listdir(self.path):
            if _OWNED.match(entry) and entry not in listed:
                os.remove(os.path.join(self.path, entry))  # leftovers of a killed writer
        for entry in manifest["shards"]:
            _check_shard(os.path.join(self.path, entry["file"]), self.dtype, entry["rows"],
                         self.d_model)
        saved = manifest["writer_state"]
        self._shards = list(manifest["shards"])
        self._written = manifest["total_rows"]
        self.rows_to_skip = int(saved.get("rows_after_state", self._written))
        self.resume_state = saved.get("state")
        self._state, self._state_end = self.resume_state, self._written - self.rows_to_skip
        if not self.provenance:
            self.provenance = manifest["provenance"]
        self.resumed = True

    # -- properties
    @property
    def n_rows(self) -> int:
        """Rows in the cache so far: written shards plus the buffer."""
        return self._written + self._fill

    @property
    def rows_written(self) -> int:
        """Rows in shards on disk (what a reader or a resumed writer sees)."""
        return self._written

    @property
    def shards_written(self) -> int:
        return len(self._shards)

    @property
    def closed(self) -> bool:
        return self._closed

    def update_provenance(self, **items) -> None:
        """Merges ``items`` into the provenance saved with the next manifest."""
        _json_check(items, "provenance")
        self.provenance.update(items)

    # -- writing
    def append(self, rows, state: Any = None) -> None:
        """Adds rows [n, D] (any float dtype; numpy, or anything ``np.asarray`` takes).

        Rows are converted to the cache dtype; a call whose rows hold NaN or inf (also
        after the conversion: float16 overflows past 65504) is refused whole, naming the
        rows. ``state``: where the source stands after these rows (see the class doc).
        """
        if self._closed:
            raise ValueError(f"{self.path}: append after close()")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d_model:
            raise ValueError(f"{self.path}: append: rows must be [n, d_model={self.d_model}], "
                             f"got shape {rows.shape}")
        if not (np.issubdtype(rows.dtype, np.floating) or rows.dtype == cache_dtype("bfloat16")):
            raise ValueError(f"{self.path}: append: rows must be floating point, got "
                             f"{rows.dtype}")
        if state is not None:
            _json_check(state, "append state")
        skip = min(self.rows_to_skip, rows.shape[0])
        if skip:
            rows = rows[skip:]
            self.rows_to_skip -= skip
        with np.errstate(over="ignore"):  # overflow shows up as inf: reported below
            converted = rows.astype(self.dtype, copy=False)
        finite = np.isfinite(converted).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            first, last = int(bad[0]), int(bad[-1])
            overflow = bool(np.isfinite(rows[bad]).all())
            why = (f"finite, but outside the range of {self.dtype_name}: use dtype float32 or "
                   "bfloat16" if overflow else "NaN or inf")
            raise ValueError(
                f"{self.path}: append: {bad.size} of {rows.shape[0]} rows are not finite "
                f"({why}): rows {first}..{last} of this call, cache rows "
                f"{self.n_rows + first}..{self.n_rows + last}; nothing was appended")
        pos = 0
        while pos < converted.shape[0]:
            if self._buffer is None:
                self._buffer = np.empty((self.rows_per_shard, self.d_model), self.dtype)
            n = min(self.rows_per_shard - self._fill, converted.shape[0] - pos)
            self._buffer[self._fill:self._fill + n] = converted[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == self.rows_per_shard:
                self._flush(complete=False)
        if state is not None:
            # where the source stands, in cache rows (rows still to skip lie before it)
            self._pending.append((self.n_rows - self.rows_to_skip, state))
            self._advance_state()

    def _advance_state(self) -> None:
        while self._pending and self._pending[0][0] <= self._written:
            self._state_end, self._state = self._pending.popleft()

    def _flush(self, complete: bool) -> None:
        if self._fill:
            name = shard_name(len(self._shards), self.shard_format)
            _write_shard(os.path.join(self.path, name), self._buffer[:self._fill],
                         self.shard_format)
            self._shards.append({"file": name, "rows": self._fill})
            self._written += self._fill
            self._fill = 0
        self._advance_state()
        self._write_manifest(complete)

    def _write_manifest(self, complete: bool) -> None:
        atomic_write_json(os.path.join(self.path, MANIFEST), {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype_name,
            "d_model": self.d_model,
            "rows_per_shard": self.rows_per_shard,
            "total_rows": self._written,
            "shards": self._shards,
            "complete": complete,
            "provenance": self.provenance,
            "writer_state": {"state": self._state,
                             "rows_after_state": self._written - self._state_end},
        })

    def close(self) -> None:
        """Writes the last (partial) shard and marks the cache complete."""
        if self._closed:
            return
        if self.rows_to_skip:
            raise ValueError(f"{self.path}: close() of a resumed cache before its source "
                             f"caught up: {self.rows_to_skip} already-written rows were not "
                             "appended again (restart the source at resume_state)")
        self._flush(complete=True)
        self._closed = True
        self._buffer = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # on an exception the cache stays incomplete: a new writer resumes it


def _json_check(value, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"CacheWriter: {what} must be JSON-serialisable ({err})") from None


def _write_shard(path: str, rows: np.ndarray, shard_format: str) -> None:
    """Writes [rows, D] to ``path`` via a temporary file + rename (fsync'd)."""

    def write(tmp):
        if shard_format == "npy":
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(rows), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        else:
            from safetensors.numpy import save_file

            save_file({TENSOR_NAME: np.ascontiguousarray(rows)}, tmp,
                      metadata={"format": FORMAT})
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    atomic_write(path, write)
