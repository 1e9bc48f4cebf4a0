"""Soak test: a long run killed with SIGKILL and resumed, against an uninterrupted one.

Three training processes (this script with ``--phase``), one after another:
1. ``straight``: ``--steps`` steps in OUT/straight, never interrupted;
2. ``killed``: the same run in OUT/killed, checkpointing every ``--save-every`` steps; the
   process sends itself SIGKILL when it asks for the batch of step ``--kill-step`` (before
   that step runs; a loader that reads ahead kills a few steps earlier);
3. ``resumed``: ``hsae train --resume OUT/killed`` (the library's :func:`resume`), which
   continues from the newest complete checkpoint (checkpoints are written in the
   background: one whose write the kill interrupted is skipped).
Each process records, once per log interval, the device's memory (``memory_stats()``,
where the platform has it) beside the run's own records (tokens/s); the parent then
compares the final parameters of the two runs: bitwise equality is expected with
``--deterministic`` (and on the CPU), otherwise the max abs difference is reported.
Writes OUT/soak.json and OUT/soak.png; exits 1 if the kill or the resume did not happen
as planned, or, with ``--deterministic``, if the parameters differ.

The runs can be split over two calls (a GPU lent for at most 10 minutes a call):
``--phases straight`` in one, ``--phases killed,resumed`` in the other, each with its own
``--out``; each report holds the SHA-256 of every final parameter, and
``--merge A/soak.json B/soak.json --out C`` joins the two reports into C/soak.json and
C/soak.png, comparing the parameters by their digests (bitwise equality).

GPU soak (not part of CI; about 20k steps)::

    python benchmarks/soak.py --steps 20000 --save-every 1000 --kill-step 12345 \\
        --d-model 2304 --n-latents 65536 --k 64 --batch-size 4096 --deterministic \\
        --out /tmp/soak

CPU smoke run (tests/test_soak.py): ``--steps 6 --save-every 2 --kill-step 3
--d-model 8 --n-latents 16 --k 4 --batch-size 16``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

PHASES = ("straight", "killed", "resumed")
DETERMINISTIC_OPS = "xla deterministic ops:"  # a child's line: True / False
MEMORY_FILE = "soak_memory.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--kill-step", type=int, default=None,
                   help="step at which the second run is killed (default: 0.6 * steps, "
                   "between two checkpoints)")
    p.add_argument("--log-every", type=int, default=None,
                   help="steps per record (default: steps / 200, at least 1)")
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--n-latents", type=int, default=65536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--data", default=None, help="activations file (default: synthetic)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible kernels: the two runs must end equal")
    p.add_argument("--out", default="soak")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="the runs this call makes: straight, killed,resumed or all three "
                   "(default)")
    p.add_argument("--merge", nargs=2, metavar="SOAK_JSON",
                   help="join the soak.json of a straight call and of a killed,resumed "
                   "call into --out")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.phases = tuple(x for x in args.phases.split(",") if x)
    if args.phases not in (PHASES, PHASES[:1], PHASES[1:]):
        p.error(f"--phases={','.join(args.phases)}: expected straight, killed,resumed or "
                f"{','.join(PHASES)}")
    if args.kill_step is None:
        args.kill_step = int(args.steps * 0.6) + args.save_every // 2
    args.log_every = args.log_every or max(1, args.steps // 200)
    if not 0 < args.kill_step < args.steps:
        p.error(f"--kill-step={args.kill_step} must be in (0, --steps={args.steps})")
    if args.kill_step < args.save_every:
        p.error(f"--kill-step={args.kill_step} comes before the first checkpoint "
                f"(--save-every={args.save_every}): nothing to resume from")
    return args


def train_settings(args) -> dict:
    return dict(d_model=args.d_model, n_latents=args.n_latents, k=args.k,
                batch_size=args.batch_size, steps=args.steps, save_every=args.save_every,
                log_every=args.log_every, eval_every=args.steps, data=args.data,
                backend=args.backend, deterministic=args.deterministic)


# ------------------------------------------------------------------- child process


def memory_stats() -> dict:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
            if k in stats}


def probed(source, log_every: int, path: str, kill_step: int | None):
    """``source`` (same class, so evaluation picks the same batches) that records memory
    every ``log_every`` steps and SIGKILLs the process at ``kill_step``, where the trainer
    asks for batches: ``host_batch`` on the loader's threads for file sources (which read
    a few steps ahead), else ``batch``."""

    def probe(step):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step % log_every == 0:
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(),
                                    **memory_stats()}) + "\n")

    class Probe(type(source)):
        if hasattr(source, "host_batch"):
            def host_batch(self, step, *args, **kwargs):
                probe(step)
                return super().host_batch(step, *args, **kwargs)
        else:
            def batch(self, step):
                probe(step)
                return super().batch(step)

    probed_source = copy.copy(source)
    probed_source.__class__ = Probe
    return probed_source


def child(args) -> None:
    from hsae_jax import xla_determinism
    from hsae_jax.train import TrainConfig, resume, train

    if args.deterministic:  # first: opening the source starts JAX's backend
        print(f"{DETERMINISTIC_OPS} {xla_determinism.request()}", flush=True)
    folder = os.path.join(args.out, "straight" if args.phase == "straight" else "killed")
    memory = os.path.join(args.out, f"{args.phase}_{MEMORY_FILE}")
    tc = TrainConfig.from_flat(**train_settings(args))
    kill = args.kill_step if args.phase == "killed" else None
    source = probed(tc.open_source(), args.log_every, memory, kill)
    if args.phase == "resumed":
        resume(folder, source=source, progress=False)
    else:
        train(tc, folder, source=source, progress=False)


# ------------------------------------------------------------------- parent process


def run_phase(args, phase: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--phase", phase,
            "--steps", str(args.steps), "--save-every", str(args.save_every),
            "--kill-step", str(args.kill_step), "--log-every", str(args.log_every),
            "--d-model", str(args.d_model), "--n-latents", str(args.n_latents),
            "--k", str(args.k), "--batch-size", str(args.batch_size),
            "--backend", args.backend, "--out", args.out]
    argv += ["--data", args.data] if args.data else []
    argv += ["--deterministic"] if args.deterministic else []
    started = time.time()
    done = subprocess.run(argv, capture_output=True, text=True)
    result = {"returncode": done.returncode, "wall_s": time.time() - started,
              "log": done.stdout.strip().splitlines(),
              "stderr": done.stderr.strip().splitlines()[-5:]}
    print(f"{phase}: exit {done.returncode} in {result['wall_s']:.1f} s", flush=True)
    return result


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def params_digest(run_dir: str) -> dict[str, str]:
    """SHA-256 of each final parameter (sae.safetensors) of a finished run."""
    import hashlib

    from safetensors.numpy import load_file

    arrays = load_file(os.path.join(run_dir, "sae.safetensors"))
    return {name: hashlib.sha256(arrays[name].tobytes()).hexdigest() + f":{arrays[name].dtype}"
            for name in sorted(arrays)}


def compare_params(a_dir: str, b_dir: str) -> dict:
    import numpy as np
    from safetensors.numpy import load_file

    a = load_file(os.path.join(a_dir, "sae.safetensors"))
    b = load_file(os.path.join(b_dir, "sae.safetensors"))
    diffs = {name: float(np.max(np.abs(a[name].astype(np.float64) - b[name])))
             for name in sorted(a)}
    return {"bitwise_equal": all(np.array_equal(a[n], b[n]) for n in a),
            "max_abs_diff": diffs}


def plot(report: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    speed, memory = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for phase in PHASES:
        records = [r for r in report["records"].get(phase, []) if "tokens_per_s" in r]
        speed.plot([r["step"] for r in records], [r["tokens_per_s"] for r in records],
                   ".-", label=phase)
        mem = [r for r in report["memory"].get(phase, []) if "bytes_in_use" in r]
        if mem:
            memory.plot([r["step"] for r in mem], [r["bytes_in_use"] / 2**30 for r in mem],
                        ".-", label=f"{phase} in use")
            memory.plot([r["step"] for r in mem],
                        [r.get("peak_bytes_in_use", 0) / 2**30 for r in mem], ":",
                        label=f"{phase} peak")
    for ax in (speed, memory):
        ax.axvline(report["kill_step"], color="r", alpha=0.4, label="kill")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    speed.set_ylabel("tokens/s (per log interval)")
    memory.set_ylabel("device memory, GiB")
    if not any(report["memory"].get(p) and "bytes_in_use" in report["memory"][p][0]
               for p in PHASES):
        memory.set_title("no memory_stats() on this platform")
    fig.suptitle(f"soak: {report['settings']}", fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def collect(args) -> dict:
    """The report of the phases this call ran (their records, memory and digests)."""
    report = {"settings": train_settings(args), "kill_step": args.kill_step,
              "phases": {}, "records": {}, "memory": {}, "digests": {}}
    for phase in args.phases:
        report["phases"][phase] = run_phase(args, phase)
        memory = read_jsonl(os.path.join(args.out, f"{phase}_{MEMORY_FILE}"))
        # evaluation batches (steps past the run) left out
        report["memory"][phase] = [r for r in memory if r["step"] < args.steps]
    if "straight" in args.phases:
        straight = os.path.join(args.out, "straight")
        report["records"]["straight"] = read_jsonl(os.path.join(straight, "metrics.jsonl"))
        if report["phases"]["straight"]["returncode"] == 0:
            report["digests"]["straight"] = params_digest(straight)
    if "resumed" in args.phases:
        killed_dir = os.path.join(args.out, "killed")
        resumed = re.search(r"resuming .* at step (\d+)",
                            "\n".join(report["phases"]["resumed"]["log"]))
        report["resumed_from"] = int(resumed.group(1)) if resumed else None
        cut = report["resumed_from"] or 0
        records = read_jsonl(os.path.join(killed_dir, "metrics.jsonl"))
        # the resumed run kept the records up to its checkpoint (the killed process's)
        # and appended its own
        report["records"]["killed"] = [r for r in records if r["step"] <= cut]
        report["records"]["resumed"] = [r for r in records if r["step"] > cut]
        if report["phases"]["resumed"]["returncode"] == 0:
            report["digests"]["resumed"] = params_digest(killed_dir)
    return report


def merge(a: dict, b: dict) -> dict:
    """One report from the reports of a straight call and of a killed,resumed call."""
    if a["settings"] != b["settings"] or a["kill_step"] != b["kill_step"]:
        raise ValueError(f"the two soak reports have different settings: {a['settings']} "
                         f"(kill {a['kill_step']}) and {b['settings']} (kill {b['kill_step']})")
    merged = {"settings": a["settings"], "kill_step": a["kill_step"], "merged": True}
    for key in ("phases", "records", "memory", "digests"):
        merged[key] = {**a.get(key, {}), **b.get(key, {})}
    merged["resumed_from"] = a.get("resumed_from", b.get("resumed_from"))
    if set(merged["phases"]) != set(PHASES):
        raise ValueError(f"the two reports hold the phases {sorted(merged['phases'])}; "
                         f"expected {list(PHASES)}")
    return merged


def judge(report: dict, args, local: bool) -> list[str]:
    """What went wrong (empty: nothing); sets report["params"]."""
    phases = report["phases"]
    problems = []
    if "straight" in phases and phases["straight"]["returncode"] != 0:
        problems.append("the uninterrupted run failed")
    if "killed" in phases and phases["killed"]["returncode"] != -signal.SIGKILL:
        problems.append(f"the second run was not killed (exit "
                        f"{phases['killed']['returncode']})")
    if "resumed" in phases and phases["resumed"]["returncode"] != 0:
        problems.append("the resumed run failed")
    elif "resumed" in phases and report.get("resumed_from") is None:
        problems.append("the resumed run did not resume from a checkpoint")
    digests = report.get("digests", {})
    if not problems and set(PHASES) <= set(phases) and not {"straight", "resumed"} <= set(
            digests):  # a report without them (another soak.py) cannot be judged
        problems.append("the reports hold no parameter digests of both runs to compare")
    if not problems and {"straight", "resumed"} <= set(digests):
        params = {"bitwise_equal": digests["straight"] == digests["resumed"]}
        if local:
            params.update(compare_params(os.path.join(args.out, "straight"),
                                         os.path.join(args.out, "killed")))
        report["params"] = params
        if report["settings"]["deterministic"] and not params["bitwise_equal"]:
            problems.append("--deterministic, yet the parameters differ")
    if report["settings"].get("deterministic"):
        without = [name for name, phase in phases.items()
                   if f"{DETERMINISTIC_OPS} False" in phase.get("log", [])]
        if without:
            problems.append(f"--deterministic, but XLA ran without deterministic ops in "
                            f"{', '.join(without)}")
    report["problems"] = problems
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        child(args)
        return 0
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"soak: --out {args.out} is not empty", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        loaded = []
        for path in args.merge:
            with open(path) as f:
                loaded.append(json.load(f))
        report = merge(*loaded)
    else:
        report = collect(args)
    problems = judge(report, args, local=not args.merge)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "soak.png"))
    params = report.get("params", {})
    diff = params.get("max_abs_diff")
    print(f"soak: phases {', '.join(report['phases'])}; kill at step {report['kill_step']}, "
          f"resumed from {report.get('resumed_from')}; parameters bitwise equal: "
          f"{params.get('bitwise_equal')}"
          + (f", max abs diff {max(diff.values()):.3g}" if diff else "")
          + f"; wrote {args.out}/soak.json, soak.png")
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
