"""Checking an export with the target library itself: load it with the library's own
loader, encode and decode activations, compare with hsae-jax.

Needs the library installed (``pip install 'hsae-jax[interop]'`` for SAELens and
sparsify; dictionary_learning is imported as ``dictionary_learning``). A budget passes
when every token selects the same non-zero latents as hsae-jax and the activations and
reconstructions agree to ``tol`` (norm-relative over the batch).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from hsae_jax.interop.export import INDEX
from hsae_jax.model import decode_arrays, encode_arrays, load_model_files


@dataclasses.dataclass(frozen=True)
class BudgetCheck:
    """One budget's comparison: ``other_latents`` is the fraction of tokens whose set of
    non-zero latents differs; the errors are norm-relative over the batch."""

    k: int
    folder: str
    other_latents: float
    act_error: float
    recon_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return (self.other_latents == 0 and self.act_error <= self.tol
                and self.recon_error <= self.tol)


def _torch_input(x):
    import torch

    return torch.from_numpy(np.array(x, np.float32))  # a writable copy


def run_saelens(folder: str, x: np.ndarray):
    """SAELens's ``SAE.load_from_disk`` + encode/decode: (acts [B, F], x_hat [B, D])."""
    import torch
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        acts = sae.encode(_torch_input(x))
        return acts.double().numpy(), sae.decode(acts).double().numpy()


def run_sparsify(folder: str, x: np.ndarray):
    """sparsify's ``SparseCoder.load_from_disk`` + encode/decode (dense acts [B, F])."""
    import torch

    if not torch.cuda.is_available():  # its Triton decoder needs a GPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        out = coder.encode(_torch_input(x))
        recon = coder.decode(out.top_acts, out.top_indices)
        acts = torch.zeros(x.shape[0], coder.num_latents, dtype=out.top_acts.dtype)
        acts.scatter_(1, out.top_indices, out.top_acts)
        return acts.double().numpy(), recon.double().numpy()


def run_dictionary_learning(folder: str, x: np.ndarray):
    """dictionary_learning's ``utils.load_dictionary`` + encode/decode."""
    import torch
    from dictionary_learning.utils import load_dictionary

    ae, _ = load_dictionary(folder, device="cpu")
    with torch.no_grad():
        acts = ae.encode(_torch_input(x))
        return acts.double().numpy(), ae.decode(acts).double().numpy()


RUNNERS = {"saelens": run_saelens, "sparsify": run_sparsify,
           "dictionary_learning": run_dictionary_learning}


def hsae_outputs(run_dir: str, x: np.ndarray, budgets):
    """{k: (acts [B, F] dense float64, x_hat [B, D] float64)} from hsae-jax itself."""
    cfg, params, stats = load_model_files(run_dir)
    vals, idx = encode_arrays(cfg, params, stats, x)  # [B, K], sorted descending
    vals, idx = np.asarray(vals, np.float64), np.asarray(idx)
    out = {}
    for k in budgets:
        acts = np.zeros((x.shape[0], cfg.n_latents))
        np.put_along_axis(acts, idx[:, :k], vals[:, :k], 1)
        out[k] = acts, np.asarray(decode_arrays(params, stats, vals, idx, k), np.float64)
    return out


def compare(expected, got, k: int, folder: str, tol: float) -> BudgetCheck:
    (acts_e, recon_e), (acts_g, recon_g) = expected, got

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    differ = np.any((acts_e != 0) != (acts_g != 0), axis=1)
    return BudgetCheck(k, folder, float(np.mean(differ)), rel(acts_g, acts_e),
                       rel(recon_g, recon_e), tol)


def random_activations(run_dir: str, tokens: int, seed: int) -> np.ndarray:
    """[tokens, D] float32 in the run's units: (b_dec + N(0, I)) / input_scale."""
    cfg, params, stats = load_model_files(run_dir)
    rng = np.random.default_rng(seed)
    scaled = np.asarray(params["b_dec"]) + rng.normal(size=(tokens, cfg.d_model))
    return (scaled / float(stats["input_scale"])).astype(np.float32)


def export_budgets(out_dir: str, format: str) -> list[tuple[int, str]]:  # noqa: A002
    """[(k, folder)] of an export: from its index, or the single folder's config."""
    index_path = os.path.join(out_dir, INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        return [(e["k"], os.path.join(out_dir, e["folder"])) for e in index["budgets"]]
    name = "config.json" if format == "dictionary_learning" else "cfg.json"
    with open(os.path.join(out_dir, name)) as f:
        cfg = json.load(f)
    k = cfg["trainer"]["k"] if format == "dictionary_learning" else cfg["k"]
    return [(int(k), out_dir)]


def verify_export(run_dir: str, out_dir: str, *, format: str,  # noqa: A002
                  x: np.ndarray | None = None, tokens: int = 256, seed: int = 0,
                  tol: float = 1e-5) -> list[BudgetCheck]:
    """Loads each budget of the export in ``out_dir`` with ``format``'s own library and
    compares it with the run in ``run_dir`` on ``x`` [B, D] (default: ``tokens`` random
    activations, :func:`random_activations`). Returns one :class:`BudgetCheck` each."""
    if format not in RUNNERS:
        raise ValueError(f"format={format!r} is not one of {tuple(RUNNERS)}")
    if x is None:
        x = random_activations(run_dir, tokens, seed)
    x = np.asarray(x, np.float32)
    budgets = export_budgets(out_dir, format)
    expected = hsae_outputs(run_dir, x, [k for k, _ in budgets])
    return [compare(expected[k], RUNNERS[format](folder, x), k, folder, tol)
            for k, folder in budgets]
