"""Activation sources: deterministic by step, every row once an epoch, mixed across files and
shards, a held-out split no step reads, stored dtypes kept, clear errors, a prefetching loader."""

from __future__ import annotations

import os
import threading

import jax
import ml_dtypes
import numpy as np
import pytest

from hsae_jax.data import (
    CacheWriter,
    NonFiniteRowsError,
    Prefetcher,
    RowSource,
    SyntheticActivations,
    SyntheticConfig,
    open_rows,
)
from hsae_jax.data.sampler import Permutation, RowSampler


def test_synthetic_batches_are_deterministic_and_sparse():
    source = SyntheticActivations(SyntheticConfig(d_model=16, n_features=40, mean_active=3),
                                  batch_size=256)
    again = SyntheticActivations(SyntheticConfig(d_model=16, n_features=40, mean_active=3),
                                 batch_size=256)
    a, b = np.asarray(source.batch(7)), np.asarray(again.batch(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.asarray(source.batch(8)))
    assert a.shape == (256, 16) and np.all(np.isfinite(a))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(source.features), axis=1), 1, rtol=1e-6)
    # heavy-tailed frequencies: the most frequent feature fires far more than the median
    p = np.sort(np.asarray(source.probs))[::-1]
    assert p[0] > 5 * np.median(p)
    np.testing.assert_allclose(p.sum(), 3, rtol=0.05)


# ----------------------------------------------------------------- the row sampler


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 99_991])
def test_permutation_is_a_bijection_with_its_inverse(n):
    p = Permutation(n, 5, 11)
    images = p(np.arange(n))
    np.testing.assert_array_equal(np.sort(images), np.arange(n))
    np.testing.assert_array_equal(p.inverse(images), np.arange(n))
    if n >= 64:
        assert not np.array_equal(images, np.arange(n))
        assert not np.array_equal(images, Permutation(n, 6, 11)(np.arange(n)))


def test_each_epoch_reads_every_training_row_once_and_never_a_held_out_one():
    sampler = RowSampler(10_000 + 7, 128, seed=3, eval_rows=780, block_rows=16)
    held_out = sampler.held_out_rows()
    assert sampler.eval_rows == held_out.size == 784 + 7  # whole blocks, plus the tail
    per_epoch = sampler.train_rows
    assert per_epoch % 128 == 0  # so that no batch straddles two epochs here
    steps = 3 * per_epoch // 128
    seen = np.concatenate([sampler.batch_rows(s) for s in range(steps)])
    for epoch in range(3):
        rows = seen[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert np.unique(rows).size == per_epoch
    assert not np.intersect1d(seen, held_out).size
    np.testing.assert_array_equal(np.union1d(np.unique(seen), held_out), np.arange(10_007))
    # epochs are ordered differently, and batches are not contiguous runs
    first, second = seen[:per_epoch], seen[per_epoch:2 * per_epoch]
    assert not np.array_equal(first, second)
    assert np.ptp(sampler.batch_rows(0)) > 5_000


def test_batches_depend_only_on_seed_and_step_and_split_between_processes():
    a = RowSampler(5000, 64, seed=1, eval_rows=100)
    b = RowSampler(5000, 64, seed=1, eval_rows=100)
    np.testing.assert_array_equal(a.batch_rows(123), b.batch_rows(123))
    assert not np.array_equal(a.batch_rows(123), RowSampler(5000, 64, seed=2).batch_rows(123))
    shares = [a.batch_rows(9, 16 * i, 16 * (i + 1)) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(shares), a.batch_rows(9))


def test_too_little_data_for_a_batch_is_named():
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        RowSampler(100, 64, seed=0, eval_rows=50)


# ------------------------------------------------------------ files, globs, caches


def save(path, rows):
    path = str(path)
    if path.endswith(".npy"):
        np.save(path, rows)
    else:
        from safetensors.numpy import save_file

        save_file({"acts": rows}, path)
    return path


def rows_of(n, d, dtype=np.float32, seed=0):
    return (np.random.default_rng(seed).normal(size=(n, d)) + np.arange(n)[:, None]).astype(dtype)


def make_cache(path, rows, dtype="float16", rows_per_shard=50):
    with CacheWriter(str(path), rows.shape[1], dtype=dtype, rows_per_shard=rows_per_shard,
                     provenance={"model": "test"}) as writer:
        writer.append(rows)
    return str(path)


@pytest.fixture(params=["npy", "safetensors", "glob", "cache"])
def stored(request, tmp_path):
    """(spec for open_rows, the rows it holds, their dtype)."""
    rows = rows_of(240, 6)
    if request.param == "glob":
        for i in range(3):
            save(tmp_path / f"part-{i}.npy", rows[80 * i:80 * (i + 1)])
        return str(tmp_path / "part-*.npy"), rows, np.float32
    if request.param == "cache":
        return make_cache(tmp_path / "cache", rows), rows.astype(np.float16), np.float16
    return save(tmp_path / f"acts.{request.param}", rows), rows, np.float32


def test_a_source_reads_whole_rows_in_their_stored_dtype(stored):
    spec, rows, dtype = stored
    source = RowSource(open_rows(spec, tensor="acts" if spec.endswith("tensors") else None),
                       batch_size=20, seed=4, eval_fraction=0.2)
    assert source.d_model == 6 and source.sampler.eval_rows == 48
    batch = source.host_batch(3)
    assert batch.dtype == dtype and batch.shape == (20, 6)
    ids = source.sampler.batch_rows(3)
    np.testing.assert_array_equal(batch, rows[ids])
    np.testing.assert_array_equal(np.asarray(source.batch(3)), batch)
    held = np.concatenate([np.asarray(x) for x in source.eval_batches(10)])
    np.testing.assert_array_equal(held, rows[source.sampler.held_out_rows()])


def test_rows_are_read_into_a_given_buffer_of_the_stored_dtype(tmp_path):
    """``take(ids, out=)`` / ``host_batch(step, out=)`` fill and return the caller's array
    (runs of rows, scattered rows, across shards); a buffer of the wrong shape, dtype or a
    read-only one is refused, naming ``out``."""
    rows = rows_of(1600, 4, np.float16)
    cache = open_rows(make_cache(tmp_path / "c", rows, "float16", rows_per_shard=200))
    source = RowSource(cache, batch_size=256, seed=1, eval_fraction=0)
    out = np.full((256, 4), np.nan, np.float16)
    assert source.host_batch(2, out=out) is out
    np.testing.assert_array_equal(out, rows[source.sampler.batch_rows(2)])
    scattered = np.random.default_rng(0).permutation(1600)[:256]  # no runs: the gather path
    assert cache.take(scattered, out=out) is out
    np.testing.assert_array_equal(out, rows[scattered])
    for bad in (np.empty((255, 4), np.float16), np.empty((256, 4), np.float32)):
        with pytest.raises(ValueError, match=r"out must be a writeable \(256, 4\) array of "
                                             r"float16"):
            cache.take(scattered, out=bad)
    frozen = np.empty((256, 4), np.float16)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cache.take(scattered, out=frozen)
    f64 = RowSource(open_rows(save(tmp_path / "f64.npy", rows_of(64, 3, np.float64))), 16,
                    eval_fraction=0)
    out = np.empty((16, 3), np.float32)
    assert f64.host_dtype == np.float32 and f64.host_batch(1, out=out) is out
    np.testing.assert_array_equal(out, f64.host_batch(1))
    with pytest.raises(ValueError, match="out must be a"):
        f64.host_batch(1, out=np.empty((16, 3), np.float64))


def test_batches_mix_rows_from_every_shard(tmp_path):
    rows = rows_of(1600, 4)
    cache = open_rows(make_cache(tmp_path / "c", rows, rows_per_shard=200))
    source = RowSource(cache, batch_size=256, seed=0, eval_fraction=0)
    shards = {cache.locate(int(i))[0] for i in source.sampler.batch_rows(0)}
    assert len(shards) >= 6  # 16 blocks of 16 rows, drawn from all 8 shards


def test_bfloat16_and_float64_data(tmp_path):
    rows = rows_of(64, 3)
    bf16 = RowSource(open_rows(make_cache(tmp_path / "bf", rows, "bfloat16")), 16,
                     eval_fraction=0)
    assert bf16.host_batch(0).dtype == ml_dtypes.bfloat16
    f64 = RowSource(open_rows(save(tmp_path / "f64.npy", rows.astype(np.float64))), 16,
                    eval_fraction=0)
    assert f64.host_batch(0).dtype == np.float32


def test_eval_data_replaces_the_held_out_rows(tmp_path):
    train = save(tmp_path / "train.npy", rows_of(100, 3))
    other = rows_of(30, 3, seed=9)
    source = RowSource(open_rows(train), 10, eval_rows=open_rows(save(tmp_path / "e.npy", other)))
    assert source.sampler.eval_rows == 4  # only the tail of 100 mod 16 rows
    got = np.concatenate([np.asarray(x) for x in source.eval_batches(5)])
    np.testing.assert_array_equal(got, other)
    assert source.split()["eval_data_rows"] == 30


def test_non_finite_rows_are_named_by_file_and_row(tmp_path):
    rows = rows_of(96, 4)
    rows[37, 2] = np.nan
    rows[80, 0] = np.inf
    source = RowSource(open_rows(save(tmp_path / "bad.npy", rows)), 96, eval_fraction=0,
                       block_rows=1)
    message = r"2 row\(s\) of step 0's batch hold NaN or inf: .*bad.npy row 37, .*bad.npy row 80"
    with pytest.raises(NonFiniteRowsError, match=message):
        source.batch(0)
    with pytest.raises(NonFiniteRowsError, match=message):  # the loader checks on the device
        for _ in Prefetcher(source, range(1), put=jax.device_put):
            pass


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "nope.npy"), "does not exist"),
    (lambda p: save(p / "flat.npy", np.zeros(10, np.float32)), r"must be \[N, D\], got shape"),
    (lambda p: (p / "x.csv").write_text("1,2") and str(p / "x.csv"), "must end in .npy"),
    (lambda p: (p / "t.npy").write_text("hello") and str(p / "t.npy"),
     "not a readable .npy file"),
    (lambda p: os.makedirs(p / "d.npy") or str(p / "d.npy"), "is a directory"),
    (lambda p: str(p), "directory without manifest.json"),
    (lambda p: save(p / "bf.npy", np.zeros((4, 2), ml_dtypes.bfloat16)),
     "bfloat16 array saved with np.save loses its dtype"),
    (lambda p: save(p / "c.npy", np.zeros((4, 2), np.complex64)), "complex"),
    (lambda p: save(p / "i.npy", np.zeros((4, 2), np.int32)), "dtype int32"),
    (lambda p: save(p / "obj.npy", np.array([[None]], object)), "pickled"),
    (lambda p: str(p / "none-*.npy"), "no file matches"),
])
def test_bad_data_is_named(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        open_rows(make(tmp_path))


@pytest.mark.parametrize("suffix", ["npy", "safetensors"])
def test_a_truncated_file_is_named(tmp_path, suffix):
    path = save(tmp_path / f"t.{suffix}", rows_of(50, 8))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=rf"t.{suffix}: truncated"):
        open_rows(path)


def test_files_of_one_glob_must_agree(tmp_path):
    save(tmp_path / "a.npy", rows_of(8, 3))
    save(tmp_path / "b.npy", rows_of(8, 4))
    with pytest.raises(ValueError, match="b.npy: 4 columns of float32, but .*a.npy has 3"):
        open_rows(str(tmp_path / "*.npy"))
    save(tmp_path / "b.npy", rows_of(8, 3, np.float16))
    with pytest.raises(ValueError, match="b.npy: 3 columns of float16"):
        open_rows(str(tmp_path / "*.npy"))


def test_safetensors_with_several_tensors_need_a_key(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "two.safetensors")
    save_file({"a": np.zeros((4, 2), np.float32), "b": np.ones((4, 3), np.float32)}, path)
    with pytest.raises(ValueError, match="name one"):
        open_rows(path)
    assert open_rows(path, tensor="b").d_model == 3


# ------------------------------------------------------------------------ the loader


class Recorder:
    """A host source whose reads are logged; step ``fail_at`` raises."""

    def __init__(self, fail_at=None):
        self.read, self.fail_at = [], fail_at
        self.thread = None

    def host_batch(self, step, process_index=0, process_count=1):
        self.thread = threading.current_thread()
        if step == self.fail_at:
            raise NonFiniteRowsError(f"step {step} is bad")
        self.read.append(step)
        return np.full((2, 3), step, np.float16)


@pytest.mark.parametrize("workers", [1, 3])
def test_the_loader_reads_ahead_on_threads_in_step_order(workers):
    source = Recorder()
    with Prefetcher(source, range(5, 40), put=lambda x: x * 2, depth=4,
                    workers=workers) as batches:
        got = [(step, int(x[0, 0])) for step, x in batches]
    assert got == [(s, 2 * s) for s in range(5, 40)]
    assert source.thread is not threading.current_thread()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_the_loaders_batches_equal_the_sources_in_float32(tmp_path, dtype):
    rows = rows_of(2000, 8, dtype)
    name = "a.safetensors" if dtype == ml_dtypes.bfloat16 else "a.npy"  # np.save loses bf16
    source = RowSource(open_rows(save(tmp_path / name, rows)), 64, eval_fraction=0.05)
    copied = []  # what crossed to the device: the stored dtype

    def put(host):
        copied.append(host.dtype)
        return jax.device_put(host)

    with Prefetcher(source, range(3, 30), put=put, depth=3) as batches:
        for step, x in batches:
            assert x.dtype == np.float32  # converted on the device
            np.testing.assert_array_equal(
                np.asarray(x), rows[source.sampler.batch_rows(step)].astype(np.float32))
    assert set(copied) == {np.dtype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_loader_reuses_host_buffers_without_changing_batches_it_gave(tmp_path, dtype):
    """Each reading thread reads into the host buffer of a batch already on the device (at
    most one buffer per thread is ever made), and no batch handed out changes afterwards:
    every batch kept to the end still equals its rows (float32 batches are copied, never
    aliased to the buffer, on the device)."""
    rows = rows_of(3000, 8, dtype)
    source = RowSource(open_rows(save(tmp_path / "a.npy", rows)), 64, eval_fraction=0)
    buffers = []

    def put(host):
        buffers.append(host.__array_interface__["data"][0])
        return jax.device_put(host)

    with Prefetcher(source, range(40), put=put, depth=4, workers=2) as batches:
        kept = list(batches)
    assert len(buffers) == 40 and len(set(buffers)) <= 2
    for step, x in kept:
        np.testing.assert_array_equal(
            np.asarray(x), rows[source.sampler.batch_rows(step)].astype(np.float32))


def test_a_source_wrapper_passing_keywords_on_gets_the_buffers_too(tmp_path):
    """A wrapper's ``host_batch(step, *args, **kwargs)`` (benchmarks/soak.py's probe) is
    handed ``out=`` like the source it wraps: the run it measures reads as the trainer's."""
    rows = rows_of(1000, 8)
    base = RowSource(open_rows(save(tmp_path / "a.npy", rows)), 32, eval_fraction=0)
    given = []

    class Wrapped(RowSource):
        def host_batch(self, step, *args, **kwargs):
            given.append("out" in kwargs)
            return super().host_batch(step, *args, **kwargs)

    source = Wrapped(base.rows, 32, eval_fraction=0)
    with Prefetcher(source, range(12), put=jax.device_put, depth=2, workers=1) as batches:
        for step, x in batches:
            np.testing.assert_array_equal(np.asarray(x), rows[source.sampler.batch_rows(step)])
    assert given[0] is False and any(given[1:])


def test_a_host_buffer_is_read_into_again_only_once_its_rows_are_used(tmp_path,
                                                                        monkeypatch):
    """With a slow device copy (``_prepare`` delayed; a host ``put`` leaves the rows in
    the buffer until then) no batch is overwritten by a later read into its buffer; and a
    batch with a NaN row is named from its own rows while other threads keep reading."""
    import time

    from hsae_jax.data import loader

    rows = rows_of(3000, 8, np.float32)
    source = RowSource(open_rows(save(tmp_path / "a.npy", rows)), 64, eval_fraction=0)
    prepare = loader._prepare
    monkeypatch.setattr(loader, "_prepare", lambda b: (time.sleep(0.02), prepare(b))[1])
    with Prefetcher(source, range(20), put=lambda host: host, depth=4, workers=2) as batches:
        for step, x in batches:
            np.testing.assert_array_equal(np.asarray(x), rows[source.sampler.batch_rows(step)])

    bad = int(source.sampler.batch_rows(1)[5])
    rows[bad, 3] = np.nan
    source = RowSource(open_rows(save(tmp_path / "b.npy", rows)), 64, eval_fraction=0)
    monkeypatch.setattr(loader, "_prepare", prepare)
    named = source.non_finite_error
    source.non_finite_error = lambda *args: (time.sleep(0.2), named(*args))[1]
    with pytest.raises(NonFiniteRowsError, match=rf"^1 row\(s\) of step 1's batch .*b.npy "
                                                 rf"row {bad}\."):
        with Prefetcher(source, range(20), put=jax.device_put, depth=4, workers=2) as batches:
            for _ in batches:
                pass


def _source_with_a_nan_at(tmp_path, step, dtype=np.float16):
    rows = rows_of(3000, 8, dtype)
    source = RowSource(open_rows(save(tmp_path / "a.npy", rows)), 64, eval_fraction=0)
    bad = int(source.sampler.batch_rows(step)[7])
    rows[bad, 1] = np.nan
    return RowSource(open_rows(save(tmp_path / "b.npy", rows)), 64, eval_fraction=0), rows, bad


@pytest.mark.parametrize("lag", [1, 2, 5])
def test_a_lagging_loader_raises_a_nan_batch_lag_steps_later_naming_its_rows(tmp_path, lag):
    """check_lag L: the batch of step 3 with a NaN row is handed out (the step skips its
    update); the iterator raises when it would hand out step 3 + L, naming step 3's row
    (read again), after handing out every step before."""
    source, _, bad = _source_with_a_nan_at(tmp_path, 3)
    seen = []
    with pytest.raises(NonFiniteRowsError, match=rf"^1 row\(s\) of step 3's batch .*b.npy "
                                                 rf"row {bad}\."):
        with Prefetcher(source, range(12), put=jax.device_put, check_lag=lag) as batches:
            for step, _ in batches:
                seen.append(step)
    assert seen == list(range(3 + lag))


def test_a_lagging_loader_raises_at_check_all_and_at_its_end(tmp_path):
    """check_all checks every batch handed out so far (the trainer calls it before each
    log, evaluation or checkpoint); the last batches are checked when the iterator ends."""
    source, _, bad = _source_with_a_nan_at(tmp_path, 3)
    with Prefetcher(source, range(12), put=jax.device_put, check_lag=4) as batches:
        for step, _ in batches:
            if step == 2:
                batches.check_all()  # steps 0-2 are fine
            if step == 3:
                with pytest.raises(NonFiniteRowsError, match=f"row {bad}"):
                    batches.check_all()
                break
    with pytest.raises(NonFiniteRowsError, match=f"row {bad}"):
        with Prefetcher(source, range(4), put=jax.device_put, check_lag=100) as batches:
            assert [step for step, _ in batches] == [0, 1, 2, 3]  # raised as it ends


def test_a_lagging_deferring_loader_keeps_the_error_and_hands_out_every_batch(tmp_path):
    source, _, bad = _source_with_a_nan_at(tmp_path, 3)
    with Prefetcher(source, range(8), put=jax.device_put, check_lag=2,
                    defer_errors=True) as batches:
        seen = []
        for step, x in batches:
            seen.append((step, bool(np.isfinite(np.asarray(x)).all()), len(batches.deferred)))
    assert seen == [(s, s != 3, int(s >= 5)) for s in range(8)]
    assert len(batches.deferred) == 1 and f"b.npy row {bad}" in str(batches.deferred[0])


class _LaterConversion:
    """A conversion that reads its host rows 20 ms after it starts, as a device may (a CPU
    device reads host memory in place); its finite flag is known only then too."""

    def __init__(self, x):
        self._x, self._done, self.value = x, threading.Event(), None
        threading.Timer(0.02, self._run).start()

    def _run(self):
        self.value = np.array(self._x, np.float32)
        self._done.set()

    def block_until_ready(self):
        self._done.wait()
        return self

    def __array__(self, dtype=None, copy=None):
        self._done.wait()
        return self.value


class _LaterFlag:
    def __init__(self, conversion):
        self._conversion = conversion

    def __bool__(self):
        return bool(np.isfinite(np.asarray(self._conversion)).all())


@pytest.mark.parametrize("lag", [0, 2])
def test_a_lagging_loader_never_overwrites_rows_a_batch_still_reads(tmp_path, monkeypatch,
                                                                   lag):
    """With the check read later the threads hand batches out before their conversion has
    run; the host buffers read into again must not be the ones a conversion still reads."""
    from hsae_jax.data import loader

    def later(x):
        conversion = _LaterConversion(x)
        return conversion, _LaterFlag(conversion)

    rows = rows_of(3000, 8, np.float32)
    source = RowSource(open_rows(save(tmp_path / "a.npy", rows)), 64, eval_fraction=0)
    monkeypatch.setattr(loader, "_float32_and_finite", later)
    with Prefetcher(source, range(24), put=lambda host: host, depth=4, workers=3,
                    check_lag=lag) as batches:
        kept = [(step, x) for step, x in batches]
    for step, x in kept:
        np.testing.assert_array_equal(np.asarray(x), rows[source.sampler.batch_rows(step)])


def test_a_lagging_loader_reports_an_earlier_nan_batch_before_a_later_read_error(tmp_path):
    """Step 3 holds NaN and step 4 cannot be read: step 3's error comes first, raised or
    (``defer_errors``, where step 4 is handed out as NaN rows) first in ``deferred``."""
    source, rows, bad = _source_with_a_nan_at(tmp_path, 3)

    class Failing(RowSource):
        def host_batch(self, step, *args, **kwargs):
            if step == 4:
                raise OSError("step 4: the disk went away")
            return super().host_batch(step, *args, **kwargs)

    failing = Failing(source.rows, 64, eval_fraction=0)
    with pytest.raises(NonFiniteRowsError, match=f"step 3's batch .*row {bad}"):
        with Prefetcher(failing, range(8), put=jax.device_put, check_lag=2) as batches:
            for _ in batches:
                pass
    with Prefetcher(failing, range(8), put=jax.device_put, check_lag=2,
                    defer_errors=True) as batches:
        list(batches)
    assert [type(e) for e in batches.deferred] == [NonFiniteRowsError, OSError]


def test_a_lagging_loader_that_cannot_read_a_bad_batch_again_still_reports_it(tmp_path):
    """The rows of a batch found with NaN / inf are read again to name them; if that read
    fails, the error still says which step held NaN / inf (and is deferred as any other)."""
    source, rows, _ = _source_with_a_nan_at(tmp_path, 3)

    class FailingTwice(RowSource):
        reads = 0

        def host_batch(self, step, *args, **kwargs):
            if step == 3:
                FailingTwice.reads += 1
                if FailingTwice.reads > 1:
                    raise OSError("the second read failed")
            return super().host_batch(step, *args, **kwargs)

    flaky = FailingTwice(source.rows, 64, eval_fraction=0)
    with Prefetcher(flaky, range(8), put=jax.device_put, check_lag=2,
                    defer_errors=True) as batches:
        assert [step for step, _ in batches] == list(range(8))
    (error,) = batches.deferred
    assert str(error) == "step 3's batch holds NaN or inf"
    assert isinstance(error.__cause__, OSError)


def test_a_negative_check_lag_is_refused():
    with pytest.raises(ValueError, match="check_lag=-1 must be >= 0"):
        Prefetcher(Recorder(), range(3), put=lambda x: x, check_lag=-1)


def test_a_deferring_loader_hands_out_a_nan_batch_and_keeps_its_error(tmp_path):
    """``defer_errors`` (a process of several): the batch with a NaN row is handed out
    as read, its error kept in ``deferred`` naming the row; the batches after it follow."""
    rows = rows_of(3000, 8, np.float16)
    source = RowSource(open_rows(save(tmp_path / "a.npy", rows)), 64, eval_fraction=0)
    bad = int(source.sampler.batch_rows(3)[7])
    rows[bad, 1] = np.inf
    source = RowSource(open_rows(save(tmp_path / "b.npy", rows)), 64, eval_fraction=0)
    with Prefetcher(source, range(6), put=jax.device_put, defer_errors=True) as batches:
        seen = [(step, bool(np.isfinite(np.asarray(x)).all())) for step, x in batches]
    assert seen == [(s, s != 3) for s in range(6)]
    assert len(batches.deferred) == 1 and isinstance(batches.deferred[0], NonFiniteRowsError)
    assert f"b.npy row {bad}" in str(batches.deferred[0])


def test_a_deferring_loader_hands_out_nan_rows_for_a_batch_it_could_not_read(tmp_path):
    """``defer_errors``: a read that fails (here step 2's, on process 1 of 2) hands out
    this process's share of NaN rows, of the stored dtype, and keeps the error; without
    it, the error is raised at its step."""
    rows = rows_of(2000, 8, np.float16)

    class Failing(RowSource):
        def host_batch(self, step, *args, **kwargs):
            if step == 2:
                raise OSError(f"step {step}: the disk went away")
            return super().host_batch(step, *args, **kwargs)

    source = Failing(open_rows(save(tmp_path / "a.npy", rows)), 64, eval_fraction=0)
    with Prefetcher(source, range(4), put=jax.device_put, defer_errors=True,
                    process_index=1, process_count=2) as batches:
        got = {step: np.asarray(x) for step, x in batches}
    assert got[2].shape == (32, 8) and np.isnan(got[2]).all()
    np.testing.assert_array_equal(got[3], rows[source._share(3, 1, 2)].astype(np.float32))
    assert [str(e) for e in batches.deferred] == ["step 2: the disk went away"]
    with pytest.raises(OSError, match="disk went away"):
        with Prefetcher(source, range(4), put=jax.device_put) as batches:
            list(batches)


def test_the_loader_converts_and_checks_sharded_batches_on_each_device(tmp_path):
    """On a (data=2, model=2) mesh of 4 CPU devices (a subprocess): float16 rows arrive
    float32 with the batch's sharding, and a NaN row is named."""
    import textwrap

    rows = rows_of(512, 8, np.float16)
    rows[300, 5] = np.nan
    path = save(tmp_path / "a.npy", rows)
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from hsae_jax.data import NonFiniteRowsError, Prefetcher, RowSource, open_rows
        from hsae_jax.parallel import make_layout
        layout = make_layout("data=2,model=2", 4)
        source = RowSource(open_rows({str(path)!r}), 32)
        rows = np.load({str(path)!r})
        bad = [s for s in range(16) if 300 in source.sampler.batch_rows(s)]
        good = [s for s in range(16) if s < bad[0]]
        with Prefetcher(source, range(len(good)), lambda x: layout.put_batch(x, 32)) as it:
            for step, x in it:
                assert x.dtype == np.float32 and x.sharding == layout.batch_sharding, x.sharding
                assert len(x.addressable_shards) == 4
                want = rows[source.sampler.batch_rows(step)].astype(np.float32)
                np.testing.assert_array_equal(np.asarray(x), want)
        try:
            for _ in Prefetcher(source, range(bad[0], bad[0] + 1),
                                lambda x: layout.put_batch(x, 32)):
                pass
        except NonFiniteRowsError as err:
            assert "row 300" in str(err), err
        else:
            raise AssertionError("no error for the NaN row")
        print("ok", len(good))
    """)
    _run_on_cpu_devices(script, 4)


def test_a_read_error_surfaces_at_its_step():
    with Prefetcher(Recorder(fail_at=3), range(6), put=lambda x: x) as batches:
        seen = []
        with pytest.raises(NonFiniteRowsError, match="step 3 is bad"):
            for step, _ in batches:
                seen.append(step)
    assert seen == [0, 1, 2]


def test_closing_early_stops_the_thread():
    source = Recorder()
    batches = Prefetcher(source, range(10_000), put=lambda x: x, depth=3)
    for step, _ in batches:
        if step == 2:
            break
    batches.close()
    assert len(source.read) < 20


def test_synthetic_batches_made_on_each_device_equal_the_whole_batch():
    """On a (data=4, model=2) mesh of 8 CPU devices (a subprocess): ``placed`` makes each
    batch with the batch's sharding, each data shard holding its own rows, and the rows
    equal those of the one-device generator (the same random draws, float32 tolerance
    for the mixing matmul)."""
    import textwrap

    script = textwrap.dedent("""
        import numpy as np, jax
        from hsae_jax.data import SyntheticActivations, SyntheticConfig
        from hsae_jax.parallel import make_layout
        layout = make_layout("data=4,model=2", 8)
        whole = SyntheticActivations(SyntheticConfig(d_model=16, n_features=48, seed=3), 64)
        placed = whole.placed(layout.batch_sharding)
        for step in (0, 7, 123):
            x = placed.batch(step)
            assert x.sharding == layout.batch_sharding, x.sharding
            assert {s.data.shape for s in x.addressable_shards} == {(16, 16)}
            want = np.asarray(whole.batch(step))
            assert np.abs(want).max() > 0.1
            np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    _run_on_cpu_devices(script, 8)


def _run_on_cpu_devices(script: str, devices: int) -> None:
    """Runs ``script`` in a fresh process with ``devices`` CPU devices; it must print ok."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_batches_staged_through_pinned_host_memory_arrive_as_put_directly(tmp_path):
    """Layout.put_batch(staged=True) (what GPUs get by default) gives the direct put's
    array: the same values and sharding, in device memory, on a (data=2, model=2) mesh of
    4 CPU devices; a CPU stages nothing unless asked (pinned_staging is None)."""
    import textwrap

    script = textwrap.dedent("""
        import numpy as np, jax
        from hsae_jax.parallel import make_layout
        from hsae_jax.parallel.mesh import pinned_staging
        layout = make_layout("data=2,model=2", 4)
        assert pinned_staging(layout.batch_sharding) is None
        staging = pinned_staging(layout.batch_sharding, any_platform=True)
        assert staging.memory_kind == "pinned_host", staging
        rows = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float16)
        direct = layout.put_batch(rows, 32, staged=False)
        staged = layout.put_batch(rows, 32, staged=True)
        assert staged.sharding == direct.sharding == layout.batch_sharding, staged.sharding
        assert staged.sharding.memory_kind == direct.sharding.memory_kind
        assert staged.dtype == np.float16
        want = rows.copy()
        np.testing.assert_array_equal(np.asarray(direct), want)
        rows[:] = 0  # the staged batch does not alias the host rows
        np.testing.assert_array_equal(np.asarray(staged), want)
        print("ok")
    """)
    _run_on_cpu_devices(script, 4)
