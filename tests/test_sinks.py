"""auditor.sinks: hostile names made safe for a terminal, an XML parser and a matplotlib figure."""

from __future__ import annotations

import io
import unicodedata
import warnings
import xml.etree.ElementTree as ET

import pytest
from models import HOSTILE_NAMES

from auditor.sinks import FIGURE_TEXT_MAX, for_figure, for_terminal, for_xml, lines_for_terminal, shape_text

# Besides the names a model file can hold, what JSON can smuggle in (a lone surrogate) and
# characters that are safe and must stay as they are.
HOSTILE = [*HOSTILE_NAMES, "lone\ud800surrogate\udfff", "\x00" * 50, "\x1b" * 3 + "[", "\u0085\u00ad\u061c"]
SAFE = ["conv1/Relu:0", "层_1", "Ünïcødé layer", "emoji 🙂 layer", "tab-free name", "a\\b", "x" * 39]
UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _unsafe(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in UNSAFE]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_name_on_a_terminal_is_one_printable_line_that_still_shows_what_was_there(name: str) -> None:
    shown = for_terminal(name)
    assert _unsafe(shown) == [] and "\n" not in shown
    assert for_terminal(shown) == shown  # escaping twice changes nothing
    shown.encode("utf-8")  # no lone surrogate left to break the output stream
    if "\x1b" in name:
        assert "\\x1b" in shown


@pytest.mark.parametrize("name", SAFE)
def test_safe_names_are_left_as_they_are(name: str) -> None:
    assert for_terminal(name) == for_xml(name) == name


def test_our_own_line_breaks_stay_while_each_line_is_escaped() -> None:
    assert lines_for_terminal("a\x1b[2J\nb\u202e") == "a\\x1b[2J\nb\\u202e"


@pytest.mark.parametrize("name", HOSTILE)
def test_a_name_in_xml_parses_back_as_its_escaped_self(name: str) -> None:
    element = ET.Element("testcase", name=for_xml(name))
    element.text = for_xml(name)
    text = ET.tostring(element, encoding="unicode")
    parsed = ET.fromstring(text.encode("utf-8"))  # expat rejects any character XML forbids
    assert parsed.get("name") == for_xml(name) and parsed.text == for_xml(name)
    assert _unsafe(for_xml(name)) == []
    assert _unsafe(for_xml(name, multiline=True).replace("\n", "")) == []


@pytest.mark.parametrize("name", [*HOSTILE, *SAFE])
def test_a_name_in_a_figure_is_drawn_literally_and_short(name: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = for_figure(name)
    assert len(shown) <= FIGURE_TEXT_MAX and _unsafe(shown) == []
    if len(for_terminal(name)) > FIGURE_TEXT_MAX:
        assert "…" in shown
    figure = Figure(figsize=(3, 2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar([1], [1], label=shown)
    axes.legend().get_texts()[0].set_parse_math(False)
    axes.set_title(shown, parse_math=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Glyph .* missing from font")  # the page silences these itself
        figure.savefig(io.StringIO(), format="svg")  # mathtext would raise on several of these


@pytest.mark.parametrize(
    ("shape", "text"),
    [
        ((), "a scalar (no dimensions)"),
        (("N", 1, 28, 28), "N×1×28×28"),
        ((None, 3, "height", "width"), "?×3×height×width"),
        ((0, -1, "", None), "?×?×?×?"),
        (("\x1b[2J", 4), "\\x1b[2J×4"),
        (("$\\frac{}$",), "$\\frac{}$"),
        (("n" * 100, 2), "n" * 11 + "…" + "n" * 12 + "×2"),
        ((True, 2), "?×2"),  # a bool is no size
    ],
)
def test_a_shape_reads_with_its_symbolic_dimensions_named_and_never_empty(shape: tuple, text: str) -> None:
    assert shape_text(shape) == text
