"""Argument checks shared by every public call: integers against the ranges the storage can hold
(:mod:`raft_sqlite.layout`), finite floats. Wrong types raise ``TypeError``, values out of range
``ValueError``; both before anything is queued or written."""

from __future__ import annotations

import math

from . import layout


def int_arg(name: str, v: object, lo: int | None = 0, hi: int | None = layout.MAX_INT64) -> int:
    """``v`` as an ``int`` (bool refused; int subclasses normalised) checked to lie in ``lo..hi``
    (a bound of None is open). Raises TypeError for a non-int, ValueError out of range; the message
    names the argument and the range."""
    if type(v) is not int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in {'-inf' if lo is None else lo}..{'inf' if hi is None else hi}, "
                         f"got {v}")
    return v


def index_arg(name: str, v: object, lo: int = 0) -> int:
    """A log/snapshot/commit index: an int in ``lo..layout.MAX_INDEX``."""
    return int_arg(name, v, lo, layout.MAX_INDEX)


def term_arg(name: str, v: object) -> int:
    """A term: an int in ``0..layout.MAX_TERM``."""
    return int_arg(name, v, 0, layout.MAX_TERM)


def float_arg(name: str, v: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``v`` (an int or float, not bool) as a finite float in ``lo..hi`` (``lo`` excluded with
    ``lo_open``). TypeError for another type, ValueError for nan/inf or out of range."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{name} is out of range: {v}") from None
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return f


def text_arg(name: str, v: str) -> str:
    """``v`` (a str) if it can be stored as SQLite TEXT: UTF-8 encodable, i.e. no lone surrogates.
    ValueError otherwise (the message names the argument)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} {v!r} is not valid text (it cannot be encoded as UTF-8)") from None
    return v
