"""The ``auditor`` command: thin subcommands over the library and the gRPC client.

Building the parser imports only light modules (``auditor.flags`` for the service's flags), and
each subcommand imports what it runs when it runs: ``--help``, ``layers``, ``render`` and
``compare`` never load onnxruntime or the gRPC stubs, and only ``--html`` and ``render`` load
matplotlib (docs/performance.md, "The whole command").

Exit codes: 0 when all is well, 1 when a gate threshold fails, 2 for bad input or usage.
Every refusal is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

# isort: off
from auditor import grpclogs  # noqa: F401  (first: gRPC reads its log level when it is first imported)

# isort: on
from auditor.config import AGGREGATES, DEVICES, GPU_MATHS, STATE_POINTS, AuditConfig
from auditor.errors import AuditError, first_line
from auditor.exits import Terminated, ending_on_signals
from auditor.flags import MAX_SAMPLES, integer, number, size
from auditor.outputs import check_outputs
from auditor.pruning import CRITERIA, MAX_ALIGN, MAX_DROP_PP
from auditor.raycluster import ADDRESS_FORMS, MAX_SHARDS
from auditor.records import (
    DONE,
    KNOWN_DATASETS,
    MAX_SIDE,
    SPLIT_CHOICES,
    SPLITS,
    DatasetRef,
    DataSpec,
    ImageOptions,
    Job,
)
from auditor.report import REPORT_MAX_BYTES, SCHEMA, Report, ReportError, format_table, render_table
from auditor.reporting.compare import compare, render_comparison
from auditor.reporting.gate import (
    BASELINE_METRICS,
    COMPARED_SETTINGS,
    GATE_METRICS,
    UNIT_METRICS,
    baseline_checks,
    baseline_settings_problem,
    gate_checks,
    junit_xml,
    summary_markdown,
    threshold_problem,
)
from auditor.runners import LocalRunner, RayRunner, RemoteRunner, Runner
from auditor.service import options
from auditor.sinks import for_terminal, lines_for_terminal
from auditor.usage import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_INTERRUPTED, EXIT_OK, Parser, format_size


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``auditor`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with ending_on_signals(), warnings.catch_warnings():
            if not os.environ.get("AUDITOR_DEBUG"):
                # A library's warning (numpy, Pillow, matplotlib) is lines on stderr around the one line a
                # refusal promises, and noise after a successful run; what matters is in the report's warnings.
                warnings.simplefilter("ignore")
            return args.handler(args)
    except Terminated as exc:  # SIGTERM, SIGHUP, …: the with blocks have cleaned up (spill folders)
        print(f"auditor: stopped by {exc.name}", file=sys.stderr)
        return exc.exit_code
    except AuditError as exc:
        print(f"auditor: error: {for_terminal(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # stdout piped into `head` and closed: that reader wanted no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush stays quiet
        return EXIT_OK
    except OSError as exc:  # a file named on the command line (--json, --junit) cannot be written
        where = f" {exc.filename}" if exc.filename else ""
        print(f"auditor: error: cannot access{for_terminal(where)}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("auditor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not bad input: one line, never exit 1 (which means "gate failed")
        if os.environ.get("AUDITOR_DEBUG"):
            raise
        print(
            f"auditor: internal error: {type(exc).__name__}: {for_terminal(first_line(exc))}; please report it "
            "(set AUDITOR_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="auditor", description="Audit ONNX models: neural efficiency, aIQ, CNA and CNA-Margin.")
    commands = parser.add_subparsers(dest="command", required=True)

    layers = commands.add_parser("layers", help="list the layers the auditor measures")
    layers.add_argument("model", type=Path, help="path to an .onnx file")
    layers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    layers.set_defaults(handler=run_layers)

    audit = commands.add_parser("audit", help="audit a model on data and print or save the report")
    _add_audit_arguments(audit)
    audit.add_argument(
        "--detach",
        action="store_true",
        help="with --server and a dataset the server holds: queue the audit as a job, print its id and exit",
    )
    audit.set_defaults(handler=run_audit)

    gate = commands.add_parser("gate", help="audit, then fail (exit 1) when a metric misses its threshold")
    _add_audit_arguments(gate)
    thresholds = gate.add_argument_group("thresholds (each optional; give at least one)")
    for key, (metric, op) in GATE_METRICS.items():
        thresholds.add_argument(
            f"--{key.replace('_', '-')}",
            type=number(0, 1) if metric in UNIT_METRICS else number(),
            metavar="X",
            help=f"require {metric} {op} X",
        )
    gate.add_argument(
        "--gate-split", default=None, help="split whose figures are gated (default: test if audited, else train)"
    )
    relative = gate.add_argument_group("thresholds against a baseline report (each optional; need --baseline)")
    relative.add_argument(
        "--baseline", metavar="BASE.json", help="report of the model this one replaces, audited the same way"
    )
    relative.add_argument(
        "--allow-difference",
        action="append",
        default=[],
        choices=COMPARED_SETTINGS,
        metavar="SETTING",
        help="let this setting differ from the baseline's, or be missing from it (repeatable; one of "
        f"{', '.join(COMPARED_SETTINGS)}); by default every one must match",
    )
    for key, (metric, direction) in BASELINE_METRICS.items():
        relative.add_argument(
            f"--{key.replace('_', '-')}",
            type=number(0),
            metavar="X",
            help=f"allow {metric} to {direction} by at most X",
        )
    gate.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML, one testcase per threshold")
    gate.add_argument(
        "--summary",
        type=Path,
        metavar="PATH",
        help="write a Markdown summary (it is also appended to $GITHUB_STEP_SUMMARY whenever that is set)",
    )
    gate.set_defaults(handler=run_gate)

    render = commands.add_parser("render", help="render a stored report as one self-contained HTML page")
    render.add_argument("report", help="an auditor.report/v1 JSON file ('-' = stdin)")
    render.add_argument("--html", required=True, metavar="PATH", help="where to write the page ('-' = stdout)")
    render.set_defaults(handler=run_render)

    compare = commands.add_parser("compare", help="compare two reports: headline metrics, layers, model changes")
    compare.add_argument("base", help="the base report (JSON; '-' = stdin)")
    compare.add_argument("new", help="the new report (JSON; '-' = stdin)")
    compare.add_argument("--json", metavar="PATH", help="write the comparison as JSON ('-' = stdout)")
    compare.set_defaults(handler=run_compare)

    shrink = commands.add_parser(
        "shrink", help="remove neurons the data shows are dead, duplicated or (with a budget) least used"
    )
    _add_shrink_arguments(shrink)
    shrink.set_defaults(handler=run_shrink)

    serve = commands.add_parser("serve", help="run the gRPC auditing service")
    options.add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)

    reports = commands.add_parser("reports", help="list stored reports on a server, or fetch one by id")
    reports.add_argument("id", nargs="?", help="report id to fetch (omit to list)")
    reports.add_argument("--model-sha256", help="list only reports of this model")
    reports.add_argument("--json", type=str, metavar="PATH", help="write the fetched report as JSON ('-' = stdout)")
    options.add_connection_arguments(reports)
    reports.set_defaults(handler=run_reports)

    jobs = commands.add_parser("jobs", help="list a server's jobs, or show, wait for or cancel one")
    jobs.add_argument("id", nargs="?", help="job id (omit to list every job)")
    jobs.add_argument(
        "--wait", action="store_true", help="wait for the job to end: exit 0 when done, 2 when failed or cancelled"
    )
    jobs.add_argument("--cancel", action="store_true", help="cancel the job (queued or running)")
    jobs.add_argument("--json", type=str, metavar="PATH", help="write the job's report as JSON ('-' = stdout)")
    jobs.add_argument("--html", metavar="PATH", help="write the job's report as one HTML page ('-' = stdout)")
    options.add_connection_arguments(jobs)
    jobs.set_defaults(handler=run_jobs)
    return parser


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``audit`` and ``gate`` (and mirrored by the gRPC settings)."""
    d = AuditConfig()
    parser.add_argument("model", type=Path, help="path to an .onnx file")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", required=True, help="mnist, fashion-mnist, a path to a .npz/.npy file, or a folder of images"
    )
    data.add_argument("--split", default="test", choices=SPLIT_CHOICES, help="default: test")
    data.add_argument(
        "--limit", type=integer(1, MAX_SAMPLES), metavar="N", help="use the first N samples of each split"
    )
    data.add_argument(
        "--resize",
        type=integer(1, MAX_SIDE),
        metavar="N",
        help="image folders: shorter side to N (default: just cover the crop)",
    )
    data.add_argument(
        "--crop", type=integer(1, MAX_SIDE), metavar="N", help="image folders: centre N×N crop (default: model's H×W)"
    )
    data.add_argument("--skip-bad", action="store_true", help="image folders: skip bad images, counted in warnings")
    data.add_argument("--batch-size", type=integer(1, 2**31 - 1), default=d.batch_size, help=f"default: {d.batch_size}")
    data.add_argument("--scale", type=number(), help="multiply samples by this (default: 1/255 for uint8 data, else 1)")
    data.add_argument("--mean", type=number(), default=d.mean, help="subtract after scaling (default: 0)")
    data.add_argument("--std", type=number(), default=d.std, help="divide after subtracting the mean (default: 1)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--beta", type=number(0, above=True), default=d.beta, help="aIQ's accuracy weight β > 0 (default: 2)"
    )
    metrics.add_argument(
        "--include-output-layer", action="store_true", help="count the output layer in efficiency and aIQ"
    )
    metrics.add_argument(
        "--cna-exclude-output-layer", action="store_true", help="leave the output layer out of CNA's slope"
    )
    metrics.add_argument("--aggregate", choices=AGGREGATES, default=d.aggregate, help="CNA layer aggregate")
    metrics.add_argument(
        "--states-at",
        choices=STATE_POINTS,
        default=d.states_at,
        help="where efficiency reads a layer's state: its pre-activation (default), or the block output "
        "after BatchNorm/Dropout/affine ops that follow the activation (SPEC §1)",
    )
    metrics.add_argument(
        "--margin-fraction",
        type=number(0, 1, above=True),
        default=d.margin_fraction,
        help="training fraction for margin_max",
    )
    metrics.add_argument(
        "--margin-seed", type=integer(0, 2**63 - 1), default=d.margin_seed, help="seed choosing that fraction"
    )
    metrics.add_argument(
        "--target-efficiency",
        type=number(0, 1, above=True),
        default=d.target_efficiency,
        help="efficiency the width advice aims at",
    )
    metrics.add_argument(
        "--alpha-range",
        type=number(),
        nargs=2,
        default=d.alpha_range,
        metavar=("LO", "HI"),
        help="declared value range of non-uint8 data, for CNA's input entropy (default: 0 1)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default=d.device, help="auto: CUDA when it can run, else CPU")
    run.add_argument(
        "--gpu-math",
        choices=GPU_MATHS,
        default=d.gpu_math,
        help="float math on CUDA: exact (fp32, TF32 off: the CPU's counts; default) or tf32 (faster; the report "
        "calls its counts approximate)",
    )
    run.add_argument(
        "--memory-budget",
        type=size,
        default=format_size(d.memory_budget),
        metavar="SIZE",
        help="what one audit may hold for counting states, e.g. 512M or 4G "
        f"(default: {format_size(d.memory_budget)}); past it, sorted runs spill to --spill-dir, and counts stay exact",
    )
    run.add_argument(
        "--spill-dir", type=Path, metavar="DIR", help="folder for spilled runs (default: the system's temp folder)"
    )
    run.add_argument(
        "--ray",
        metavar="ADDRESS",
        help=f"audit on Ray: {ADDRESS_FORMS}; needs the ray extra",
    )
    run.add_argument(
        "--shards",
        type=integer(1, MAX_SHARDS),
        metavar="N",
        help="with --ray: cut each split into N contiguous shards (default: 1)",
    )
    run.add_argument("--json", type=str, metavar="PATH", help="write the report as JSON ('-' = stdout)")
    run.add_argument(
        "--html", metavar="PATH", help="write the report as one self-contained HTML page ('-' = stdout)"
    )
    run.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    options.add_connection_arguments(parser)


def _add_shrink_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``shrink``: the data to measure on, the held-out split, the budget, the outputs."""
    d = AuditConfig()
    parser.add_argument("model", type=Path, help="path to an .onnx file")
    parser.add_argument("--data", required=True, help="mnist, fashion-mnist, or a path to a .npz/.npy file")
    parser.add_argument(
        "--split", default="train", choices=SPLITS, help="split whose states decide what goes (default: train)"
    )
    parser.add_argument(
        "--holdout",
        default="test",
        choices=SPLITS,
        help="split where accuracy, η_N and aIQ are measured before and after, and the budget's stop is "
        "checked (default: test)",
    )
    parser.add_argument(
        "--limit", type=integer(1, MAX_SAMPLES), metavar="N", help="use the first N samples of each split"
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=number(0, MAX_DROP_PP),
        metavar="PP",
        help="also remove the least-used neurons while held-out accuracy falls by at most PP percentage "
        "points (0–100); without it only exact removals (dead, duplicate) are made",
    )
    parser.add_argument(
        "--criterion",
        choices=tuple(CRITERIA),
        default="layer-share",
        help="how the budget ranks neurons, least useful first (default: layer-share; docs/shrink.md)",
    )
    parser.add_argument(
        "--align",
        type=integer(1, MAX_ALIGN),
        default=1,
        metavar="N",
        help="keep every layer's width a multiple of N (or whole): 8 suits onnxruntime's CPU Conv kernels "
        "(default: 1; docs/shrink.md)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="PATH", help="where to write the shrunk .onnx")
    parser.add_argument("--json", type=str, metavar="PATH", help="write the shrink report as JSON ('-' = stdout)")
    parser.add_argument(
        "--html", metavar="PATH", help="write the shrunk model's audit page with the shrink ('-' = stdout)"
    )
    parser.add_argument(
        "--baseline-json",
        type=Path,
        metavar="PATH",
        help="write the original's held-out audit report: the --baseline for auditor gate on the shrunk model",
    )
    parser.add_argument(
        "--batch-size", type=integer(1, 2**31 - 1), default=d.batch_size, help=f"default: {d.batch_size}"
    )
    parser.add_argument(
        "--scale", type=number(), help="multiply samples by this (default: 1/255 for uint8 data, else 1)"
    )
    parser.add_argument("--mean", type=number(), default=d.mean, help="subtract after scaling (default: 0)")
    parser.add_argument("--std", type=number(), default=d.std, help="divide after subtracting the mean (default: 1)")
    parser.add_argument(
        "--beta", type=number(0, above=True), default=d.beta, help="aIQ's accuracy weight β > 0 (default: 2)"
    )
    parser.add_argument("--device", choices=DEVICES, default=d.device, help="auto: CUDA when it can run, else CPU")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The audit settings named by the command line."""
    return AuditConfig(
        beta=args.beta,
        batch_size=args.batch_size,
        include_output_layer=args.include_output_layer,
        cna_include_output_layer=not args.cna_exclude_output_layer,
        aggregate=args.aggregate,
        margin_fraction=args.margin_fraction,
        margin_seed=args.margin_seed,
        target_efficiency=args.target_efficiency,
        alpha_range=tuple(args.alpha_range),
        scale=args.scale,
        mean=args.mean,
        std=args.std,
        device=args.device,
        states_at=args.states_at,
        memory_budget=args.memory_budget,
        gpu_math=args.gpu_math,
    )


def run_layers(args: argparse.Namespace) -> int:
    from auditor.engine.prepare import describe_model

    info = describe_model(args.model)
    fields = ("name", "op", "activation", "role", "neurons", "positions", "block_output")
    rows = [{key: getattr(layer, key) for key in fields} for layer in info.layers]
    if args.json:
        print(json.dumps({"input": info.input_name, "layers": rows}, indent=2))
        return EXIT_OK
    table = [[str(i), *("-" if row[k] is None else str(row[k]) for k in fields)] for i, row in enumerate(rows, 1)]
    _show("\n".join(format_table(["#", *fields], table)))
    return EXIT_OK


def produce_report(args: argparse.Namespace) -> Report:
    """Run the audit the arguments describe, on the runner they choose."""
    with _progress_bar(args) as progress:
        return choose_runner(args).run(args.model, data_from_args(args), config_from_args(args), progress)


def data_from_args(args: argparse.Namespace) -> DataSpec:
    """The data the arguments name."""
    if args.limit is not None and args.limit < 1:
        raise AuditError(f"--limit must be at least 1, got {args.limit}")
    images = ImageOptions(resize=args.resize, crop=args.crop, skip_bad=args.skip_bad)
    return DataSpec(args.data, args.split, args.limit, images)


def choose_runner(args: argparse.Namespace) -> Runner:
    """Where the audit runs: on ``--server``, on the Ray cluster at ``--ray``, or here."""
    connection = options.connection_from_args(args)
    if args.shards is not None and args.ray is None:
        raise AuditError(f"--shards needs --ray ADDRESS ({ADDRESS_FORMS})")
    if connection is not None:
        if args.ray is not None or args.spill_dir is not None:
            raise AuditError("--ray and --spill-dir apply to local audits; the server has its own settings")
        return RemoteRunner(connection)
    if args.ray is not None:
        return RayRunner(args.ray, 1 if args.shards is None else args.shards)
    return LocalRunner(args.spill_dir)


class _progress_bar:
    """A tqdm bar on an interactive stderr, nothing otherwise; yields a runner's ``Progress``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = sys.stderr.isatty() and not args.no_progress
        self.bar = None
        self.done: dict[str, int] = {}

    def __enter__(self) -> _progress_bar | None:
        return self if self.enabled else None

    def started(self, total: int | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="sample", file=sys.stderr, leave=False, dynamic_ncols=True)

    def advanced(self, split: str, done: int) -> None:
        if self.bar is None:
            self.started(None)
        self.bar.update(done - self.done.get(split, 0))
        self.done[split] = done
        self.bar.set_description(split)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _show(text: str, file: TextIO | None = None) -> None:
    """Print our own lines of text to a terminal (or a log): names from the model inside them are
    escaped (``auditor.sinks``), so they cannot move the cursor, retitle the window or read backwards."""
    print(lines_for_terminal(text), file=file or sys.stdout)


def _inputs(args: argparse.Namespace) -> dict[str, str | Path | None]:
    """The files ``audit``, ``gate`` and ``shrink`` read, which no output may overwrite: the model and a data file."""
    return {"the model": args.model, "--data": args.data if Path(args.data).is_file() else None}


def _to_stdout(args: argparse.Namespace) -> bool:
    """Whether a report file goes to stdout (``--json -`` or ``--html -``), so the table must not."""
    return "-" in (args.json, getattr(args, "html", None))


def _write(text: str, destination: str) -> None:
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n")


def run_audit(args: argparse.Namespace) -> int:
    if args.detach:
        return _submit_job(args)
    check_outputs(_inputs(args), {"--json": args.json, "--html": args.html})
    report = produce_report(args)
    _write_report(report, args)
    if not _to_stdout(args):
        _show(render_table(report))
    return EXIT_OK


def _write_report(report: Report, args: argparse.Namespace) -> None:
    """The report files that ``audit`` and ``gate`` were asked for: ``--json`` and ``--html``."""
    if args.json:
        _write(report.to_json(), args.json)
    if args.html:
        from auditor.reporting.page import render_page

        _write(render_page(report).rstrip("\n"), args.html)


def run_gate(args: argparse.Namespace) -> int:
    absolute = {key: getattr(args, key) for key in GATE_METRICS}
    relative = {key: getattr(args, key) for key in BASELINE_METRICS}
    given = {key: value for key, value in {**absolute, **relative}.items() if value is not None}
    if not given:
        raise AuditError("gate needs at least one threshold, e.g. --min-aiq 0.5; see auditor gate --help")
    for key, value in given.items():
        problem = threshold_problem(key, value)
        if problem:
            raise AuditError(problem)
    split = args.gate_split or ("train" if args.split == "train" else "test")
    check_outputs(
        {**_inputs(args), "--baseline": args.baseline},
        {"--json": args.json, "--html": args.html, "--junit": args.junit, "--summary": args.summary},
    )
    baseline = _read_baseline(args, relative, split)
    report = produce_report(args)
    try:
        checks = gate_checks(report, absolute, split)
    except ValueError as exc:
        raise AuditError(f"{exc}; choose --gate-split among the audited splits") from None
    if baseline is not None:
        base_samples, samples = baseline.splits[split].samples, report.splits[split].samples
        if base_samples != samples:
            raise AuditError(
                f"the baseline's {split} split has {base_samples} samples and this audit's {samples}; "
                "gate against a baseline audited on the same data (--data, --split, --limit)"
            )
        checks += baseline_checks(report, baseline, relative, split)
    _write_report(report, args)
    if args.junit:
        args.junit.write_text(junit_xml(checks, report))
    summary = summary_markdown(checks, report, baseline, split)
    if args.summary:
        args.summary.write_text(summary)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as step_summary:
            step_summary.write(summary + "\n")
    out = sys.stderr if _to_stdout(args) else sys.stdout
    for check in checks:
        _show(check.describe(), out)
    failed = [c for c in checks if not c.passed]
    print(
        f"gate {'FAILED' if failed else 'passed'}: {len(checks) - len(failed)}/{len(checks)} thresholds met", file=out
    )
    return EXIT_GATE_FAILED if failed else EXIT_OK


def _read_baseline(args: argparse.Namespace, relative: dict[str, float | None], split: str) -> Report | None:
    """The ``--baseline`` report, refused unless it can be gated against: same settings, the gated
    split, and a figure for every relative threshold given. None without ``--baseline``."""
    given = [key for key, value in relative.items() if value is not None]
    if args.baseline is None:
        if given:
            option = "--" + given[0].replace("_", "-")
            raise AuditError(f"{option} needs --baseline BASE.json, a report of the model this one replaces")
        return None
    baseline = read_report(args.baseline, "baseline")
    problem = baseline_settings_problem(baseline.config, config_from_args(args).to_dict(), args.allow_difference)
    if problem:
        raise AuditError(f"the baseline {args.baseline} {problem}")
    if split not in baseline.splits:
        raise AuditError(
            f"the baseline {args.baseline} has no {split} split (it has {', '.join(baseline.splits)}); "
            "audit the baseline with that split, or choose --gate-split"
        )
    for key in given:
        metric = BASELINE_METRICS[key][0]
        if baseline.metric(metric, split) is None:
            where = "CNA-Margin (it needs --split both)" if metric == "cna_margin_max" else f"{metric} on {split}"
            raise AuditError(
                f"the baseline {args.baseline} has no {where}: it is null there, so --{key.replace('_', '-')} "
                "cannot be checked"
            )
    return baseline


def run_shrink(args: argparse.Namespace) -> int:
    """``shrink``: measure, cut, verify, and write the model and the reports asked for."""
    from auditor.datasets.splits import open_dataset
    from auditor.pruning.plan import save_model, shrink
    from auditor.pruning.report import html_section, render_text
    from auditor.reporting.page import render_page

    check_outputs(
        _inputs(args),
        {"--out": args.out, "--json": args.json, "--html": args.html, "--baseline-json": args.baseline_json},
    )
    config = AuditConfig(
        batch_size=args.batch_size, scale=args.scale, mean=args.mean, std=args.std, beta=args.beta, device=args.device
    )
    data = [open_dataset(args.data, args.split, limit=args.limit)]
    holdout = [open_dataset(args.data, args.holdout, limit=args.limit)]
    report = shrink(
        args.model,
        data,
        holdout,
        config,
        max_accuracy_drop=args.max_accuracy_drop,
        criterion=args.criterion,
        align=args.align,
        progress=_stage_printer(),
    )
    save_model(report.model, args.out, like=args.model)
    if args.json:
        _write(report.to_json(), args.json)
    if args.html:
        _write(render_page(report.after_report, sections=[html_section(report)]).rstrip("\n"), args.html)
    if args.baseline_json:
        args.baseline_json.write_text(report.before_report.to_json() + "\n")
    if not _to_stdout(args):
        print(render_text(report))
    return EXIT_OK


def _stage_printer() -> Callable[[str], None] | None:
    """Stage messages on an interactive stderr (``auditor shrink``'s passes take a while), else none."""
    if not sys.stderr.isatty():
        return None
    return lambda message: print(f"auditor shrink: {message}", file=sys.stderr)


def run_render(args: argparse.Namespace) -> int:
    from auditor.reporting.page import render_page

    check_outputs({"the report": args.report}, {"--html": args.html})
    _write(render_page(read_report(args.report, "report")).rstrip("\n"), args.html)
    return EXIT_OK


def run_compare(args: argparse.Namespace) -> int:
    if args.base == args.new == "-":
        raise AuditError("only one of the two reports can come from stdin ('-')")
    check_outputs({"the base report": args.base, "the new report": args.new}, {"--json": args.json})
    comparison = compare(read_report(args.base, "base report"), read_report(args.new, "new report"))
    if args.json:
        _write(json.dumps(comparison.to_dict(), indent=2), args.json)
    if args.json != "-":
        _show(render_comparison(comparison))
    return EXIT_OK


def read_report(source: str, what: str) -> Report:
    """A stored ``auditor.report/v1`` from a JSON file, or stdin for ``-``, every field checked
    (``Report.load``); anything else is an ``AuditError`` that names ``what`` and the file."""
    if source == "-":
        raw = sys.stdin.buffer.read(REPORT_MAX_BYTES + 1)
    else:
        path = Path(source)
        if not path.is_file():
            raise AuditError(f"{what} {source} {'is not a file' if path.exists() else 'does not exist'}")
        with path.open("rb") as file:
            raw = file.read(REPORT_MAX_BYTES + 1)
    try:
        return Report.load(raw)
    except ReportError as exc:
        raise AuditError(f"{what} {source} is not an {SCHEMA} report ({exc})") from None


def run_serve(args: argparse.Namespace) -> int:
    from auditor.service.server import run_serve

    return run_serve(args)


def run_reports(args: argparse.Namespace) -> int:
    from auditor.service import client

    connection = options.connection_from_args(args)
    if connection is None:
        raise AuditError("reports are kept by the server; give --server HOST:PORT")
    if args.id is None:
        for row in client.list_reports(connection, args.model_sha256):
            print(json.dumps(row))
        return EXIT_OK
    check_outputs({}, {"--json": args.json})
    report = client.get_report(connection, args.id)
    if args.json:
        _write(report.to_json(), args.json)
    if args.json != "-":
        _show(render_table(report))
    return EXIT_OK


def _submit_job(args: argparse.Namespace) -> int:
    """``audit --detach``: queue the audit as a job on the server and print its id (one line)."""
    from auditor.service import client

    connection = options.connection_from_args(args)
    if connection is None:
        raise AuditError("--detach runs the audit as a job on a server; give --server HOST:PORT")
    if args.data not in KNOWN_DATASETS:
        raise AuditError(
            f"--detach audits a dataset the server holds ({', '.join(KNOWN_DATASETS)}), not {args.data!r}; "
            "audit other data without --detach"
        )
    if args.json or args.html:
        raise AuditError("--detach prints only the job id; get the report with: auditor jobs ID --wait --json PATH")
    if args.limit is not None and args.limit < 1:
        raise AuditError(f"--limit must be at least 1, got {args.limit}")
    dataset = DatasetRef(args.data, args.split, args.limit)
    print(client.submit_job(connection, args.model, dataset, config_from_args(args)).id)
    return EXIT_OK


JOB_COLUMNS = ("id", "model", "dataset", "state", "samples", "queue")


def run_jobs(args: argparse.Namespace) -> int:
    """List jobs, or show one (``--wait`` for it, ``--cancel`` it); exit 2 for a failed or cancelled job."""
    from auditor.service import client

    connection = options.connection_from_args(args)
    if connection is None:
        raise AuditError("jobs are kept by the server; give --server HOST:PORT")
    if args.id is None:
        if args.wait or args.cancel or args.json or args.html:
            raise AuditError("--wait, --cancel, --json and --html act on one job: give its id")
        _show("\n".join(format_table(JOB_COLUMNS, [_job_row(job) for job in client.list_jobs(connection)])))
        return EXIT_OK
    check_outputs({}, {"--json": args.json, "--html": args.html})
    report = None
    if args.cancel:
        job = client.cancel_job(connection, args.id)
    elif args.wait:
        job, report = client.watch_job(connection, args.id)
    else:
        job = client.get_job(connection, args.id)
        if job.state == DONE and (args.json or args.html):
            report = client.get_report(connection, job.report_id)
    if job.error:
        raise AuditError(f"job {job.id} {job.state}: {job.error}")
    if report is None:
        if args.json or args.html:
            raise AuditError(f"job {job.id} is {job.state} and has no report yet; add --wait to wait for it")
        _show("\n".join(format_table(JOB_COLUMNS, [_job_row(job)])))
        return EXIT_OK
    _write_report(report, args)
    if not _to_stdout(args):
        _show(render_table(report))
    return EXIT_OK


def _job_row(job: Job) -> list[str]:
    """A job as a row of ``auditor jobs``: id, model, dataset, state, samples done, queue position."""
    ref = job.spec.dataset
    dataset = "-" if ref is None else f"{ref.name}/{ref.split}" + (f"[:{ref.limit}]" if ref.limit else "")
    samples = ", ".join(f"{split} {done}" for split, done in job.samples.items()) or "-"
    queue = "-" if job.queue_position is None else str(job.queue_position)
    return [job.id, job.spec.model_name or job.spec.content_address[:12], dataset, job.state, samples, queue]


if __name__ == "__main__":
    sys.exit(main())
