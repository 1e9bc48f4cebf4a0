"""Small file helpers the format modules share: atomic safetensors and JSON, reading."""

from __future__ import annotations

import json
import os

import numpy as np

from hsae_jax.io_utils import atomic_write, atomic_write_json


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes float32/int numpy ``tensors`` to ``path`` (tmp file + rename)."""
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json(path: str, payload: dict) -> None:
    atomic_write_json(path, payload)


def read_json(path: str, what: str) -> dict:
    """The JSON file ``path``; if missing, an error that says ``what`` and names the
    sub-folders holding that file name (a multi-budget export: pass one of them)."""
    if not os.path.isfile(path):
        folder, name = os.path.split(path)
        subs = sorted(d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                      if os.path.isfile(os.path.join(folder, d, name)))
        hint = f"; it has sub-folders with one, pass one of them: {', '.join(subs)}" \
            if subs else ""
        raise FileNotFoundError(f"{path} not found: {what}{hint}")
    with open(path) as f:
        return json.load(f)


def read_safetensors(path: str, what: str, expected: set[str] | None = None,
                     expected_is: str = "") -> dict[str, np.ndarray]:
    """All tensors of ``path`` as float32 numpy arrays (bfloat16/float16 upcast).

    ``expected``: the tensor names the file must hold, exactly (a ValueError naming both
    lists and ``expected_is``, what such a file is, otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {what}")
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = np.asarray(f.get_tensor(name), np.float32)
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
        import torch
        from safetensors.torch import load_file

        out = {n: t.to(torch.float32).numpy() for n, t in load_file(path).items()}
    if expected is not None and set(out) != expected:
        raise ValueError(f"{path}: tensors {sorted(out)}, expected {sorted(expected)} "
                         f"({expected_is})")
    return out


def looks_like_hsae_run(cfg: dict) -> bool:
    return "input_scale" in cfg and "d_model" in cfg and "n_latents" in cfg
