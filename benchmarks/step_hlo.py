"""The trainer's compiled step as XLA plans it: its host round trips and its big copies.

Compiles the step ``hsae train`` takes (the same arguments as ``profile_step.py``) and reads
the optimized HLO, no timing. It lists:

- every ``conditional`` and every ``while`` without a known trip count: on a GPU each one
  copies its predicate to the host, which waits for the device to get there, then launches
  what follows (a round trip per cond taken, per loop iteration);
- every ``copy``, ``convert`` and ``transpose`` of at least ``--min-mb`` MB (default: a
  quarter of an [F, D] float32 array): each reads and writes that much once more, glue
  that a step at the hardware floor would not have (issue 14).

Each comes with its computation (a branch of a cond runs only when taken), its shape, its
megabytes, the step's piece its scopes put it in (``profile_step.PIECES``) and its op_name.
Counts are of instructions in the plan, not of executions. Prints tables; writes JSON.

GPU (``bash benchmarks/h200.sh hlo``)::

    python benchmarks/step_hlo.py --k 64 --dead 0.1 --out step_hlo.json

CPU smoke run (tests/test_bench.py): ``--tiny``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profile_step  # noqa: E402  (sets the command-buffer flag before JAX starts)

from hsae_jax.bench import common  # noqa: E402
from hsae_jax.io_utils import atomic_write_json  # noqa: E402

ROUND_TRIPS = ("conditional", "while")
GLUE = ("copy", "convert", "transpose")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
         "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _result_type(rest: str) -> tuple[str, str]:
    """(the result type, the text after it) of an instruction's right-hand side."""
    if rest.startswith("("):  # a tuple type, maybe nested
        depth = 0
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail.lstrip()


def array_bytes(result_type: str) -> int:
    """Bytes of an array type such as ``f32[8192,128]{1,0}`` (0 for tuples and tokens)."""
    m = re.match(r"(\w+)\[([\d,]*)\]", result_type)
    if not m or m.group(1) not in BYTES:
        return 0
    size = 1
    for dim in filter(None, m.group(2).split(",")):
        size *= int(dim)
    return size * BYTES[m.group(1)]


def instructions(hlo_text: str):
    """(computation, name, opcode, result type, the line) for every instruction."""
    computation = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header (or the module's)
            m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", line)
            computation = m.group(1) if m else None
            continue
        m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m:
            continue
        result_type, after = _result_type(m.group(2))
        op = re.match(r"([a-z][\w\-]*)\(", after)
        if op:
            yield computation, m.group(1), op.group(1), result_type, line


def _glue_op(opcode: str, name: str) -> str | None:
    """The glue an instruction is (copy / convert / transpose), or None: the instruction
    itself, or a fusion XLA named after one (``wrapped_convert``, ``loop_transpose_fusion``)."""
    if opcode in GLUE:
        return opcode
    if opcode == "fusion":
        return next((g for g in GLUE if re.search(rf"(^|_){g}(_|\.|$)", name)), None)
    return None


def report(hlo_text: str, min_bytes: int) -> dict:
    """{"round_trips": [...], "glue": [...]} of the optimized HLO ``hlo_text``; what runs
    inside a fusion (its computation's instructions) moves no memory of its own and is
    left out."""
    scopes = profile_step.op_scopes(hlo_text)
    fused = set(re.findall(r"\bfusion\(.*?calls=%?([\w.\-]+)", hlo_text))
    round_trips, glue = [], []
    for computation, name, opcode, result_type, line in instructions(hlo_text):
        if computation in fused:
            continue
        row = {"op": opcode, "name": name, "computation": computation,
               "op_name": scopes.get(name, ""), "piece": profile_step.piece_of(scopes.get(name))}
        if opcode in ROUND_TRIPS:
            if opcode == "while" and re.search(r'"known_trip_count":\{"n":"\d+"', line):
                continue  # a loop XLA counts on the device: no predicate read a step
            round_trips.append(row)
        elif (kind := _glue_op(opcode, name)) and array_bytes(result_type) >= min_bytes:
            glue.append({**row, "op": kind, "shape": result_type.split("{")[0],
                         "mb": array_bytes(result_type) / 1e6})
    return {"round_trips": round_trips, "glue": glue}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-mb", type=float, default=None,
                   help="the smallest copy listed (default: a quarter of F x D x 4 bytes)")
    ours, rest = p.parse_known_args(argv)
    args = profile_step.parse_args(rest)
    args.min_mb = ours.min_mb
    if args.out == "profile_step.json":
        args.out = "step_hlo.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    trainer, x, batch, devices, settings = profile_step.build(args)
    hlo = trainer.step.lower(*trainer.state, x).compile().as_text()
    min_mb = args.min_mb if args.min_mb is not None else args.n_latents * args.d_model / 1e6
    found = report(hlo, int(min_mb * 1e6))
    print(profile_step.describe(args, trainer, batch))
    print(f"host round trips in the plan: {len(found['round_trips'])} (conditionals, and "
          "loops without a known trip count); copies / converts / transposes of at least "
          f"{min_mb:.0f} MB: {len(found['glue'])}, "
          f"{sum(g['mb'] for g in found['glue']) / 1e3:.2f} GB written\n")
    cut = lambda rows: [{**r, "op_name": r["op_name"][-90:]} for r in rows]  # noqa: E731
    print(common.markdown_table(cut(found["round_trips"]), [
        ("op", "op", "s"), ("name", "name", "s"), ("computation", "in", "s"),
        ("piece", "piece", "s"), ("op_name", "op_name (end)", "s")]))
    print()
    print(common.markdown_table(cut(found["glue"]), [
        ("op", "op", "s"), ("shape", "shape", "s"), ("mb", "MB", ".0f"),
        ("computation", "in", "s"), ("piece", "piece", "s"),
        ("op_name", "op_name (end)", "s")]))
    payload = {"benchmark": "step_hlo", "device": common.device_info(),
               "workload": profile_step.workload(args, batch, devices, settings),
               "min_mb": min_mb, **found}
    atomic_write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
