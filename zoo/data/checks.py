"""Checks shared by the DataModules: their numeric options, and the numbers read from their files."""

from __future__ import annotations

import math

from .download import DataError


def check_counts(
    owner: str, positive: dict[str, int | None], non_negative: dict[str, int | None] | None = None
) -> None:
    """Raise `DataError` naming ``owner`` and every option of ``positive`` (``non_negative``) that is not an integer
    >= 1 (>= 0); ``None`` means "unset" and passes."""
    bad = [
        f"{name} must be an integer >= {low}, got {value!r}"
        for options, low in ((positive, 1), (non_negative or {}, 0))
        for name, value in options.items()
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low)
    ]
    if bad:
        raise DataError(f"{owner}: {'; '.join(bad)}")


def parse_number(token: str, where: str) -> float:
    """``token`` (stripped, not a missing-value token) as a float; `DataError` at ``where`` (file, line, column) if it
    is not a plain number (float() also reads ``1_000`` and non-ASCII digits) or is infinite (``inf``, overflow).

    A NaN spelled in a way the caller's missing-value tokens do not list (``-nan``) stays NaN: a missing value.
    """
    try:
        if not token.isascii() or "_" in token:
            raise ValueError(token)
        value = float(token)
    except ValueError:
        raise DataError(f"{where}: {token!r} is not a number") from None
    if math.isinf(value):
        raise DataError(f"{where}: {token!r} is not a finite number (inf, or too large for float64)")
    return value
