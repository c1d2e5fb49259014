"""The ``auditor`` command: thin subcommands over the library and the gRPC client.

Exit codes: 0 when all is well, 1 when a gate threshold fails, 2 for bad input or usage.
Every refusal is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from auditor import client, server
from auditor.config import AGGREGATES, DEVICES, STATE_POINTS, AuditConfig
from auditor.errors import AuditError, first_line
from auditor.report import GATE_METRICS, Report, format_table, gate_checks, junit_xml, render_table

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``auditor`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except AuditError as exc:
        print(f"auditor: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a file named on the command line (--json, --junit) cannot be written
        where = f" {exc.filename}" if exc.filename else ""
        print(f"auditor: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("auditor: interrupted", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug, not bad input: one line, never exit 1 (which means "gate failed")
        if os.environ.get("AUDITOR_DEBUG"):
            raise
        print(
            f"auditor: internal error: {type(exc).__name__}: {first_line(exc)}; please report it "
            "(set AUDITOR_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auditor", description="Audit ONNX models: neural efficiency, aIQ, CNA and CNA-Margin."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    layers = commands.add_parser("layers", help="list the layers the auditor measures")
    layers.add_argument("model", type=Path, help="path to an .onnx file")
    layers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    layers.set_defaults(handler=run_layers)

    audit = commands.add_parser("audit", help="audit a model on data and print or save the report")
    _add_audit_arguments(audit)
    audit.set_defaults(handler=run_audit)

    gate = commands.add_parser("gate", help="audit, then fail (exit 1) when a metric misses its threshold")
    _add_audit_arguments(gate)
    thresholds = gate.add_argument_group("thresholds (each optional; give at least one)")
    for key, (metric, op) in GATE_METRICS.items():
        thresholds.add_argument(f"--{key.replace('_', '-')}", type=float, metavar="X", help=f"require {metric} {op} X")
    gate.add_argument(
        "--gate-split", default=None, help="split whose figures are gated (default: test if audited, else train)"
    )
    gate.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML, one testcase per threshold")
    gate.set_defaults(handler=run_gate)

    serve = commands.add_parser("serve", help="run the gRPC auditing service")
    server.add_serve_arguments(serve)
    serve.set_defaults(handler=server.run_serve)

    reports = commands.add_parser("reports", help="list stored reports on a server, or fetch one by id")
    reports.add_argument("id", nargs="?", help="report id to fetch (omit to list)")
    reports.add_argument("--model-sha256", help="list only reports of this model")
    reports.add_argument("--json", type=str, metavar="PATH", help="write the fetched report as JSON ('-' = stdout)")
    client.add_connection_arguments(reports)
    reports.set_defaults(handler=run_reports)
    return parser


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``audit`` and ``gate`` (and mirrored by the gRPC settings)."""
    d = AuditConfig()
    parser.add_argument("model", type=Path, help="path to an .onnx file")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="mnist, fashion-mnist, or a path to a .npz/.npy file")
    data.add_argument("--split", default="test", choices=["train", "test", "both"], help="default: test")
    data.add_argument("--limit", type=int, metavar="N", help="use the first N samples of each split")
    data.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default: {d.batch_size}")
    data.add_argument("--scale", type=float, help="multiply samples by this (default: 1/255 for uint8 data, else 1)")
    data.add_argument("--mean", type=float, default=d.mean, help="subtract after scaling (default: 0)")
    data.add_argument("--std", type=float, default=d.std, help="divide after subtracting the mean (default: 1)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--beta", type=float, default=d.beta, help="aIQ's accuracy weight β > 0 (default: 2)")
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
        "--margin-fraction", type=float, default=d.margin_fraction, help="training fraction for margin_max"
    )
    metrics.add_argument("--margin-seed", type=int, default=d.margin_seed, help="seed choosing that fraction")
    metrics.add_argument(
        "--target-efficiency", type=float, default=d.target_efficiency, help="efficiency the width advice aims at"
    )
    metrics.add_argument(
        "--alpha-range",
        type=float,
        nargs=2,
        default=d.alpha_range,
        metavar=("LO", "HI"),
        help="declared value range of non-uint8 data, for CNA's input entropy (default: 0 1)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default=d.device, help="auto: CUDA when it can run, else CPU")
    run.add_argument("--json", type=str, metavar="PATH", help="write the report as JSON ('-' = stdout)")
    run.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    client.add_connection_arguments(parser)


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
    )


def run_layers(args: argparse.Namespace) -> int:
    from auditor.prepare import describe_model

    info = describe_model(args.model)
    fields = ("name", "op", "activation", "role", "neurons", "positions", "block_output")
    rows = [{key: getattr(layer, key) for key in fields} for layer in info.layers]
    if args.json:
        print(json.dumps({"input": info.input_name, "layers": rows}, indent=2))
        return EXIT_OK
    table = [[str(i), *("-" if row[k] is None else str(row[k]) for k in fields)] for i, row in enumerate(rows, 1)]
    print("\n".join(format_table(["#", *fields], table)))
    return EXIT_OK


def produce_report(args: argparse.Namespace) -> Report:
    """Run the audit the arguments describe, locally or on ``--server``."""
    if args.limit is not None and args.limit < 1:
        raise AuditError(f"--limit must be at least 1, got {args.limit}")
    config = config_from_args(args)
    connection = client.connection_from_args(args)
    if connection is not None:
        with _progress_bar(args, None) as progress:
            return client.remote_audit(
                connection, args.model, args.data, args.split, args.limit, config, progress=progress
            )
    from auditor.audit import audit
    from auditor.data import open_splits
    from auditor.prepare import prepare

    prepared = prepare(args.model, device=config.device, states_at=config.states_at)
    datasets = open_splits(args.data, args.split, limit=args.limit)
    with _progress_bar(args, sum(d.count for d in datasets)) as progress:
        return audit(prepared, datasets, config, progress=progress)


class _progress_bar:
    """A tqdm bar on an interactive stderr, nothing otherwise; yields a ``progress`` callback."""

    def __init__(self, args: argparse.Namespace, total: int | None) -> None:
        self.enabled = sys.stderr.isatty() and not args.no_progress
        self.total = total
        self.bar = None
        self.done: dict[str, int] = {}

    def __enter__(self) -> Callable[[str, int], None] | None:
        if not self.enabled:
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="sample", file=sys.stderr, leave=False, dynamic_ncols=True)
        return self.update

    def update(self, split: str, done: int) -> None:
        self.bar.update(done - self.done.get(split, 0))
        self.done[split] = done
        self.bar.set_description(split)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _write(text: str, destination: str) -> None:
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n")


def run_audit(args: argparse.Namespace) -> int:
    report = produce_report(args)
    if args.json:
        _write(report.to_json(), args.json)
    if args.json != "-":
        print(render_table(report))
    return EXIT_OK


def run_gate(args: argparse.Namespace) -> int:
    thresholds = {key: getattr(args, key) for key in GATE_METRICS}
    if all(value is None for value in thresholds.values()):
        raise AuditError("gate needs at least one threshold, e.g. --min-aiq 0.5; see auditor gate --help")
    report = produce_report(args)
    split = args.gate_split or ("test" if "test" in report.splits else next(iter(report.splits)))
    try:
        checks = gate_checks(report, thresholds, split)
    except ValueError as exc:
        raise AuditError(f"{exc}; choose --gate-split among the audited splits") from None
    if args.json:
        _write(report.to_json(), args.json)
    if args.junit:
        args.junit.write_text(junit_xml(checks, report))
    out = sys.stdout if args.json != "-" else sys.stderr
    for check in checks:
        print(check.describe(), file=out)
    failed = [c for c in checks if not c.passed]
    print(
        f"gate {'FAILED' if failed else 'passed'}: {len(checks) - len(failed)}/{len(checks)} thresholds met", file=out
    )
    return EXIT_GATE_FAILED if failed else EXIT_OK


def run_reports(args: argparse.Namespace) -> int:
    connection = client.connection_from_args(args)
    if connection is None:
        raise AuditError("reports are kept by the server; give --server HOST:PORT")
    if args.id is None:
        for row in client.list_reports(connection, args.model_sha256):
            print(json.dumps(row))
        return EXIT_OK
    report = client.get_report(connection, args.id)
    if args.json:
        _write(report.to_json(), args.json)
    if args.json != "-":
        print(render_table(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
