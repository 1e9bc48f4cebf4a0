"""benchmarks/soak.py at a CPU size: a run killed with SIGKILL at a step and resumed ends
bit-identical to an uninterrupted one; the JSON and the plot are written."""

from __future__ import annotations

import importlib.util
import json
import os

SOAK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "soak.py")


def test_soak_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    out = tmp_path / "soak"
    assert soak.main(["--steps", "6", "--save-every", "2", "--kill-step", "3", "--d-model", "8",
                      "--n-latents", "16", "--k", "4", "--batch-size", "16",
                      "--out", str(out)]) == 0
    report = json.loads((out / "soak.json").read_text())
    assert report["phases"]["killed"]["returncode"] == -9
    assert report["resumed_from"] == 2 and report["problems"] == []
    assert report["params"]["bitwise_equal"]  # the xla backend on a CPU is deterministic
    assert [r["step"] for r in report["records"]["straight"] if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in report["records"]["resumed"] if "loss" in r] == [3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 for r in report["records"]["resumed"] if "loss" in r)
    assert {r["step"] for r in report["memory"]["straight"]} == set(range(6))
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
