"""The benchmarks run end to end at a CPU size and write their JSON (the GPU numbers come
from the same code on an H200: benchmarks/NOTES.md)."""

from __future__ import annotations

import collections
import json

import pytest

from hsae_jax.cli import main


def test_loss_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "loss.json"
    assert main(["bench", "--tiny", "--ks", "4", "--iters", "2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert {r["impl"] for r in rows} == {"reference", "xla"}
    assert all("median_ms" in r and r["median_ms"] > 0 for r in rows)
    xla = [r for r in rows if r["impl"] == "xla"]
    assert all(r["dweight_rel_err"] < 1e-5 for r in xla)
    assert "| K | weights |" in capsys.readouterr().out


def test_step_benchmark_smoke(tmp_path):
    out = tmp_path / "step.json"
    assert main(["bench", "--step", "--tiny", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {r["impl"] for r in payload["steps"]} == {"hsae", "hsae-auxk", "naive-jax"}
    assert all(r["tokens_per_s"] > 0 for r in payload["steps"])
    # memory, the same quantities for every row: the state kept between steps (parameters
    # and both Adam moments, plus small counters) and what a step needs beyond it
    w = payload["workload"]
    b, f, d = w["batch"], w["n_latents"], w["d_model"]
    param_bytes = (2 * f * d + f + d) * 4
    for row in payload["steps"]:
        assert 3 * param_bytes <= row["state_bytes"] <= 3 * param_bytes + 16 * f, row
        assert row["extra_bytes"] > 0, row
        assert row["total_bytes"] == row["state_bytes"] + row["extra_bytes"] + b * d * 4
    assert {"encoder matmul", "top-k hsae", "clip + Adam update", "loss and gradients (trainer)",
            "after-gradient tail (trainer)"} <= {
        p["piece"] for p in payload["pieces"]}
    assert not [p for p in payload["pieces"] if "error" in p]


def test_trainer_loop_benchmark_smoke(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "--train", "--tiny", "--steps", "12", "--rows", "1024",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    runs = {r["run"]: r for r in payload["runs"]}
    assert set(runs) == {"synthetic", "npy-float32", "npy-float16", "cache-float16",
                         "dead-auxk", "dead-no-auxk", "npy-float16-dead-auxk"}
    assert not [r for r in runs.values() if "error" in r]
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in runs.values())
    # 12 steps logged every 4: the intervals ending at steps 8 and 12 (the first one holds
    # compilation); the dead runs time steps 2..14 after their 1-step run: those ending at
    # 8 and 12 (not the 1-step run's, not 2..4 with compilation, not 12..14 with evaluation)
    assert {r["run"]: r["intervals"] for r in runs.values()} == dict.fromkeys(runs, 2)
    f = payload["workload"]["n_latents"]
    for name in ("dead-auxk", "dead-no-auxk", "npy-float16-dead-auxk"):  # 10% held dead
        assert runs[name]["dead_fraction"] == round(0.1 * f) / f, runs[name]
    for name in ("dead-auxk", "npy-float16-dead-auxk"):
        assert runs[name]["auxk_loss"] > 0
    assert runs["dead-no-auxk"]["auxk_loss"] == 0
    assert (tmp_path / "work" / "cache-float16" / "manifest.json").exists()


def test_trainer_loop_runs_are_named_by_what_they_change():
    from hsae_jax.bench.train import TrainBenchSettings, run_settings
    from hsae_jax.train import TrainConfig

    s = TrainBenchSettings.tiny()
    paths = {"npy-float16": "/data/x.npy"}

    def config(name):
        flat, dead = run_settings(s, name, paths)
        tc = TrainConfig.from_flat(**flat)
        return tc, tc.sae, dead

    _, default, _ = config("synthetic")
    assert default.auxk_coef > 0 and default.auxk_max_fraction == 1
    _, cfg, dead = config("synthetic-no-auxk")  # no AuxK in the step at all
    assert (cfg.auxk_coef, dead) == (0.0, False)
    _, cfg, dead = config("synthetic-no-scores")  # AuxK on, the scores not kept
    assert (cfg.auxk_coef, cfg.auxk_max_fraction, dead) == (default.auxk_coef, 0.25, False)
    tc, cfg, dead = config("npy-float16-dead-auxk-bf16")
    assert (tc.data, cfg.auxk_dtype, cfg.auxk_coef, dead) == (
        "/data/x.npy", "bfloat16", 1 / 32, True)
    assert config("dead-no-auxk")[1].auxk_coef == 0.0
    assert config("synthetic")[0].data is None
    for bad in ("synthetic-bf16", "dead-auxk-fp8", "npy-float64"):
        with pytest.raises(ValueError, match=f"--runs: unknown run '{bad}'"):
            run_settings(s, bad, paths)


def test_benchmark_reporting_does_not_import_triton():
    """Importing Triton fixes compile/interpret mode for the process: the device report
    must read versions without importing it."""
    import subprocess
    import sys

    script = ("import sys; from hsae_jax.bench.common import device_info; info = device_info(); "
              "assert 'triton' not in sys.modules, 'triton imported'; print(info['triton'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()[0].isdigit()


def _load_benchmark(name):
    """The module of benchmarks/NAME.py (a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", _benchmark_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_floor_kernels_do_what_the_table_says():
    """The floor kernels (benchmarks/loss_floor.py) gather and scatter exactly the fused
    kernel's rows, so their timings bound it; checked against NumPy on random data with
    out-of-range indices, several D tiles and a partial row block."""
    import jax
    import numpy as np
    from conftest import KERNEL_BACKEND

    from hsae_jax import WalkConfig

    floor = _load_benchmark("loss_floor")
    floor.make_kernels(KERNEL_BACKEND)
    rng = np.random.default_rng(7)
    b, f, d, k = 6, 20, 40, 5
    indices = rng.integers(-2, f + 2, size=(b, k)).astype(np.int32)
    weight = rng.standard_normal((f, d)).astype(np.float32)
    vals = rng.standard_normal((b, k)).astype(np.float32)
    g = rng.standard_normal((b, d)).astype(np.float32)
    ok = (indices >= 0) & (indices < f)
    safe = np.where(ok, indices, 0)
    gathered = np.einsum("bk,bkd->bd", vals * ok, weight.astype(np.float64)[safe])
    scattered = np.zeros((f, d))
    np.add.at(scattered, safe[ok], (vals[:, :, None] * g[:, None, :])[ok])

    calls = floor.floor_calls(KERNEL_BACKEND, WalkConfig(block_b=4, block_d=16, num_warps=1,
                                                          loop_num_stages=2),
                              jax.numpy.asarray(indices), weight, vals, jax.numpy.asarray(g))
    (out,) = calls["gather"](weight, vals)
    np.testing.assert_allclose(out, gathered, rtol=1e-5, atol=1e-5)
    (dw,) = calls["scatter"](weight, vals)
    np.testing.assert_allclose(dw, scattered, rtol=1e-5, atol=1e-5)
    out, dw = calls["gather + scatter"](weight, vals)
    np.testing.assert_allclose(out, gathered, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, scattered, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 70 s; the sharded = replicated step: tests/test_sharded_auxk.py
def test_shard_benchmark_smoke(tmp_path):
    """benchmarks/shard_h200.py at a CPU size: the one-device sharded step against the
    replicated one (no, 10% and every latent dead), and the largest-F search (attempts in
    subprocesses, a fake 3.2 MB device so that some fail: XLA's figure for the tiny step is
    2.7 MB at F=1536, 3.6 MB at F=2048)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "shard.json"
    root = str(_benchmark_path("shard_h200").parents[1])  # this checkout's hsae_jax
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, str(_benchmark_path("shard_h200")), "--tiny", "--low", "1024",
         "--high", "2048", "--max-gb", "0.0032", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    step = payload["step"]
    assert {(r["dead_fraction"], r["step"]) for r in step["rows"]} == {
        (f, s) for f in (0.0, 0.1, 1.0) for s in ("sharded", "replicated")}
    assert step["same_first_loss"] and step["collectives_in_one_device_program"] == []
    found = payload["largest"]
    assert found["largest_n_latents"] == 1536 and found["first_failing"] == 2048
    assert all(a["ok"] == (a["n_latents"] <= 1536) for a in found["attempts"])
    assert "largest F that trains: 1536" in proc.stdout


def _benchmark_path(name):
    import pathlib

    return pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"


def test_loader_diagnostic_smoke(tmp_path):
    """benchmarks/loader_h200.py at a CPU size: every row timed, the synthetic loop is 1."""
    module = _load_benchmark("loader_h200")
    out = tmp_path / "loader.json"
    assert module.main(["--tiny", "--work-dir", str(tmp_path / "w"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # the loader's pieces too (on a CPU the copies are not staged: no "staged" or
    # "registered" pieces, but the loader alone runs Layout.put_batch's staged path)
    assert {r["what"] for r in rows} == {"step", "put", "loader", "loader staged", "loop",
                                         "loop lag 2", "read", "read + put"}
    assert {(r["data"], r["workers"]) for r in rows if r["what"] == "read"} == {
        (f".npy {dt}", w) for dt in ("float32", "float16") for w in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert [r["vs_synthetic_loop"] for r in rows if r["data"] == "synthetic"] == [1.0]


def test_step_profile_puts_the_device_time_in_the_steps_pieces(tmp_path):
    """benchmarks/profile_step.py: a traced step's ops, grouped by the step's named scopes."""
    profile = _load_benchmark("profile_step")
    out = tmp_path / "profile.json"
    assert profile.main(["--tiny", "--dead", "0.1", "--backend", "xla", "--steps", "3",
                         "--warmup", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    pieces = {r["piece"]: r["ms_per_step"] for r in payload["pieces"]}
    for piece in ("encoder matmul", "top-k", "encoder backward", "decoder loss", "AuxK",
                  "optimizer tail"):
        assert pieces.get(piece, 0) > 0, (piece, pieces)
    assert abs(sum(pieces.values()) - payload["device_ms"]) < 1e-6
    assert all(r["op_name"].startswith("jit(step)/") for r in payload["ops"]
               if r["piece"] != "other (glue)")
    assert profile.piece_of("jit(step)/transpose(jvp(encoder))/while") == "encoder backward"
    assert profile.piece_of("jit(step)/auxk/cond/branch_1_fun/jvp()/top_k") == "AuxK"
    assert profile.piece_of("jit(step)/jvp(encoder)/top_k/top_k") == "top-k"
    assert profile.piece_of(None) == "other (glue)"


def test_step_hlo_lists_the_steps_host_round_trips_and_big_copies(tmp_path):
    """benchmarks/step_hlo.py: the compiled step's conds (none in AuxK, whose bucket the
    trainer picks on the host; on the CPU the optimizer's skip-if-not-finite) and the
    copies outside fusions, by piece."""
    hlo = _load_benchmark("step_hlo")
    out = tmp_path / "hlo.json"
    assert hlo.main(["--tiny", "--dead", "0.1", "--backend", "xla", "--min-mb", "0",
                     "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    trips = collections.Counter((r["op"], r["piece"]) for r in payload["round_trips"])
    assert trips[("conditional", "AuxK")] == 0
    assert trips[("conditional", "optimizer tail")] >= 1
    assert payload["glue"] and all(g["op"] in hlo.GLUE and g["mb"] >= 0 for g in payload["glue"])
    assert not [g for g in payload["glue"] if g["computation"].startswith("fused_")]
    assert hlo.array_bytes("bf16[8,4]{1,0}") == 64 and hlo.array_bytes("(f32[], s32[])") == 0
    assert hlo._glue_op("fusion", "wrapped_convert.3") == "convert"
    assert hlo._glue_op("fusion", "loop_transpose_fusion") == "transpose"
    assert hlo._glue_op("fusion", "loop_select_fusion.2") is None
    text = """HloModule m
ENTRY %main (p: f32[4]) -> (f32[4], f32[4]) {
  %w = (s32[], f32[4]) while(%t), body=%b, backend_config={"known_trip_count":{"n":"3"}}
  %v = (s32[], f32[4]) while(%t), condition=%c, body=%b
  ROOT %r = (f32[4], f32[4]) conditional(%p, %a, %a), branch_computations={%x, %y}
}
"""
    assert [r["name"] for r in hlo.report(text, 0)["round_trips"]] == ["v", "r"]


def test_step_profile_lists_the_device_time_its_pieces_leave_out(tmp_path):
    """op_times on a GPU-like trace: device events of the step's HLO ops are summed per op
    (a thread's enclosing event once), and device kernels without an HLO op of the step
    are listed by name instead of vanishing; host events never count."""
    import gzip

    profile = _load_benchmark("profile_step")

    def event(name, ts, dur, pid=1, tid=1, **args):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid,
                "args": args}

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        event("fusion.1", 0, 10, hlo_op="fusion.1", hlo_module="jit_step"),
        event("fusion.1", 20, 10, hlo_op="fusion.1", hlo_module="jit_step"),
        event("cublas", 40, 5, hlo_op="dot.3", hlo_module="jit_step"),
        event("triton_kernel_hsae_fwd", 50, 7, tid=2),  # no HLO op: left out of the pieces
        event("other_module_op", 60, 3, hlo_op="x", hlo_module="jit_eval"),
        event("host_op", 0, 100, pid=2, hlo_op="fusion.1", hlo_module="jit_step"),
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    totals, counts, missed = profile.op_times(str(tmp_path), "jit_step")
    assert totals == {"fusion.1": 20.0, "dot.3": 5.0} and counts == {"fusion.1": 2, "dot.3": 1}
    assert missed == {"triton_kernel_hsae_fwd": 7.0, "other_module_op": 3.0}


def test_step_profile_on_a_mesh_shows_the_gradient_mean_over_data(tmp_path):
    """profile_step.py --mesh data=2,model=1 on 2 CPU devices (a subprocess): B rows per data
    shard, device times per device, the data axis's gradient all-reduce a piece of its own."""
    import os
    import subprocess
    import sys

    out = tmp_path / "profile.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(_benchmark_path("profile_step")), "--tiny", "--mesh",
         "data=2,model=1", "--backend", "xla", "--steps", "3", "--warmup", "1", "--out",
         str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["workload"]["devices"] == 2 and payload["workload"]["rows_per_step"] == 128
    pieces = {r["piece"]: r["ms_per_step"] for r in payload["pieces"]}
    assert pieces.get("gradient mean over data", 0) > 0, pieces
    assert pieces.get("decoder loss", 0) > 0, pieces


@pytest.mark.slow  # 110 s; meshes = one device: tests/test_parallel.py
def test_multi_gpu_benchmark_smoke(tmp_path):
    """benchmarks/multi_gpu.py on 2 CPU devices: meshes (2,1) and (1,2) train like one
    device (every step's loss, grad norm and other metrics and the FVU per k at rtol 1e-5:
    the real check, since Adam hides a gradient's scale; the parameters within one Adam
    step at the peak rate), the scaling runs
    report tokens/s on 1 and 2 devices, the latent-sharded runs report the plan's memory
    and the FVU at every k and leave their metrics but not their checkpoints or model."""
    import os
    import subprocess
    import sys

    out = tmp_path / "multi.json"
    root = str(_benchmark_path("multi_gpu").parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(_benchmark_path("multi_gpu")), "--tiny", "--no-file-runs",
         "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["gpus"] == 2
    correct = payload["correctness"]
    assert [r["mesh"] for r in correct["rows"]] == ["1 GPU", "mesh (2,1)", "mesh (1,2)"]
    assert correct["same"], correct["rows"]
    for row in correct["rows"][1:]:
        assert set(row["metric_rel_diff"]) >= {"loss", "l0", "grad_norm"}
        assert set(row["param_rel_diff"]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    scaling = payload["scaling"]["rows"]
    assert [(r["data"], r["mesh"]) for r in scaling] == [
        ("synthetic", "1 GPU"), ("synthetic", "data=2"), ("synthetic", "model=2")]
    assert all(r["tokens_per_s"] > 0 for r in scaling)
    assert all(r["speedup"] > 0 for r in scaling[1:])
    sharded = payload["sharded"]["rows"]
    assert [(r["n_latents"], r["options"]) for r in sharded] == [(512, "default"),
                                                                 (1024, "low-memory")]
    for row in sharded:
        assert len(row["fvu_per_k"]) == 8 and all(0 < v < 10 for v in row["fvu_per_k"])
        assert row["plan_gb"] > 0 and os.path.exists(row["fvu_png"])
        # the large files go once the row is made; the metrics stay
        assert os.path.exists(os.path.join(row["run_dir"], "metrics.json"))
        assert not os.path.exists(os.path.join(row["run_dir"], "checkpoints"))
        assert not os.path.exists(os.path.join(row["run_dir"], "sae.safetensors"))
    assert "latent-sharded runs" in proc.stdout


def test_step_profile_of_the_update_in_blocks(tmp_path):
    """profile_step.py --low-memory --update-blocks N: the step the trainer takes with those
    settings (its optimizer tail in blocks), and 0 for the whole update."""
    profile = _load_benchmark("profile_step")
    for blocks in ("4", "0"):
        out = tmp_path / f"profile{blocks}.json"
        assert profile.main(["--tiny", "--backend", "xla", "--steps", "2", "--warmup", "1",
                             "--low-memory", "--update-blocks", blocks, "--out", str(out)]) == 0
        payload = json.loads(out.read_text())
        settings = payload["workload"]["settings"]
        assert settings["param_dtype"] == "bfloat16"
        assert settings["update_blocks"] == (int(blocks) or None)
        pieces = {r["piece"]: r["ms_per_step"] for r in payload["pieces"]}
        assert pieces.get("optimizer tail", 0) > 0, pieces


def test_cond_cost_times_idle_conds_that_change_nothing(tmp_path):
    """benchmarks/cond_cost.py: its idle conds leave the step's result bit-equal to the
    step without them (only their cost differs), one table row per cond count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    cond = _load_benchmark("cond_cost")
    x = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
    weight = jax.random.normal(jax.random.key(1), (32, 8), jnp.float32)
    plain = np.asarray(jax.jit(lambda w: cond.step(0, w, x))(weight))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: cond.step(3, w, x))(weight)),
                                  plain)
    assert not np.array_equal(plain, np.asarray(weight))
    out = tmp_path / "cond.json"
    assert cond.main(["--batch", "16", "--d-model", "8", "--n-latents", "32", "--conds",
                      "0,2", "--chain", "2", "--iters", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["conds"] for r in rows] == [0, 2] and rows[0]["ms_per_cond"] is None
    assert rows[1]["ms_per_step"] > 0
