"""Text to fixed-length token contexts, and which positions of them to skip.

Documents come from a ``.txt`` file (separated by blank lines), a ``.jsonl`` file (one
JSON object per line, the text under ``text_field``), a ``datasets`` dataset (streamed)
or any iterable of strings. They are tokenised without special tokens, joined with the
tokenizer's separator (EOS, else SEP) after each document, and cut into windows of
``context_length`` tokens, each starting with BOS (or CLS) when ``prepend_bos``; the
tail shorter than a window is dropped. The same text and tokenizer always give the
same contexts, so a resumed harvest can skip the ones already done.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np


def read_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.txt`` (blank-line separated) or ``.jsonl`` file, streamed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    if path.endswith(".jsonl"):
        return _jsonl_documents(path, text_field)
    if path.endswith(".txt"):
        return _txt_documents(path)
    raise ValueError(f"text file {path!r} must end in .txt or .jsonl")


def _txt_documents(path: str) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip("\n")
                lines = []
    if lines:
        yield "".join(lines).strip("\n")


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number}: no text field {text_field!r} (use "
                                 "--text-field to name the field holding the text)")
            yield record[text_field]


def dataset_documents(name: str, config: str | None = None, split: str = "train",
                      text_field: str = "text", revision: str | None = None) -> Iterator[str]:
    """Documents of a ``datasets`` dataset (hub name or local folder), streamed in order."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset needs the `datasets` package: pip install "
                          "'hsae-jax[harvest]'") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
    for number, record in enumerate(ds):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"dataset {name!r} record {number}: no text field {text_field!r} "
                             f"(fields: {sorted(record)})")
        yield text


@dataclasses.dataclass(frozen=True)
class ContextSpec:
    """How documents become contexts and which positions are skipped.

    context_length: T. prefix_token_id: the token each context starts with (BOS or CLS)
    or None. separator_token_id: appended after each document (EOS or SEP) or None.
    skip_token_ids: token ids that get no row (special tokens). skip_first: positions
    0..skip_first-1 of every context get no row.
    """

    context_length: int
    prefix_token_id: int | None
    separator_token_id: int | None
    skip_token_ids: tuple[int, ...]
    skip_first: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer, context_length: int, prepend_bos: bool | None = None,
                      skip_special: bool = True, skip_first: int = 0) -> ContextSpec:
        """The spec a Hugging Face tokenizer implies: BOS (else CLS) as the prefix when
        ``prepend_bos`` (None: when there is one), EOS (else SEP) as the separator, and
        its special tokens but UNK as the skipped ids."""
        prefix = tokenizer.bos_token_id
        if prefix is None:
            prefix = tokenizer.cls_token_id
        if prepend_bos and prefix is None:
            raise ValueError("prepend_bos=True, but the tokenizer has no BOS or CLS token")
        if prepend_bos is False:
            prefix = None
        separator = tokenizer.eos_token_id
        if separator is None:
            separator = tokenizer.sep_token_id
        skip: tuple[int, ...] = ()
        if skip_special:
            skip = tuple(sorted({int(i) for i in tokenizer.all_special_ids}
                                - {tokenizer.unk_token_id}))
        return cls(context_length, prefix, separator, skip, skip_first)

    def skipped(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens [n, T] -> (special [n, T] bool, first [n, T] bool): positions skipped as
        special tokens (beyond the first positions) and as first positions."""
        first = np.zeros(tokens.shape, bool)
        first[:, :self.skip_first] = True
        special = np.isin(tokens, np.asarray(self.skip_token_ids, tokens.dtype)) & ~first
        return special, first

    def keep(self, tokens: np.ndarray) -> np.ndarray:
        """[n, T] bool: the positions that get a row."""
        special, first = self.skipped(tokens)
        return ~(special | first)


def token_contexts(documents: Iterable[str], tokenizer, spec: ContextSpec,
                   docs_per_call: int = 256) -> Iterator[np.ndarray]:
    """Contexts [T] int32, in order, from ``documents`` (tokenised ``docs_per_call`` at a
    time, never all at once)."""
    body = spec.context_length - (spec.prefix_token_id is not None)
    if body < 1:
        raise ValueError(f"context_length={spec.context_length} leaves no room after the "
                         "prefix token")
    prefix = [] if spec.prefix_token_id is None else [spec.prefix_token_id]
    pending: list[int] = []
    start = 0
    documents = iter(documents)
    while True:
        group = list(itertools.islice(documents, docs_per_call))
        if not group:
            return
        for ids in tokenizer(group, add_special_tokens=False)["input_ids"]:
            pending.extend(ids)
            if spec.separator_token_id is not None:
                pending.append(spec.separator_token_id)
        while len(pending) - start >= body:
            yield np.asarray(prefix + pending[start:start + body], np.int32)
            start += body
        pending, start = pending[start:], 0


def batched_contexts(contexts: Iterator[np.ndarray], batch_size: int, skip: int = 0,
                     limit: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first context, tokens [n, T] int32) batches, after skipping the first
    ``skip`` contexts, up to context ``limit`` (exclusive)."""
    index = skip
    contexts = itertools.islice(contexts, skip, limit)
    while True:
        batch = list(itertools.islice(contexts, batch_size))
        if not batch:
            return
        yield index, np.stack(batch)
        index += len(batch)
