"""hsae train: the run folder, resume equality, non-finite steps, several devices, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsae_jax import HierarchicalTopKSAE
from hsae_jax.cli import main
from hsae_jax.train import TrainConfig, train
from hsae_jax.train.checkpoint import Checkpointer

TINY = dict(d_model=16, n_latents=64, k=8, batch_size=128, steps=20, synthetic_features=32,
            synthetic_active=8.0, log_every=5, eval_every=10, save_every=10, eval_batches=2,
            warmup_steps=5, dead_tokens=512)


def tiny(**overrides) -> TrainConfig:
    return TrainConfig.from_flat(**{**TINY, **overrides})


def state_params(run_dir):
    ckpt = Checkpointer(str(run_dir))
    step = ckpt.latest_step()
    path = os.path.join(ckpt.directory, str(step))
    ckpt.close()
    return step, path


def test_a_run_writes_everything(tmp_path):
    summary = train(tiny(), str(tmp_path), progress=False, log=lambda *_: None)
    for name in ("sae.safetensors", "cfg.json", "metrics.json", "metrics.jsonl",
                 "fvu_vs_k.png", "loss.png"):
        assert (tmp_path / name).exists(), name
    for png in ("fvu_vs_k.png", "loss.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert len(metrics["fvu_per_k"]) == 8
    assert metrics["fvu_per_k"][-1] < metrics["fvu_per_k"][0]
    assert 0 < metrics["l0"] <= 8 and 0 <= metrics["dead_fraction"] <= 1
    assert 0 < metrics["mean_max_cosine"] <= 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "eval" in r] == [10, 20]
    assert all(r["tokens_per_s"] > 0 and r["elapsed_s"] > 0 for r in records if "loss" in r)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_model"] == 16 and cfg["n_latents"] == 64 and cfg["k"] == 8
    assert cfg["input_scale"] > 0 and cfg["train"]["steps"] == 20
    loaded = HierarchicalTopKSAE.load(str(tmp_path))
    x = jnp.ones((3, 16))
    assert loaded(x).shape == (3, 16)


def test_training_reduces_the_error_at_every_budget(tmp_path):
    metrics = train(tiny(steps=150, eval_every=150, save_every=150), str(tmp_path),
                    progress=False, log=lambda *_: None)
    fvu = np.asarray(metrics["fvu_per_k"])
    assert np.all(np.diff(fvu) < 0), fvu  # falls as k grows
    assert fvu[-1] < 0.5


def test_resume_ends_with_the_same_parameters(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(tiny(), str(straight), progress=False, log=lambda *_: None)
    # the same run killed after its step-10 checkpoint: later state and outputs gone
    shutil.copytree(straight, killed)
    step, path = state_params(killed)
    shutil.rmtree(path)
    for name in ("sae.safetensors", "metrics.json", "fvu_vs_k.png", "loss.png"):
        os.remove(killed / name)
    assert state_params(killed)[0] == 10
    train(tiny(), str(killed), resume=True, progress=False, log=lambda *_: None)
    a = HierarchicalTopKSAE.load(str(straight))
    b = HierarchicalTopKSAE.load(str(killed))
    chex.assert_trees_all_equal(a.params(), b.params())
    ra = (straight / "metrics.jsonl").read_text().splitlines()
    rb = (killed / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items()  # noqa: E731
                            if k not in ("tokens_per_s", "elapsed_s")} for x in lines]
    assert strip(ra) == strip(rb)


def kill_after_checkpoint(run, step):
    """Makes ``run`` look killed right after its checkpoint at ``step``."""
    ckpt = Checkpointer(str(run))
    for later in ckpt.manager.all_steps():
        if later > step:
            shutil.rmtree(os.path.join(ckpt.directory, str(later)))
    ckpt.close()
    for name in ("sae.safetensors", "metrics.json", "fvu_vs_k.png", "loss.png"):
        os.remove(run / name)


def test_a_run_whose_latents_die_takes_auxks_buckets_and_resumes_bit_exact(tmp_path):
    """Latents die and revive within 20 steps (dead after 3 batches): the loop takes the
    step compiled for the bucket that holds them (named in the log when first taken), AuxK
    trains them, and the run killed after its step-10 checkpoint and resumed (the bucket
    bound saved with it) ends bit-identical to the uninterrupted run."""
    tc = tiny(n_latents=256, dead_tokens=384)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    said = []
    train(tc, str(straight), progress=False, log=said.append)
    taken = [line for line in said if "AuxK on" in line]
    assert len(taken) >= 2, said  # more than one bucket over the run
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("auxk_loss", 0) > 0 for r in records)
    assert not any(k.startswith("auxk_b") or k == "auxk_fits" for r in records for k in r)
    ckpt = Checkpointer(str(straight))
    assert ckpt.meta(10)["auxk_bound"] >= 0
    ckpt.close()
    shutil.copytree(straight, killed)
    kill_after_checkpoint(killed, 10)
    train(tc, str(killed), resume=True, progress=False, log=lambda *_: None)
    chex.assert_trees_all_equal(HierarchicalTopKSAE.load(str(straight)).params(),
                                HierarchicalTopKSAE.load(str(killed)).params())


def test_auxk_on_bfloat16_operands_trains_on_the_cpu(tmp_path):
    """--auxk-dtype bfloat16 with latents dying: XLA's CPU runtime cannot run some
    bfloat16 x bfloat16 -> float32 dots of the step (it raised "Unsupported element type
    for DotThunk::Execute"); the run trains and AuxK's loss is positive."""
    tc = tiny(n_latents=256, dead_tokens=384, auxk_dtype="bfloat16", steps=10, eval_every=10,
              save_every=10)
    train(tc, str(tmp_path), progress=False, log=lambda *_: None)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("auxk_loss", 0) > 0 for r in records)


def test_training_on_a_float16_cache_resumes_bit_exact(tmp_path):
    """Rows mixed across shards, a held-out split, resume across epochs and shards."""
    from hsae_jax.data import CacheWriter

    synthetic = tiny().open_source()
    rows = np.concatenate([np.asarray(synthetic.batch(i)) for i in range(6)])  # 768 x 16
    with CacheWriter(str(tmp_path / "cache"), 16, dtype="float16", rows_per_shard=100) as w:
        w.append(rows)
    tc = tiny(data=str(tmp_path / "cache"), steps=16, save_every=8, eval_every=8)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(tc, str(straight), progress=False, log=lambda *_: None)
    shutil.copytree(straight, killed)
    kill_after_checkpoint(killed, 8)
    train(tc, str(killed), resume=True, progress=False, log=lambda *_: None)
    chex.assert_trees_all_equal(HierarchicalTopKSAE.load(str(straight)).params(),
                                HierarchicalTopKSAE.load(str(killed)).params())
    data = json.loads((straight / "cfg.json").read_text())["data"]
    # 10% of 768 rows, in whole blocks of 16, held out; 16 steps x 128 rows > one epoch
    assert data["held_out_rows"] == 80 and data["train_rows"] == 688
    assert data["dtype"] == "float16" and "cache" in data["source"]
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["tokens"] == 80  # evaluated on the held-out rows only


def test_resume_ignores_a_checkpoint_that_was_never_finished(tmp_path):
    train(tiny(), str(tmp_path), progress=False, log=lambda *_: None)
    step, path = state_params(tmp_path)
    assert step == 20
    # a save killed half-way: orbax's temporary directory, never renamed
    partial = path.replace("/20", "/30.orbax-checkpoint-tmp-1234")
    shutil.copytree(path, partial)
    train(tiny(steps=30), str(tmp_path), resume=True, progress=False, log=lambda *_: None)
    assert state_params(tmp_path)[0] == 30


def test_non_finite_batches_skip_the_update_and_are_counted(tmp_path):
    inner = tiny().open_source()

    class Poisoned:
        d_model = inner.d_model
        features = inner.features
        describe = inner.describe

        def batch(self, step):
            x = inner.batch(step)
            return x.at[0, 0].set(jnp.nan) if step in (3, 12) else x

    summary = train(tiny(), str(tmp_path), source=Poisoned(), progress=False,
                    log=lambda *_: None)
    assert summary["skipped_steps"] == 2
    params = HierarchicalTopKSAE.load(str(tmp_path)).params()
    assert all(np.all(np.isfinite(np.asarray(p))) for p in params.values())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [1, 1, 2, 2]


def test_a_skipped_step_leaves_every_parameter_unchanged():
    from hsae_jax.model import init_arrays
    from hsae_jax.train.step import make_mesh, make_optimizer, make_train_step

    tc = tiny()
    cfg = tc.sae
    tx = make_optimizer(tc)
    step = make_train_step(cfg, tx, make_mesh(1))
    params, stats = init_arrays(cfg, jax.random.key(0), jnp.ones((4, 16)))
    before = jax.tree.map(np.asarray, (params, stats))
    x = jnp.full((128, 16), jnp.inf)
    params, stats, opt_state, metrics = step(params, stats, tx.init(params), x)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, (params, stats)), before)
    assert int(metrics["skipped_steps"]) == 1


def test_resume_refuses_changed_settings_and_missing_runs(tmp_path):
    train(tiny(steps=10), str(tmp_path), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--n-latents: saved 64, given 128"):
        train(tiny(n_latents=128), str(tmp_path), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny(), str(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train(tiny(), str(tmp_path / "nothing"), resume=True, progress=False)
    assert not (tmp_path / "nothing").exists()


def test_data_parallel_over_four_devices_matches_one(tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        import jax
        from hsae_jax.train import TrainConfig, train
        from hsae_jax import HierarchicalTopKSAE
        assert jax.device_count() == 4, jax.devices()
        cfg = {json.dumps({**TINY, "steps": 6})}
        for n in (1, 4):
            train(TrainConfig.from_flat(**cfg, devices=n), sys.argv[1] + f"/d{{n}}", progress=False,
                  log=lambda *_: None)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one = HierarchicalTopKSAE.load(str(tmp_path / "d1")).params()
    four = HierarchicalTopKSAE.load(str(tmp_path / "d4")).params()
    chex.assert_trees_all_close(four, one, rtol=2e-5, atol=2e-6)


def test_cli_train_then_eval(tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", "--no-progress", "--out", str(tmp_path), *args]) == 0
    assert main(["eval", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert f"| fvu | {saved['fvu']:.5g} |" in out
    assert "| 8 |" in out


def test_cli_reports_bad_settings_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--no-progress", "--out", str(tmp_path), "--k", "0"])
    assert info.value.code == 2
    assert "--k=0 must be an int >= 1" in capsys.readouterr().err


def test_every_setting_has_help_and_a_flag(capsys):
    from hsae_jax.model import SAEConfig

    fields = [*dataclasses.fields(SAEConfig),
              *(f for f in dataclasses.fields(TrainConfig) if f.name != "sae")]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for field in fields:
        assert field.metadata.get("help"), field.name
        assert "--" + field.name.replace("_", "-") in help_text, field.name
    assert "(default: 1024) (default" not in help_text
    for line in help_text.splitlines():
        assert line.count("(default") <= 1, line


def test_training_runs_on_the_triton_kernels(tmp_path):
    """Top-k, the sparse encoder backward and the fused loss kernels in the jitted step
    (compiled on a GPU, Triton's interpreter elsewhere), agreeing with the xla backend."""
    from conftest import KERNEL_BACKEND

    settings = dict(steps=3, batch_size=32, log_every=1, eval_every=3, save_every=3,
                    eval_batches=1, warmup_steps=1)
    kernel = train(tiny(backend=KERNEL_BACKEND, **settings), str(tmp_path / "kernel"),
                   progress=False, log=lambda *_: None)
    xla = train(tiny(backend="xla", **settings), str(tmp_path / "xla"), progress=False,
                log=lambda *_: None)
    np.testing.assert_allclose(kernel["fvu_per_k"], xla["fvu_per_k"], rtol=1e-4)
    chex.assert_trees_all_close(HierarchicalTopKSAE.load(str(tmp_path / "kernel")).params(),
                                HierarchicalTopKSAE.load(str(tmp_path / "xla")).params(),
                                rtol=1e-4, atol=1e-6)
