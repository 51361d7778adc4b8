"""Typed rows of SQLite queries (apsw types a row as a tuple of any SQLite value), and the authorizer of
the connections that may only read them.

Used where a row's columns are compared and reported rather than trusted: validation (recovery, verify,
the record scanner) and the few scalar reads elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
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


#: Authorizer actions that only read (SQLite's action codes: the same numbers in apsw and ``sqlite3``).
READ_ONLY_OPS = frozenset({apsw.SQLITE_READ, apsw.SQLITE_SELECT, apsw.SQLITE_FUNCTION, apsw.SQLITE_RECURSIVE,
                           apsw.SQLITE_TRANSACTION, apsw.SQLITE_SAVEPOINT})
#: Pragmas that only read even when given an argument (``PRAGMA table_info(t)``).
READ_PRAGMAS = frozenset({"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
                          "foreign_key_list", "function_list", "pragma_list", "collation_list", "database_list",
                          "compile_options", "module_list"})

#: An SQLite authorizer: ``(action, arg1, arg2, database, trigger) -> SQLITE_OK | SQLITE_DENY``.
Authorizer = Callable[[int, str | None, str | None, str | None, str | None], int]


def read_only_authorizer(read_pragmas: Collection[str] = READ_PRAGMAS) -> Authorizer:
    """An SQLite authorizer (for apsw's ``Connection.authorizer`` or ``sqlite3``'s ``set_authorizer``) that
    allows reading, functions, recursive CTEs and read transactions, reading a PRAGMA (one without an
    argument, or one of ``read_pragmas``), and denies everything else before the statement runs
    (INSERT/UPDATE/DELETE, DDL, ATTACH, setting a PRAGMA)."""
    pragmas = frozenset(read_pragmas)

    def authorize(op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None) -> int:
        if op in READ_ONLY_OPS:
            return apsw.SQLITE_OK
        if op == apsw.SQLITE_PRAGMA and (p2 is None or (p1 or "").lower() in pragmas):
            return apsw.SQLITE_OK  # reading a pragma; setting one is refused
        return apsw.SQLITE_DENY

    return authorize
