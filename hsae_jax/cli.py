"""The ``hsae`` command line: ``train``, ``eval``, ``harvest`` and ``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def _csv(cast):
    def parse(text: str):
        return tuple(cast(x) for x in text.split(",") if x)

    return parse


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the decoder loss (or, with --step, a step)")
    p.add_argument("--step", action="store_true",
                   help="time whole training steps (and their pieces) instead of the loss")
    p.add_argument("--no-pieces", action="store_true", help="--step: skip per-piece timings")
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
    p.add_argument("--out", help="JSON output path (default: bench_loss.json or "
                   "bench_step.json)")


def _bench(args) -> int:
    # JAX and torch may share the GPU: don't let XLA take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from hsae_jax.bench import loss, step

    common = {
        "batch": args.batch, "n_latents": args.n_latents, "d_model": args.d_model,
        "ks": args.ks, "impls": args.impls, "iters": args.iters, "warmup": args.warmup,
        "seed_module": args.seed_module, "out": args.out,
    }
    if args.step:
        module, settings_cls = step, step.StepBenchSettings
        extra = {"pieces": False} if args.no_pieces else {}
    else:
        module, settings_cls = loss, loss.LossBenchSettings
        extra = {"dtypes": args.dtypes, "distributions": args.distributions}
        if args.no_check:
            extra["check_errors"] = False
    overrides = {k: v for k, v in {**common, **extra}.items() if v is not None}
    settings = settings_cls.tiny(**overrides) if args.tiny else settings_cls(**overrides)
    module.run(settings)
    return 0


def _field_type(field):
    text = str(field.type)
    for name, cast in (("int", int), ("float", float)):
        if text.startswith(name):
            return cast
    return str


def _add_train(sub) -> None:
    from hsae_jax.train.config import TrainConfig

    p = sub.add_parser(
        "train", help="train an SAE (default: the embedded synthetic data, ~1 min on a CPU)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/default", help="run folder to write")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for field in dataclasses.fields(TrainConfig):
        p.add_argument("--" + field.name.replace("_", "-"), dest=field.name,
                       type=_field_type(field), default=field.default,
                       help=field.metadata["help"])


def _train(args) -> int:
    from hsae_jax.train import TrainConfig, train

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    out = args.resume or args.out
    train(TrainConfig(**settings), out, resume=bool(args.resume),
          progress=not args.no_progress)
    return 0


def _add_harvest(sub) -> None:
    from hsae_jax.harvest.config import HarvestConfig

    p = sub.add_parser(
        "harvest", help="write a model's activations over text as an activation cache",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for field in dataclasses.fields(HarvestConfig):
        flag = "--" + field.name.replace("_", "-")
        if str(field.type).startswith("bool"):
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                           default=field.default, help=field.metadata["help"])
        else:
            p.add_argument(flag, dest=field.name, type=_field_type(field),
                           default=field.default, help=field.metadata["help"])


def _harvest(args) -> int:
    from hsae_jax.harvest import HarvestConfig, harvest

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(HarvestConfig)}
    harvest(HarvestConfig(**settings), progress=not args.no_progress)
    return 0


def _add_eval(sub) -> None:
    from hsae_jax.evaluate_model.run import InModelEvalConfig

    p = sub.add_parser("eval", help="recompute a run's metrics from its saved model (with "
                       "--model: splice it into a language model)")
    p.add_argument("run_dir")
    p.add_argument("--data", help="activations file (default: the run's synthetic data); "
                   "with --model: the text file, as --data-text")
    p.add_argument("--data-key", help="tensor name inside a .safetensors file")
    p.add_argument("--batches", type=int, default=None, help="evaluation batches")
    p.add_argument("--backend", default=None, help="op backend (default: the run's)")
    group = p.add_argument_group(
        "inside a language model (with --model): CE, KL and loss recovered at each budget, "
        "into metrics.json['in_model'] and loss_recovered_vs_k.png")
    for field in dataclasses.fields(InModelEvalConfig):
        flag = "--" + ("data-text" if field.name == "data" else field.name.replace("_", "-"))
        cast = _csv(int) if field.name == "budgets" else _field_type(field)
        group.add_argument(flag, dest="in_model_" + field.name, type=cast,
                           metavar=field.name.upper(), default=field.default,
                           help=field.metadata["help"])
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eval_in_model(args) -> int:
    from hsae_jax.evaluate_model import InModelEvalConfig, evaluate_in_model, in_model_table

    settings = {f.name: getattr(args, "in_model_" + f.name)
                for f in dataclasses.fields(InModelEvalConfig)}
    settings["data"] = settings["data"] or args.data
    result = evaluate_in_model(args.run_dir, InModelEvalConfig(**settings),
                               progress=not args.no_progress)
    print(in_model_table(result))
    return 0


def _eval(args) -> int:
    if args.in_model_model:
        return _eval_in_model(args)
    from hsae_jax.evaluate_run import evaluate_run, metrics_table

    metrics = evaluate_run(args.run_dir, data=args.data, data_key=args.data_key,
                           batches=args.batches, backend=args.backend)
    print(metrics_table(metrics))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_harvest(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "eval": _eval, "harvest": _harvest,
                "bench": _bench}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"hsae {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
