"""Whether the run folder's disk holds what a run will write, checked before it trains.

A run writes checkpoints of its whole state (parameters, Adam moments, counters) every
``save_every`` steps and at the end; orbax keeps :data:`KEPT_CHECKPOINTS` and writes the
next one beside them before the oldest goes. At the end it writes the model file
(``sae.safetensors``: W_enc and W_dec in float32). With large dictionaries these are tens
to hundreds of GB (F = 2^22, D = 2304 with the low-memory options: 116 GB a checkpoint,
77 GB the model file); a disk that cannot hold them would end a long run in an error
after training. :func:`check_disk_space` computes the most the run will add to what its
folder holds (from the saves still to come and the checkpoints already there, on resume)
and raises :class:`DiskSpaceError` before the first step if the disk has less free.
A checkpoint is counted at the state's bytes: orbax compresses, which saves little on
trained float weights (zeroed Adam moments early in a run compress well, later ones not).
"""

from __future__ import annotations

import math
import shutil

import jax

from hsae_jax.train.run_dir import RunError

KEPT_CHECKPOINTS = 2  # hsae_jax.train.checkpoint.Checkpointer's max_to_keep
GB = 1e9


class DiskSpaceError(RunError):
    """The run folder's disk cannot hold the checkpoints and the model file still to come."""


def state_bytes(abstract_state) -> int:
    """Bytes of every array of a state (shapes and dtypes, e.g. :func:`abstract_state`'s):
    what one checkpoint holds, uncompressed, over all devices and processes."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract_state) if hasattr(leaf, "dtype"))


def model_file_bytes(n_latents: int, d_model: int) -> int:
    """Bytes of ``sae.safetensors``: W_enc, W_dec, b_enc and b_dec in float32."""
    return 4 * (2 * n_latents * d_model + n_latents + d_model)


def saves_to_come(start: int, steps: int, save_every: int) -> int:
    """Checkpoints a run writes going from step ``start`` to ``steps``: every multiple of
    ``save_every`` after ``start``, and the last step."""
    if steps <= start:
        return 0
    return steps // save_every - start // save_every + (steps % save_every != 0)


def bytes_to_come(checkpoint: int, model: int, existing: int, saves: int) -> int:
    """The most a run adds to its folder: while writing its checkpoints (``existing`` ones
    there already, up to :data:`KEPT_CHECKPOINTS` kept plus the one being written), and at
    the end (the kept ones and the model file)."""
    peak = min(existing + saves, KEPT_CHECKPOINTS + 1) if saves else existing
    end = min(existing + saves, KEPT_CHECKPOINTS) if saves else existing
    return max((peak - existing) * checkpoint, max(end - existing, 0) * checkpoint + model)


def check_disk_space(out_dir: str, abstract_state, n_latents: int, d_model: int, steps: int,
                     save_every: int, saved: list[int]) -> None:
    """Raises :class:`DiskSpaceError` when the disk of ``out_dir`` has less free space than
    the run will add to it: its checkpoints of ``abstract_state`` from the newest of those
    already ``saved`` there (their steps; none: step 0) to ``steps``, and the model file."""
    start = max(saved, default=0)
    saves = saves_to_come(start, steps, save_every)
    checkpoint = state_bytes(abstract_state)
    model = model_file_bytes(n_latents, d_model)
    need = bytes_to_come(checkpoint, model, min(len(saved), KEPT_CHECKPOINTS), saves)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise DiskSpaceError(
            f"--out {out_dir}: its disk has {free / GB:.1f} GB free, but the run adds "
            f"{need / GB:.1f} GB: checkpoints of {checkpoint / GB:.1f} GB ({saves} to write, "
            f"{KEPT_CHECKPOINTS} kept, the next written beside them) and the model file of "
            f"{model / GB:.1f} GB; free {(need - free) / GB:.1f} GB or more, or write the "
            "run to a larger disk")
