"""Tables a visitor downloads: CSV that a spreadsheet opens as plain text, never as formulas."""

from __future__ import annotations

from typing import Any

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formula(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with a single quote.

    Cells beginning with =, +, -, @, a tab or a carriage return are the CSV-injection risk; other
    values (numbers included) are returned unchanged.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of the table with every text cell (and column name) passed through `neutralise_formula`."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(neutralise_formula)
    out.columns = [neutralise_formula(str(c)) for c in out.columns]
    return out


def safe_csv_bytes(frame: pd.DataFrame) -> bytes:
    """The table as UTF-8 CSV with formula-like cells neutralised."""
    return safe_frame(frame).to_csv(index=False).encode("utf-8")
