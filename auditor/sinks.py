"""Text from outside made safe for each place it is shown: a terminal, XML, HTML, a figure.

Tensor, graph and split names, doc strings and the model's name come from files a stranger may
have written. Shown raw, an ESC sequence rewrites the user's terminal (or its title, or the
clipboard), a bidi override makes a name read backwards, a NUL or a lone surrogate makes a JUnit
file that XML parsers reject, and ``$...$`` sends a figure's text through matplotlib's mathtext
parser, which raises on bad input. Each sink has one function here, and every place that shows
such a string calls the one for its sink.

An unsafe character is written as its Python escape (``\\x1b``, ``\\u202e``, ``\\ud800``), so
the reader still sees that it was there and which it was; the result is printable and contains
no unsafe character, so escaping twice changes nothing.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Callable, Sequence

FIGURE_TEXT_MAX = 40  # characters of one name drawn in a figure; longer ones are cut in the middle

# Control characters, format characters (bidi overrides and isolates, zero-width ones), lone
# surrogates, and the line and paragraph separators that some terminals honour.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escaped(text: str, unsafe: Callable[[str], bool]) -> str:
    return "".join(c.encode("unicode_escape").decode("ascii") if unsafe(c) else c for c in text)


def _unsafe_on_a_terminal(c: str) -> bool:
    return unicodedata.category(c) in _UNSAFE_CATEGORIES


def for_terminal(text: str) -> str:
    """``text`` with every control, format and separator character escaped, newlines and tabs
    included: one printable line that cannot move the cursor or change the terminal's state."""
    return _escaped(str(text), _unsafe_on_a_terminal)


def lines_for_terminal(text: str) -> str:
    """Multi-line output made of our own lines: each line escaped with ``for_terminal``, the line
    breaks between them kept."""
    return "\n".join(for_terminal(line) for line in str(text).split("\n"))


def _xml_legal(c: str) -> bool:
    """XML 1.0's ``Char`` production: what may appear in a document at all, even as a reference."""
    o = ord(c)
    return o in (0x9, 0xA, 0xD) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or 0x10000 <= o <= 0x10FFFF


def for_xml(text: str, *, multiline: bool = False) -> str:
    """``text`` holding only XML-legal characters, fit for an attribute or element text (the XML
    writer still escapes ``&``, ``<``, ``>`` and quotes). Every control, format or separator
    character, and every character XML forbids, is escaped, so a name stays one line; with
    ``multiline`` the line breaks of our own text (a JUnit ``system-out``) stay."""
    kept = "\n" if multiline else ""
    return _escaped(str(text), lambda c: c not in kept and (_unsafe_on_a_terminal(c) or not _xml_legal(c)))


def for_html(text: object) -> str:
    """``text`` as HTML element text or a quoted attribute value: markup escaped (``html.escape``),
    and the characters ``for_xml`` escapes shown as escapes (a lone surrogate could not even be
    written to the file)."""
    return html.escape(for_xml(str(text), multiline=True))


def for_figure(text: str, limit: int = FIGURE_TEXT_MAX) -> str:
    """One name as a figure shows it: escaped as on a terminal and, past ``limit`` characters, cut
    in the middle with an ellipsis. Draw it with mathtext off (``text.parse_math``), so ``$`` is a
    dollar sign and not the start of a formula."""
    text = for_terminal(text)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def shape_text(shape: Sequence[int | str | None]) -> str:
    """A tensor shape as a message shows it: ``1×28×28``; symbolic dimensions by their name
    (``N×3×height×width``, escaped for a terminal: the model wrote them), unknown ones as ``?``,
    and no dimensions at all as ``a scalar (no dimensions)``, never an empty string."""
    if not shape:
        return "a scalar (no dimensions)"
    return "×".join(_dim_text(d) for d in shape)


def _dim_text(d: int | str | None) -> str:
    if isinstance(d, int) and not isinstance(d, bool) and d > 0:
        return str(d)
    return for_figure(d, 24) if isinstance(d, str) and d else "?"
