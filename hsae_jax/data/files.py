"""Activations stored in one file: a ``[N, D]`` ``.npy`` or ``.safetensors`` matrix."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


class ActivationFile:
    """Rows of a [N, D] activation matrix in a ``.npy`` or ``.safetensors`` file.

    Read lazily (``.npy`` memory-mapped, ``.safetensors`` by slices), never loaded
    whole. Batches are contiguous runs of ``batch_size`` rows taken in a shuffled order
    that changes every epoch, then shuffled within the batch; all from ``seed``.
    """

    def __init__(self, path: str, batch_size: int, seed: int = 0, tensor: str | None = None):
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        self.path = path
        self.batch_size = batch_size
        self.seed = seed
        if path.endswith(".npy"):
            self._array = np.load(path, mmap_mode="r")
            self._slice = lambda start, stop: np.asarray(self._array[start:stop])
            shape = self._array.shape
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            self._file = safe_open(path, framework="np")
            names = list(self._file.keys())
            if tensor is None:
                if len(names) != 1:
                    raise ValueError(f"{path} holds tensors {names}: name one with --data-key")
                tensor = names[0]
            if tensor not in names:
                raise ValueError(f"{path} has no tensor {tensor!r} (it has {names})")
            handle = self._file.get_slice(tensor)
            shape = tuple(handle.get_shape())
            self._slice = lambda start, stop: np.asarray(handle[start:stop])
        else:
            raise ValueError(f"data file {path!r} must end in .npy or .safetensors")
        if len(shape) != 2:
            raise ValueError(f"{path}: activations must be [N, D], got shape {tuple(shape)}")
        self.n_rows, self.d_model = int(shape[0]), int(shape[1])
        if self.n_rows < batch_size:
            raise ValueError(f"{path} has {self.n_rows} rows, fewer than batch_size={batch_size}")
        self.batches_per_epoch = self.n_rows // batch_size

    def batch(self, step: int) -> jax.Array:
        epoch, position = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.batches_per_epoch)
        start = int(order[position]) * self.batch_size
        rows = self._slice(start, start + self.batch_size).astype(np.float32)
        rows = rows[np.random.default_rng([self.seed, epoch, position]).permutation(len(rows))]
        return jnp.asarray(rows)

    def describe(self) -> str:
        return f"{self.path}: {self.n_rows} x {self.d_model}"
