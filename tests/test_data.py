"""Activation sources: deterministic by step, streamed from files, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from hsae_jax.data import ActivationFile, SyntheticActivations, SyntheticConfig


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


@pytest.fixture(params=["npy", "safetensors"])
def activation_file(request, tmp_path):
    rows = np.arange(100 * 6, dtype=np.float32).reshape(100, 6)
    path = tmp_path / f"acts.{request.param}"
    if request.param == "npy":
        np.save(path, rows)
    else:
        from safetensors.numpy import save_file

        save_file({"acts": rows}, str(path))
    return str(path), rows


def test_file_batches_are_shuffled_whole_rows_and_cover_an_epoch(activation_file):
    path, rows = activation_file
    source = ActivationFile(path, batch_size=10, seed=3)
    assert (source.n_rows, source.d_model, source.batches_per_epoch) == (100, 6, 10)
    seen = np.concatenate([np.asarray(source.batch(s)) for s in range(10)])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, rows.tolist()))
    assert not np.array_equal(seen, rows)  # shuffled
    np.testing.assert_array_equal(np.asarray(source.batch(4)),
                                  np.asarray(ActivationFile(path, 10, seed=3).batch(4)))
    assert not np.array_equal(np.asarray(source.batch(0)), np.asarray(source.batch(10)))


def test_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationFile(str(tmp_path / "nope.npy"), 4)
    np.save(tmp_path / "flat.npy", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match=r"must be \[N, D\], got shape \(10,\)"):
        ActivationFile(str(tmp_path / "flat.npy"), 4)
    np.save(tmp_path / "small.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        ActivationFile(str(tmp_path / "small.npy"), 4)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"must end in .npy or .safetensors"):
        ActivationFile(str(tmp_path / "x.csv"), 1)
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((4, 2), np.float32), "b": np.zeros((4, 2), np.float32)},
              str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="name one with --data-key"):
        ActivationFile(str(tmp_path / "two.safetensors"), 2)
    assert ActivationFile(str(tmp_path / "two.safetensors"), 2, tensor="b").d_model == 2
