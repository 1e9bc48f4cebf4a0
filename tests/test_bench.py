"""The benchmarks run end to end at a CPU size and write their JSON (the GPU numbers come
from the same code on an H200: benchmarks/NOTES.md)."""

from __future__ import annotations

import json

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
    assert {r["impl"] for r in payload["steps"]} == {"hsae", "naive-jax"}
    assert all(r["tokens_per_s"] > 0 for r in payload["steps"])
    assert {"encoder matmul", "top-k hsae", "clip + Adam update", "loss and gradients (trainer)",
            "after-gradient tail (trainer)"} <= {
        p["piece"] for p in payload["pieces"]}
    assert not [p for p in payload["pieces"] if "error" in p]


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
