"""hsae_jax.interop without the client libraries: the folding rule, export arguments and
files, the CLI, refusals on import. (Round trips through SAELens, sparsify and
dictionary_learning themselves are in test_interop_clients.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from interop_helpers import BUDGETS, RANDOM_SCALE, K, activations, make_random_run

from hsae_jax.cli import main
from hsae_jax.interop import (
    INDEX,
    export_run,
    fold_input_scale,
    from_saelens,
    from_sparsify,
    parse_budgets,
)
from hsae_jax.interop.folding import topk_sae_reference
from hsae_jax.interop.saelens import write_saelens
from hsae_jax.interop.verify import compare, hsae_outputs
from hsae_jax.model import load_model_files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = make_random_run(str(tmp_path_factory.mktemp("run")))
    json.dump({"fvu_per_k": [0.9 - 0.1 * i for i in range(K)]},
              open(os.path.join(path, "metrics.json"), "w"))
    return path


# ----------------------------------------------------------------------- the fold


@pytest.mark.parametrize("k", BUDGETS)
def test_folded_topk_sae_reproduces_hsae(run, k):
    x = activations(run, 11)
    _, params, stats = load_model_files(run)
    expected = hsae_outputs(run, x, [k])[k]
    check = compare(expected, topk_sae_reference(fold_input_scale(params, float(
        stats["input_scale"])), x, k), k, "", 1e-5)
    assert check.ok, check


@pytest.mark.parametrize("k", BUDGETS)
def test_the_same_sae_without_the_fold_is_rejected(run, k):
    x = activations(run, 12)
    _, params, _ = load_model_files(run)
    check = compare(hsae_outputs(run, x, [k])[k],
                    topk_sae_reference(fold_input_scale(params, 1.0), x, k), k, "", 1e-5)
    assert not check.ok
    assert check.other_latents > 0.3 and check.recon_error > 0.1


def test_fold_is_the_documented_rule(run):
    _, params, _ = load_model_files(run)
    folded = fold_input_scale(params, 2.5)
    p = {n: np.asarray(a, np.float64) for n, a in params.items()}
    np.testing.assert_allclose(folded.w_enc, p["W_enc"] * 2.5, rtol=1e-7)
    np.testing.assert_array_equal(folded.b_enc, np.asarray(params["b_enc"]))
    np.testing.assert_allclose(folded.w_dec, p["W_dec"] / 2.5, rtol=1e-7)
    np.testing.assert_allclose(folded.b_dec, p["b_dec"] / 2.5, rtol=1e-7)
    assert all(a.dtype == np.float32 for a in (folded.w_enc, folded.b_enc, folded.w_dec,
                                                folded.b_dec))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="input_scale"):
            fold_input_scale(params, bad)


# ----------------------------------------------------------------- export_run


def test_budgets_parse():
    assert parse_budgets("8, 2,4,8") == (2, 4, 8)
    assert parse_budgets([3, 1]) == (1, 3)
    for bad in ("", "8,x", "1.5", ",", "8;16"):
        with pytest.raises(ValueError, match="budgets="):
            parse_budgets(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "onnx"}, "format='onnx'"),
    ({"format": "saelens", "k": K + 1}, f"k={K + 1} is larger than the run's K={K}"),
    ({"format": "saelens", "k": 0}, "k=0 must be >= 1"),
    ({"format": "saelens", "budgets": "2,99"}, "budgets=99 is larger"),
    ({"format": "saelens", "budgets": "2,-1"}, "budgets=-1 must be >= 1"),
    ({"format": "saelens", "budgets": "two"}, "budgets='two'"),
    ({"format": "saelens", "k": 2, "budgets": "2,4"}, "not both"),
])
def test_bad_arguments_are_named(run, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        export_run(run, str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_run_files_are_named(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        export_run(str(tmp_path / "nothing"), str(tmp_path / "out"), format="saelens")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no sae.safetensors"):
        export_run(str(tmp_path / "half"), str(tmp_path / "out"), format="sparsify")


def test_existing_output_needs_force_and_is_replaced_whole(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_run(run, str(out), format="saelens", k=2)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(run, str(out), format="saelens", budgets="2,4", force=True)
    assert sorted(os.listdir(out)) == [INDEX, "k2", "k4"]
    assert not [p for p in os.listdir(tmp_path) if p != "out"]  # no staging left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(run, str(empty), format="sparsify", k=3)  # an empty folder is fine
    assert json.loads((empty / "cfg.json").read_text())["k"] == 3


def test_output_that_would_hold_the_run_is_refused(run, tmp_path):
    with pytest.raises(ValueError, match="hold the run folder"):
        export_run(run, run, format="saelens", force=True)
    with pytest.raises(ValueError, match="hold the run folder"):
        export_run(run, os.path.dirname(run), format="saelens", force=True)
    assert os.path.isfile(os.path.join(run, "sae.safetensors"))


def test_index_and_metadata_record_budgets_fvu_model_and_hook(run, tmp_path):
    index = export_run(run, str(tmp_path / "sl"), format="saelens", budgets="1,4,8",
                       hook_name="blocks.2.hook_resid_post")
    on_disk = json.loads((tmp_path / "sl" / INDEX).read_text())
    assert on_disk == json.loads(json.dumps(index))
    assert [(b["k"], b["folder"]) for b in on_disk["budgets"]] == [(1, "k1"), (4, "k4"),
                                                                   (8, "k8")]
    assert [b["fvu"] for b in on_disk["budgets"]] == pytest.approx([0.9, 0.6, 0.2])
    assert on_disk["K"] == K and on_disk["input_scale"] == pytest.approx(RANDOM_SCALE)
    cfg = json.loads((tmp_path / "sl" / "k4" / "cfg.json").read_text())
    assert cfg["k"] == 4 and cfg["architecture"] == "topk" and cfg["d_in"] == 24
    meta = cfg["metadata"]
    assert meta["model_name"] == "tiny-model"  # from the run's cfg.json
    assert meta["hook_name"] == "blocks.2.hook_resid_post"  # the argument wins
    assert meta["hsae_jax"]["fvu_at_k"] == pytest.approx(0.6)
    assert meta["hsae_jax"]["K"] == K and meta["hsae_jax"]["objective"] == "hierarchical"
    side = json.loads((tmp_path / "sl" / "k4" / "cfg.json").read_text())
    assert side["metadata"]["sae_lens_version"].startswith("6.")


def test_sparsify_and_dictionary_learning_files(run, tmp_path):
    import torch

    export_run(run, str(tmp_path / "sp"), format="sparsify", k=4)
    assert sorted(os.listdir(tmp_path / "sp")) == ["cfg.json", "hsae_jax.json",
                                                   "sae.safetensors"]
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg == {"activation": "topk", "expansion_factor": 4, "normalize_decoder": False,
                   "num_latents": 96, "k": 4, "multi_topk": False, "skip_connection": False,
                   "transcode": False, "d_in": 24}
    export_run(run, str(tmp_path / "dl"), format="dictionary_learning", k=4)
    state = torch.load(tmp_path / "dl" / "ae.pt")
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    assert shapes == {"k": (), "threshold": (), "decoder.weight": (24, 96),
                      "encoder.weight": (96, 24), "encoder.bias": (96,), "b_dec": (24,)}
    assert state["k"].dtype == torch.int32 and int(state["k"]) == 4
    assert all(state[n].dtype == torch.float32 for n in shapes if n != "k")
    config = json.loads((tmp_path / "dl" / "config.json").read_text())
    assert config["trainer"]["dict_class"] == "AutoEncoderTopK"
    assert config["trainer"]["k"] == 4 and config["trainer"]["lm_name"] == "tiny-model"


# ----------------------------------------------------------------------- the CLI


def test_cli_export(run, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["export", run, out, "--format", "sparsify", "--budgets", "2,8"]) == 0
    printed = capsys.readouterr().out
    assert "k=2:" in printed and "FVU 0.8000" in printed
    assert sorted(os.listdir(out)) == [INDEX, "k2", "k8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run, out, "--format", "sparsify", "--k", "3"])
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
    for argv, message in ((["--k", "9"], "k=9 is larger"), (["--budgets", "4,a"], "budgets="),
                          (["--format", "x"], "invalid choice")):
        with pytest.raises(SystemExit):
            main(["export", run, str(tmp_path / "other"), "--format", "saelens", *argv])
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------ import


def _saelens_folder(path, cfg_extra, tensors=None):
    d, f = 6, 10
    rng = np.random.default_rng(0)
    tensors = tensors or {"W_enc": rng.normal(size=(d, f)), "b_enc": rng.normal(size=f),
                          "W_dec": rng.normal(size=(f, d)), "b_dec": rng.normal(size=d)}
    from hsae_jax.interop._files import write_json, write_safetensors

    write_safetensors(str(path / "sae_weights.safetensors"),
                      {n: np.asarray(a, np.float32) for n, a in tensors.items()})
    write_json(str(path / "cfg.json"), {"d_in": d, "d_sae": f, "dtype": "float32",
                                        "metadata": {"sae_lens_version": "6.54.0"},
                                        **cfg_extra})
    return str(path)


@pytest.mark.parametrize("cfg_extra, message", [
    ({"architecture": "jumprelu"}, "architecture 'jumprelu' cannot be represented"),
    ({"architecture": "standard"}, "architecture 'standard'"),
    ({"architecture": "topk", "k": 3, "normalize_activations": "layer_norm"},
     "normalize_activations='layer_norm'"),
])
def test_saelens_architectures_hsae_cannot_hold_are_refused(tmp_path, cfg_extra, message):
    with pytest.raises(ValueError, match=message):
        from_saelens(_saelens_folder(tmp_path, cfg_extra))


def test_saelens_extra_parameters_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"W_enc": rng.normal(size=(6, 10)), "b_enc": rng.normal(size=10),
               "W_dec": rng.normal(size=(10, 6)), "b_dec": rng.normal(size=6),
               "threshold": rng.normal(size=10)}
    with pytest.raises(ValueError, match="threshold"):
        from_saelens(_saelens_folder(tmp_path, {"architecture": "topk", "k": 3}, tensors))


def test_an_hsae_run_is_not_mistaken_for_another_format(run):
    for load in (from_saelens, from_sparsify):
        with pytest.raises(ValueError, match="is an hsae-jax run folder"):
            load(run)


def test_import_of_an_export_without_clients(run, tmp_path):
    """from_saelens on an export reproduces the run at its budget k and every k' < k."""
    export_run(run, str(tmp_path / "sl"), format="saelens", k=4)
    sae = from_saelens(str(tmp_path / "sl"), backend="xla")
    assert sae.cfg.k == 4 and sae.cfg.objective == "hierarchical"
    assert float(sae.input_scale[...]) == 1.0
    assert from_saelens(str(tmp_path / "sl"), objective="topk").cfg.objective == "topk"
    x = activations(run, 13)
    expected = hsae_outputs(run, x, [1, 2, 3, 4])
    vals, idx = (np.asarray(a) for a in sae.encode(x))
    for k in (1, 2, 3, 4):
        acts = np.zeros((x.shape[0], sae.cfg.n_latents))
        np.put_along_axis(acts, idx[:, :k], vals[:, :k], 1)
        got = (acts, np.asarray(sae.decode(vals, idx, k), np.float64))
        assert compare(expected[k], got, k, "", 1e-5).ok


def test_an_unfolded_saelens_folder_imports_to_a_different_model(run, tmp_path):
    _, params, _ = load_model_files(run)
    write_saelens(str(tmp_path), fold_input_scale(params, 1.0), K, {"hsae_jax": {}})
    sae = from_saelens(str(tmp_path), backend="xla")
    x = activations(run, 14)
    vals, idx = (np.asarray(a) for a in sae.encode(x))
    acts = np.zeros((x.shape[0], sae.cfg.n_latents))
    np.put_along_axis(acts, idx, vals, 1)
    check = compare(hsae_outputs(run, x, [K])[K],
                    (acts, np.asarray(sae.decode(vals, idx), np.float64)), K, "", 1e-5)
    assert not check.ok and check.other_latents > 0.3


def test_importing_a_multi_budget_export_names_its_folders(run, tmp_path):
    export_run(run, str(tmp_path / "sp"), format="sparsify", budgets="2,4")
    with pytest.raises(FileNotFoundError, match="pass one of them: k2, k4"):
        from_sparsify(str(tmp_path / "sp"))
    assert from_sparsify(str(tmp_path / "sp" / "k2")).cfg.k == 2


def test_bfloat16_saelens_weights_import_as_float32(tmp_path):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(2)
    tensors = {"W_enc": rng.normal(size=(6, 10)), "b_enc": rng.normal(size=10),
               "W_dec": rng.normal(size=(10, 6)), "b_dec": rng.normal(size=6)}
    folder = _saelens_folder(tmp_path, {"architecture": "topk", "k": 3}, tensors)
    save_file({n: torch.tensor(a, dtype=torch.bfloat16) for n, a in tensors.items()},
              os.path.join(folder, "sae_weights.safetensors"))
    sae = from_saelens(folder)
    assert sae.W_enc[...].dtype == np.float32 and sae.W_enc[...].shape == (10, 6)
    np.testing.assert_allclose(np.asarray(sae.W_enc[...]), tensors["W_enc"].T, rtol=1e-2,
                               atol=1e-2)


def test_budgets_and_k_accept_numpy_integers(run, tmp_path):
    assert parse_budgets(np.int64(3)) == (3,)
    assert parse_budgets([np.int32(4), 2]) == (2, 4)
    export_run(run, str(tmp_path / "o"), format="sparsify", k=np.int64(5))
    assert json.loads((tmp_path / "o" / "cfg.json").read_text())["k"] == 5
    for bad in ([2.5], [True], 2.0):
        with pytest.raises(ValueError, match="must be an integer"):
            parse_budgets(bad)
