"""The command lines' shared parsing: memory sizes read and refused in one line."""

from __future__ import annotations

import pytest

from auditor.config import DEFAULT_MEMORY_BUDGET, MAX_MEMORY_BUDGET, MIN_MEMORY_BUDGET
from auditor.errors import AuditError
from auditor.usage import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 << 20),
        ("4G", 4 << 30),
        ("1.5G", 3 << 29),
        ("64MiB", 64 << 20),
        ("2gb", 2 << 30),
        (" 1G ", 1 << 30),
        (str(100 << 20), 100 << 20),
        ("65536K", 64 << 20),
    ],
)
def test_parse_size_reads_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1M", "0", "63M", "-1G", "", "G", "abc", "1.2.3G", "1e9", "4X", "2P", "1 G B"])
def test_parse_size_refuses_with_one_line(text: str) -> None:
    with pytest.raises(AuditError) as caught:
        parse_size(text)
    assert "memory budget" in caught.value.message and "\n" not in caught.value.message


@pytest.mark.parametrize("size", [DEFAULT_MEMORY_BUDGET, MIN_MEMORY_BUDGET, MAX_MEMORY_BUDGET, 3 << 29, 100 << 20])
def test_format_size_reads_back_as_the_same_size(size: int) -> None:
    assert parse_size(format_size(size)) == size
    assert format_size(DEFAULT_MEMORY_BUDGET) == "1G"
