"""``hsae eval RUN --model ...``: a saved SAE spliced into a causal LM, results into the run.

Layer, hook and the context settings default to those of the harvest the run was
trained on (the provenance of the cache its ``cfg.json`` names as data), so the SAE is
evaluated where and how its activations were taken.
"""

from __future__ import annotations

import dataclasses
import json
import os

from hsae_jax.data.cache import is_cache, read_manifest
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.model import load_model_files, setting

METRICS_KEY = "in_model"
PLOT_NAME = "loss_recovered_vs_k.png"


@dataclasses.dataclass
class InModelEvalConfig:
    model: str = setting(None, "causal LM: hub name or local folder (transformers)")
    data: str = setting(None, "text to evaluate on: .txt (blank-line separated documents) or "
                        ".jsonl")
    text_field: str = setting("text", ".jsonl: the field holding the text")
    layer: int | None = setting(None, "block L whose residual stream the SAE replaces (default: "
                                "the run's harvest)")
    hook: str | None = setting(None, "resid_post or resid_pre (default: the run's harvest, else "
                               "resid_post)")
    budgets: tuple[int, ...] | None = setting(None, "budgets k (default: 1, 2, 4, ... and K)")
    contexts: int = setting(64, "contexts to evaluate on (the first ones of the text)")
    context_length: int | None = setting(None, "tokens per context (default: the run's harvest, "
                                         "else 128)")
    skip_first: int | None = setting(None, "first positions of each context left alone and not "
                                     "scored (default: the run's harvest, else 0)")
    batch_size: int = setting(4, "contexts per forward pass")
    device: str = setting("auto", "torch device")
    revision: str = setting("main", "hub revision of the model")
    gguf_file: str | None = setting(None, "GGUF file inside the model folder")
    model_dtype: str = setting("float32", "dtype of the model's weights")


def default_budgets(k: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to K, and K."""
    out, b = [], 1
    while b < k:
        out.append(b)
        b *= 2
    return (*out, k)


def harvest_provenance(run_dir: str) -> dict | None:
    """The provenance of the activation cache the run was trained on, if it was."""
    try:
        with open(os.path.join(run_dir, "cfg.json")) as f:
            data = json.load(f).get("train", {}).get("data")
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(data, str) and is_cache(data):
        return read_manifest(data)["provenance"]
    return None


def _resolve(cfg: InModelEvalConfig, run_dir: str, k: int, n_latents: int):
    """(layer, hook, context settings, budgets) with the harvest's values as defaults;
    raises ValueError naming the setting."""
    if not cfg.model:
        raise ValueError("--model: the causal LM to splice the SAE into is required")
    if not cfg.data:
        raise ValueError("--data: a text file (.txt or .jsonl) to evaluate on is required")
    if not os.path.isfile(cfg.data):
        raise FileNotFoundError(f"--data {cfg.data!r} does not exist")
    prov = harvest_provenance(run_dir) or {}
    layer = cfg.layer if cfg.layer is not None else prov.get("layer")
    if layer is None:
        raise ValueError(f"--layer: {run_dir} was not trained on a harvested cache that "
                         "records its layer; give --layer")
    hook = cfg.hook or prov.get("hook") or "resid_post"
    settings = {
        "context_length": cfg.context_length or prov.get("context_length") or 128,
        "skip_first": cfg.skip_first if cfg.skip_first is not None else prov.get("skip_first",
                                                                                   0),
        "prepend_bos": prov.get("prepend_bos"),
        "skip_special": bool(prov.get("skip_token_ids", True)),
    }
    budgets = tuple(cfg.budgets) if cfg.budgets else default_budgets(k)
    bad = [b for b in budgets if not 1 <= b <= n_latents]
    if bad:
        raise ValueError(f"--budgets {list(budgets)}: {bad} outside [1, n_latents={n_latents}]")
    if cfg.contexts < 1 or cfg.batch_size < 1:
        raise ValueError(f"--contexts={cfg.contexts} and --batch-size={cfg.batch_size} must "
                         "be >= 1")
    if settings["skip_first"] >= settings["context_length"]:
        raise ValueError(f"--skip-first={settings['skip_first']} must be < the context length "
                         f"{settings['context_length']}")
    return int(layer), hook, settings, sorted(set(budgets)), prov


def evaluate_in_model(run_dir: str, cfg: InModelEvalConfig, *, model=None, tokenizer=None,
                      progress: bool = True, log=print) -> dict:
    """Splices the SAE saved in ``run_dir`` into ``cfg.model`` and measures CE, KL and the
    fraction of loss recovered at each budget (:func:`spliced_losses`) on the first
    ``cfg.contexts`` contexts of ``cfg.data``. Merges the results into the run's
    ``metrics.json`` under ``"in_model"`` and draws ``loss_recovered_vs_k.png``.

    model / tokenizer: already loaded ones instead of loading ``cfg.model``.
    """
    import numpy as np

    from hsae_jax.evaluate_model.plot import plot_loss_recovered_vs_k
    from hsae_jax.evaluate_model.splice import sae_reconstruct, spliced_losses
    from hsae_jax.harvest.hooks import block_at
    from hsae_jax.harvest.loading import load_model, load_tokenizer
    from hsae_jax.harvest.text import ContextSpec, read_documents, token_contexts

    sae_cfg, params, stats = load_model_files(run_dir)
    layer, hook, settings, budgets, prov = _resolve(cfg, run_dir, sae_cfg.k, sae_cfg.n_latents)
    documents = read_documents(cfg.data, cfg.text_field)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, cfg.revision, cfg.gguf_file)
    if model is None:
        model = load_model(cfg.model, cfg.revision, dtype=cfg.model_dtype, device=cfg.device,
                           gguf_file=cfg.gguf_file, causal_lm=True)
    block_at(model, layer, hook)  # layer in range
    width = getattr(model.config, "hidden_size", None)
    if width is not None and width != sae_cfg.d_model:
        raise ValueError(f"the SAE in {run_dir} has d_model={sae_cfg.d_model}, but "
                         f"{cfg.model} has hidden_size={width}")
    if prov.get("model") and prov["model"] != cfg.model:
        log(f"note: the run was trained on activations of {prov['model']}; evaluating in "
            f"{cfg.model}")
    spec = ContextSpec.for_tokenizer(tokenizer, settings["context_length"],
                                     settings["prepend_bos"], settings["skip_special"],
                                     settings["skip_first"])
    contexts = []
    for ctx in token_contexts(documents, tokenizer, spec):
        contexts.append(ctx)
        if len(contexts) == cfg.contexts:
            break
    if not contexts:
        raise ValueError(f"--data {cfg.data}: no full context of {spec.context_length} tokens")
    tokens = np.stack(contexts)
    log(f"splicing {run_dir} into {cfg.model} {hook} layer {layer}: {len(tokens)} contexts of "
        f"{spec.context_length} tokens, budgets {budgets}")
    metrics = spliced_losses(model, tokens, spec.keep(tokens), layer, hook,
                             sae_reconstruct(sae_cfg, params, stats,
                                             pad_to=cfg.batch_size * spec.context_length),
                             budgets, batch_size=cfg.batch_size, progress=progress)
    result = {"model": cfg.model, "layer": layer, "hook": hook, "data": cfg.data,
              "contexts": int(tokens.shape[0]), "context_length": spec.context_length,
              "skip_first": spec.skip_first, "k": sae_cfg.k, **metrics}
    merge_metrics(run_dir, {METRICS_KEY: result})
    plot_loss_recovered_vs_k(result, os.path.join(run_dir, PLOT_NAME))
    return result


def merge_metrics(run_dir: str, items: dict) -> None:
    """Sets ``items`` in the run's ``metrics.json`` (other keys kept), atomically."""
    path = os.path.join(run_dir, "metrics.json")
    metrics = {}
    if os.path.exists(path):
        with open(path) as f:
            metrics = json.load(f)
    atomic_write_json(path, {**metrics, **items})


def in_model_table(result: dict) -> str:
    """A markdown table of :func:`evaluate_in_model`'s result."""
    lines = [f"{result['model']} {result['hook']} layer {result['layer']}: "
             f"{result['scored_tokens']} scored tokens", "",
             f"CE clean {result['ce_clean']:.4f}, zero ablation {result['ce_zero_ablation']:.4f}"
             f" (KL {result['kl_zero_ablation']:.4f})", "",
             "| k | CE | KL | loss recovered |", "|---|---|---|---|"]
    for k, ce, kl, rec in zip(result["budgets"], result["ce"], result["kl"],
                              result["loss_recovered"], strict=True):
        frac = "n/a" if rec is None else f"{rec:.3f}"
        lines.append(f"| {k} | {ce:.4f} | {kl:.4f} | {frac} |")
    return "\n".join(lines)
