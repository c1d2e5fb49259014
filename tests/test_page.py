"""auditor.reporting.page and ``auditor render`` / ``--html``: one self-contained file, drawn in a real browser.

Reports come from real audits of the bundled LeNet-300-100 on real MNIST, and reach the page as
a ``Report`` read back from JSON (``Report.load``), as ``auditor render`` reads a file. The keys
older reports lack are removed from a copy where a test needs a report as an older auditor wrote it. The browser
is the real headless Chromium (Debian package ``chromium``); those tests skip only when the
binary is absent.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from models import HOSTILE_NAMES
from PIL import Image
from refusals import cli_refused

from auditor.cli import main
from auditor.report import Report
from auditor.reporting.page import SPLIT_COLORS, render_page

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lenet300_11_4.onnx"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="the chromium binary is not installed (apt-get install chromium; .ci/run installs it)"
)
LAYER_KEYS = ("top_probabilities", "probability_quantiles")
QUANTILES = ("0", "0.25", "0.5", "0.75", "1")
SVG = re.compile(r"<svg\b.*?</svg>", re.S)

# A reference to the network, in any form a page could fetch one: an attribute of a tag pointing
# at an absolute or protocol-relative URL, a CSS import, a CSS url() that is not a fragment or data:.
NETWORK_REFERENCE = re.compile(
    r"""<[^>]*\b(?:src|href|srcset|poster|action|data)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//"""
    r"""|@import|url\(\s*["']?\s*(?!#|data:)[^)]*\)|<link\b|<script\b[^>]*\bsrc\b|<iframe\b|<object\b|<embed\b""",
    re.I,
)


def network_references(page: str) -> list[str]:
    return NETWORK_REFERENCE.findall(page)


def page_of(report: dict, *, strict: bool = True) -> str:
    """The page of a report's JSON object, read through ``Report.load`` as ``auditor render`` reads it."""
    return render_page(Report.load(json.dumps(report), strict=strict))


def without_page_keys(report: dict) -> dict:
    """A copy of ``report`` as an auditor written before the optional keys existed would write it."""
    out = copy.deepcopy(report)
    for figures in out["splits"].values():
        figures.pop("cna_points", None)
        for layer in figures["layers"]:
            for key in LAYER_KEYS:
                layer.pop(key, None)
    if out.get("cna_margin"):
        out["cna_margin"].pop("curves", None)
    return out


def svgs(page: str) -> list[str]:
    return SVG.findall(page)


def audit_json(tmp: Path, *args: str) -> dict:
    out = tmp / "report.json"
    argv = ["audit", str(EXAMPLE), "--data", "mnist", "--device", "cpu", *args, "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real report of the example on 300 samples of each split."""
    return audit_json(tmp_path_factory.mktemp("both"), "--split", "both", "--limit", "300")


@pytest.fixture(scope="module")
def full(both: dict) -> dict:
    """The same report, checked to carry every key the figures draw."""
    for figures in both["splits"].values():
        assert len(figures["cna_points"]["alpha"]) == len(figures["cna_points"]["beta"]) == 300
        for layer in figures["layers"]:
            assert len(layer["top_probabilities"]) == min(100, layer["states_distinct"])
            assert list(layer["probability_quantiles"]) == list(QUANTILES)
    assert [len(both["cna_margin"]["curves"][key]) for key in ("alpha", "train", "test")] == [100, 100, 100]
    return both


@pytest.fixture(scope="module")
def full_page(full: dict) -> str:
    return page_of(full)


# --- The page as text -----------------------------------------------------------------------------


def test_the_network_reference_check_catches_each_kind() -> None:
    assert network_references('<p>see <a href="#fig1-3">figure</a></p><svg><use xlink:href="#fig1-2"/></svg>') == []
    assert network_references('<svg xmlns="http://www.w3.org/2000/svg"><path style="fill:url(#fig2-1)"/></svg>') == []
    for bad in (
        '<img src="https://example.org/x.png">',
        "<img src=//example.org/x.png>",
        '<a href="http://example.org">',
        "<style>@import 'x.css';</style>",
        "<style>body{background:url(http://example.org/x.png)}</style>",
        "<style>body{background:url( '//example.org/x.png' )}</style>",
        '<link rel="stylesheet" href="x.css">',
        '<script src="x.js"></script>',
        '<svg><image xlink:href="https://example.org/x.png"/></svg>',
    ):
        assert network_references(bad), bad


def test_page_is_one_file_with_every_figure_and_no_network_reference(full_page: str) -> None:
    page = full_page
    assert network_references(page) == []
    assert "<script" not in page and "<link" not in page and "<img" not in page
    drawn = svgs(page)
    assert len(drawn) == 6 == page.count("<figure>")
    ids = [i for svg in drawn for i in re.findall(r'\bid="([^"]+)"', svg)]
    assert len(ids) == len(set(ids)), "figures share element ids"
    for svg in drawn:  # each inlined figure is well-formed XML whose internal references resolve
        root = ET.fromstring(svg)
        own = {el.get("id") for el in root.iter() if el.get("id")}
        refs = re.findall(r'href="#([^"]+)"|url\(#([^)]+)\)', svg)
        assert {a or b for a, b in refs} <= own
    assert not re.search(r"\b\d{4}-\d{2}-\d{2}T", page), "a date leaked into the page"


def test_page_shows_every_number_as_a_table(full: dict, full_page: str) -> None:
    page = full_page
    assert f"<code>{full['model']['sha256']}</code>" in page
    assert full["model"]["producer"] in page and "CPUExecutionProvider" in page
    for split, figures in full["splits"].items():
        for metric in ("accuracy", "network_efficiency", "aiq", "cna"):
            assert f">{figures[metric]:.4f}<" in page, (split, metric)
        for layer in figures["layers"]:
            assert layer["name"] in page
            for key in ("entropy_bits", "efficiency"):
                assert f">{layer[key]:.4f}<" in page
            assert f">{layer['max_entropy_bits']:.2f}<" in page
            assert f">{layer['probability_quantiles']['0.5']:.3g}<" in page
    margin = full["cna_margin"]
    for key in ("area", "margin_max", "cna_margin_max", "margin_p5", "cna_margin_p5"):
        assert f">{margin[key]:.4f}<" in page
    assert f"CNA_A = {margin['area']:.4f}" in page
    for alpha, train, test in zip(*(margin["curves"][k] for k in ("alpha", "train", "test")), strict=True):
        assert f">{alpha:.4f}</td><td class='num'>{train:.4f}</td><td class='num'>{test:.4f}<" in page
    assert "aIQ (β = 2, 0–1 scale)" in page and "No warnings." in page


def test_wider_layers_are_marked(full: dict, full_page: str) -> None:
    report = copy.deepcopy(full)
    layers = report["splits"]["test"]["layers"]
    assert [layer["wider_than_data"] for layer in layers] == [True, False]  # 11 neurons > ⌈log2 300⌉ = 9 > 4
    assert full_page.count('<tr class="wide">') == 2  # the first layer on both splits
    layers[1]["wider_than_data"] = True
    page = page_of(report)
    assert page.count('<tr class="wide">') == 3 and page.count("▲ wider than the data") == 3


def test_warnings_are_set_apart_and_escaped(full: dict) -> None:
    report = copy.deepcopy(full)
    report["warnings"] = ["layer x: 3 NaN values", "<b>bold</b> & more"]
    page = page_of(report)
    section = re.search(r'<section class="warnings">(.*?)</section>', page, re.S).group(1)
    assert "Warnings (2)" in section and "layer x: 3 NaN values" in section
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in section and "<b>" not in page


def test_names_from_the_model_never_become_markup(full: dict) -> None:
    report = copy.deepcopy(full)
    hostile = '"><script>alert(1)</script><img src=https://example.org/x>'
    report["model"]["name"] = hostile
    report["model"]["producer"] = hostile
    report["providers"] = [hostile]
    for figures in report["splits"].values():
        figures["layers"][0]["name"] = hostile + "$\\frac{a}{b}$"
    report["model"]["layers"][0]["name"] = hostile + "$\\frac{a}{b}$"
    page = page_of(report)
    assert "<script" not in page and "<img" not in page and network_references(page) == []
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert len(svgs(page)) == 6


def test_figures_whose_data_is_absent_become_notes(both: dict) -> None:
    page = page_of(without_page_keys(both))
    assert len(svgs(page)) == 3  # efficiency, entropy and widths come from the v1 keys every report has
    for key in ("top_probabilities", "cna_margin.curves", "cna_points"):
        assert f"<code>{key}</code>" in page
    assert network_references(page) == []


def test_one_split_page_says_the_curves_need_both(tmp_path: Path) -> None:
    report = audit_json(tmp_path, "--limit", "200")
    assert report["cna_margin"] is None
    page = page_of(report)
    assert "CNA-Margin needs a train and a test split" in page
    assert "No slope–entropy curves: they need a train and a test split" in page
    assert len(svgs(page)) == 5  # three layer figures, the state distributions, the test split's (α, β)


def test_malformed_optional_data_is_a_note_not_a_crash(full: dict) -> None:
    report = copy.deepcopy(full)
    report["cna_margin"]["curves"] = {"alpha": [0.1, "x"], "train": [1.0], "test": None}
    for figures in report["splits"].values():
        figures["cna_points"] = {"alpha": [[1.0, 2.0]], "beta": [float("nan")]}
        for layer in figures["layers"]:
            layer["top_probabilities"] = "many"
    page = page_of(report, strict=False)  # NaN and strings where numbers belong: only a lax load takes them
    assert len(svgs(page)) == 3 and page.count('class="note"') >= 3


def test_a_report_read_back_from_its_json_renders_the_same_page(both: dict) -> None:
    report = Report.from_dict(both)
    assert render_page(report) == render_page(Report.load(report.to_json())) == page_of(both)


def test_an_older_report_without_the_optional_keys_renders_with_its_notes(both: dict) -> None:
    """A report as the first ``auditor.report/v1`` writer wrote it: none of the keys added since
    (figure data, weights, spill and sharding records, CUDA options, block outputs, warnings)."""
    old = without_page_keys(both)
    for key in ("weights", "spilled_bytes", "sharding", "provider_options", "warnings"):
        old.pop(key, None)
    for layer in old["model"]["layers"]:
        layer.pop("block_output", None)
    report = Report.load(json.dumps(old))
    assert report.weights is None and report.cna_margin.curves is None and report.warnings == []
    assert all(s.cna_points is None for s in report.splits.values())
    assert all(layer.top_probabilities is layer.probability_quantiles is None for layer in report.splits["test"].layers)
    page = render_page(report)
    for key in ("top_probabilities", "cna_margin.curves", "cna_points"):
        assert f"<code>{key}</code>; reports from older auditors lack" in page
    assert "no <code>weights</code> section (reports from older auditors lack it)" in page
    assert "No warnings." in page and len(svgs(page)) == 3
    assert f">{both['cna_margin']['area']:.4f}<" in page  # the v1 figures are all still shown
    assert page.count("<h3>") == page_of(both).count("<h3>")


def test_rendering_does_not_load_matplotlib_until_a_page_is_drawn() -> None:
    code = (
        "import sys, auditor.cli, auditor.reporting.page\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --- The command line -----------------------------------------------------------------------------


def test_audit_html_equals_render_of_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html, out = tmp_path / "audit.html", tmp_path / "audit.json"
    argv = ["audit", str(EXAMPLE), "--data", "mnist", "--split", "both", "--limit", "120", "--device", "cpu"]
    assert main([*argv, "--json", str(out), "--html", str(html)]) == 0
    assert "accuracy" in capsys.readouterr().out  # the table still prints
    rendered = tmp_path / "render.html"
    assert main(["render", str(out), "--html", str(rendered)]) == 0
    assert rendered.read_text() == html.read_text()
    assert main(["render", str(out), "--html", "-"]) == 0
    assert capsys.readouterr().out == html.read_text()


def test_render_reads_stdin(both: dict, tmp_path: Path) -> None:
    html = tmp_path / "page.html"
    done = subprocess.run(
        [sys.executable, "-m", "auditor.cli", "render", "-", "--html", str(html)],
        input=json.dumps(both),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert html.read_text() == page_of(both)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json", "not an auditor.report/v1 report"),
        ("[1, 2]", "its schema is None"),
        ('{"schema": "auditor.report/v2"}', "'auditor.report/v2'"),
        ('{"schema": "auditor.report/v1"}', "lacks 'model'"),
        ("[" * 100_000, "not an auditor.report/v1 report"),
    ],
)
def test_render_refuses_what_is_not_a_report(tmp_path: Path, capsys, content: str, fragment: str) -> None:
    source = tmp_path / "bad.json"
    source.write_text(content)
    cli_refused(capsys, main(["render", str(source), "--html", str(tmp_path / "x.html")]), fragment, "bad.json")
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("splits", "test", "samples"), "many", "report.splits.test.samples is 'many'"),
        (("splits", "test", "aiq"), float("nan"), "report.splits.test.aiq is nan"),
        (("splits", "test", "accuracy"), True, "report.splits.test.accuracy is True"),
        (("model", "name"), 7, "report.model.name is 7"),
        (("splits", "test", "layers"), {"a": 1}, "not an auditor.report/v1 report"),
    ],
)
def test_render_refuses_fields_of_the_wrong_type(both: dict, tmp_path: Path, capsys, path, value, fragment) -> None:
    report = copy.deepcopy(both)
    target = report
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    source = tmp_path / "typed.json"
    source.write_text(json.dumps(report))
    cli_refused(capsys, main(["render", str(source), "--html", str(tmp_path / "x.html")]), fragment)


def test_render_refuses_missing_files_and_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_refused(capsys, main(["render", str(tmp_path / "none.json"), "--html", "x.html"]), "does not exist")
    cli_refused(capsys, main(["render", str(tmp_path), "--html", "x.html"]), "is not a file")


def test_unwritable_html_is_one_line(both: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "r.json"
    source.write_text(json.dumps(both))
    cli_refused(capsys, main(["render", str(source), "--html", str(tmp_path / "no" / "p.html")]), "p.html")


# --- In a real browser ----------------------------------------------------------------------------


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` with a throwaway profile and every host unresolvable."""
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp)


def color_pixels(image: Image.Image, color: str, tolerance: int = 12) -> int:
    target = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    return int((np.abs(pixels - target).max(axis=2) <= tolerance).sum())


def assert_draws(page_file: Path, tmp: Path, figures: int) -> None:
    """Chromium lays the page out with every figure as SVG, and its screenshot shows them in colour."""
    dom = chromium(page_file, tmp, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<svg\b", dom.stdout)) == figures
    assert len(re.findall(r"<path\b", dom.stdout)) >= 20 * figures
    assert dom.stdout.count("<table>") >= 4
    shot = tmp / "shot.png"
    done = chromium(page_file, tmp, f"--screenshot={shot}", "--window-size=1200,6000")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 6000)
        gray = np.asarray(image.convert("L"))
        assert (gray < 250).mean() > 0.03, "the screenshot is blank"
        for split, color in SPLIT_COLORS.items():
            assert color_pixels(image, color) > 2000, f"no {split} colour drawn"


@pytest.mark.slow
@needs_chromium
def test_page_draws_in_headless_chromium(full_page: str, tmp_path: Path) -> None:
    page_file = tmp_path / "page.html"
    page_file.write_text(full_page)
    assert_draws(page_file, tmp_path, figures=6)


@pytest.mark.slow
@needs_chromium
def test_old_report_draws_in_headless_chromium(both: dict, tmp_path: Path) -> None:
    page_file = tmp_path / "old.html"
    page_file.write_text(page_of(without_page_keys(both)))
    assert_draws(page_file, tmp_path, figures=3)


@pytest.mark.slow
@needs_chromium
def test_example_audit_page_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's acceptance: the bundled example on all of MNIST, ``--split both --html``."""
    page_file = tmp_path / "lenet.html"
    argv = ["audit", str(EXAMPLE), "--data", "mnist", "--split", "both", "--device", "cpu", "--html", str(page_file)]
    assert main(argv) == 0
    capsys.readouterr()
    page = page_file.read_text()
    assert network_references(page) == [] and "<script" not in page
    assert len(svgs(page)) == 6 and page.count("<table>") >= 8
    for key in ("top_probabilities", "cna_margin.curves", "cna_points"):  # the engine wrote every figure's data
        assert f"<code>{key}</code>" not in page
    assert_draws(page_file, tmp_path, figures=6)


@pytest.mark.slow
def test_hostile_names_in_many_splits_render_literally_without_a_warning_or_a_crash(
    both: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every hostile name at once, as a split name (drawn in the figures' legends), the model's
    name and a layer's name: one page with 21 splits, which also crowds the legends."""
    names = [*HOSTILE_NAMES, "lone\ud800surrogate", "$\\frac{a}{b}$ " * 20]
    report = copy.deepcopy(both)
    report["model"]["name"] = "".join(names)
    report["splits"] = {name: copy.deepcopy(both["splits"]["test"]) for name in names}
    for name, figures in report["splits"].items():
        figures["layers"][0]["name"] = name
    source = tmp_path / "report.json"
    source.write_text(json.dumps(report))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning (layout, missing glyph) may reach the user
        page_of(report)
    assert main(["render", str(source), "--html", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr() == ("", "")
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert "<script" not in page and network_references(page) == []
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069\ud800-\udfff]", page)
    assert "\\x1b[31mALERT" in page and "$\\frac{}$" in page
