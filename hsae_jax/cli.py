"""The ``hsae`` command line: ``train``, ``eval``, ``harvest``, ``export``, ``plan`` and
``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys


def _csv(cast):
    def parse(text: str):
        return tuple(cast(x) for x in text.split(",") if x)

    return parse


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the decoder loss (--step: a training step; "
                       "--train: the trainer's own loop on each kind of data)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--step", action="store_true",
                      help="time whole training steps (and their pieces) instead of the loss")
    mode.add_argument("--train", action="store_true",
                      help="run hsae train on synthetic data, .npy files, a float16 cache and "
                      "with dead latents (AuxK), and report its tokens/s")
    p.add_argument("--steps", type=int, help="--train: steps per run (default 300)")
    p.add_argument("--rows", type=int, help="--train: rows of the data files (default 400000)")
    p.add_argument("--runs", type=_csv(str), help="--train: runs to make (default all)")
    p.add_argument("--dead-tokens", type=int, help="--train: dead_tokens of the dead-latent "
                   "runs (default 1000000, the trainer's)")
    p.add_argument("--work-dir", help="--train: where data files and run folders go")
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
    p.add_argument("--out", help="JSON output path (default: bench_loss.json, "
                   "bench_step.json or bench_train.json)")


def _bench(args) -> int:
    # JAX and torch may share the GPU: don't let XLA take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from hsae_jax.bench import loss, step, train

    if args.train:
        overrides = {"batch": args.batch, "n_latents": args.n_latents, "d_model": args.d_model,
                     "k": args.ks[0] if args.ks else None, "steps": args.steps,
                     "rows": args.rows, "runs": args.runs, "work_dir": args.work_dir,
                     "dead_tokens": args.dead_tokens,
                     "out": args.out}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        cls = train.TrainBenchSettings
        train.run(cls.tiny(**overrides) if args.tiny else cls(**overrides))
        return 0
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once (a help text that names its default keeps it)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line (``hsae train: error: ...``), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _setting_fields():
    """(dataclass field, its flag) for every flat setting of ``hsae train``."""
    from hsae_jax.model import SAEConfig
    from hsae_jax.train.config import TrainConfig

    fields = [*dataclasses.fields(SAEConfig),
              *(f for f in dataclasses.fields(TrainConfig) if f.name != "sae")]
    return [(f, "--" + f.name.replace("_", "-")) for f in fields]


def _parse_budgets(text: str):
    from hsae_jax.train.config import parse_budgets

    try:
        return parse_budgets(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, e.g. 8,16,32 (got {text!r})") from None


def _parser_for(field):
    """The argparse type of a setting, from its annotation."""
    text = str(field.type)
    if text.startswith("tuple[int"):
        return _parse_budgets
    for name, cast in (("int", int), ("float", float)):
        if text.startswith(name):
            return cast
    return str


def _add_train(sub) -> None:
    # Flags the user did not type stay out of the namespace (SUPPRESS): a new run takes
    # the defaults for them, a resumed run the values saved with it.
    p = sub.add_parser(
        "train", help="train an SAE (default: the embedded synthetic data, ~1 min on a CPU)",
        formatter_class=_HelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--out", help="run folder to write, missing or empty (default: "
                   "runs/default)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint that "
                   "restores, with the settings saved there; flags given must repeat them, "
                   "except --steps (not below the checkpoint's step), the logging, "
                   "evaluation and saving intervals, --devices, --backend, --deterministic "
                   "and --max-skipped-fraction")
    p.add_argument("--no-progress", action="store_true", default=False,
                   help="no progress bar")
    _add_setting_flags(p)


def _add_setting_flags(p, typed_only: bool = False) -> None:
    """A flag for every setting of TrainConfig (and its SAEConfig). The parser of
    ``hsae train`` leaves untyped flags out of its namespace (argument_default=SUPPRESS);
    ``typed_only`` gives another parser that behaviour for these flags."""
    extra = {"default": argparse.SUPPRESS} if typed_only else {}
    for field, flag in _setting_fields():
        help_text = field.metadata["help"]
        if "default" not in help_text and field.default not in (None, False):
            help_text += f" (default: {field.default})"
        if str(field.type) == "bool":
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                           help=help_text, **extra)
        else:
            p.add_argument(flag, dest=field.name, type=_parser_for(field), help=help_text,
                           **extra)


TRAIN_MEMORY_FRACTION = "0.95"
"""Share of each GPU's memory XLA may use in ``hsae train`` unless
XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (JAX's default, 0.75, leaves out a quarter of
an H200: the low-memory F = 2^22 step on two of them, 106 GB per device, ran out of memory
under it and trains under 0.97). XLA takes it as it needs it (no preallocation, unless
XLA_PYTHON_CLIENT_PREALLOCATE says so), so a GPU shared with other processes is not
claimed up front."""


def _train(args) -> int:
    # before JAX starts its GPU backend; values the user set stay
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", TRAIN_MEMORY_FRACTION)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from hsae_jax.train import TrainConfig, resume, train

    settings = {f.name: getattr(args, f.name) for f, _ in _setting_fields()
                if hasattr(args, f.name)}
    progress = not args.no_progress
    if hasattr(args, "resume"):
        out = getattr(args, "out", None)
        if out is not None and os.path.abspath(out) != os.path.abspath(args.resume):
            raise ValueError(f"--resume {args.resume} continues that run in its own folder, "
                             f"--out {out} names another; to fork a run, copy its folder and "
                             "resume the copy")
        resume(args.resume, progress=progress, **settings)
    else:
        train(TrainConfig.from_flat(**settings), getattr(args, "out", "runs/default"),
              progress=progress)
    return 0


def _add_harvest(sub) -> None:
    from hsae_jax.harvest.config import HarvestConfig

    p = sub.add_parser(
        "harvest", help="write a model's activations over text as an activation cache",
        formatter_class=_HelpFormatter)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for field in dataclasses.fields(HarvestConfig):
        flag = "--" + field.name.replace("_", "-")
        if str(field.type).startswith("bool"):
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                           default=field.default, help=field.metadata["help"])
        else:
            p.add_argument(flag, dest=field.name, type=_parser_for(field),
                           default=field.default, help=field.metadata["help"])


def _harvest(args) -> int:
    from hsae_jax.harvest import HarvestConfig, harvest

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(HarvestConfig)}
    harvest(HarvestConfig(**settings), progress=not args.no_progress)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory per device of a training step (the same flags as hsae train)",
        formatter_class=_HelpFormatter,
        description="Estimates the bytes per device of hsae train with these settings "
        "(hsae_jax.parallel.plan); --compile also compiles the step here, from shapes "
        "only, and prints XLA's own figure; --table prints the README's tables.")
    p.add_argument("--gpus", type=int, help="devices to plan for (default: the mesh's size, "
                   "else this machine's devices)")
    p.add_argument("--device-gb", type=float, default=141.0, help="memory of one device")
    p.add_argument("--compile", action="store_true", help="also compile the step on this "
                   "machine's devices and print XLA's memory analysis")
    p.add_argument("--table", action="store_true", help="print the README's tables")
    _add_setting_flags(p, typed_only=True)


def _plan(args) -> int:
    from hsae_jax.parallel.plan import plan_report, tables_markdown
    from hsae_jax.train import TrainConfig

    if args.table:
        print(tables_markdown(args.device_gb))
        return 0
    settings = {f.name: getattr(args, f.name) for f, _ in _setting_fields()
                if hasattr(args, f.name)}
    print(plan_report(TrainConfig.from_flat(**settings), args.gpus,
                      compile_step=args.compile, device_gb=args.device_gb))
    return 0


def _add_eval(sub) -> None:
    from hsae_jax.evaluate_model.run import InModelEvalConfig

    p = sub.add_parser("eval", help="recompute a run's metrics from its saved model (with "
                       "--model: splice it into a language model)")
    p.add_argument("run_dir")
    p.add_argument("--data", help="activations file (default: the run's synthetic data); "
                   "with --model: the text file, as --data-text")
    p.add_argument("--data-key", help="tensor name inside a .safetensors file")
    p.add_argument("--batches", type=_positive_int, default=None,
                   help="evaluation batches (default: the run's --eval-batches)")
    p.add_argument("--backend", default=None, help="op backend (default: the run's)")
    group = p.add_argument_group(
        "inside a language model (with --model): CE, KL and loss recovered at each budget, "
        "into metrics.json['in_model'] and loss_recovered_vs_k.png")
    for field in dataclasses.fields(InModelEvalConfig):
        flag = "--" + ("data-text" if field.name == "data" else field.name.replace("_", "-"))
        cast = _csv(int) if field.name == "budgets" else _parser_for(field)
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


def _add_export(sub) -> None:
    from hsae_jax.interop.export import FORMATS

    p = sub.add_parser(
        "export", help="write a run as a SAELens / sparsify / dictionary_learning folder",
        description="Writes RUN's SAE as folders the other library loads with its own "
        "loader, input_scale folded into the weights (W_enc*s, W_dec/s, b_dec/s). "
        "--budgets writes one sub-folder k<k> per budget and an index hsae_export.json.")
    p.add_argument("run_dir", metavar="RUN", help="hsae-jax run folder (sae.safetensors, "
                   "cfg.json; metrics.json if present gives FVU per k)")
    p.add_argument("out_dir", metavar="OUT", help="output folder (must be absent or empty "
                   "unless --force)")
    p.add_argument("--format", required=True, choices=FORMATS, help="target library")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--k", type=int, help="one budget k <= K, written to OUT itself "
                       "(default: the run's K)")
    which.add_argument("--budgets", help="comma-separated budgets, e.g. 8,16,32: one "
                       "sub-folder OUT/k<k> each")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--model-name", help="model the SAE reads (metadata; default: the run's)")
    p.add_argument("--hook-name", help="hook point the SAE reads (metadata; default: the "
                   "run's)")
    p.add_argument("--verify", action="store_true", help="then load each folder with the "
                   "library itself and compare with hsae-jax on random activations "
                   "(needs the library installed)")


def _export(args) -> int:
    from hsae_jax.interop import export_run, verify_export

    try:
        result = export_run(args.run_dir, args.out_dir, format=args.format, k=args.k,
                            budgets=args.budgets, force=args.force,
                            model_name=args.model_name, hook_name=args.hook_name)
    except ImportError as err:  # torch, for dictionary_learning's ae.pt
        raise ValueError(str(err)) from err
    for entry in result["budgets"] if "folder" not in result else [result]:
        fvu = "" if entry["fvu"] is None else f" (FVU {entry['fvu']:.4f})"
        folder = os.path.normpath(os.path.join(args.out_dir, entry["folder"]))
        print(f"k={entry['k']}: {folder}{fvu}")
    if not args.verify:
        return 0
    try:
        checks = verify_export(args.run_dir, args.out_dir, format=args.format)
    except ImportError as err:
        raise ValueError(f"--verify needs the {args.format} library: {err}") from err
    for c in checks:
        print(f"verify k={c.k}: {'ok' if c.ok else 'MISMATCH'} (tokens with other latents "
              f"{c.other_latents:.1%}, activation error {c.act_error:.2g}, reconstruction "
              f"error {c.recon_error:.2g})")
    return 0 if all(c.ok for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    """``hsae``: returns 0, or exits with status 2 (a bad command line, setting or file:
    one line naming it), 1 (a run that could not go on or trained nothing) or 130
    (interrupted). HSAE_TRACEBACK=1 shows the traceback instead."""
    parser = _Parser(prog="hsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_harvest(sub)
    _add_bench(sub)
    _add_plan(sub)
    _add_export(sub)
    args = parser.parse_args(argv)
    try:
        commands = {"train": _train, "eval": _eval, "harvest": _harvest, "bench": _bench,
                    "export": _export, "plan": _plan}
        return commands[args.command](args)
    except Exception as err:
        status = _exit_status(err)
        if status is None or os.environ.get("HSAE_TRACEBACK"):
            raise
        parser.exit(status, f"hsae {args.command}: error: {_as_flags(_one_line(err))}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"hsae {args.command}: interrupted\n")


def _exit_status(err: Exception) -> int | None:
    """2: a bad setting, argument or file; 1: a run that could not go on (the folder in
    use, a run that trained nothing, a device out of memory); None: a bug (traceback)."""
    import jax

    from hsae_jax.train.run_dir import RunError

    if isinstance(err, (RunError, MemoryError, jax.errors.JaxRuntimeError)):
        return 1
    if isinstance(err, (ValueError, TypeError, OSError)):
        return 2
    return None


def _one_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(lines) <= 1 else text + " (HSAE_TRACEBACK=1 shows the rest)"


def _as_flags(message: str) -> str:
    """Names settings as the flags a command-line user typed (SAEConfig.k -> --k)."""
    return re.sub(r"\b(?:SAEConfig|TrainConfig)\.(\w+)",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)


if __name__ == "__main__":
    sys.exit(main())
