"""EleutherAI sparsify (``eai-sparsify`` 1.3) folders: export for
``SparseCoder.load_from_disk``, and import.

A sparsify folder holds ``cfg.json`` (``d_in`` plus the ``SparseCoderConfig`` fields;
unknown keys are dropped by its loader) and ``sae.safetensors`` with ``encoder.weight``
[F, D], ``encoder.bias`` [F], ``W_dec`` [F, D], ``b_dec`` [D]. Its encoder computes

    pre = ReLU((x - b_dec) @ encoder.weight.T + encoder.bias)           [B, F]
    top_acts, top_indices = torch.topk(pre, k, sorted=False)          [B, k]
    x_hat = sum_j top_acts_j W_dec[top_indices_j] + b_dec

ReLU *before* top-k (hsae-jax: after). Both give the same non-zero latents and values;
where fewer than k pre-activations are positive, sparsify fills the rest of its k slots
with zeros at arbitrary indices, which contribute nothing. The parameter dtype is that of
the first tensor in the file (float32 here). The decoder is not renormalised on load; the
export sets ``normalize_decoder: false`` because folded decoder rows have norm 1/s, so
that fine-tuning it with sparsify does not silently rescale them.

cfg.json keeps sparsify's own keys only (its loader logs a warning for each unknown
one); model, hook and the ``hsae_jax`` entry go to a sidecar ``hsae_jax.json``.
"""

from __future__ import annotations

import os

import numpy as np

from hsae_jax.interop import _files
from hsae_jax.interop.folding import FoldedSAE
from hsae_jax.model import HierarchicalTopKSAE

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
SIDECAR = "hsae_jax.json"


def write_sparsify(folder: str, sae: FoldedSAE, k: int, info: dict) -> None:
    """Writes ``folder``/cfg.json and sae.safetensors for a TopK SAE at budget k.

    ``info``: ``model_name``, ``hook_name`` and ``hsae_jax``, written to ``hsae_jax.json``.
    """
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.n_latents // sae.d_model),  # unused: num_latents > 0
        "normalize_decoder": False,
        "num_latents": sae.n_latents,
        "k": int(k),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_model,
    }
    _files.write_safetensors(os.path.join(folder, WEIGHTS), {
        "encoder.weight": sae.w_enc,  # [F, D]
        "encoder.bias": sae.b_enc,
        "W_dec": sae.w_dec,  # [F, D]
        "b_dec": sae.b_dec,
    }, metadata={"format": "pt"})
    _files.write_json(os.path.join(folder, CONFIG), cfg)
    _files.write_json(os.path.join(folder, SIDECAR), {
        "model_name": info.get("model_name"), "hookpoint": info.get("hook_name"),
        "hsae_jax": info["hsae_jax"]})


def read_sparsify(path: str) -> tuple[int, dict, dict]:
    """(k, params in hsae-jax layout, the cfg) of a sparsify TopK SAE folder."""
    cfg = _files.read_json(os.path.join(path, CONFIG), "not a sparsify folder (cfg.json)")
    if "d_in" not in cfg:
        if _files.looks_like_hsae_run(cfg):
            raise ValueError(f"{path} is an hsae-jax run folder, not a sparsify one: load "
                             "it with HierarchicalTopKSAE.load, or export it first")
        raise ValueError(f"{path}/cfg.json has no d_in: not a sparsify SparseCoder folder")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{path}: sparsify activation {activation!r} cannot be represented "
                         "by hsae-jax, which holds TopK SAEs only")
    if cfg.get("transcode"):
        raise ValueError(f"{path}: a sparsify transcoder (transcode=True) predicts another "
                         "module's output; hsae-jax holds autoencoders only")
    if cfg.get("skip_connection"):
        raise ValueError(f"{path}: skip_connection=True (W_skip) cannot be represented")
    tensors = _files.read_safetensors(
        os.path.join(path, WEIGHTS), "sparsify weights",
        {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, "a TopK SAE with its decoder")
    w_enc = tensors["encoder.weight"]  # [F, D]
    f, d = w_enc.shape
    want_f = int(cfg.get("num_latents") or 0) or d * int(cfg.get("expansion_factor", 32))
    if int(cfg["d_in"]) != d or want_f != f:
        raise ValueError(f"{path}: cfg d_in={cfg['d_in']}, latents={want_f}, but "
                         f"encoder.weight is {w_enc.shape}")
    if tensors["W_dec"].shape != (f, d) or tensors["encoder.bias"].shape != (f,) or \
            tensors["b_dec"].shape != (d,):
        raise ValueError(f"{path}/{WEIGHTS}: shapes do not fit encoder.weight [{f}, {d}]")
    params = {"W_enc": w_enc, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
              "b_dec": tensors["b_dec"]}
    return int(cfg.get("k", 32)), {n: np.asarray(a) for n, a in params.items()}, cfg


def from_sparsify(path: str, *, objective: str | None = None,
                  backend: str = "auto") -> HierarchicalTopKSAE:
    """A sparsify TopK SAE folder (``cfg.json`` + ``sae.safetensors``; for a multi-layer
    checkpoint, the hookpoint's sub-folder) as an :class:`~hsae_jax.HierarchicalTopKSAE`
    with ``input_scale`` 1 and K = its k.

    ``objective``: as in :func:`~hsae_jax.interop.from_saelens`. Refuses groupmax,
    transcoders and skip connections, naming what was found.
    """
    from hsae_jax.interop.importing import build_model

    k, params, _ = read_sparsify(path)
    sidecar = os.path.join(path, SIDECAR)
    meta = _files.read_json(sidecar, "")["hsae_jax"] if os.path.isfile(sidecar) else None
    return build_model(params, k, meta, objective, backend)
