"""hsae eval --model: an SAE spliced into a causal LM. Zero ablation recovers 0% of the
loss, a perfect reconstruction 100%, a trained SAE in between and more with larger k."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_fixtures import (  # noqa: E402
    limit_torch_threads,
    save_model_dir,
    tiny_model,
    toy_documents,
    train_tiny_lm,
    word_tokenizer,
    write_txt,
)

from hsae_jax.cli import main  # noqa: E402
from hsae_jax.evaluate_model import (  # noqa: E402
    InModelEvalConfig,
    default_budgets,
    evaluate_in_model,
    identity_reconstruct,
    spliced_losses,
    zero_reconstruct,
)
from hsae_jax.harvest import ContextSpec, HarvestConfig, harvest, token_contexts  # noqa: E402
from hsae_jax.model import SAEConfig, init_arrays, save_model_files  # noqa: E402
from hsae_jax.train import TrainConfig, train  # noqa: E402

QUIET = dict(progress=False, log=lambda *_: None)
limit_torch_threads()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 trained for a moment on the toy corpus: (folder, model, tokenizer,
    text file, documents)."""
    docs = toy_documents(seed=1, n=300)
    tok = word_tokenizer("gpt2", docs)
    model = train_tiny_lm(tiny_model("gpt2", tok), tok, docs, steps=150)
    root = tmp_path_factory.mktemp("lm")
    return save_model_dir(root / "model", model, tok), model, tok, write_txt(
        root / "corpus.txt", docs), docs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, lm):
    """An HSAE trained on layer 1 activations harvested from ``lm``: (run folder, cache)."""
    folder, _, _, text, _ = lm
    root = tmp_path_factory.mktemp("run")
    cache_dir = str(root / "acts")
    harvest(HarvestConfig(model=folder, layer=1, data=text, out=cache_dir, context_length=32,
                          skip_first=1, dtype="float32"), **QUIET)
    run = str(root / "run")
    train(TrainConfig.from_flat(data=cache_dir, n_latents=64, k=8, batch_size=256,
                                steps=40, warmup_steps=10, eval_every=40, save_every=40,
                                log_every=40, eval_batches=2), run, **QUIET)
    return run, cache_dir


def contexts_and_keep(tok, docs, n=12, length=32, skip_first=1):
    spec = ContextSpec.for_tokenizer(tok, length, skip_first=skip_first)
    tokens = np.stack(list(token_contexts(docs, tok, spec))[:n])
    return tokens, spec.keep(tokens)


def test_zero_ablation_recovers_nothing_and_identity_everything(lm):
    _, model, tok, _, docs = lm
    tokens, keep = contexts_and_keep(tok, docs)
    zero = spliced_losses(model, tokens, keep, 1, "resid_post", zero_reconstruct, [1, 4],
                          batch_size=5)
    same = spliced_losses(model, tokens, keep, 1, "resid_post", identity_reconstruct, [1, 4],
                          batch_size=5)
    assert zero["loss_recovered"] == [0.0, 0.0]
    assert zero["ce"] == [zero["ce_zero_ablation"]] * 2
    assert zero["kl"] == pytest.approx([zero["kl_zero_ablation"]] * 2, rel=1e-12)
    assert same["loss_recovered"] == [1.0, 1.0] and same["kl"] == [0.0, 0.0]
    assert same["ce"] == [same["ce_clean"]] * 2
    # the residual stream matters: ablating it costs well over a nat
    assert zero["ce_zero_ablation"] > zero["ce_clean"] + 1.0 and zero["kl_zero_ablation"] > 1.0
    # the clean CE is the model's own next-token loss at the scored positions
    scored = keep.copy()
    scored[:, -1] = False
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits
    lp = torch.log_softmax(logits.double(), -1)[:, :-1]
    nll = -lp.gather(2, torch.as_tensor(tokens[:, 1:], dtype=torch.long)[..., None])[..., 0]
    expected = nll[torch.as_tensor(scored[:, :-1])].mean().item()
    assert same["scored_tokens"] == scored.sum()
    assert same["ce_clean"] == pytest.approx(expected, rel=1e-5)


def test_resid_pre_and_skipped_positions_are_left_alone(lm):
    from hsae_jax.harvest.hooks import patch_hook

    _, model, tok, _, docs = lm
    tokens, keep = contexts_and_keep(tok, docs, n=6)
    # resid_pre of block 1 is resid_post of block 0: zero ablation hits the same tensor
    pre = spliced_losses(model, tokens, keep, 1, "resid_pre", zero_reconstruct, [1])
    post = spliced_losses(model, tokens, keep, 0, "resid_post", zero_reconstruct, [1])
    assert pre["ce_zero_ablation"] == pytest.approx(post["ce_zero_ablation"], rel=1e-6)
    # only the kept positions are replaced: keep position 5 alone, and the loss at 5 is
    # that of a model with position 5 ablated after block 0, not positions 0..5
    only = np.zeros_like(keep)
    only[:, 5] = True
    result = spliced_losses(model, tokens, only, 0, "resid_post", zero_reconstruct, [1])
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def ce_at_5(positions):
        def ablate(hidden):
            hidden = hidden.clone()
            hidden[:, positions] = 0
            return hidden

        with torch.no_grad(), patch_hook(model, 0, "resid_post", ablate):
            lp = torch.log_softmax(model(input_ids=ids).logits[:, 5].double(), -1)
        return -lp.gather(1, ids[:, 6:7]).mean().item()

    assert result["scored_tokens"] == 6
    assert result["ce_zero_ablation"] == pytest.approx(ce_at_5([5]), rel=1e-5)
    assert abs(ce_at_5(slice(0, 6)) - ce_at_5([5])) > 1e-3


def test_a_trained_sae_recovers_more_loss_at_larger_budgets(lm, trained_run, tmp_path):
    folder, _, _, text, _ = lm
    run, cache_dir = trained_run
    run_copy = str(tmp_path / "run")
    shutil.copytree(run, run_copy)
    before = json.loads(open(f"{run_copy}/metrics.json").read())
    # trained on the cache itself: layer, hook and context settings come from the
    # harvest's provenance
    result = evaluate_in_model(run_copy, InModelEvalConfig(model=folder, data=text,
                                                           contexts=24), **QUIET)
    assert (result["layer"], result["hook"], result["context_length"], result["skip_first"]) \
        == (1, "resid_post", 32, 1)
    assert result["budgets"] == [1, 2, 4, 8] == list(default_budgets(8))
    rec, kl = result["loss_recovered"], result["kl"]
    assert 0.0 < rec[0] < rec[1] < rec[2] < rec[3] < 1.0, rec
    assert kl[0] > kl[1] > kl[2] > kl[3] > 0.0, kl
    assert result["ce_clean"] < result["ce"][3] < result["ce"][0] < result["ce_zero_ablation"]
    metrics = json.loads(open(f"{run_copy}/metrics.json").read())
    assert metrics["in_model"] == json.loads(json.dumps(result))
    assert {k: metrics[k] for k in before} == before  # nothing else lost
    png = open(f"{run_copy}/loss_recovered_vs_k.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_line_and_plain_eval(lm, trained_run, tmp_path, capsys):
    folder, _, _, text, _ = lm
    run = str(tmp_path / "run")
    shutil.copytree(trained_run[0], run)
    assert main(["eval", run]) == 0  # the activation-file evaluation, as before
    assert "| k | FVU |" in capsys.readouterr().out
    assert main(["eval", run, "--model", folder, "--data", text, "--layer", "1",
                 "--budgets", "2,8", "--contexts", "6", "--context-length", "32",
                 "--skip-first", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| k | CE | KL | loss recovered |" in out and "| 8 |" in out
    metrics = json.loads(open(f"{run}/metrics.json").read())
    assert metrics["in_model"]["budgets"] == [2, 8] and "fvu_per_k" in metrics
    # a run trained on data that is not a harvest cache has no layer to default to
    cfg = json.loads(open(f"{run}/cfg.json").read())
    cfg["train"]["data"] = str(tmp_path / "acts.npy")
    with open(f"{run}/cfg.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(SystemExit) as info:
        main(["eval", run, "--model", folder, "--data", text])
    assert info.value.code == 2
    assert "--layer: " in capsys.readouterr().err


def test_errors_name_the_setting(lm, tmp_path):
    folder, _, _, text, _ = lm
    run = str(tmp_path / "run")
    sae_cfg = SAEConfig(d_model=32, n_latents=16, k=4)
    save_model_files(run, sae_cfg, *init_arrays(sae_cfg, __import__("jax").random.key(0)))
    for changes, error, match in [
        (dict(layer=None), ValueError, "--layer: .* was not trained on a harvested cache"),
        (dict(budgets=(2, 17)), ValueError, r"\[17\] outside \[1, n_latents=16\]"),
        (dict(data=str(tmp_path / "none.txt")), FileNotFoundError, "does not exist"),
        (dict(model=None), ValueError, "--model: the causal LM"),
        (dict(skip_first=40), ValueError, "--skip-first=40 must be < the context length 32"),
        (dict(), ValueError, "has d_model=32, but .* has hidden_size=64"),
        (dict(layer=7), ValueError, "layer=7 is out of range"),
    ]:
        settings = dict(model=folder, data=text, layer=1, context_length=32, contexts=2)
        with pytest.raises(error, match=match):
            evaluate_in_model(run, InModelEvalConfig(**{**settings, **changes}), **QUIET)
