"""Exports loaded by the real libraries, with their own loaders, against hsae-jax.

SAELens (``sae-lens`` 6.54) and sparsify (``eai-sparsify`` 1.3) are installed by the
``test`` extra. dictionary_learning 0.1.0 is not (it pins nnsight < 0.4 and a CUDA
torch): its wheel is fetched with ``pip download --no-deps`` (or taken from
``$HSAE_DICTIONARY_LEARNING_WHEEL``) and its own ``utils.load_dictionary`` and
``AutoEncoderTopK`` run with stub modules for nnsight and zstandard, which only its
training/buffer code uses; without the wheel those tests skip and say why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
from conftest import KERNEL_BACKEND
from interop_helpers import BUDGETS, K, activations, make_random_run, shared_trained_run

from hsae_jax import backends
from hsae_jax.interop import export_run, fold_input_scale, from_saelens, from_sparsify
from hsae_jax.interop import verify as verify_mod
from hsae_jax.interop.dictionary_learning import write_dictionary_learning
from hsae_jax.interop.saelens import write_saelens
from hsae_jax.interop.sparsify import write_sparsify
from hsae_jax.interop.verify import compare, hsae_outputs, verify_export
from hsae_jax.model import load_model_files

# Both libraries import Triton; Triton fixes compiled-vs-interpreted at its first import,
# so import it here in the mode this test process uses for hsae-jax's own kernels.
backends.import_triton("compiled" if KERNEL_BACKEND == "triton" else "interpret")
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs a GPU

with warnings.catch_warnings():  # transformer_lens's own deprecation notice, at import
    warnings.simplefilter("ignore", DeprecationWarning)
    sae_lens = pytest.importorskip("sae_lens", reason="needs the interop extra (sae-lens)")
sparsify = pytest.importorskip("sparsify", reason="needs the interop extra (eai-sparsify)")
import torch  # noqa: E402

DL_WHEEL = "dictionary_learning-0.1.0-py3-none-any.whl"
DL_SHA256 = "211116f9cc6fde643ea447f11da1c1ea9d0174dd9460e2031ae95b2724622ca5"
FORMATS = ("saelens", "sparsify")
WRITERS = {"saelens": write_saelens, "sparsify": write_sparsify,
           "dictionary_learning": write_dictionary_learning}


def test_the_pinned_clients_are_the_ones_under_test():
    assert sae_lens.__version__.startswith("6.54.")
    assert sparsify.__version__.startswith("1.3.")
    assert torch.__version__.startswith("2.13.0")


@pytest.fixture(scope="module", params=["random", "trained"])
def run(request, tmp_path_factory):
    if request.param == "trained":
        return shared_trained_run(tmp_path_factory)
    return make_random_run(str(tmp_path_factory.mktemp(request.param)))


def _assert_all_ok(checks, budgets):
    assert [c.k for c in checks] == list(budgets)
    for c in checks:
        assert c.ok, c


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_reproduces_hsae_in_the_library(run, tmp_path, fmt):
    """Every budget k in {1, K/2, K}: the library's own loader, encode and decode give the
    same non-zero latents per token, activations and reconstructions to 1e-5."""
    out = str(tmp_path / fmt)
    export_run(run, out, format=fmt, budgets=",".join(map(str, BUDGETS)))
    _assert_all_ok(verify_export(run, out, format=fmt, x=activations(run, 21)), BUDGETS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_without_the_scale_fold_is_rejected(run, tmp_path, fmt):
    """The negative control: the same checks on the issue's "keys fixed, scale not
    folded" export fail, with most tokens selecting other latents."""
    _, params, stats = load_model_files(run)
    assert abs(float(stats["input_scale"]) - 1) > 0.5
    x = activations(run, 22)
    expected = hsae_outputs(run, x, BUDGETS)
    for k in BUDGETS:
        folder = str(tmp_path / f"k{k}")
        WRITERS[fmt](folder, fold_input_scale(params, 1.0), k, {"hsae_jax": {}})
        check = compare(expected[k], verify_mod.RUNNERS[fmt](folder, x), k, folder, 1e-5)
        assert not check.ok
        assert check.other_latents > 0.3 and check.recon_error > 0.1, check


def test_saelens_loads_the_metadata(run, tmp_path):
    export_run(run, str(tmp_path / "sl"), format="saelens", k=K // 2, hook_name="h.3")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == K // 2
    assert sae.cfg.d_in == 24 and sae.cfg.d_sae == 96 and sae.W_enc.dtype == torch.float32
    assert sae.cfg.metadata.hook_name == "h.3"
    meta = sae.cfg.metadata.hsae_jax
    assert meta["budget_k"] == K // 2 and meta["K"] == K
    metrics_path = os.path.join(run, "metrics.json")
    if os.path.exists(metrics_path):  # the trained run: FVU at k from its metrics.json
        fvu = json.load(open(metrics_path))["fvu_per_k"]
        assert meta["fvu_at_k"] == pytest.approx(fvu[K // 2 - 1]) and meta["fvu_per_k"] == fvu


def test_sparsify_load_many_reads_a_budget_export(run, tmp_path):
    out = tmp_path / "sp"
    export_run(run, str(out), format="sparsify", budgets="2,8")
    coders = sparsify.SparseCoder.load_many(str(out), local=True)
    assert sorted(coders) == ["k2", "k8"]
    assert coders["k2"].cfg.k == 2 and coders["k8"].num_latents == 96


# ---------------------------------------------------------------- import round trips


def _hsae_model_outputs(sae, x, k):
    vals, idx = (np.asarray(a) for a in sae.encode(x))
    acts = np.zeros((x.shape[0], sae.cfg.n_latents))
    np.put_along_axis(acts, idx[:, :k], vals[:, :k], 1)
    return acts, np.asarray(sae.decode(vals, idx, k), np.float64)


@pytest.mark.parametrize("fmt, load", [("saelens", from_saelens),
                                       ("sparsify", from_sparsify)])
def test_export_then_import_gives_the_same_model(run, tmp_path, fmt, load):
    export_run(run, str(tmp_path / "e"), format=fmt, k=K)
    sae = load(str(tmp_path / "e"), backend="xla")
    assert sae.cfg.k == K and float(sae.input_scale[...]) == 1.0
    assert sae.cfg.objective == "hierarchical"  # recorded by the export
    x = activations(run, 23)
    expected = hsae_outputs(run, x, BUDGETS)
    for k in BUDGETS:  # every budget, from the one imported model
        check = compare(expected[k], _hsae_model_outputs(sae, x, k), k, "", 1e-5)
        assert check.ok, check


def _randomised(module, names, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = module.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 1 else 0.3))


@pytest.mark.parametrize("rescale, b_dec_to_input", [(False, True), (True, False)])
def test_a_saelens_topk_sae_imports_exactly(tmp_path, rescale, b_dec_to_input):
    """A TopK SAE made and saved by SAELens (with its run-time decoder-norm rescaling
    and without b_dec on the input): hsae-jax encodes/decodes as SAELens does."""
    cfg = sae_lens.TopKSAEConfig(d_in=20, d_sae=70, k=6, apply_b_dec_to_input=b_dec_to_input,
                                 rescale_acts_by_decoder_norm=rescale)
    sae = sae_lens.TopKSAE(cfg)
    _randomised(sae, ["W_enc", "b_enc", "W_dec", "b_dec"], 5)
    sae.save_model(str(tmp_path))
    model = from_saelens(str(tmp_path), backend="xla")
    assert model.cfg.k == 6 and model.cfg.objective == "topk"
    x = np.random.default_rng(6).normal(size=(200, 20)).astype(np.float32) * 2 + 0.3
    check = compare(verify_mod.run_saelens(str(tmp_path), x), _hsae_model_outputs(model, x, 6),
                    6, "", 1e-5)
    assert check.ok, check


def test_a_sparsify_sae_imports_exactly(tmp_path):
    coder = sparsify.SparseCoder(20, sparsify.SparseCoderConfig(num_latents=70, k=6))
    _randomised(coder, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], 7)
    coder.save_to_disk(str(tmp_path))
    model = from_sparsify(str(tmp_path), backend="xla")
    assert model.cfg.k == 6 and model.cfg.objective == "topk"
    x = np.random.default_rng(8).normal(size=(200, 20)).astype(np.float32)
    check = compare(verify_mod.run_sparsify(str(tmp_path), x),
                    _hsae_model_outputs(model, x, 6), 6, "", 1e-5)
    assert check.ok, check


def test_library_saes_hsae_cannot_represent_are_refused(tmp_path):
    jump = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=8, d_sae=16))
    jump.save_model(str(tmp_path / "jumprelu"))
    with pytest.raises(ValueError, match="architecture 'jumprelu' cannot be represented"):
        from_saelens(str(tmp_path / "jumprelu"))
    std = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=8, d_sae=16))
    std.save_model(str(tmp_path / "standard"))
    with pytest.raises(ValueError, match="architecture 'standard'"):
        from_saelens(str(tmp_path / "standard"))
    for name, cfg, message in (
            ("groupmax", sparsify.SparseCoderConfig(num_latents=16, k=4, activation="groupmax"),
             "activation 'groupmax'"),
            ("skip", sparsify.SparseCoderConfig(num_latents=16, k=4, skip_connection=True),
             "skip_connection"),
            ("transcoder", sparsify.SparseCoderConfig(num_latents=16, k=4, transcode=True),
             "transcoder")):
        sparsify.SparseCoder(8, cfg).save_to_disk(str(tmp_path / name))
        with pytest.raises(ValueError, match=message):
            from_sparsify(str(tmp_path / name))


# ----------------------------------------------------- dictionary_learning, stubbed


def _dictionary_learning_wheel(tmp_dir) -> str:
    wheel = os.environ.get("HSAE_DICTIONARY_LEARNING_WHEEL")
    if not wheel:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--only-binary=:all:", "dictionary-learning==0.1.0", "-d", str(tmp_dir)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"dictionary_learning: cannot run pip download ({err})")
        wheel = os.path.join(tmp_dir, DL_WHEEL)
        if done.returncode != 0 or not os.path.isfile(wheel):
            pytest.skip("dictionary_learning: `pip download --no-deps dictionary-learning=="
                        f"0.1.0` failed (no package index?): {done.stderr.strip()[-300:]}")
    with open(wheel, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == DL_SHA256, f"{wheel}: not the 0.1.0 wheel"
    return wheel


@pytest.fixture(scope="module")
def dictionary_learning(tmp_path_factory):
    """dictionary_learning 0.1.0's own code, from its wheel; nnsight and zstandard (used
    by its activation buffer and data loading only) are stubbed when not installed."""
    root = tmp_path_factory.mktemp("dictionary_learning")
    with zipfile.ZipFile(_dictionary_learning_wheel(root)) as z:
        z.extractall(root / "site")
    stubs = {"nnsight": {"LanguageModel": type("LanguageModel", (), {})}, "zstandard": {}}
    added = []
    for name, attrs in stubs.items():
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.SimpleNamespace(__name__=name, **attrs)
            added.append(name)
    sys.path.insert(0, str(root / "site"))
    try:
        import dictionary_learning.utils as utils

        yield utils
    finally:
        sys.path.remove(str(root / "site"))
        for name in [*added, *[m for m in sys.modules if m.startswith("dictionary_learning")]]:
            sys.modules.pop(name, None)


def test_dictionary_learning_export_reproduces_hsae(dictionary_learning, run, tmp_path):
    out = str(tmp_path / "dl")
    export_run(run, out, format="dictionary_learning", budgets=",".join(map(str, BUDGETS)))
    ae, config = dictionary_learning.load_dictionary(os.path.join(out, f"k{K}"), device="cpu")
    assert type(ae).__name__ == "AutoEncoderTopK" and int(ae.k) == K
    assert config["trainer"]["dict_class"] == "AutoEncoderTopK"
    _assert_all_ok(verify_export(run, out, format="dictionary_learning",
                                 x=activations(run, 24)), BUDGETS)


def test_dictionary_learning_without_the_fold_is_rejected(dictionary_learning, run, tmp_path):
    _, params, _ = load_model_files(run)
    x = activations(run, 25)
    write_dictionary_learning(str(tmp_path), fold_input_scale(params, 1.0), K, {"hsae_jax": {}})
    check = compare(hsae_outputs(run, x, [K])[K],
                    verify_mod.run_dictionary_learning(str(tmp_path), x), K, "", 1e-5)
    assert not check.ok and check.other_latents > 0.3
