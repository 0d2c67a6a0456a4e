"""The README's error table lists every status and error type the service can answer."""

from __future__ import annotations

import re
from pathlib import Path

from service.errors import ERROR_STATUS

README = Path(__file__).resolve().parents[2] / "README.md"


def error_table() -> list[tuple[str, str]]:
    text = README.read_text()
    table = text[text.index("| status | type | when |") :].split("\n\n")[0]
    return [(row.split("|")[1].strip(), row.split("|")[2].strip()) for row in table.splitlines()[2:]]


def test_every_error_type_and_status_is_in_the_readme_table():
    rows = error_table()
    statuses = {int(s) for status, _ in rows for s in re.findall(r"\d{3}", status)}
    types = {t for _, kinds in rows for t in re.findall(r"`(\w+)`", kinds)}
    assert set(ERROR_STATUS.values()) | {499} <= statuses
    assert set(ERROR_STATUS) <= types


def test_the_readme_says_what_a_fully_masked_row_returns():
    text = " ".join(README.read_text().split())
    assert "its output row is exactly the output projection's bias (`proj.bias`)" in text
