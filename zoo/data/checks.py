"""Validation of a DataModule's numeric options, shared by every DataModule's ``__init__``."""

from __future__ import annotations

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
