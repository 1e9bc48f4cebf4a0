"""SAELens (``sae-lens`` 6.54) folders: export for ``SAE.load_from_disk``, and import.

A SAELens folder holds ``cfg.json`` and ``sae_weights.safetensors``. Its ``TopKSAE``
(architecture ``"topk"``) computes, with ``apply_b_dec_to_input=True`` and
``rescale_acts_by_decoder_norm=False``:

    hidden_pre = (x - b_dec) @ W_enc + b_enc     W_enc [d_in, d_sae]  (transposed from ours)
    acts = scatter(ReLU(torch.topk(hidden_pre, k, sorted=False)))   dense [.., d_sae]
    x_hat = acts @ W_dec + b_dec                 W_dec [d_sae, d_in]

top-k before ReLU, as in hsae-jax; the decoder is not renormalised on load. Exported
weights are float32 (``dtype: "float32"``), folded by :mod:`hsae_jax.interop.folding`.
``metadata`` keeps ``model_name``/``hook_name`` (SAELens's own keys, when known) and an
``hsae_jax`` entry (budget, K, objective, input scale, FVU per k, the folding rule).
"""

from __future__ import annotations

import os

import numpy as np

from hsae_jax.interop import _files
from hsae_jax.interop.folding import FoldedSAE
from hsae_jax.model import HierarchicalTopKSAE

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
FORMAT_VERSION = "6.54.0"  # the sae_lens_version we write: the 6.x config layout


def write_saelens(folder: str, sae: FoldedSAE, k: int, info: dict) -> None:
    """Writes ``folder``/cfg.json and sae_weights.safetensors for a TopK SAE at budget k.

    ``info``: ``model_name``, ``hook_name`` (None when unknown) and ``hsae_jax`` (a dict)
    for the config's metadata.
    """
    metadata = {"sae_lens_version": FORMAT_VERSION}
    for key in ("model_name", "hook_name"):
        if info.get(key) is not None:
            metadata[key] = info[key]
    metadata["hsae_jax"] = info["hsae_jax"]
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.n_latents,
        "k": int(k),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": metadata,
    }
    _files.write_safetensors(os.path.join(folder, WEIGHTS), {
        "W_enc": sae.w_enc.T,  # [D, F]
        "b_enc": sae.b_enc,
        "W_dec": sae.w_dec,  # [F, D]
        "b_dec": sae.b_dec,
    })
    _files.write_json(os.path.join(folder, CONFIG), cfg)


def _architecture(cfg: dict) -> str:
    """The SAELens architecture of a 6.x config, or of an older one (activation_fn_str)."""
    if "architecture" in cfg:
        return str(cfg["architecture"])
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if activation == "topk":
        return "topk"
    return f"standard (activation {activation!r})"


def _topk_k(cfg: dict) -> int:
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise ValueError("the config has no k (nor activation_fn_kwargs.k)")
    return int(k)


def read_saelens(path: str) -> tuple[int, dict, dict]:
    """(k, params in hsae-jax layout, the SAELens config) of a SAELens TopK folder.

    Folds what SAELens applies at run time into the weights so that hsae-jax's encoder
    (x - b_dec) @ W_enc.T + b_enc -> top-k -> ReLU gives the same result:
    ``rescale_acts_by_decoder_norm`` (b_enc *= |W_dec_f|, W_enc[:, f] *= |W_dec_f|,
    W_dec_f /= |W_dec_f|, as SAELens's own fold) and ``apply_b_dec_to_input=False``
    (b_enc += b_dec @ W_enc). Anything else that changes the math is refused.
    ``reshape_activations="hook_z"`` only says inputs arrive as [.., n_heads, d_head]:
    the imported model takes them flattened, [B, n_heads * d_head].
    """
    cfg = _files.read_json(os.path.join(path, CONFIG), "not a SAELens folder (cfg.json)")
    if _files.looks_like_hsae_run(cfg) and "d_in" not in cfg:
        raise ValueError(f"{path} is an hsae-jax run folder, not a SAELens one: load it "
                         "with HierarchicalTopKSAE.load, or export it first (hsae export)")
    arch = _architecture(cfg)
    if arch != "topk":
        raise ValueError(
            f"{path}: SAELens architecture {arch!r} cannot be represented by hsae-jax, "
            "which holds TopK SAEs only (top-k of the pre-activations, then ReLU); "
            "JumpReLU, gated, standard ReLU, BatchTopK-as-JumpReLU, abs-top-k and "
            "transcoders are refused")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(
            f"{path}: normalize_activations={norm!r} rescales inputs at run time from "
            "statistics the folder does not fold in; only 'none' can be imported (fold "
            "the normalisation into the weights with SAELens first)")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{path}: finetuning_scaling_factor=True cannot be represented")
    tensors = _files.read_safetensors(
        os.path.join(path, WEIGHTS), "SAELens weights", {"W_enc", "b_enc", "W_dec", "b_dec"},
        "a TopK SAE without extra parameters")
    w_enc = tensors["W_enc"].astype(np.float64)  # [D, F]
    b_enc = tensors["b_enc"].astype(np.float64)
    w_dec = tensors["W_dec"].astype(np.float64)  # [F, D]
    b_dec = tensors["b_dec"].astype(np.float64)
    d, f = w_enc.shape
    if w_dec.shape != (f, d) or b_enc.shape != (f,) or b_dec.shape != (d,):
        raise ValueError(f"{path}/{WEIGHTS}: W_enc {w_enc.shape}, b_enc {b_enc.shape}, "
                         f"W_dec {w_dec.shape}, b_dec {b_dec.shape} do not fit together")
    for key, want in (("d_in", d), ("d_sae", f)):
        if key in cfg and int(cfg[key]) != want:
            raise ValueError(f"{path}: cfg {key}={cfg[key]} but the weights have {want}")
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8)  # SAELens's clamp
        b_enc, w_enc, w_dec = b_enc * norms, w_enc * norms[None, :], w_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc
    params = {"W_enc": w_enc.T, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    return _topk_k(cfg), params, cfg


def from_saelens(path: str, *, objective: str | None = None,
                 backend: str = "auto") -> HierarchicalTopKSAE:
    """A SAELens TopK SAE folder (``cfg.json`` + ``sae_weights.safetensors``) as an
    :class:`~hsae_jax.HierarchicalTopKSAE` with ``input_scale`` 1 and K = its k.

    ``objective``: ``"topk"`` or ``"hierarchical"`` for further training; default
    ``"hierarchical"`` for a folder hsae-jax exported from a hierarchical run, else
    ``"topk"``. The model's encode/decode equal SAELens's (float32). Raises ValueError
    naming what was found for an architecture hsae-jax cannot represent.
    """
    from hsae_jax.interop.importing import build_model

    k, params, cfg = read_saelens(path)
    return build_model(params, k, (cfg.get("metadata") or {}).get("hsae_jax"), objective,
                       backend)
