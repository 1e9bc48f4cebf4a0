"""benchmarks/soak.py at a CPU size: a run killed with SIGKILL at a step and resumed ends
bit-identical to an uninterrupted one; the JSON and the plot are written; the runs split
over two calls and merged give the same verdict."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

SOAK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "soak.py")
SIZE = ["--steps", "8", "--save-every", "2", "--kill-step", "5", "--d-model", "8",
        "--n-latents", "16", "--k", "4", "--batch-size", "16"]
# Checkpoints are written in the background: the one of step 4 may still be unfinished
# when step 5 kills the run, which then resumes from step 2's (the newest complete one).
RESUMED_FROM = (2, 4)


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_smoke(soak, tmp_path):
    out = tmp_path / "soak"
    assert soak.main([*SIZE, "--out", str(out)]) == 0
    report = json.loads((out / "soak.json").read_text())
    assert report["phases"]["killed"]["returncode"] == -9
    start = report["resumed_from"]
    assert start in RESUMED_FROM and report["problems"] == []
    assert report["params"]["bitwise_equal"]  # the xla backend on a CPU is deterministic
    assert report["digests"]["straight"] == report["digests"]["resumed"]
    assert set(report["digests"]["straight"]) == {"W_dec", "W_enc", "b_dec", "b_enc"}
    assert [r["step"] for r in report["records"]["straight"] if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in report["records"]["resumed"] if "loss" in r] == list(
        range(start + 1, 9))
    assert all(r["tokens_per_s"] > 0 for r in report["records"]["resumed"] if "loss" in r)
    assert {r["step"] for r in report["memory"]["straight"]} == set(range(8))
    assert is_png(out / "soak.png")


def test_a_soak_split_over_two_calls_merges_into_one_verdict(soak, tmp_path):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert soak.main([*SIZE, "--phases", "straight", "--out", str(a)]) == 0
    assert soak.main([*SIZE, "--phases", "killed,resumed", "--out", str(b)]) == 0
    parts = [json.loads((p / "soak.json").read_text()) for p in (a, b)]
    assert set(parts[0]["phases"]) == {"straight"} and "params" not in parts[0]
    assert set(parts[1]["phases"]) == {"killed", "resumed"} and "params" not in parts[1]
    assert soak.main(["--merge", str(a / "soak.json"), str(b / "soak.json"),
                      "--out", str(merged)]) == 0
    report = json.loads((merged / "soak.json").read_text())
    assert report["params"] == {"bitwise_equal": True} and report["problems"] == []
    assert report["resumed_from"] in RESUMED_FROM
    assert is_png(merged / "soak.png")


def test_merging_reports_of_other_settings_is_refused(soak, tmp_path):
    straight = {"settings": {"steps": 6}, "kill_step": 3, "phases": {"straight": {}}}
    other = {"settings": {"steps": 8}, "kill_step": 3, "phases": {"killed": {}, "resumed": {}}}
    with pytest.raises(ValueError, match="different settings"):
        soak.merge(straight, other)
    with pytest.raises(ValueError, match="phases"):
        soak.merge(straight, {**straight, "phases": {"killed": {}}})


def test_differing_parameters_fail_a_deterministic_soak(soak, tmp_path):
    report = {"settings": {"deterministic": True}, "kill_step": 3,
              "phases": {p: {"returncode": rc} for p, rc in
                         (("straight", 0), ("killed", -9), ("resumed", 0))},
              "resumed_from": 2,
              "digests": {"straight": {"W_enc": "aa"}, "resumed": {"W_enc": "ab"}}}
    assert soak.judge(report, None, local=False) == [
        "--deterministic, yet the parameters differ"]
    assert report["params"] == {"bitwise_equal": False}


def test_a_deterministic_soak_whose_xla_was_not_deterministic_fails(soak):
    """Each child says whether XLA runs with deterministic ops; a run without them cannot
    vouch for the kernels' reproducibility, even when the parameters came out equal."""
    logs = {"straight": ["xla deterministic ops: True"],
            "killed": ["xla deterministic ops: True"],
            "resumed": ["xla deterministic ops: False", "resuming ... at step 2"]}
    report = {"settings": {"deterministic": True}, "kill_step": 3, "resumed_from": 2,
              "phases": {p: {"returncode": rc, "log": logs[p]} for p, rc in
                         (("straight", 0), ("killed", -9), ("resumed", 0))},
              "digests": {"straight": {"W_enc": "aa"}, "resumed": {"W_enc": "aa"}}}
    assert soak.judge(report, None, local=False) == [
        "--deterministic, but XLA ran without deterministic ops in resumed"]


def test_a_resume_that_started_from_no_checkpoint_fails(soak):
    report = {"settings": {"deterministic": True}, "kill_step": 3, "resumed_from": None,
              "phases": {p: {"returncode": rc} for p, rc in
                         (("straight", 0), ("killed", -9), ("resumed", 0))},
              "digests": {"straight": {"W_enc": "aa"}, "resumed": {"W_enc": "aa"}}}
    assert "the resumed run did not resume from a checkpoint" in soak.judge(report, None,
                                                                             local=False)


def test_phases_must_be_a_whole_half(soak):
    with pytest.raises(SystemExit):
        soak.parse_args([*SIZE, "--phases", "resumed"])


def test_a_merge_without_both_digests_is_no_pass(soak):
    """Reports that lack a run's digests (written by another soak.py) cannot say the
    parameters are equal: the verdict fails instead of passing with nothing compared."""
    report = {"settings": {"deterministic": True}, "kill_step": 3, "resumed_from": 2,
              "phases": {p: {"returncode": rc} for p, rc in
                         (("straight", 0), ("killed", -9), ("resumed", 0))},
              "digests": {"straight": {"W_enc": "aa"}}}
    assert soak.judge(report, None, local=False) == [
        "the reports hold no parameter digests of both runs to compare"]
    assert "params" not in report


def test_a_soak_on_an_activation_file_kills_and_resumes(soak, tmp_path):
    """File sources are read on the loader's threads (``host_batch``): the kill happens
    there too, a few steps early (the loader reads ahead), and the runs end equal."""
    import numpy as np

    data = tmp_path / "acts.npy"
    np.save(data, np.random.default_rng(0).normal(size=(4096, 8)).astype(np.float16))
    out = tmp_path / "soak"
    assert soak.main([*SIZE, "--steps", "16", "--save-every", "4", "--kill-step", "14",
                      "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "soak.json").read_text())
    assert report["phases"]["killed"]["returncode"] == -9
    # the save of step 8 waited for step 4's write: at least that one is complete
    assert report["resumed_from"] in (4, 8, 12) and report["problems"] == []
    assert report["params"]["bitwise_equal"]
