"""The memory options' effect on FVU: the same run with float32 everything and with the
options ``hsae plan`` offers for large dictionaries (bfloat16 parameters / Adam moments /
matmul inputs, a capped AuxK), each a full ``hsae train`` from the same seed and data.
Prints a markdown table (final FVU at K and at a few budgets, dead fraction) and writes
JSON. Usage: python benchmarks/low_memory_fvu.py [--steps 2000] [--out FILE] [any
hsae train flag as --key=value]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from hsae_jax.bench import common
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.train import TrainConfig, train

VARIANTS = {
    "float32": {},
    "bf16 compute": dict(compute_dtype="bfloat16"),
    "bf16 params": dict(compute_dtype="bfloat16", param_dtype="bfloat16"),
    "bf16 Adam": dict(adam_dtype="bfloat16"),
    "bf16 params + Adam": dict(compute_dtype="bfloat16", param_dtype="bfloat16",
                               adam_dtype="bfloat16"),
    "bf16 all + AuxK 1/64": dict(compute_dtype="bfloat16", param_dtype="bfloat16",
                                 adam_dtype="bfloat16", auxk_max_fraction=0.015625),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="low_memory_fvu.json")
    args, extra = p.parse_known_args(argv)
    base = {"steps": args.steps}
    for item in extra:  # --key=value, as hsae train spells it
        key, value = item.lstrip("-").split("=", 1)
        field = TrainConfig.from_flat().to_flat()[key.replace("-", "_")]
        base[key.replace("-", "_")] = type(field)(value) if field is not None else value
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants.split(","):
            tc = TrainConfig.from_flat(**{**base, **VARIANTS[name]})
            m = train(tc, os.path.join(work, name.replace(" ", "_")), progress=False,
                      log=lambda *_: None)
            k = len(m["fvu_per_k"])
            row = {"variant": name, "fvu": m["fvu"], "fvu_k1": m["fvu_per_k"][0],
                   "fvu_half_k": m["fvu_per_k"][k // 2 - 1], "dead": m["dead_fraction"],
                   "l0": m["l0"], "skipped": m["skipped_steps"]}
            print(f"  {name}: FVU {m['fvu']:.4f}", flush=True)
            rows.append(row)
    print(common.markdown_table(rows, [
        ("variant", "variant", "s"), ("fvu", "FVU at K", ".4f"),
        ("fvu_half_k", "FVU at K/2", ".4f"), ("fvu_k1", "FVU at 1", ".4f"),
        ("dead", "dead", ".3f"), ("skipped", "skipped", "d")]))
    atomic_write_json(args.out, {"settings": base, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
