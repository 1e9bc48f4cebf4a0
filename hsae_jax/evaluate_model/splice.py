"""Loss of a causal LM with its residual stream at one hook point replaced.

For each batch of contexts: one clean forward pass (logits, and the residual stream h at
the hook point), then one pass per variant with h replaced at the scored positions:
zero ablation (h = 0) and the SAE's reconstruction at every budget k. Reported per
budget: cross-entropy of the next token, KL(clean || spliced) of the next-token
distribution, and the fraction of loss recovered
``(CE_zero - CE_k) / (CE_zero - CE_clean)``.

Scored positions are those ``keep`` marks (the positions a harvest writes rows for:
not special tokens, not the first N) except the last of each context (no next token);
the residual stream is replaced exactly there, and loss and KL are averaged exactly
there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hsae_jax.harvest.hooks import patch_hook

# h_rows [m, D] float32, budgets -> {k: reconstruction [m, D] float32}
Reconstruct = Callable[[np.ndarray, Sequence[int]], dict]


def identity_reconstruct(rows: np.ndarray, budgets: Sequence[int]) -> dict:
    """A perfect 'SAE': every budget returns the input (100% of the loss recovered)."""
    return dict.fromkeys(budgets, rows)


def zero_reconstruct(rows: np.ndarray, budgets: Sequence[int]) -> dict:
    """Zero ablation as an 'SAE' (0% of the loss recovered)."""
    return dict.fromkeys(budgets, np.zeros_like(rows))


def sae_reconstruct(cfg, params, stats, pad_to: int | None = None) -> Reconstruct:
    """The SAE's reconstructions at each budget: encode once at the largest budget, decode
    the first k latents (``hsae_jax.model.encode_arrays`` / ``decode_arrays``). Rows are
    padded to ``pad_to`` so that every batch reuses one compiled function."""
    import jax

    from hsae_jax.model import decode_arrays, encode_arrays

    encode = jax.jit(lambda x, k: encode_arrays(cfg, params, stats, x, k), static_argnums=1)
    decode = jax.jit(lambda v, i, k: decode_arrays(params, stats, v, i, k), static_argnums=2)

    def reconstruct(rows: np.ndarray, budgets: Sequence[int]) -> dict:
        m = rows.shape[0]
        size = max(pad_to or m, m)
        x = np.zeros((size, rows.shape[1]), np.float32)
        x[:m] = rows
        vals, indices = encode(x, max(budgets))
        return {k: np.asarray(decode(vals, indices, k))[:m] for k in budgets}

    return reconstruct


def _scored(keep: np.ndarray) -> np.ndarray:
    scored = keep.copy()
    scored[:, -1] = False  # the last position has no next token in the context
    return scored


def _logprobs(model, ids, scored, layer: int, hook: str, where=None, replacement=None,
              captured: list | None = None):
    """Next-token log-probabilities [m, V] float32 at the ``scored`` positions [n, T] of
    the contexts ``ids`` [n, T]; the residual stream at the hook point is appended to
    ``captured`` and, where ``where`` [n, T] is True, replaced by ``replacement`` [r, D]."""
    import torch

    def at_hook(hidden):
        if captured is not None:
            captured.append(hidden.detach())
        if replacement is None:
            return None
        new = hidden.clone()
        new[where] = replacement.to(hidden.dtype)
        return new

    with torch.inference_mode(), patch_hook(model, layer, hook, at_hook):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return torch.log_softmax(logits[scored].float(), dim=-1)


def _ce_sum(lp, targets) -> float:
    return float(-lp.gather(1, targets[:, None]).double().sum())


def _kl_sum(clean, lp) -> float:
    """Sum over positions of KL(clean || lp) of log-probabilities [m, V]."""
    return float((clean.exp() * (clean - lp)).sum(-1).double().sum())


def spliced_losses(model, tokens: np.ndarray, keep: np.ndarray, layer: int, hook: str,
                   reconstruct: Reconstruct, budgets: Sequence[int], batch_size: int = 8,
                   progress: bool = False) -> dict:
    """CE, KL and fraction of loss recovered at each budget, over ``tokens`` [N, T] int
    with positions ``keep`` [N, T] bool.

    model: a torch causal LM (``model(input_ids=...).logits`` [n, T, V]) in eval mode.
    reconstruct: rows [m, D] float32 -> {k: [m, D]} (:func:`sae_reconstruct`).
    Returns ``budgets``, ``ce_clean``, ``ce_zero_ablation``, ``kl_zero_ablation`` and,
    one per budget, ``ce``, ``kl``, ``loss_recovered`` (None for every budget when zero
    ablation costs nothing); ``scored_tokens``; losses in nats per scored token.
    """
    import torch

    budgets = [int(k) for k in budgets]
    device = next(model.parameters()).device
    ce_clean = ce_zero = kl_zero = 0.0
    ce_k, kl_k = np.zeros(len(budgets)), np.zeros(len(budgets))
    count = 0
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, unit="batch", dynamic_ncols=True)
    for start in starts:
        ids = torch.as_tensor(tokens[start:start + batch_size], dtype=torch.long, device=device)
        where = torch.as_tensor(keep[start:start + batch_size], device=device)
        scored = torch.as_tensor(_scored(keep[start:start + batch_size]), device=device)
        targets = ids[:, 1:][scored[:, :-1]]  # [m]: the token after each scored position
        if targets.numel() == 0:
            continue
        args = (model, ids, scored, layer, hook)
        captured: list = []
        clean = _logprobs(*args, captured=captured)
        rows = captured[0][where]  # [r, D]
        zero = _logprobs(*args, where=where, replacement=torch.zeros_like(rows))
        ce_clean += _ce_sum(clean, targets)
        ce_zero += _ce_sum(zero, targets)
        kl_zero += _kl_sum(clean, zero)
        recon = reconstruct(rows.float().cpu().numpy(), budgets)
        for j, k in enumerate(budgets):
            new = torch.tensor(np.asarray(recon[k], np.float32), device=device)
            spliced = _logprobs(*args, where=where, replacement=new)
            ce_k[j] += _ce_sum(spliced, targets)
            kl_k[j] += _kl_sum(clean, spliced)
        count += int(targets.numel())
    if count == 0:
        raise ValueError("no scored positions: every position is skipped (or last in its "
                         "context)")
    ce_clean, ce_zero = ce_clean / count, ce_zero / count
    ce = ce_k / count
    gap = ce_zero - ce_clean
    # zero ablation no worse than the clean model: the fraction is undefined (None)
    recovered = ((ce_zero - ce) / gap).tolist() if gap > 0 else [None] * len(budgets)
    return {
        "budgets": budgets,
        "scored_tokens": count,
        "ce_clean": ce_clean,
        "ce_zero_ablation": ce_zero,
        "kl_zero_ablation": kl_zero / count,
        "ce": ce.tolist(),
        "kl": (kl_k / count).tolist(),
        "loss_recovered": recovered,
    }
