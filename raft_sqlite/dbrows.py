"""Typed rows of SQLite queries (apsw types a row as a tuple of any SQLite value).

Used where a row's columns are compared and reported rather than trusted: validation (recovery, verify,
the record scanner) and the few scalar reads elsewhere.
"""

from __future__ import annotations

from typing import Any

import apsw

#: A row read from a store (e.g. one being validated). Any column may hold any SQLite type (damage is what the
#: checks look for): they compare the values and report what does not fit, so the values are ``Any``.
DbRow = tuple[Any, ...]


def db_rows(cursor: apsw.Cursor) -> list[DbRow]:
    """Every row of ``cursor`` (see :data:`DbRow`)."""
    return cursor.fetchall()


def db_row(cursor: apsw.Cursor) -> DbRow | None:
    """The first row of ``cursor`` (see :data:`DbRow`), or None."""
    row: DbRow | None = cursor.fetchone()
    return row


def db_scalar(cursor: apsw.Cursor) -> Any:
    """The single value of an aggregate query or a PRAGMA read (which always yields one row)."""
    row = db_row(cursor)
    assert row is not None  # an aggregate without GROUP BY always yields one row
    return row[0]
