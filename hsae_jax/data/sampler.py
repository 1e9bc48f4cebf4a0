"""Which rows each training step reads: deterministic in (seed, step), mixed across the data.

The N rows are cut into blocks of ``block_rows`` consecutive rows (a block is read as one
slice). A seeded permutation of the blocks holds some out for evaluation (plus the last
``N mod block_rows`` rows); the training blocks are visited in a fresh permutation every
epoch, and step s takes the rows at positions ``[s * B, (s + 1) * B)`` of that endless
stream: every training row once per epoch, batches drawn from the whole file or cache
(not from one contiguous run), the same batch for the same (seed, step) on every run, so
a resumed run reads exactly what an uninterrupted one would. A batch is its blocks in
stream order (with ``B`` a multiple of ``block_rows``, whole blocks), so that reading it
is one slice per block and a device's share of the batch is a set of random blocks. The
permutations are keyed Feistel networks over the block index, computed for the positions
asked for: no table of N entries is ever built.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijective avalanche mix)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random bijection of [0, n), evaluated on arrays of positions.

    A balanced Feistel network (4 rounds) on the smallest even number of bits that holds
    n, restricted to [0, n) by cycle walking.
    """

    ROUNDS = 4

    def __init__(self, n: int, *key: int):
        if n < 1:
            raise ValueError(f"Permutation of {n} elements")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.low_mask = np.uint64((1 << self.half) - 1)
        keys = np.asarray([k & 0xFFFFFFFF for k in key] or [0], np.uint64)
        seed = np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            for k in keys:
                seed = _mix(np.asarray(seed ^ k, np.uint64) + np.uint64(0x632BE59BD9B4E019))
            self.round_keys = [_mix(np.asarray(seed + np.uint64(r), np.uint64))
                               for r in range(self.ROUNDS)]

    def _round(self, right: np.ndarray, r: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            return _mix(right ^ self.round_keys[r]) & self.low_mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.low_mask
        for r in range(self.ROUNDS):
            left, right = right, left ^ self._round(right, r)
        return (left << np.uint64(self.half)) | right

    def _decrypt(self, y: np.ndarray) -> np.ndarray:
        left, right = y >> np.uint64(self.half), y & self.low_mask
        for r in reversed(range(self.ROUNDS)):
            left, right = right ^ self._round(left, r), left
        return (left << np.uint64(self.half)) | right

    def _walk(self, x, step) -> np.ndarray:
        x = np.asarray(x, np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} outside [0, {self.n})")
        y = step(x)
        out = y >= np.uint64(self.n)
        while out.any():  # cycle walking: at most a few rounds (the domain is < 4n)
            y[out] = step(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)

    def __call__(self, x) -> np.ndarray:
        """The images of positions ``x`` (int array in [0, n))."""
        return self._walk(x, self._encrypt)

    def inverse(self, y) -> np.ndarray:
        """The positions whose images are ``y``."""
        return self._walk(y, self._decrypt)


class RowSampler:
    """Training and evaluation row ids of N rows, from a seed.

    n_rows: N. batch_size: B, rows per step. eval_rows: rows to hold out for evaluation
      (rounded up to whole blocks; the last ``N mod block_rows`` rows are always held out).
    block_rows: consecutive rows read together.
    """

    def __init__(self, n_rows: int, batch_size: int, *, seed: int, eval_rows: int = 0,
                 block_rows: int = 16):
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows} must be >= 1")
        self.n_rows, self.batch_size, self.seed = int(n_rows), int(batch_size), int(seed)
        self.block_rows = int(block_rows)
        self.n_blocks = self.n_rows // self.block_rows
        self.eval_blocks = min(self.n_blocks, -(-max(0, eval_rows) // self.block_rows))
        self.train_blocks = self.n_blocks - self.eval_blocks
        self.train_rows = self.train_blocks * self.block_rows
        self.eval_rows = self.n_rows - self.train_rows
        if self.train_rows < self.batch_size:
            raise ValueError(
                f"the data has {self.n_rows} rows; {self.eval_rows} held out for evaluation "
                f"leave {self.train_rows} for training (whole blocks of {self.block_rows}), "
                f"fewer than one batch of {self.batch_size}: use more data, a smaller "
                "--batch-size or a smaller --eval-fraction")
        self._split = Permutation(max(1, self.n_blocks), self.seed, 0x5B1)
        self._epochs: dict[int, Permutation] = {}

    def _epoch(self, epoch: int) -> Permutation:
        perm = self._epochs.get(epoch)
        if perm is None:
            if len(self._epochs) > 4:
                self._epochs.clear()
            perm = self._epochs[epoch] = Permutation(self.train_blocks, self.seed, 0xE9,
                                                     epoch)
        return perm

    def _rows_of_blocks(self, blocks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return blocks.astype(np.int64) * self.block_rows + offsets

    def batch_rows(self, step: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """[hi - lo] int64 row ids of rows ``lo..hi`` (default all B) of step ``step``'s
        batch, in batch order."""
        hi = self.batch_size if hi is None else hi
        q = np.int64(step) * self.batch_size + np.arange(lo, hi, dtype=np.int64)  # stream
        per_epoch = self.train_rows
        epoch, within = np.divmod(q, per_epoch)
        slot, offset = np.divmod(within, self.block_rows)
        rows = np.empty(q.shape, np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            train_block = self._epoch(int(e))(slot[here])
            block = self._split.inverse(self.eval_blocks + train_block)
            rows[here] = self._rows_of_blocks(block, offset[here])
        return rows

    def held_out_rows(self) -> np.ndarray:
        """[eval_rows] int64: the held-out rows, in a fixed seeded order."""
        blocks = self._split.inverse(np.arange(self.eval_blocks))
        rows = (blocks[:, None] * self.block_rows + np.arange(self.block_rows)).reshape(-1)
        tail = np.arange(self.n_blocks * self.block_rows, self.n_rows, dtype=np.int64)
        rows = np.concatenate([rows, tail])
        return rows[np.random.default_rng([self.seed, 0xE7A1]).permutation(rows.size)]
