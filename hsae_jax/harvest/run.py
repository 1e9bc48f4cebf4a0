"""``harvest``: a model's activations over text, written as an activation cache.

The loop: contexts in batches of ``batch_size`` -> activations [n, T, D] at the hook
point -> the rows of the kept positions (context by context, position by position) ->
:class:`~hsae_jax.data.cache.CacheWriter`, with the position after each batch (the next
context and the token counts so far) as the writer's resume state. A killed harvest
restarts at the last batch boundary inside its written shards; batches keep the same
boundaries, so the model sees the same inputs and the rows come out bit-identical.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

import numpy as np

from hsae_jax.data.cache import CacheWriter, is_cache, read_manifest
from hsae_jax.harvest.config import STATIC_KEYS, HarvestConfig
from hsae_jax.harvest.text import (
    ContextSpec,
    batched_contexts,
    dataset_documents,
    read_documents,
    token_contexts,
)
from hsae_jax.version import __version__

COUNT_KEYS = ("contexts", "tokens", "rows", "skipped_tokens", "skipped_special",
              "skipped_first")


def _check_out(cfg: HarvestConfig) -> dict | None:
    """The manifest of an incomplete harvest in ``cfg.out`` to resume, or None; refuses a
    complete cache or a foreign directory unless ``cfg.overwrite``."""
    if cfg.overwrite or not os.path.exists(cfg.out):
        return None
    if not os.path.isdir(cfg.out):
        raise FileExistsError(f"--out {cfg.out} exists and is not a directory")
    if not is_cache(cfg.out):
        if os.listdir(cfg.out):
            raise FileExistsError(f"--out {cfg.out} is a non-empty directory without a cache "
                                  "manifest: choose another --out, or pass --overwrite")
        return None
    manifest = read_manifest(cfg.out)
    if manifest["complete"]:
        raise FileExistsError(f"--out {cfg.out} already holds a complete cache "
                              f"({manifest['total_rows']} rows): choose another --out, or "
                              "pass --overwrite to replace it")
    return manifest


def _documents(cfg: HarvestConfig, documents: Iterable[str] | None):
    if documents is not None:
        return documents
    if cfg.data is not None:
        return read_documents(cfg.data, cfg.text_field)
    return dataset_documents(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)


def _model_name(cfg: HarvestConfig, model) -> str:
    if cfg.model:
        return cfg.model
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or f"callable:{getattr(model, '__qualname__', type(model).__name__)}"


def harvest(cfg: HarvestConfig, *, model=None, tokenizer=None,
            documents: Iterable[str] | None = None, progress: bool = True,
            log: Callable[[str], object] = print) -> dict:
    """Writes the activations ``cfg`` describes to the cache ``cfg.out``; returns its
    provenance (settings and the counts ``contexts``, ``tokens``, ``rows``,
    ``skipped_tokens`` = ``skipped_special`` + ``skipped_first``).

    model: None (load ``cfg.model`` with ``transformers``: a hub name or a local folder),
      a loaded torch ``transformers`` model, or any callable mapping tokens [n, T] int32
      to activations [n, T, D] (e.g. a jitted JAX/Flax function; ``cfg.layer`` and
      ``cfg.hook`` are then only recorded).
    tokenizer: None (load ``cfg.tokenizer`` or ``cfg.model``) or a loaded Hugging Face
      tokenizer.
    documents: strings to use instead of ``cfg.data`` / ``cfg.dataset``.

    An incomplete harvest in ``cfg.out`` with the same settings is resumed.
    """
    torch = sys.modules.get("torch")  # a torch model implies torch is imported
    is_torch = model is not None and torch is not None and isinstance(model, torch.nn.Module)
    callable_model = model is not None and not is_torch
    cfg.validate(callable_model=callable_model, documents=documents is not None)
    docs = _documents(cfg, documents)
    resume_from = _check_out(cfg)

    if tokenizer is None:
        from hsae_jax.harvest.loading import load_tokenizer

        name = cfg.tokenizer or cfg.model
        if not name:
            raise ValueError("--tokenizer: needed when the model is a callable")
        tokenizer = load_tokenizer(name, cfg.revision, None if cfg.tokenizer else cfg.gguf_file)
    spec = ContextSpec.for_tokenizer(tokenizer, cfg.context_length, cfg.prepend_bos,
                                     cfg.skip_special, cfg.skip_first)
    provenance = {
        "model": _model_name(cfg, model),
        "revision": cfg.revision,
        "gguf_file": cfg.gguf_file,
        "tokenizer": cfg.tokenizer or getattr(tokenizer, "name_or_path", None) or None,
        "layer": cfg.layer,
        "hook": cfg.hook,
        "dataset": "<documents>" if documents is not None else (cfg.data or cfg.dataset),
        "dataset_config": cfg.dataset_config,
        "split": cfg.split if cfg.dataset else None,
        "text_field": cfg.text_field,
        "context_length": cfg.context_length,
        "batch_size": cfg.batch_size,
        "prepend_bos": spec.prefix_token_id is not None,
        "prefix_token_id": spec.prefix_token_id,
        "separator_token_id": spec.separator_token_id,
        "skip_token_ids": list(spec.skip_token_ids),
        "skip_first": cfg.skip_first,
        "max_contexts": cfg.max_contexts,
        "model_dtype": None if callable_model else cfg.model_dtype,
        "harvester": f"hsae-jax {__version__}",
    }
    start, counts = 0, dict.fromkeys(COUNT_KEYS, 0)
    if resume_from is not None:
        saved = resume_from["provenance"]
        diff = {k: (saved.get(k), provenance[k]) for k in STATIC_KEYS
                if saved.get(k) != provenance[k]}
        for key in ("dtype", "rows_per_shard"):
            if resume_from[key] != getattr(cfg, key):
                diff[key] = (resume_from[key], getattr(cfg, key))
        if diff:
            raise ValueError(f"--out {cfg.out} holds an incomplete harvest with other "
                             "settings (cache, now): " + ", ".join(
                                 f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
                             + "; pass --overwrite to start again")
        state = resume_from["writer_state"].get("state") or {}
        start = int(state.get("next_context", 0))
        counts.update({k: int(state.get(k, 0)) for k in COUNT_KEYS})

    if model is None:
        from hsae_jax.harvest.loading import load_model

        model = load_model(cfg.model, cfg.revision, dtype=cfg.model_dtype, device=cfg.device,
                           gguf_file=cfg.gguf_file)
    if not callable_model:
        from hsae_jax.harvest.hooks import TorchActivations

        activations = TorchActivations(model, cfg.layer, cfg.hook)
        provenance["model_class"] = type(model).__name__
    else:
        activations = model

    contexts = token_contexts(docs, tokenizer, spec)
    batches = batched_contexts(contexts, cfg.batch_size, skip=start, limit=cfg.max_contexts)
    log(f"harvesting {provenance['model']} {cfg.hook} layer {cfg.layer} over "
        f"{provenance['dataset']} into {cfg.out}"
        + (f" (resuming at context {start})" if resume_from is not None else ""))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_contexts, initial=start, unit="ctx", dynamic_ncols=True)
    writer = None
    try:
        for first, tokens in batches:
            acts = np.asarray(activations(tokens))  # [n, T, D]
            if acts.ndim != 3 or acts.shape[:2] != tokens.shape:
                raise ValueError(f"the model gave activations of shape {acts.shape} for "
                                 f"tokens {tokens.shape}; expected [n, T, D] = "
                                 f"[{tokens.shape[0]}, {tokens.shape[1]}, D]")
            if writer is None:
                writer = _open_writer(cfg, acts.shape[2], provenance)
            special, first_pos = spec.skipped(tokens)
            keep = ~(special | first_pos)
            counts["contexts"] += tokens.shape[0]
            counts["tokens"] += tokens.size
            counts["rows"] += int(keep.sum())
            counts["skipped_special"] += int(special.sum())
            counts["skipped_first"] += int(first_pos.sum())
            counts["skipped_tokens"] = counts["skipped_special"] + counts["skipped_first"]
            writer.update_provenance(**counts)
            writer.append(acts[keep], state={"next_context": first + tokens.shape[0],
                                             **counts})
            if bar is not None:
                bar.update(tokens.shape[0])
                bar.set_postfix(rows=counts["rows"], shards=writer.shards_written,
                                refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if writer is None:
        if resume_from is None:
            raise ValueError(f"{provenance['dataset']}: the text gives no full context of "
                             f"{cfg.context_length} tokens")
        writer = _open_writer(cfg, resume_from["d_model"], provenance)  # all done but close
        writer.update_provenance(**counts)
    if counts["rows"] == 0:
        raise ValueError(f"every one of the {counts['tokens']} tokens was skipped (special "
                         "tokens / --skip-first): nothing to write")
    writer.close()
    log(f"wrote {counts['rows']} rows x {writer.d_model} ({cfg.dtype}) in "
        f"{writer.shards_written} shards to {cfg.out}; skipped {counts['skipped_tokens']} of "
        f"{counts['tokens']} tokens")
    return dict(writer.provenance)


def _open_writer(cfg: HarvestConfig, d_model: int, provenance: dict) -> CacheWriter:
    return CacheWriter(cfg.out, int(d_model), dtype=cfg.dtype,
                       rows_per_shard=cfg.rows_per_shard, provenance=provenance,
                       overwrite=cfg.overwrite, resume=True)

