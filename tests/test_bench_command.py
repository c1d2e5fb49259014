"""bench/plain_mnist.py, bench_command.py's baseline, does the audit's work: the same images, the
same model, the same predictions (its accuracy is the report's, to the digit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from auditor.cli import main
from auditor.datasets.idx import locate

REPO = Path(__file__).resolve().parents[1]


def test_the_plain_script_scores_the_images_the_audit_scores(tmp_path: Path) -> None:
    model = REPO / "examples" / "lenet5_3_9_4.onnx"
    report = tmp_path / "r.json"
    assert main(["audit", str(model), "--data", "mnist", "--split", "test", "--json", str(report)]) == 0
    accuracy = json.loads(report.read_text())["splits"]["test"]["accuracy"]
    plain = REPO / "bench" / "plain_mnist.py"
    done = subprocess.run(
        [sys.executable, str(plain), str(model), str(locate("mnist")), "test"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.strip() == f"accuracy {accuracy:.4f}"
