"""Tiny language models and text, built offline: a toy corpus, a word-level tokenizer
trained on it, and randomly initialised GPT-2 / Llama / BERT models from small configs.
"""

from __future__ import annotations

import os

import numpy as np

from hsae_jax import backends


def pin_triton_mode() -> None:
    """Imports Triton in the mode this process's kernel tests use (interpreted on a CPU,
    compiled on a GPU) before ``transformers`` does: loading a ``transformers`` model
    imports ``torch._dynamo``, which imports Triton, and Triton fixes its mode at that
    first import (see ``hsae_jax.backends``). Without this, the interpreter tests that
    share a pytest-xdist worker with these tests would find Triton compiled."""
    try:
        backends.import_triton("compiled" if backends.cuda_available() else "interpret")
    except backends.BackendUnavailableError:
        pass  # Triton absent or already fixed: the kernel tests report that themselves


pin_triton_mode()


def limit_torch_threads() -> None:
    """One torch thread per pytest-xdist worker: two workers on two cores would otherwise
    run four threads and take longer than one worker."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)

NOUNS = "cat dog bird fox owl frog bee ant".split()
ADJECTIVES = "red big small old new blue".split()
VERBS = "sees likes finds follows hears".split()
COUNTING = "one two three four five six seven eight nine ten".split()


def toy_documents(seed: int, n: int = 120) -> list[str]:
    """Documents of short sentences with learnable structure: 'the ADJ NOUN VERB the
    NOUN .' and counting runs 'one two three ...'."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(int(rng.integers(1, 6))):
            if rng.random() < 0.3:
                start = int(rng.integers(0, 5))
                sentences.append(" ".join(COUNTING[start:start + int(rng.integers(3, 6))]) + " .")
            else:
                sentences.append(f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} "
                                 f"{rng.choice(VERBS)} the {rng.choice(NOUNS)} .")
        docs.append(" ".join(sentences))
    return docs


def write_txt(path, docs: list[str]) -> str:
    with open(path, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    return str(path)


SPECIALS = {
    "gpt2": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
    "llama": dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
    "bert": dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                 mask_token="[MASK]"),
}


def word_tokenizer(kind: str, docs: list[str]):
    """A ``PreTrainedTokenizerFast`` with a word-level vocabulary of ``docs``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[kind]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    names = ["<unk>"] + list(dict.fromkeys(specials.values()))
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=names))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


def tiny_model(kind: str, tokenizer, seed: int = 0, n_layers: int = 2, d_model: int = 64):
    """A randomly initialised model (eval mode): GPT2LMHeadModel, LlamaForCausalLM or
    BertModel."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, vocab_size=vocab,
                            n_positions=128, **ids)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model,
                             intermediate_size=2 * d_model, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=vocab,
                             max_position_embeddings=128,
                             pad_token_id=tokenizer.pad_token_id, **ids)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.BertConfig(num_hidden_layers=n_layers, hidden_size=d_model,
                            intermediate_size=2 * d_model, num_attention_heads=4,
                            vocab_size=vocab, max_position_embeddings=128,
                            pad_token_id=tokenizer.pad_token_id)
        model = tf.BertModel(cfg)
    return model.eval()


def save_model_dir(path, model, tokenizer) -> str:
    """Saves model and tokenizer to a folder ``from_pretrained`` loads (as a hub name)."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_tiny_lm(model, tokenizer, docs: list[str], steps: int = 150, context: int = 32,
                  seed: int = 0):
    """A few Adam steps of next-token training on ``docs`` (so the model's residual
    stream matters for its predictions); returns the model in eval mode."""
    import torch

    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(ids[:len(ids) // context * context]).view(-1, context)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    model.train()
    try:
        for _ in range(steps):
            batch = ids[torch.randint(0, ids.shape[0], (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
