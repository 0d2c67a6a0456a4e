"""The wire contract's page (docs/wire-contract.md, moved there from the README) says what the service answers.

Its error table is generated from service/errors.py when the site is built; tests/unit/test_docs.py checks that
the built page lists every error type with its status.
"""

from __future__ import annotations

from pathlib import Path

WIRE_CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "wire-contract.md"


def test_the_wire_contract_says_what_a_fully_masked_row_returns():
    text = " ".join(WIRE_CONTRACT.read_text().split())
    assert "its output row is exactly the output projection's bias (`proj.bias`)" in text


def test_the_wire_contract_takes_its_error_table_from_the_code():
    text = WIRE_CONTRACT.read_text()
    assert "<!-- mha:errors -->" in text.splitlines()
    assert "**499** (no body)" in text  # a status with no error type, so only the prose can name it
