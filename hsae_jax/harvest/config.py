"""Every setting of ``hsae harvest``, with its default and help, in one place."""

from __future__ import annotations

import dataclasses

from hsae_jax.model import setting

HOOKS = ("resid_post", "resid_pre")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
# provenance keys that a resumed harvest must share with the one it continues
STATIC_KEYS = ("model", "revision", "gguf_file", "tokenizer", "layer", "hook", "dataset",
               "dataset_config", "split", "text_field", "context_length", "batch_size",
               "prepend_bos", "separator_token_id", "skip_token_ids", "skip_first",
               "max_contexts", "model_dtype")


@dataclasses.dataclass
class HarvestConfig:
    # where from
    model: str = setting(None, "Hugging Face model: hub name (e.g. HuggingFaceTB/SmolLM2-135M) or "
                         "local folder")
    revision: str = setting("main", "hub revision (branch, tag or commit) of the model")
    gguf_file: str | None = setting(None, "load this GGUF file of the model folder (needs gguf)")
    tokenizer: str | None = setting(None, "tokenizer name or folder (default: the model's)")
    layer: int = setting(None, "block index L (0-based): resid_post is the output of block L")
    hook: str = setting("resid_post", "resid_post (output of block L) or resid_pre (its input)")
    # text
    data: str | None = setting(None, "local text: a .txt file (documents separated by blank lines) "
                               "or a .jsonl file (one JSON object per line)")
    dataset: str | None = setting(None, "a `datasets` dataset (hub name or local folder) instead "
                                  "of --data; read streaming")
    dataset_config: str | None = setting(None, "the dataset's configuration name")
    split: str = setting("train", "the dataset's split")
    text_field: str = setting("text", "field holding the text (.jsonl and datasets)")
    # contexts
    context_length: int = setting(128, "tokens per context window")
    prepend_bos: bool | None = setting(None, "start each context with the BOS (or CLS) token "
                                       "(default: when the tokenizer has one)")
    skip_special: bool = setting(True, "write no rows for special tokens (BOS, EOS, pad, CLS, ...)")
    skip_first: int = setting(0, "write no rows for the first N positions of each context")
    max_contexts: int | None = setting(None, "stop after this many contexts (default: all text)")
    # running
    batch_size: int = setting(16, "contexts per forward pass")
    device: str = setting("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1 ...")
    model_dtype: str = setting("float32", "dtype of the model's weights: float32, bfloat16, "
                               "float16")
    # the cache
    out: str = setting(None, "cache directory to write (resumed when it holds an incomplete "
                       "harvest with the same settings)")
    dtype: str = setting("float16", "cache dtype: float16, bfloat16 or float32")
    rows_per_shard: int = setting(65536, "rows per shard file")
    overwrite: bool = setting(False, "replace a complete (or different) cache in --out")

    def validate(self, *, callable_model: bool = False, documents: bool = False) -> None:
        """Raises ValueError naming the first bad setting (before any work).

        callable_model: the model is given as a callable (no --model/--layer needed).
        documents: the text is given as strings (no --data/--dataset needed).
        """
        if not self.out:
            raise ValueError("--out: the cache directory to write is required")
        if not callable_model:
            if not self.model:
                raise ValueError("--model: a model name or folder is required")
            if self.layer is None:
                raise ValueError("--layer: the block index to harvest is required")
            if self.hook not in HOOKS:
                raise ValueError(f"--hook={self.hook!r} must be one of {HOOKS}")
            if self.model_dtype not in MODEL_DTYPES:
                raise ValueError(f"--model-dtype={self.model_dtype!r} must be one of "
                                 f"{MODEL_DTYPES}")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"--layer={self.layer!r} must be an integer >= 0")
        if documents:
            if self.data is not None or self.dataset is not None:
                raise ValueError("documents were given: leave --data and --dataset unset")
        elif (self.data is None) == (self.dataset is None):
            raise ValueError("give exactly one of --data (a .txt/.jsonl file) and --dataset "
                             f"(got data={self.data!r}, dataset={self.dataset!r})")
        if self.data is not None and not self.data.endswith((".txt", ".jsonl")):
            raise ValueError(f"--data={self.data!r} must be a .txt or .jsonl file")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} must be one of {CACHE_DTYPES}")
        for name, low in (("context_length", 1), ("batch_size", 1), ("rows_per_shard", 1),
                          ("skip_first", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be an integer "
                                 f">= {low}")
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ValueError(f"--max-contexts={self.max_contexts} must be >= 1")
        if self.skip_first >= self.context_length:
            raise ValueError(f"--skip-first={self.skip_first} must be < --context-length="
                             f"{self.context_length} (it would skip every token)")
