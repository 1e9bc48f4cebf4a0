"""The sharded activation cache: round trips, take/read across shards, atomic writes,
resume without lost or repeated rows, and one clear error per broken cache."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from hsae_jax.data import ActivationCache, CacheWriter, read_manifest
from hsae_jax.data.cache import MANIFEST

FORMATS = [("float16", "npy"), ("float32", "npy"), ("float16", "safetensors"),
           ("float32", "safetensors"), ("bfloat16", "safetensors")]


def np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def chunks(rng, n, most=40):
    """Random chunk sizes (zeros included) adding up to n."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(rng.integers(0, most)), n - sum(sizes)))
    return sizes


def write_cache(path, rows, *, dtype="float32", rows_per_shard=16, shard_format=None,
                sizes=None, **kw):
    with CacheWriter(str(path), rows.shape[1], dtype=dtype, rows_per_shard=rows_per_shard,
                     shard_format=shard_format, **kw) as writer:
        pos = 0
        for size in sizes or [rows.shape[0]]:
            writer.append(rows[pos:pos + size])
            pos += size
    return str(path)


@pytest.mark.parametrize("dtype,shard_format", FORMATS)
def test_round_trip_across_shards(tmp_path, rng_seed, dtype, shard_format):
    rng = np.random.default_rng(rng_seed)
    n, d = int(rng.integers(70, 120)), int(rng.integers(3, 9))
    rows = rng.normal(size=(n, d)).astype(np.float32) * 10
    path = write_cache(tmp_path / "acts", rows, dtype=dtype, shard_format=shard_format,
                       sizes=chunks(rng, n), provenance={"model": "m", "layer": 3})
    expected = rows.astype(np_dtype(dtype))

    manifest = json.loads((tmp_path / "acts" / MANIFEST).read_text())
    n_shards = -(-n // 16)
    assert manifest["complete"] is True and manifest["total_rows"] == n
    assert (manifest["dtype"], manifest["d_model"], manifest["rows_per_shard"]) == (dtype, d, 16)
    assert [s["rows"] for s in manifest["shards"]] == [16] * (n_shards - 1) + [n - 16 * (
        n_shards - 1)]
    assert [s["file"] for s in manifest["shards"]] == [
        f"shard-{i:06d}.{shard_format}" for i in range(n_shards)]
    assert manifest["provenance"] == {"model": "m", "layer": 3}
    assert sorted(os.listdir(path)) == sorted([MANIFEST] + [s["file"] for s in
                                                            manifest["shards"]])

    cache = ActivationCache(path)
    assert (cache.n_rows, len(cache), cache.d_model, cache.dtype) == (n, n, d, np_dtype(dtype))
    assert cache.provenance == {"model": "m", "layer": 3}
    whole = cache.read(0, n)
    assert whole.dtype == np_dtype(dtype)
    np.testing.assert_array_equal(whole, expected)
    # ranges on, across and inside shard boundaries
    for start, stop in [(15, 17), (16, 32), (0, 0), (n - 1, n), (5, n - 3), (31, 33)]:
        np.testing.assert_array_equal(cache.read(start, stop), expected[start:stop])
    for _ in range(5):
        start = int(rng.integers(0, n))
        stop = int(rng.integers(start, n + 1))
        np.testing.assert_array_equal(cache.read(start, stop), expected[start:stop])
    # the shard files are ordinary .npy / safetensors files
    first = os.path.join(path, manifest["shards"][0]["file"])
    if shard_format == "npy":
        np.testing.assert_array_equal(np.load(first), expected[:16])
    else:
        from safetensors.numpy import load_file

        np.testing.assert_array_equal(load_file(first)["activations"], expected[:16])


@pytest.mark.parametrize("dtype,shard_format", [FORMATS[0], FORMATS[4]])
def test_take_returns_rows_in_the_given_order(tmp_path, rng_seed, dtype, shard_format):
    rng = np.random.default_rng(rng_seed)
    rows = rng.normal(size=(203, 5)).astype(np.float32)
    cache = ActivationCache(write_cache(tmp_path / "c", rows, dtype=dtype,
                                        shard_format=shard_format, rows_per_shard=32))
    expected = rows.astype(np_dtype(dtype))
    random_ids = rng.integers(0, 203, size=150)  # repeats, every shard, any order
    np.testing.assert_array_equal(cache.take(random_ids), expected[random_ids])
    run = np.arange(20, 90)  # sorted runs crossing shard boundaries, given shuffled
    shuffled = rng.permutation(np.concatenate([run, np.arange(150, 203)]))
    np.testing.assert_array_equal(cache.take(shuffled), expected[shuffled])
    np.testing.assert_array_equal(cache.take(run.astype(np.int32)), expected[run])
    assert cache.take(np.zeros(0, np.int64)).shape == (0, 5)
    with pytest.raises(IndexError, match=r"row 203 is outside \[0, n_rows=203\)"):
        cache.take([0, 203])
    with pytest.raises(IndexError, match="row -1"):
        cache.take([-1])
    with pytest.raises(TypeError, match="1-D integer array"):
        cache.take(np.array([1.0]))
    with pytest.raises(IndexError, match="n_rows=203"):
        cache.read(10, 204)


def test_take_reads_from_memory_maps_from_another_thread(tmp_path, rng_seed):
    import threading

    rng = np.random.default_rng(rng_seed)
    rows = rng.normal(size=(300, 4)).astype(np.float32)
    cache = ActivationCache(write_cache(tmp_path / "c", rows, rows_per_shard=20),
                            max_open_shards=3)
    ids = [rng.integers(0, 300, size=64) for _ in range(20)]
    results = [None] * len(ids)

    def work():
        for i, batch in enumerate(ids):
            results[i] = cache.take(batch)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    for batch, got in zip(ids, results, strict=True):
        np.testing.assert_array_equal(got, rows[batch])
    assert len(cache._open) <= 3  # least recently used maps were closed


def test_leftover_and_unlisted_shards_are_ignored(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    rows = rng.normal(size=(40, 3)).astype(np.float32)
    path = write_cache(tmp_path / "c", rows)
    np.save(os.path.join(path, "shard-000007.npy"), np.ones((16, 3), np.float32))
    with open(os.path.join(path, "shard-000003.npy.tmp-999"), "wb") as f:
        f.write(b"half a shard")
    cache = ActivationCache(path)
    assert cache.n_rows == 40
    np.testing.assert_array_equal(cache.read(0, 40), rows)


def test_a_writer_killed_inside_a_shard_write_leaves_a_valid_cache(tmp_path, rng_seed,
                                                                   monkeypatch):
    rng = np.random.default_rng(rng_seed)
    rows = rng.normal(size=(50, 3)).astype(np.float32)
    calls = []
    real = np.lib.format.write_array

    def dies_on_the_second_shard(f, array, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        real(f, array, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", dies_on_the_second_shard)
    path = str(tmp_path / "c")
    with pytest.raises(KeyboardInterrupt), CacheWriter(path, 3, dtype="float32",
                                                       rows_per_shard=16) as writer:
        writer.append(rows)
    assert sorted(os.listdir(path)) == [MANIFEST, "shard-000000.npy"]  # tmp removed
    manifest = read_manifest(path)
    assert manifest["complete"] is False and manifest["total_rows"] == 16
    cache = ActivationCache(path, allow_incomplete=True)
    np.testing.assert_array_equal(cache.read(0, 16), rows[:16])


class ContextSource:
    """A deterministic stand-in for a harvest: context i yields a random number of rows."""

    def __init__(self, seed, n_contexts=40, d=4):
        self.rng_seed, self.n, self.d = seed, n_contexts, d

    def rows(self, i):
        rng = np.random.default_rng([self.rng_seed, i])
        return rng.normal(size=(int(rng.integers(0, 13)), self.d)).astype(np.float32)

    def run(self, writer, start=0, die_after=None, batch=3):
        """Appends contexts [start, n) in batches of ``batch``, state = next context."""
        for appended, i in enumerate(range(start, self.n, batch)):
            if appended == die_after:
                raise KeyboardInterrupt
            stop = min(i + batch, self.n)
            writer.append(np.concatenate([self.rows(j) for j in range(i, stop)]),
                          state={"next_context": stop})

    def all_rows(self):
        return np.concatenate([self.rows(i) for i in range(self.n)])


@pytest.mark.parametrize("die_after", [0, 1, 4, 9, 12])
def test_resume_after_a_kill_gives_the_uninterrupted_rows(tmp_path, rng_seed, die_after):
    source = ContextSource(rng_seed)
    path = str(tmp_path / "c")
    settings = dict(dtype="float16", rows_per_shard=16, provenance={"run": 1})
    with pytest.raises(KeyboardInterrupt), CacheWriter(path, 4, **settings) as writer:
        source.run(writer, die_after=die_after)
    written = read_manifest(path)["total_rows"]
    assert written % 16 == 0
    # a leftover from the dying shard write must go
    open(os.path.join(path, "shard-000099.npy.tmp-1"), "wb").close()

    with CacheWriter(path, 4, **settings) as writer:
        assert writer.resumed and writer.rows_written == written
        state = writer.resume_state
        start = state["next_context"] if state else 0
        assert 0 <= writer.rows_to_skip <= 3 * 12  # at most one batch of contexts
        source.run(writer, start=start)
    assert "shard-000099.npy.tmp-1" not in os.listdir(path)
    cache = ActivationCache(path)
    expected = source.all_rows().astype(np.float16)
    assert cache.n_rows == expected.shape[0]
    np.testing.assert_array_equal(cache.read(0, cache.n_rows), expected)
    assert cache.provenance == {"run": 1}
    assert cache.manifest["writer_state"] == {"state": {"next_context": 40},
                                              "rows_after_state": 0}


def test_resume_twice_and_a_resume_that_ends_inside_the_skipped_rows(tmp_path, rng_seed):
    source = ContextSource(rng_seed, n_contexts=30)
    path = str(tmp_path / "c")
    for die_after in (3, 6):
        with pytest.raises(KeyboardInterrupt), CacheWriter(path, 4, dtype="float32",
                                                           rows_per_shard=8) as writer:
            state = writer.resume_state
            source.run(writer, start=state["next_context"] if state else 0,
                       die_after=die_after, batch=2)
    # restarting one context at a time: the first appends fall wholly in the skipped rows
    with CacheWriter(path, 4, dtype="float32", rows_per_shard=8) as writer:
        source.run(writer, start=writer.resume_state["next_context"], batch=1)
    np.testing.assert_array_equal(ActivationCache(path).read(0, source.all_rows().shape[0]),
                                  source.all_rows())


def test_writer_refusals(tmp_path, rng_seed):
    rows = np.random.default_rng(rng_seed).normal(size=(20, 3)).astype(np.float32)
    path = write_cache(tmp_path / "done", rows, provenance={"keep": True})
    with pytest.raises(FileExistsError, match="already holds a complete activation cache"):
        CacheWriter(path, 3, dtype="float32", rows_per_shard=16)
    # an incomplete cache: resumed only with matching settings, or when asked
    inc = str(tmp_path / "inc")
    with pytest.raises(KeyboardInterrupt), CacheWriter(inc, 3, dtype="float32",
                                                       rows_per_shard=8) as writer:
        writer.append(rows)
        raise KeyboardInterrupt
    with pytest.raises(ValueError, match=r"different settings.*dtype='float32' vs 'float16'"):
        CacheWriter(inc, 3, dtype="float16", rows_per_shard=8)
    with pytest.raises(ValueError, match="rows_per_shard=8 vs 4"):
        CacheWriter(inc, 3, dtype="float32", rows_per_shard=4)
    with pytest.raises(ValueError, match="shard_format"):
        CacheWriter(inc, 3, dtype="float32", rows_per_shard=8, shard_format="safetensors")
    with pytest.raises(FileExistsError, match="incomplete activation cache"):
        CacheWriter(inc, 3, dtype="float32", rows_per_shard=8, resume=False)
    # a foreign directory is never written into unless asked, and then nothing foreign goes
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not an activation cache"):
        CacheWriter(str(foreign), 3)
    write_cache(foreign, rows, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"
    assert ActivationCache(str(foreign)).n_rows == 20
    # overwriting a complete cache replaces its shards and manifest
    write_cache(path, rows[:5], overwrite=True)
    assert ActivationCache(path).n_rows == 5
    assert sorted(os.listdir(path)) == [MANIFEST, "shard-000000.npy"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        CacheWriter(str(tmp_path / "file"), 3)
    for kw, match in [(dict(dtype="float64"), "dtype 'float64' is not one of"),
                      (dict(rows_per_shard=0), "rows_per_shard=0 must be an integer >= 1"),
                      (dict(shard_format="npz"), "shard_format='npz' must be one of"),
                      (dict(dtype="bfloat16", shard_format="npy"), "bfloat16 shards must be"),
                      (dict(provenance={"f": object()}), "provenance must be JSON")]:
        with pytest.raises(ValueError, match=match):
            CacheWriter(str(tmp_path / "new"), 3, **kw)
    with pytest.raises(ValueError, match="d_model=0"):
        CacheWriter(str(tmp_path / "new"), 0)


def test_append_refuses_bad_rows_naming_them(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    path = str(tmp_path / "c")
    writer = CacheWriter(path, 4, dtype="float16", rows_per_shard=8)
    writer.append(rng.normal(size=(11, 4)))  # float64 in: converted
    bad = rng.normal(size=(6, 4))
    bad[2, 1], bad[4, 3] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"2 of 6 rows are not finite \(NaN or inf\): rows "
                                         r"2\.\.4 of this call, cache rows 13\.\.15; nothing"):
        writer.append(bad)
    big = np.full((3, 4), 1.0, np.float32)
    big[1, 0] = 1e6
    with pytest.raises(ValueError, match=r"outside the range of float16.*cache rows 12\.\.12"):
        writer.append(big)
    with pytest.raises(ValueError, match=r"rows must be \[n, d_model=4\], got shape \(3, 5\)"):
        writer.append(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="floating point, got int64"):
        writer.append(np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="append state must be JSON"):
        writer.append(np.zeros((1, 4), np.float32), state={"x": {1, 2}})
    assert writer.n_rows == 11
    writer.append(np.zeros((2, 4), ml_dtypes.bfloat16))  # bfloat16 in
    writer.close()
    with pytest.raises(ValueError, match="append after close"):
        writer.append(np.zeros((1, 4), np.float32))
    assert ActivationCache(path).n_rows == 13


# ------------------------------------------------------------------------ reader errors


@pytest.fixture
def good_cache(tmp_path):
    rows = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float16)
    return write_cache(tmp_path / "c", rows, dtype="float16")


def edit_manifest(path, **changes):
    mpath = os.path.join(path, MANIFEST)
    with open(mpath) as f:
        manifest = json.load(f)
    for key, value in changes.items():
        if value is KeyError:
            del manifest[key]
        else:
            manifest[key] = value
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    return mpath


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope does not exist"):
        ActivationCache(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"no manifest.json: not an activation cache"):
        ActivationCache(str(tmp_path))


def test_bad_json(good_cache):
    mpath = os.path.join(good_cache, MANIFEST)
    with open(mpath, "w") as f:
        f.write('{"format": "hsae-activation-cache",\n "version": }')
    with pytest.raises(ValueError, match=rf"^{mpath}: not valid JSON \(.* line 2, column"):
        ActivationCache(good_cache)


MANIFEST_ERRORS = [
    (dict(total_rows=KeyError, writer_state=KeyError),
     r"missing keys \['total_rows', 'writer_state'\]"),
    (dict(format="npz"), "format is 'npz', expected 'hsae-activation-cache'"),
    (dict(version=2), "version is 2; this reader knows version 1"),
    (dict(dtype="float64"), "dtype 'float64' is not one of float16, bfloat16, float32"),
    (dict(d_model=0), "d_model is 0, expected an integer >= 1"),
    (dict(complete="yes"), "complete is 'yes', expected true or false"),
    (dict(provenance=[]), "provenance must be a JSON object"),
    (dict(total_rows=41), "the shards' rows add up to 40, but total_rows is 41"),
    (dict(shards=[{"file": "shard-000000.npy", "rows": 16},
                  {"file": "shard-000001.npy", "rows": 8},
                  {"file": "shard-000002.npy", "rows": 16}]),
     r"shards\[1\] \(shard-000001.npy\) lists 8 rows; every shard but the last"),
    (dict(shards=[{"file": "../x.npy", "rows": 40}]), "must be a plain file name"),
    (dict(shards=[{"file": "shard.npz", "rows": 40}]), "must end in .npy or .safetensors"),
    (dict(shards=[{"file": "s.npy"}]), r"shards\[0\] is .*expected"),
    (dict(dtype="bfloat16"), "bfloat16 shards must be .safetensors"),
]


@pytest.mark.parametrize("changes,message", MANIFEST_ERRORS)
def test_manifest_errors_name_the_file_and_the_problem(good_cache, changes, message):
    mpath = edit_manifest(good_cache, **changes)
    with pytest.raises(ValueError, match=message) as info:
        ActivationCache(good_cache)
    text = str(info.value)
    assert text.startswith(mpath) and "\n" not in text


def test_incomplete_and_empty_caches(good_cache, tmp_path):
    edit_manifest(good_cache, complete=False)
    with pytest.raises(ValueError, match=r"incomplete cache \(complete: false; 40 rows in 3 "
                                         "shards so far\\).*allow_incomplete=True"):
        ActivationCache(good_cache)
    assert ActivationCache(good_cache, allow_incomplete=True).n_rows == 40
    empty = str(tmp_path / "empty")
    CacheWriter(empty, 3).close()
    with pytest.raises(ValueError, match=r"manifest.json: empty cache \(no rows\)"):
        ActivationCache(empty)


def replace_shard(path, index, array):
    np.save(os.path.join(path, f"shard-{index:06d}.npy"), array)


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.remove(os.path.join(p, "shard-000001.npy")),
     r"shard-000001.npy: missing \(listed in manifest.json\)"),
    (lambda p: replace_shard(p, 1, np.zeros((15, 3), np.float16)),
     "shard-000001.npy: 15 rows, the manifest lists 16"),
    (lambda p: replace_shard(p, 2, np.zeros((8, 4), np.float16)),
     "shard-000002.npy: 4 columns, expected d_model=3"),
    (lambda p: replace_shard(p, 0, np.zeros((16, 3), np.float32)),
     "shard-000000.npy: dtype float32, the manifest says float16"),
    (lambda p: replace_shard(p, 0, np.zeros((16, 3, 1), np.float16)),
     r"shard-000000.npy: shape \(16, 3, 1\), expected a 2-D"),
    (lambda p: replace_shard(p, 0, np.asfortranarray(np.zeros((16, 3), np.float16))),
     "shard-000000.npy: stored column-major"),
    (lambda p: os.truncate(os.path.join(p, "shard-000000.npy"), 150),
     r"shard-000000.npy: truncated \(150 bytes, its header needs 224\)"),
    (lambda p: open(os.path.join(p, "shard-000000.npy"), "wb").write(b"garbage"),
     "shard-000000.npy: not a readable .npy file"),
])
def test_shard_errors_name_the_shard(good_cache, damage, message):
    damage(good_cache)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        ActivationCache(good_cache)
    assert str(info.value).startswith(good_cache) and "\n" not in str(info.value)


def test_safetensors_shard_errors(tmp_path):
    from safetensors.numpy import save_file

    rows = np.zeros((10, 3), np.float32)
    path = write_cache(tmp_path / "c", rows, shard_format="safetensors")
    shard = os.path.join(path, "shard-000000.safetensors")
    save_file({"acts": rows}, shard)
    with pytest.raises(ValueError, match=r"holds no tensor named 'activations' \(it has "
                                         r"\['acts'\]\)"):
        ActivationCache(path)
    save_file({"activations": rows.astype(np.float16)}, shard)
    with pytest.raises(ValueError, match="dtype float16, the manifest says float32"):
        ActivationCache(path)
    with open(shard, "wb") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        ActivationCache(path)
