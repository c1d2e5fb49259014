"""``auditor-train``: thin subcommands over the trainer's functions.

    auditor-train train  --arch lenet-300-100 --widths 11,4 --seed 0 --out m.onnx
    auditor-train grid   --arch lenet-300-100 --widths 2,4,8,16 --variant none,dropout \
                         --randomize-labels 0,0.5 --replicates 3 --jobs 2 --out grid/
    auditor-train grid   --arch mlp-5x500 --recipe cna --randomize-labels 0,0.1,0.3,0.5 \
                         --checkpoint-every 20 --data fashion-mnist --out cna/
    auditor-train report grid/ --out grid-report/

Bad input is one line on stderr and exit code 2, never a traceback. Heavy modules (torch,
matplotlib, the auditor's engine) are imported by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from auditor.config import STATE_POINTS
from auditor.errors import AuditError, first_line
from auditor.flags import integer, number
from auditor.outputs import check_outputs
from auditor.sinks import for_terminal
from auditor.usage import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Parser
from trainers.records import MAX_WIDTH

if TYPE_CHECKING:
    from trainers.records import Architecture, Recipe, TrainingJob

PROG = "auditor-train"
TRAIN_EXTRA = ("torch", "matplotlib")  # the modules of the 'train' extra
MAX_COUNT = 2**31 - 1  # counts (epochs, samples): beyond this torch and numpy overflow
MAX_BOOTSTRAP = 100_000  # --bootstrap: resamples, each a pass over every network; 100 times the default
MAX_LR = 1e6  # beyond any rate that trains, and within float32, which torch's optimizers use
MAX_PARALLEL = 1024  # --jobs, --threads, --members: each is a process, a thread or a network held at once


def _items(text: str, what: str) -> list[str]:
    """The comma-separated items of ``text``, stripped; an empty item (``2,,4``, ``2,``) is refused,
    since it is a typo more often than not and would otherwise drop a value silently."""
    items = [part.strip() for part in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated values with none empty, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]``, each a width in 1..``MAX_WIDTH``."""
    width = integer(1, MAX_WIDTH)
    values = []
    for item in _items(text, "integer"):
        try:
            values.append(width(item))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers in 1..{MAX_WIDTH}, got {text!r}"
            ) from None
    return values


def _fractions(text: str) -> list[float]:
    """``"0,0.25,1"`` -> ``[0.0, 0.25, 1.0]``, each in [0, 1]."""
    return [_fraction(part) for part in _items(text, "number in [0, 1]")]


def _words(text: str) -> list[str]:
    """``"none,dropout"`` -> ``["none", "dropout"]`` (checked where they are used)."""
    return _items(text, "name")


def _layer_lists(text: str) -> list[list[int]]:
    """``"2,4;8,16"`` -> ``[[2, 4], [8, 16]]``: one list of widths per layer."""
    return [_int_list(part) for part in text.split(";")]


def _fraction(text: str) -> float:
    try:
        return number(0, 1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {MAX_COUNT}, got {text!r}")
    return value


def _add_network_args(parser: argparse.ArgumentParser, *, lists: bool) -> None:
    """Options shared by ``train`` and ``grid``: the network, its data, and the recipe (SPEC §7).

    With ``lists`` (``grid``), ``--variant`` and ``--randomize-labels`` take comma-separated lists:
    the study axes, every combination of which is trained. Recipe options default to None and
    take the ``--recipe`` preset's value (``_recipe``).
    """
    from trainers.records import ARCHS, LABEL_NOISE_KINDS, RECIPES, VARIANTS

    parser.add_argument("--arch", required=True, help=f"one of: {', '.join(ARCHS)}")
    if lists:
        parser.add_argument(
            "--variant", type=_words, default=["none"], help=f"comma-separated, from: {', '.join(VARIANTS)}"
        )
        parser.add_argument(
            "--randomize-labels",
            type=_fractions,
            default=[0.0],
            metavar="F[,F...]",
            help="label-noise levels: fractions of the training labels made noisy (see --label-noise)",
        )
    else:
        parser.add_argument("--variant", default="none", help=f"one of: {', '.join(VARIANTS)} (default none)")
        parser.add_argument(
            "--randomize-labels",
            type=_fraction,
            default=0.0,
            metavar="F",
            help="make this fraction of the training labels noisy (see --label-noise)",
        )
    parser.add_argument(
        "--label-noise",
        choices=LABEL_NOISE_KINDS,
        help="random: resample the chosen labels uniformly (aIQ paper); shuffled: permute them among "
        "themselves (CNA paper). Default: shuffled with --recipe cna, else random",
    )
    parser.add_argument(
        "--dropout-p", type=number(0, 1, below=True), default=0.5, help="dropout rate of --variant dropout"
    )
    parser.add_argument(
        "--data",
        default="mnist",
        help="mnist, fashion-mnist, gaussian-noise[:SEED] (MLP only), or a .npz of 28x28 images (default mnist)",
    )
    parser.add_argument(
        "--checkpoint-every", type=_positive, metavar="N", help="also export the network after every N-th epoch"
    )
    parser.add_argument("--limit", type=_positive, help="use only the first N samples of each split")
    parser.add_argument(
        "--threads",
        type=integer(1, MAX_PARALLEL),
        default=1,
        help="torch threads per training process (default 1)",
    )
    recipe = parser.add_argument_group("recipe (defaults are the --recipe preset's)")
    recipe.add_argument(
        "--recipe",
        choices=RECIPES,
        default="lenet",
        help="lenet: the aIQ paper's (SGD Nesterov lr 0.001, L2, early stopping); cna: the CNA paper's MLP "
        "recipe (SGD lr 0.05 momentum 0.8, batch 128, 100 epochs, label-noise runs 200). Default lenet",
    )
    recipe.add_argument("--lr", type=number(0, MAX_LR, above=True))
    recipe.add_argument("--batch-size", type=_positive)
    recipe.add_argument("--patience", type=_positive, help="early-stopping patience (cna: none)")
    recipe.add_argument("--max-epochs", type=_positive, help="cap on epochs (lenet: none; cna: 100)")
    recipe.add_argument(
        "--noisy-max-epochs", type=_positive, help="epochs of runs with label noise (cna: 200; lenet: --max-epochs)"
    )
    recipe.add_argument(
        "--restore-best", action="store_true", help="keep the best epoch's weights instead of the final ones"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Train, export and summarise the paper's LeNet grids.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train one network and export it to ONNX")
    _add_network_args(train, lists=False)
    train.add_argument("--widths", type=_int_list, help="hidden widths, e.g. 11,4 (mlp-5x500: 500 each)")
    train.add_argument("--seed", type=integer(0, 2**32 - 1), default=0)
    train.add_argument("--out", type=Path, required=True, help="the .onnx file to write")

    grid = commands.add_parser("grid", help="train every combination of variant, label noise and widths, resumably")
    _add_network_args(grid, lists=True)
    widths = grid.add_mutually_exclusive_group()
    widths.add_argument("--widths", type=_int_list, help="values every layer takes, e.g. 2,4,8,16 (mlp-5x500: 500)")
    widths.add_argument("--layer-widths", type=_layer_lists, help='per-layer values, e.g. "2,4;8,16"')
    grid.add_argument("--replicates", type=_positive, default=1, help="seeds 0..R-1 (default 1)")
    grid.add_argument("--jobs", type=integer(1, MAX_PARALLEL), default=1, help="parallel training processes")
    grid.add_argument(
        "--members",
        type=integer(1, MAX_PARALLEL),
        default=8,
        help="networks trained at once as one batched model (mlp-5x500, lenet-300-100 variant none; default 8; "
        "1: one network per process)",
    )
    grid.add_argument("--ray", metavar="ADDRESS", help='run on a Ray cluster ("auto", "local", or host:port)')
    grid.add_argument("--out", type=Path, required=True, help="folder for the ONNX files and manifest.jsonl")

    report = commands.add_parser(
        "report", help="audit a folder of networks: the paper's tables, heatmaps, τ, the CNA study, HTML"
    )
    report.add_argument(
        "folder", type=Path, help="a folder of networks made by 'grid' or 'train' (searched recursively)"
    )
    report.add_argument(
        "--data", help="audit the networks trained on this data set (default: the one they were trained on)"
    )
    report.add_argument("--limit", type=_positive, help="audit only the first N samples of each split")
    report.add_argument("--beta", type=number(0, above=True), default=2.0, help="aIQ's beta (default 2)")
    report.add_argument(
        "--states-at",
        choices=STATE_POINTS,
        default="pre-activation",
        help="where a layer's states are read (SPEC §1; default pre-activation)",
    )
    report.add_argument("--top-k", type=_positive, default=5, help="architectures listed per ranking (default 5)")
    report.add_argument("--percent", action="store_true", help="show accuracy, aIQ and efficiencies x100")
    report.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="ARCH:WIDTHS",
        help="fold-decrease reference, e.g. lenet-300-100:300,100 (default: the largest network trained)",
    )
    report.add_argument(
        "--bootstrap",
        type=integer(1, MAX_BOOTSTRAP),
        default=1000,
        metavar="B",
        help="resamples of networks for the CNA study's 95%% intervals (default 1000)",
    )
    report.add_argument("--out", type=Path, required=True, help="folder for the report files")
    return parser


def _recipe(args: argparse.Namespace, label_noise: float) -> Recipe:
    """The ``--recipe`` preset with the options given on top; label-noise runs take ``--noisy-max-epochs``."""
    from dataclasses import replace

    from trainers.records import CNA_NOISY_EPOCHS, RECIPES

    preset = RECIPES[args.recipe]
    max_epochs = args.max_epochs or preset.max_epochs
    if label_noise > 0:
        noisy_default = CNA_NOISY_EPOCHS if args.recipe == "cna" else max_epochs
        max_epochs = args.noisy_max_epochs or noisy_default
    chosen = {"lr": args.lr, "batch_size": args.batch_size, "patience": args.patience}
    return replace(
        preset,
        **{key: value for key, value in chosen.items() if value is not None},
        max_epochs=max_epochs,
        restore_best=args.restore_best,
    )


def _label_noise_kind(args: argparse.Namespace) -> str:
    return args.label_noise or ("shuffled" if args.recipe == "cna" else "random")


def _default_widths(arch: str) -> tuple[int, ...]:
    from trainers.records import DEFAULT_WIDTHS

    if arch not in DEFAULT_WIDTHS:
        raise AuditError(f"{arch} needs --widths (or --layer-widths for grid)")
    return DEFAULT_WIDTHS[arch]


def _job(args: argparse.Namespace, widths: Sequence[int], seed: int, variant: str, label_noise: float) -> TrainingJob:
    """The ``TrainingJob`` the shared options describe (validated there; errors are AuditErrors)."""
    from trainers.records import Architecture, TrainingJob

    architecture = Architecture(args.arch, tuple(widths), variant, args.dropout_p)
    return TrainingJob(
        architecture,
        seed=seed,
        label_noise=label_noise,
        recipe=_recipe(args, label_noise),
        dataset=args.data,
        limit=args.limit,
        label_noise_kind=_label_noise_kind(args),
        checkpoint_every=args.checkpoint_every,
    )


def _train(args: argparse.Namespace) -> int:
    from trainers.files import save_atomic
    from trainers.job import run_job

    data_file = args.data if Path(args.data).is_file() else None
    check_outputs({"--data": data_file}, {"--out": args.out}, make_folders=True)
    job = _job(args, args.widths or _default_widths(args.arch), args.seed, args.variant, args.randomize_labels)

    def on_epoch(epoch: int, accuracy: float) -> None:
        print(f"epoch {epoch}: train accuracy {accuracy:.4f}", file=sys.stderr, flush=True)

    result = run_job(job, args.threads, on_epoch=on_epoch)
    for checkpoint in result.checkpoints:
        path = args.out.with_name(f"{args.out.stem}_e{checkpoint.network.epochs}{args.out.suffix}")
        save_atomic(path, checkpoint.onnx)
        print(f"wrote {path}: checkpoint after epoch {checkpoint.network.epochs}", file=sys.stderr)
    save_atomic(args.out, result.onnx)
    n = result.network
    a = job.architecture
    print(
        f"wrote {args.out}: {a.arch} ({a.widths_text}) {a.variant}, "
        f"{n.params:,} params, {n.epochs} epochs, train accuracy {n.train_accuracy:.4f}, "
        f"test accuracy {n.test_accuracy:.4f}, {n.seconds:.1f} s on {n.device}"
    )
    return 0


def _grid(args: argparse.Namespace) -> int:
    from trainers.grid import plan, run_grid, width_combinations

    widths = args.widths if args.widths or args.layer_widths else None
    layer_widths = args.layer_widths
    if widths is None and layer_widths is None:
        layer_widths = [[w] for w in _default_widths(args.arch)]
    combinations = width_combinations(args.arch, widths, layer_widths)
    jobs = [
        _job(args, job.architecture.widths, job.seed, job.architecture.variant, job.label_noise)
        for job in plan(
            _job(args, combinations[0], 0, args.variant[0], 0.0),
            combinations,
            args.replicates,
            args.variant,
            args.randomize_labels,
        )
    ]
    outcome = run_grid(
        jobs, args.out, workers=args.jobs, threads=args.threads, ray_address=args.ray, members=args.members
    )
    done = f"{len(outcome.trained)} trained, {len(outcome.skipped)} already done"
    print(f"{done}; manifest: {outcome.manifest}")
    return 0


def _reference(text: str) -> Architecture:
    """``lenet-300-100:300,100`` -> that architecture (AuditError when malformed)."""
    from trainers.records import Architecture

    arch, _, widths = text.partition(":")
    try:
        parsed = _int_list(widths)
    except argparse.ArgumentTypeError:
        raise AuditError(f"--reference expects ARCH:WIDTHS such as lenet-300-100:300,100, got {text!r}") from None
    return Architecture(arch, tuple(parsed))


def _report(args: argparse.Namespace) -> int:
    from auditor import AuditConfig
    from trainers.study import StudySettings, make_report

    settings = StudySettings(
        dataset=args.data,
        limit=args.limit,
        config=AuditConfig(beta=args.beta, states_at=args.states_at),
        top_k=args.top_k,
        percent=args.percent,
        references=tuple(_reference(text) for text in args.reference),
        bootstrap=args.bootstrap,
    )
    print(make_report(args.folder, args.out, settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``auditor-train`` console script; returns the exit code."""
    handlers = {"train": _train, "grid": _grid, "report": _report}
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("AUDITOR_DEBUG"):
                warnings.simplefilter("ignore")  # a library's warning is lines around the one line a refusal promises
            return handlers[args.command](args)
    except ModuleNotFoundError as error:
        if error.name not in TRAIN_EXTRA:
            return _internal_error(error)
        hint = "install the trainer: pip install 'onnx-auditor[train]'"
        print(f"{PROG}: error: {error.name} is missing; {hint}", file=sys.stderr)
    except AuditError as error:
        print(f"{PROG}: error: {for_terminal(str(error))}", file=sys.stderr)
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"{PROG}: error: {for_terminal(f'{error.strerror or error}{where}')}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"{PROG}: error: out of memory; train smaller networks (--widths) or fewer at once", file=sys.stderr)
    except Exception as error:  # a bug, or torch failing (an allocation): one line, never exit 1
        return _internal_error(error)
    return EXIT_BAD_INPUT


def _internal_error(error: BaseException) -> int:
    """What the CLI prints for an exception it did not expect: one line, exit 2; the traceback
    with ``AUDITOR_DEBUG=1``."""
    if os.environ.get("AUDITOR_DEBUG"):
        raise error
    print(
        f"{PROG}: internal error: {type(error).__name__}: {for_terminal(first_line(error))}; please report it "
        "(set AUDITOR_DEBUG=1 for the traceback)",
        file=sys.stderr,
    )
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
