"""The ``hsae`` command line: ``train``, ``eval`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import sys


def _csv(cast):
    def parse(text: str):
        return tuple(cast(x) for x in text.split(",") if x)

    return parse


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the decoder loss (or, with --step, a step)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    p.add_argument("--batch", type=int, help="B (default 4096; tiny 64)")
    p.add_argument("--n-latents", type=int, help="F (default 65536; tiny 512)")
    p.add_argument("--d-model", type=int, help="D (default 2304; tiny 64)")
    p.add_argument("--ks", type=_csv(int), help="comma-separated K values (default 32,64,128)")
    p.add_argument("--dtypes", type=_csv(str), help="weight dtypes (default float32,bfloat16)")
    p.add_argument("--distributions", type=_csv(str),
                   help="index distributions (default uniform,zipf)")
    p.add_argument("--impls", type=_csv(str), help="implementations to time")
    p.add_argument("--iters", type=int, help="timed runs per case (default 30)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 3)")
    p.add_argument("--seed-module", help="path of the seed's hierarchical_kernels.py "
                   "(times the seed's torch kernel on the same data)")
    p.add_argument("--no-check", action="store_true", help="skip error checks vs reference")
    p.add_argument("--out", default="bench_loss.json", help="JSON output path")


def _bench(args) -> int:
    # JAX and torch may share the GPU: don't let XLA take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from hsae_jax.bench import loss

    overrides = {
        "batch": args.batch, "n_latents": args.n_latents, "d_model": args.d_model,
        "ks": args.ks, "dtypes": args.dtypes, "distributions": args.distributions,
        "impls": args.impls, "iters": args.iters, "warmup": args.warmup,
        "seed_module": args.seed_module, "out": args.out,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_check:
        overrides["check_errors"] = False
    settings = (loss.LossBenchSettings.tiny(**overrides) if args.tiny
                else loss.LossBenchSettings(**overrides))
    loss.run(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    args = parser.parse_args(argv)
    return {"bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
