"""The ``raft-sqlite`` command line: inspect, verify and operate a node's ``data_dir``.

Read commands (``status``, ``sql``, ``log``, ``verify``, ``snapshot``, ``metrics``) open the database
files read-only (``SQLITE_OPEN_READONLY`` + ``PRAGMA query_only``): they never write, never take the
node's identity and are safe while the node runs in another process. Write commands (``compact``, ``remove-group``,
``restore``) refuse to run while a store holds the data_dir lock (:mod:`raft_sqlite.lock`), naming the
holder; ``backup`` then takes a live, read-only backup beside the running node (``backup.LiveSource``).
Every read command takes ``--json``.

Exit codes (see :data:`EXIT_CODES`): 0 success; 1 problems found (``verify`` found corruption, ``demo``
lost an acknowledged entry); 2 usage error; 3 data_dir (or group, backup) not found; 4 the store is
corrupt or unreadable; 5 refused (a write statement in ``sql``, compaction not covered by a snapshot,
the node is running); 6 an optional component is missing (prometheus_client, backup support, datasette).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType, TracebackType
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar, cast
from urllib.parse import quote

import apsw
import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from . import fsio, layout
from .dbrows import READ_PRAGMAS, db_scalar, read_only_authorizer
from .demo import DEMO_CLUSTER, DEMO_NODE, DemoError, demo_payload, run_demo, run_demo_node  # noqa: F401  re-exported: defined here before demo.py
from .entry import EntryKind, LogEntry
from .errors import (
    BackupError,
    CompactionError,
    CorruptionError,
    DataDirLocked,
    GroupNotFoundError,
    NodeIdentityMismatch,
    OutputRefused,
    RaftSqliteError,
    RecoveryRefused,
    SnapshotError,
    StorageFault,
)
from .fsync import FSYNC_MODES, FsyncMode
from .lock import Holder, holder
from .maintenance import file_space
from .migrate import current_revision
from .objectstore import Remote, is_url
from .recovery import RecoveryPolicy
from .snapshot import SnapshotKind, SnapshotMeta
from .snapview import SnapshotNotFoundError, SnapshotView
from .sqlstate import RESERVED_TABLES, state_file
from .status import GroupStatus, read_group_status, read_last_index
from .store import NodeStore, node_crc
from .verify import NotAStoreError, open_readonly
from .verify import verify as run_verify
from .wal import INT, SPAN, crc_matches, record_crc

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID  # imported where used: start-up speed (see _BackupProgress)

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_REFUSED, EXIT_UNAVAILABLE = range(7)
#: exit code -> meaning (printed by ``raft-sqlite --help`` and documented in docs/operations.md).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_PROBLEMS: "problems found (verify, snapshot verify: corruption; demo: an acknowledged entry was lost)",
    EXIT_USAGE: "usage error (bad option or argument, SQL syntax error, bad dot-command)",
    EXIT_NOT_FOUND: "data_dir, group or backup not found",
    EXIT_CORRUPT: "the store is corrupt or unreadable",
    EXIT_REFUSED: "refused (write statement in sql, compaction not covered by a snapshot, node running, not "
                  "confirmed, not enough disk space)",
    EXIT_UNAVAILABLE: "an optional component is missing (prometheus_client, backup support, datasette)",
}



class TrimmedLines:
    """What rich writes to a pipe, through this stream: each line without the trailing spaces rich pads
    tables and lines with (scripts, ``diff`` and docs see clean lines). Writes go to ``sys.<name>`` as it
    is at write time (click's test runner swaps it), or to a file (``sql``'s ``.output FILE``)."""

    def __init__(self, name: str | IO[str]):
        self.target = name
        self._tail = ""

    @property
    def stream(self) -> IO[str]:
        """``sys.<name>`` now, or the file given."""
        return cast(IO[str], getattr(sys, self.target)) if isinstance(self.target, str) else self.target

    def write(self, s: str) -> int:
        """Pass on every complete line of ``s`` without its trailing spaces; keep a partial last line."""
        *lines, self._tail = (self._tail + s).split("\n")
        if lines:
            self.stream.write("".join(ln.rstrip(" ") + "\n" for ln in lines))
        return len(s)

    def flush(self) -> None:
        """Write the kept partial line as it is, then flush the stream."""
        if self._tail:  # a line printed without its newline (end=""): kept as printed
            self.stream.write(self._tail)
            self._tail = ""
        self.stream.flush()

    def isatty(self) -> bool:
        """Never a terminal (rich then prints no colours or cursor moves)."""
        return False

    @property
    def encoding(self) -> str:
        """The stream's encoding (utf-8 when it has none)."""
        return getattr(self.stream, "encoding", None) or "utf-8"

    def fileno(self) -> int:
        """The stream's file descriptor."""
        return self.stream.fileno()


def _console(name: str) -> Console:
    """rich's console for ``sys.stdout``/``sys.stderr``. On a terminal, rich's defaults. Piped (scripts,
    tests, docs): tables as wide as ``COLUMNS`` (default 200) instead of 80, text never wrapped
    (``soft_wrap``: a message or a path stays on one line for grep), no trailing spaces (:class:`TrimmedLines`)."""
    if getattr(sys, name).isatty():
        return Console(stderr=name == "stderr", highlight=False)
    return Console(file=cast(IO[str], TrimmedLines(name)), highlight=False, soft_wrap=True,
                   width=int(os.environ.get("COLUMNS", "200")))


out = _console("stdout")
err = _console("stderr")
KIND_NAMES = {0: "NORMAL", 1: "CONFIG", 2: "NOOP"}


class CliError(click.ClickException):
    """An expected failure: printed as one line on stderr, no traceback, exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        # click declares exit_code a ClassVar, yet BaseCommand.main() reads it from the instance: one
        # class carries every documented code
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        err.print(f"[bold red]error:[/] {_esc(self.message)}")


def _esc(s: str) -> str:
    return escape(s)


P = ParamSpec("P")
R = TypeVar("R")


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn expected exceptions of a command into :class:`CliError` with the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*a: P.args, **kw: P.kwargs) -> R:
        try:
            return fn(*a, **kw)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except NotAStoreError as exc:
            raise CliError(str(exc), EXIT_NOT_FOUND) from None
        except DataDirLocked as exc:
            raise CliError(f"refused: {exc}", EXIT_REFUSED) from None
        except (CorruptionError, apsw.CorruptError, apsw.NotADBError) as exc:
            raise CliError(f"the store is corrupt or unreadable: {exc} (run `raft-sqlite verify` for details)",
                           EXIT_CORRUPT) from None
        except (CompactionError, RecoveryRefused, NodeIdentityMismatch, BackupError) as exc:
            raise CliError(f"refused: {exc}", EXIT_REFUSED) from None
        except (StorageFault, apsw.Error) as exc:
            raise CliError(f"storage error: {type(exc).__name__}: {exc}", EXIT_CORRUPT) from None
        except RaftSqliteError as exc:
            raise CliError(str(exc), EXIT_REFUSED) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)

    return wrapper


def _dump_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o).hex()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        return dataclasses.asdict(o)
    if hasattr(o, "_asdict"):
        return o._asdict()
    return str(o)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------- helpers
def store_holder(data_dir: str) -> Holder | None:
    """Who holds ``data_dir``'s lock (a running store: pid, host, since, node_id), or None if no store
    has it open. A probe through :func:`raft_sqlite.lock.holder`: it takes nothing and writes nothing."""
    return holder(data_dir)


def _check_dir(data_dir: str) -> str:
    data_dir = os.fspath(data_dir)
    if not os.path.exists(data_dir):
        raise CliError(f"data_dir {data_dir!r} does not exist", EXIT_NOT_FOUND)
    if not os.path.isdir(data_dir):
        raise CliError(f"data_dir {data_dir!r} is not a directory", EXIT_NOT_FOUND)
    if not os.path.isfile(os.path.join(data_dir, layout.MAIN_DB)):
        raise CliError(f"{data_dir!r} is not a raft_sqlite data_dir (no {layout.MAIN_DB} in it)", EXIT_NOT_FOUND)
    return data_dir


def _open_readonly_cli(path: str, damaged: str) -> apsw.Connection:
    """:func:`open_readonly` of ``path``, its expected failures as :class:`CliError`: not a SQLite database
    (exit 4; ``damaged`` says what to do), cannot be opened (exit 3)."""
    try:
        return open_readonly(path)
    except (apsw.NotADBError, apsw.CorruptError) as exc:
        raise CliError(f"{path} is not readable as a SQLite database ({exc}); {damaged}", EXIT_CORRUPT) from None
    except apsw.CantOpenError as exc:
        raise CliError(f"cannot open {path}: {exc} (permissions?)", EXIT_NOT_FOUND) from None


def open_main_readonly(data_dir: str) -> apsw.Connection:
    """Read-only connection on ``data_dir/raft.db`` after checking it is a raft_sqlite store; expected
    failures become :class:`CliError` (not found: exit 3; unreadable or not a store: exit 4)."""
    data_dir = _check_dir(data_dir)
    path = os.path.join(data_dir, layout.MAIN_DB)
    conn = _open_readonly_cli(path, "the store is corrupt: run `raft-sqlite verify` and restore from a backup")
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except apsw.Error as exc:
        conn.close()
        raise CliError(f"{path} is not readable ({type(exc).__name__}: {exc}); run `raft-sqlite verify`",
                       EXIT_CORRUPT) from None
    if not {"node", "groups", "log_entries"} <= names:
        conn.close()
        raise CliError(f"{path} is not a raft_sqlite database (tables node/groups/log_entries missing)",
                       EXIT_CORRUPT)
    return conn


def _node_record(conn: apsw.Connection, path: str) -> dict[str, Any]:
    row = conn.execute("SELECT node_id, cluster_id, format_version, created_at, crc32 FROM node").fetchone()
    if row is None:
        raise CliError(f"{path}: the node record is missing (store never finished its first open?)", EXIT_CORRUPT)
    nid, cid, fmt, created, crc = row
    if node_crc(nid, cid, fmt, created) != crc:
        raise CliError(f"{path}: the node record fails its CRC check; the store is corrupt "
                       "(run `raft-sqlite verify`)", EXIT_CORRUPT)
    return {"node_id": nid, "cluster_id": cid, "format_version": fmt, "created_at": created}


def _groups(conn: apsw.Connection) -> dict[str, int]:
    return {name: gid for gid, name in conn.execute("SELECT group_id, name FROM groups ORDER BY group_id")}


def _pick_group(conn: apsw.Connection, group: str | None) -> tuple[str, int]:
    groups = _groups(conn)
    if group is None:
        if len(groups) == 1:
            return next(iter(groups.items()))
        if not groups:
            raise CliError("the store holds no groups yet", EXIT_NOT_FOUND)
        raise click.UsageError(f"the store holds several groups; pick one with --group ({', '.join(groups)})")
    if group not in groups:
        raise CliError(f"no group {group!r} in this store (groups: {', '.join(groups) or 'none'})", EXIT_NOT_FOUND)
    return group, groups[group]


# ---------------------------------------------------------------------------------------------- status
def collect_status(data_dir: str) -> dict[str, Any]:
    """Everything ``raft-sqlite status`` shows, as a JSON-able dict, read through a read-only
    connection in one read transaction (a consistent view even while the node writes)."""
    data_dir = _check_dir(data_dir)
    who = store_holder(data_dir)
    path = os.path.join(data_dir, layout.MAIN_DB)
    conn = open_main_readonly(data_dir)
    try:
        conn.execute("BEGIN")
        now = time.time()
        node = _node_record(conn, path)
        space = {layout.MAIN_DB: _space(conn)}
        settings = dict(conn.execute("SELECT key, value FROM settings"))
        mode = settings.get("fsync_mode")
        st = {
            "data_dir": os.path.abspath(data_dir),
            "node": node,
            "in_use_by_pid": None if who is None else who.pid,
            "in_use_by": None if who is None else dataclasses.asdict(who),
            "schema_revision": current_revision(conn),
            "fsync_mode": mode,
            "fsync_guarantee": FSYNC_MODES[FsyncMode(mode)]["guarantee"] if mode in FsyncMode.__members__ else None,
            "fsync_interval": float(settings["fsync_interval"]) if "fsync_interval" in settings else None,
            "recovery_policy": settings.get("recovery_policy"),
            "pragmas": {k[7:]: v for k, v in settings.items() if k.startswith("pragma.")},
            "files": {n: os.path.getsize(os.path.join(data_dir, n)) for n in sorted(os.listdir(data_dir))
                      if os.path.isfile(os.path.join(data_dir, n))},
            "groups": [_group_status(conn, g, now) for g in read_group_status(conn)],
            "space": space,
        }
        # the last backup recorded (by row id: the wall clock may have been set back since)
        b = conn.execute("SELECT path, created_at, size, duration FROM backups ORDER BY backup_id DESC "
                         "LIMIT 1").fetchone()
        st["last_backup"] = None if b is None else {"path": b[0], "created_at": b[1], "age_s": max(0.0, now - b[1]),
                                                    "size": b[2], "duration_s": b[3]}
        count = conn.execute("SELECT count(*) FROM backups").fetchone()
        assert count is not None  # count(*) yields one row even over no rows
        st["backups"] = count[0]
        e = conn.execute("SELECT event_id, at, kind, policy, outcome, duration, details FROM recovery_events "
                         "ORDER BY event_id DESC LIMIT 1").fetchone()
        st["last_recovery"] = None if e is None else _event(e, now)
        conn.execute("COMMIT")
    finally:
        conn.close()
    chunks = os.path.join(data_dir, layout.CHUNKS_DB)
    if os.path.isfile(chunks):
        with contextlib.suppress(apsw.Error), contextlib.closing(open_readonly(chunks)) as cc:
            space[layout.CHUNKS_DB] = _space(cc)
    _add_applied(data_dir, cast(list[dict[str, Any]], st["groups"]))
    return st


def _add_applied(data_dir: str, groups: list[dict[str, Any]]) -> None:
    """Set each group's ``applied``: the applied index of its state database (``store.state``), None when it
    has none; ``state_error`` too when the file cannot be read."""
    applied = state_applied(data_dir, [g["group_id"] for g in groups])
    for g in groups:
        a = applied.get(g["group_id"])
        g["applied"] = a if isinstance(a, int) else None
        if isinstance(a, str):
            g["state_error"] = a


def _applied_cell(g: dict[str, Any]) -> str:
    return "?" if "state_error" in g else "" if g["applied"] is None else str(g["applied"])


def _space(conn: apsw.Connection) -> dict[str, int]:
    """Size and free (reusable, not yet given back: ``raft-sqlite vacuum``) bytes of ``conn``'s main file."""
    page_size, pages, free = file_space(conn)
    return {"size": page_size * pages, "free_bytes": page_size * free, "page_size": page_size}


def _event(e: tuple[Any, ...], now: float) -> dict[str, Any]:
    eid, at, kind, policy, outcome, duration, details = e
    d = {"event_id": eid, "at": at, "age_s": now - at, "kind": kind, "policy": policy, "outcome": outcome,
         "duration_s": duration}
    try:
        det = json.loads(details) if details else {}
    except ValueError:
        det = {"raw": details}
    if isinstance(det, dict):
        for k in ("groups", "entries_validated", "bytes_validated", "segments_validated", "snapshots_validated"):
            if k in det:
                d[k] = det[k]
        d["dropped"] = det.get("dropped", [])
        d["problems"] = det.get("problems", [])
    return d


def _group_status(conn: apsw.Connection, g: GroupStatus, now: float) -> dict[str, Any]:
    gid = g.group_id
    snaps = {r[0]: r for r in conn.execute(
        "SELECT snapshot_id, idx, term, kind, parent_id, status, size, finished_at FROM snapshots WHERE group_id=?",
        (gid,))}
    durable = [r for r in snaps.values() if r[5] == "DURABLE"]
    snap = None
    if durable:
        newest = max(durable, key=lambda r: (r[1], r[0]))
        deltas, cur, base_row = 0, newest, None
        for _ in range(len(snaps) + 1):
            if cur is None:
                break
            if cur[3] == "FULL":
                base_row = cur
                break
            deltas += 1
            cur = snaps.get(cur[4])
        snap = {"newest_id": newest[0], "newest_index": newest[1], "newest_term": newest[2], "kind": newest[3],
                "size": newest[6], "age_s": None if newest[7] is None else now - newest[7],
                "base_id": base_row[0] if base_row else None, "base_index": base_row[1] if base_row else None,
                "deltas": deltas, "chain_ok": base_row is not None, "durable_count": len(durable)}
    oldest = g.oldest_segment_created_at
    return {
        "name": g.name, "group_id": gid, "term": g.current_term, "voted_for": g.voted_for,
        "commit_index": g.commit_index, "first_index": g.first_index, "last_index": g.last_index,
        "entries": g.entries, "stored_entries": g.stored_entries, "stored_bytes": g.stored_bytes,
        "segments": {"count": g.segments, "sealed": g.sealed_segments,
                     "oldest_age_s": None if oldest is None else now - oldest},
        "snapshot_index": g.snapshot_index, "snapshot_term": g.snapshot_term, "snapshot": snap,
        "recovered_partially": g.recovered_partially,
    }


# ---------------------------------------------------------------------------------------------- CLI
@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExit codes:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items()))
@click.version_option(package_name="raft_sqlite", prog_name="raft-sqlite")
def cli() -> None:
    """Inspect, verify and operate the data_dir of a raft_sqlite node.

    Read commands never write and are safe while the node runs. Shell completion:
    eval "$(_RAFT_SQLITE_COMPLETE=bash_source raft-sqlite)".
    """


#: A non-negative integer SQLite can hold (signed 64 bits): a larger one is a usage error (exit 2), not an
#: OverflowError deep in a query.
U64 = click.IntRange(min=0, max=2**63 - 1)

DATA_DIR = click.argument("data_dir", type=click.Path(file_okay=False, path_type=str))
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")


@cli.command()
@DATA_DIR
@JSON_OPT
@friendly
def status(data_dir: str, as_json: bool) -> None:
    """Node and cluster ids, fsync mode, and per group: term, vote, commit, log bounds, entries and bytes,
    segments, snapshot chain, the applied index of its SQL state database (store.state; column `applied`, shown
    when a group has one), last backup and last recovery. Safe while the node runs."""
    st = collect_status(data_dir)
    if as_json:
        _dump_json(st)
        return
    n = st["node"]
    head = _Fields()
    head.add_row("data_dir", _esc(st["data_dir"]))  # table cells are rich markup: a '[' in a path is text
    head.add_row("node / cluster", f"{_esc(n['node_id'])} / {_esc(n['cluster_id'])}")
    head.add_row("format / schema", f"{n['format_version']} / {st['schema_revision']}")
    head.add_row("fsync mode", f"{st['fsync_mode']} ({st['fsync_guarantee']})" if st["fsync_guarantee"]
                 else str(st["fsync_mode"]))
    head.add_row("recovery policy", str(st["recovery_policy"]))
    head.add_row("open by", "no process (stopped)" if st["in_use_by"] is None
                 else Holder(**st["in_use_by"]).describe())
    files = st["files"]
    head.add_row("files", ", ".join(f"{k} {_size(v)}" for k, v in files.items()))
    head.add_row("free space", ", ".join(f"{k} {_size(v['free_bytes'])} of {_size(v['size'])}"
                                         for k, v in st["space"].items()) + " (reused as the log grows; "
                 "`raft-sqlite vacuum` gives it back)")
    lb = st["last_backup"]
    head.add_row("last backup", "never" if lb is None else f"{_age(lb['age_s'])} ago, {_size(lb['size'])}, "
                 f"took {lb['duration_s']:.2f} s -> {_esc(lb['path'])}")
    ev = st["last_recovery"]
    if ev is not None:
        head.add_row("last recovery", f"{ev['outcome']} ({ev['kind']}, policy {ev['policy']}) {_age(ev['age_s'])} ago "
                     f"in {ev['duration_s'] * 1000 if ev['duration_s'] is not None else 0:.1f} ms: "
                     f"{ev.get('entries_validated', '?')} entries validated, {len(ev.get('dropped', []))} dropped")
    head.print()
    t = Table(title="groups  (segs: count (sealed); snapshot: #base_id@index [+deltas -> newest index])",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    flags = any(g["recovered_partially"] for g in st["groups"])
    states = any(g["applied"] is not None or "state_error" in g for g in st["groups"])
    for col in ("group", "term", "vote", "commit", "log", "entries", "bytes", "segs", "oldest seg", "snapshot",
                "snap age") + (("applied",) if states else ()) + (("flags",) if flags else ()):
        t.add_column(col, no_wrap=True,
                     justify="left" if col in ("group", "vote", "log", "snapshot", "flags") else "right")
    for g in st["groups"]:
        s = g["snapshot"]
        chain = "-" if s is None else (f"#{s['base_id']}@{s['base_index']}" + (
            f" +{s['deltas']} -> {s['newest_index']}" if s["deltas"] else "") if s["chain_ok"] else "BROKEN")
        t.add_row(g["name"], str(g["term"]), "-" if g["voted_for"] is None else str(g["voted_for"]),
                  str(g["commit_index"]), f"{g['first_index']}..{g['last_index']}", str(g["entries"]),
                  _size(g["stored_bytes"]), f"{g['segments']['count']} ({g['segments']['sealed']})",
                  _age(g["segments"]["oldest_age_s"]), chain, _age(s["age_s"]) if s else "-",
                  *((_applied_cell(g),) if states else ()),
                  *(("recovered_partially" if g["recovered_partially"] else "",) if flags else ()))
    print_wide(t)


# ---------------------------------------------------------------------------------------------- sql
#: the `sql` command may also run the checks that only read
_authorizer = read_only_authorizer(READ_PRAGMAS | {"foreign_key_check", "integrity_check", "quick_check"})


#: statements SQLite does not call read-only (sqlite3_stmt_readonly) that only read here
_READ_ONLY_SQL = re.compile(r"\s*PRAGMA\s+(?:\w+\s*\.\s*)?journal_mode\s*;?\s*", re.IGNORECASE)


class SqlRefused(Exception):
    """Raised (by the connection's exec tracer) before a statement that could write runs in
    ``raft-sqlite sql``; the message names the statement."""


def _exec_guard(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
    # sqlite3_stmt_readonly() is False for every statement that could change a database file: writes,
    # DDL, VACUUM (also VACUUM INTO, which the authorizer never sees), ANALYZE, REINDEX, BEGIN
    # IMMEDIATE, and pragmas with side effects (wal_checkpoint, optimize, incremental_vacuum, ...).
    if cursor.is_readonly or _READ_ONLY_SQL.fullmatch(sql):
        return True
    raise SqlRefused(f"statement {sql.strip()[:200]!r} could write or checkpoint")


def open_sql_connection(data_dir: str, *, attach_chunks: bool = True) -> apsw.Connection:
    """The connection ``raft-sqlite sql`` uses: read-only on ``raft.db`` (``chunks.db`` attached read-only
    as schema ``chunks``), ``query_only``, an authorizer that denies every statement that could
    write or attach (INSERT/UPDATE/DELETE, DDL, ATTACH, setting a PRAGMA), and an exec tracer that
    refuses, before it runs, every statement SQLite does not report as read-only (VACUUM [INTO],
    PRAGMA wal_checkpoint/optimize, ANALYZE, ...): :class:`SqlRefused`."""
    conn = open_main_readonly(data_dir)
    chunks = os.path.join(data_dir, layout.CHUNKS_DB)
    if attach_chunks and os.path.isfile(chunks):
        try:
            conn.execute("ATTACH ? AS chunks", (f"file:{quote(os.path.abspath(chunks))}?mode=ro",))
        except apsw.Error as exc:
            err.print(f"warning: {layout.CHUNKS_DB} not attached ({_esc(str(exc))})")
    conn.authorizer = _authorizer
    conn.exec_trace = _exec_guard
    return conn


# ---------------------------------------------------------------------------------------------- state databases
def state_path(data_dir: str, group: str) -> tuple[int, str]:
    """The group id and the state database path of ``group``: :class:`CliError` (exit 3) when the store has no
    such group or the group has no state database (nothing is created)."""
    conn = open_main_readonly(data_dir)
    try:
        _, gid = _pick_group(conn, group)
    finally:
        conn.close()
    path = state_file(data_dir, gid)
    if not os.path.isfile(path):
        wal = (f"; its WAL {path}-wal is there without it (an orphaned WAL: see store.state)"
               if os.path.exists(path + "-wal") else "")
        raise CliError(f"group {group!r} has no state database ({path} does not exist; store.state({group!r}) "
                       f"creates it){wal}", EXIT_NOT_FOUND)
    return gid, path


def open_state_sql_connection(path: str, group: str | None = None) -> apsw.Connection:
    """A read-only connection (:func:`open_readonly`, like raft.db's: the state database keeps its WAL file
    across opens, so nothing is created) checked to be a state database (of ``group`` when given: else a
    warning), with the authorizer and statement guard of :func:`open_sql_connection`. :class:`CliError` when
    the file is not a readable state database (exit 4)."""
    conn = _open_readonly_cli(path, "delete it to rebuild the state from the log (store.state), or restore a "
                                    "snapshot")
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        owner = (conn.execute("SELECT group_name FROM raft_state_identity WHERE id=1").fetchone()
                 if set(RESERVED_TABLES) <= names else None)
    except apsw.Error as exc:
        conn.close()
        raise CliError(f"{path} is not readable ({type(exc).__name__}: {exc})", EXIT_CORRUPT) from None
    if owner is None:
        conn.close()
        raise CliError(f"{path} is not a raft_sqlite state database (tables {', '.join(RESERVED_TABLES)} or its "
                       "identity row missing)", EXIT_CORRUPT)
    if group is not None and owner[0] != group:
        err.print(f"warning: {_esc(path)} is the state database of group {_esc(repr(owner[0]))}, not "
                  f"{_esc(repr(group))}")
    conn.authorizer = _authorizer
    conn.exec_trace = _exec_guard
    return conn


def read_state_applied(data_dir: str, gid: int) -> int | None:
    """The applied index of group ``gid``'s state database (``raft_applied``), None when it has none. Opened
    read-only (:func:`open_readonly`); apsw errors propagate."""
    path = state_file(data_dir, gid)
    if not os.path.isfile(path):
        return None
    conn = open_readonly(path)
    try:
        row = conn.execute("SELECT applied_index FROM raft_applied WHERE id=1").fetchone()
    finally:
        conn.close()
    return None if row is None else int(cast(int, row[0]))


def state_applied(data_dir: str, gids: list[int]) -> dict[int, int | str]:
    """Applied index per group id that has a state database (the ``applied`` of ``status`` and ``groups``):
    an int, or the error text when the file cannot be read. One directory listing, one open per state file."""
    folder = os.path.dirname(state_file(data_dir, 0))
    try:
        present = set(os.listdir(folder))
    except OSError:
        return {}
    res: dict[int, int | str] = {}
    for gid in gids:
        if os.path.basename(state_file(data_dir, gid)) not in present:
            continue
        try:
            applied = read_state_applied(data_dir, gid)
        except (apsw.Error, RaftSqliteError, ValueError, TypeError) as exc:
            res[gid] = f"unreadable: {type(exc).__name__}: {exc}"
            continue
        if applied is not None:
            res[gid] = applied
    return res


def _cell(v: Any, raw: bool) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        if raw:
            return b.hex()
        return f"<{len(b)} B> {b[:16].hex()}{'...' if len(b) > 16 else ''}"
    return v


def run_query(conn: apsw.Connection, query: str, *, raw: bool = False) -> list[tuple[list[str], list[tuple[Any, ...]]]]:
    """Execute ``query`` (one or more statements) and return result sets ``[(columns, rows)]`` with
    BLOBs rendered as ``<length B> hexprefix`` unless ``raw`` (then full hex). A statement that would
    write raises :class:`CliError` (exit 5)."""
    sets: list[tuple[list[str], list[tuple[Any, ...]]]] = []
    cur = conn.cursor()
    try:
        desc = None
        for row in cur.execute(query):
            d = cur.description
            if d is not desc:
                desc = d
                sets.append(([c[0] for c in d], []))
            sets[-1][1].append(tuple(_cell(v, raw) for v in row))
    except (apsw.AuthError, apsw.ReadOnlyError, SqlRefused) as exc:
        raise CliError(f"refused: raft-sqlite sql is read-only; only SELECT and reading PRAGMAs are allowed "
                       f"({exc})", EXIT_REFUSED) from None
    except apsw.SQLError as exc:
        raise CliError(f"SQL error: {exc}", EXIT_USAGE) from None
    except UnicodeDecodeError as exc:
        raise CliError(f"a TEXT value is not valid UTF-8 ({exc}): the row is damaged; select CAST(column AS BLOB) "
                       "to see its bytes, and run `raft-sqlite verify`", EXIT_CORRUPT) from None
    finally:
        cur.close()
    return sets


@dataclasses.dataclass
class Sink:
    """Where query results go: ``console`` for tables, ``write`` for CSV/JSON text (exact bytes: no
    trimming, no wrapping)."""

    console: Console
    write: Callable[[str], None]


def _stdout_write(text: str) -> None:
    click.echo(text, nl=False)


def _print_sets(sets: list[tuple[list[str], list[tuple[Any, ...]]]], fmt: str, *, headers: bool = True,
                sink: Sink | None = None) -> None:
    sink = sink or Sink(out, _stdout_write)
    if fmt == "json":
        docs = [[dict(zip(cols, r)) for r in rows] for cols, rows in sets]
        sink.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, default=_json_default) + "\n")
        return
    for cols, rows in sets:
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if headers:
                w.writerow(cols)
            w.writerows(rows)
            sink.write(buf.getvalue())
        else:
            t = Table(show_lines=False, box=box.SIMPLE_HEAD, pad_edge=False, show_header=headers)
            for c in cols:
                t.add_column(c, overflow="fold")
            for r in rows:
                t.add_row(*("NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in r))
            print_wide(t, sink.console)
            sink.console.print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", style="dim")


class _Fields:
    """``name  value`` lines (the head of ``status``). On a terminal a rich grid (values wrap at the
    window's edge); piped, one line per field whatever its length (grep, docs)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add_row(self, name: str, value: str) -> None:
        self.rows.append((name, value))

    def print(self) -> None:
        if out.is_terminal:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            for name, value in self.rows:
                grid.add_row(name, value)
            out.print(grid)
            return
        width = max((len(name) for name, _ in self.rows), default=0)
        for name, value in self.rows:
            out.print(f"[bold]{_esc(name.ljust(width))}[/]  {value}")


def print_wide(table: Table, console: Console | None = None) -> None:
    """Print ``table`` at its natural width when that is wider than the console (up to 400 columns):
    query results stay one row per line instead of folding every cell."""
    con = console or out
    want = Measurement.get(con, con.options.update_width(400), table).maximum
    if want <= con.width:
        con.print(table)
        return
    saved = con.width
    con.width = min(want, 400)  # Console.print(width=) cannot exceed the console's width
    try:
        con.print(table, crop=False)
    finally:
        con.width = saved


_REPL_HELP = """.tables              tables and views (chunks.* is chunks.db)
.schema [NAME]       CREATE statement(s)
.dump [TABLE ...]    the store (or those tables) as SQL text: CREATE and INSERT statements, read in one
                     read transaction (load it with sqlite3 into a new file to look at a copy)
.mode table|csv|json output format
.headers on|off      column names in table and csv output
.output [FILE]       send results to FILE (not inside the data_dir), or back to stdout without FILE
.read FILE           run the statements and dot-commands in FILE
.timer on|off        print the run time of each statement
.quit                leave (or Ctrl-D)
Statements end with ';'. Views: group_status, snapshot_chain, segments, backup_history, recovery_log."""


def dump_sql(conn: apsw.Connection, tables: list[str] | None = None) -> Iterator[str]:
    """The main schema of ``conn`` (or only ``tables``) as SQL text, like the sqlite3 shell's ``.dump``:
    tables with their rows as INSERTs (values spelled by SQLite's ``quote()``, so BLOBs, REALs and TEXT
    round-trip exactly), then indexes, triggers and views. Read in one read transaction (a consistent
    copy while the node writes); never takes a write lock (apsw's own ``.dump`` begins IMMEDIATE)."""
    def ident(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    own = not conn.in_transaction  # inside the prompt's own BEGIN: read in that transaction
    if own:
        conn.execute("BEGIN")
    try:
        yield "PRAGMA foreign_keys=OFF;"
        yield "BEGIN TRANSACTION;"
        objs = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                            "ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 WHEN 'trigger' THEN 2 "
                            "ELSE 3 END, rowid").fetchall()
        wanted = None if not tables else set(tables)
        for row in objs:
            kind, name, tbl, sql_text = (str(v) for v in row)  # sqlite_master's columns are TEXT
            if (wanted is not None and tbl not in wanted) or (name.startswith("sqlite_") and name != "sqlite_sequence"):
                continue
            if kind != "table":  # an index, trigger or view: its statement only
                yield sql_text + ";"
                continue
            # sqlite_sequence exists once a table uses AUTOINCREMENT: its rows are restored, not its table
            yield "DELETE FROM sqlite_sequence;" if name == "sqlite_sequence" else sql_text + ";"
            cols = [str(r[1]) for r in conn.execute(f"PRAGMA table_info({ident(name)})")]
            values = " || ',' || ".join(f"quote({ident(c)})" for c in cols)
            for (line,) in conn.execute(f"SELECT 'INSERT INTO {ident(name).replace(chr(39), chr(39) * 2)} "
                                        f"VALUES(' || {values} || ');' FROM {ident(name)}"):
                yield str(line)
        yield "COMMIT;"
    finally:
        if own:
            conn.execute("COMMIT")


class SqlShell:
    """The statements and sqlite3-style dot-commands of ``raft-sqlite sql``: at its prompt, from stdin and
    from ``.read FILE``. Read-only like the connection it is given; the only file it writes is the one
    named by ``.output``, which may not be inside a data_dir (:func:`raft_sqlite.fsio.check_output_path`)."""

    def __init__(self, conn: apsw.Connection, fmt: str, raw: bool):
        self.conn, self.fmt, self.raw = conn, fmt, raw
        self.headers, self.timer = True, False
        self.sink: Sink | None = None  # None: stdout
        self._file: IO[str] | None = None
        self._depth = 0

    def close(self) -> None:
        """Close the ``.output`` file, if any."""
        self._set_output(None)

    def _set_output(self, path: str | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self.sink = None, None
        if path is None:
            return
        try:
            target = fsio.check_output_path(path)  # never into a data_dir (this one or another), nor over a database
        except OutputRefused as exc:
            raise CliError(str(exc), EXIT_REFUSED) from None
        try:
            f = open(target, "w", encoding="utf-8", newline="")  # noqa: SIM115  (closed by _set_output/close)
        except OSError as exc:
            raise CliError(f".output: cannot write {path!r}: {exc.strerror or exc}", EXIT_USAGE) from None
        con = Console(file=cast(IO[str], TrimmedLines(f)), highlight=False, soft_wrap=True, no_color=True,
                      width=int(os.environ.get("COLUMNS", "200")))

        def write(text: str) -> None:
            f.write(text)

        self._file, self.sink = f, Sink(con, write)

    def _write(self, text: str) -> None:
        (self.sink.write if self.sink is not None else _stdout_write)(text)

    def statement(self, query: str) -> None:
        """Run ``query`` (one or more SQL statements) and print its result sets per ``.mode``/``.headers``
        to the current output (``.timer``: its run time on stderr). Refusals and errors raise
        :class:`CliError`."""
        t0 = time.perf_counter()
        sets = run_query(self.conn, query, raw=self.raw)
        _print_sets(sets, self.fmt, headers=self.headers, sink=self.sink)
        if self.timer:
            err.print(f"Run Time: real {time.perf_counter() - t0:.3f}")

    def run(self, lines: Iterator[str | None], *, bail: bool) -> bool:
        """Run ``lines`` (statements end with ';', dot-commands on a line of their own; None drops the
        statement begun). Errors stop the run when ``bail`` (a script), else are printed (the prompt).
        Returns False after ``.quit``."""
        buf = ""
        for line in lines:
            if line is None:
                buf = ""
                continue
            if not buf and line.strip().startswith("."):
                try:
                    if not self.dot(line.strip()):
                        return False
                except CliError as exc:
                    if bail:
                        raise
                    exc.show()
                continue
            buf += line + "\n"
            if apsw.complete(buf):
                try:
                    self.statement(buf)
                except CliError as exc:
                    if bail:
                        raise
                    exc.show()
                buf = ""
        if buf.strip():
            if bail:  # the end of a script: run what is left, as sqlite3 does
                self.statement(buf)
            else:
                err.print("incomplete statement ignored (no ';')")
        return True

    def dot(self, line: str) -> bool:
        """One dot-command; False for ``.quit``. Bad usage raises :class:`CliError` (exit 2)."""
        import shlex

        try:
            cmd, *args = shlex.split(line)
        except ValueError as exc:
            raise CliError(f"{line}: {exc}", EXIT_USAGE) from None
        if cmd in (".quit", ".exit", ".q"):
            return False
        fn = self._DOTS.get(cmd)
        if fn is None:
            raise CliError(f"unknown command {line!r}; .help lists them", EXIT_USAGE)
        return fn(self, cmd, args) is not False

    @staticmethod
    def _on_off(cmd: str, args: list[str]) -> bool:
        if len(args) != 1 or args[0].lower() not in ("on", "off", "1", "0", "yes", "no"):
            raise CliError(f"usage: {cmd} on|off", EXIT_USAGE)
        return args[0].lower() in ("on", "1", "yes")

    def _help(self, cmd: str, args: list[str]) -> None:
        err.print(_REPL_HELP, markup=False)

    def _mode(self, cmd: str, args: list[str]) -> None:
        if len(args) != 1 or args[0] not in ("table", "csv", "json"):
            raise CliError("usage: .mode table|csv|json", EXIT_USAGE)
        self.fmt = args[0]

    def _headers(self, cmd: str, args: list[str]) -> None:
        self.headers = self._on_off(cmd, args)

    def _timer(self, cmd: str, args: list[str]) -> None:
        self.timer = self._on_off(cmd, args)

    def _output(self, cmd: str, args: list[str]) -> None:
        if len(args) > 1:
            raise CliError("usage: .output [FILE]", EXIT_USAGE)
        self._set_output(args[0] if args and args[0] not in ("stdout", "-") else None)

    def _read(self, cmd: str, args: list[str]) -> bool:
        if len(args) != 1:
            raise CliError("usage: .read FILE", EXIT_USAGE)
        if self._depth >= 16:
            raise CliError(".read: nested more than 16 deep (does a file read itself?)", EXIT_USAGE)
        try:
            with open(args[0], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f".read: cannot read {args[0]!r}: {getattr(exc, 'strerror', None) or exc}",
                           EXIT_USAGE) from None
        self._depth += 1
        try:
            return self.run(iter(text.splitlines()), bail=True)
        finally:
            self._depth -= 1

    def _dump(self, cmd: str, args: list[str]) -> None:
        try:
            for stmt in dump_sql(self.conn, args or None):
                self._write(stmt + "\n")
        except apsw.Error as exc:
            raise CliError(f".dump failed: {exc}", EXIT_CORRUPT) from None

    def _tables(self, cmd: str, args: list[str]) -> None:
        q = ("SELECT type, name FROM sqlite_master WHERE type IN ('table','view') UNION ALL "
             "SELECT type, 'chunks.' || name FROM chunks.sqlite_master WHERE type='table' ORDER BY 1, 2")
        try:
            sets = run_query(self.conn, q)
        except CliError:  # chunks.db not attached
            sets = run_query(self.conn, q.split(" UNION ALL")[0])
        _print_sets(sets, self.fmt, headers=self.headers, sink=self.sink)

    def _schema(self, cmd: str, args: list[str]) -> None:
        q = "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL" + (" AND name = ?" if args else "")
        for (text,) in self.conn.execute(q, tuple(args[:1])):
            self._write(text + ";\n")

    _DOTS: dict[str, Callable[[SqlShell, str, list[str]], bool | None]] = {
        ".help": _help, ".mode": _mode, ".headers": _headers, ".header": _headers, ".timer": _timer,
        ".output": _output, ".read": _read, ".dump": _dump, ".tables": _tables, ".schema": _schema}


def _prompt_lines(what: str = "") -> Iterator[str | None]:
    """Lines typed at the prompt (readline editing and history when available) until Ctrl-D; None after
    Ctrl-C, which drops the statement being typed. ``what``: the banner's tail (default: raft.db's views)."""
    with contextlib.suppress(ImportError):  # deferred: optional module, line editing and history when available
        import readline  # noqa: F401
    err.print(f"raft-sqlite sql (read-only). Type .help for help. {what or _REPL_HELP.splitlines()[-1]}",
              markup=False)
    buf = ""
    while True:
        try:
            line = input("        ...> " if buf.strip() else "raft-sqlite> ")
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print()
            buf = ""
            yield None
            continue
        yield line
        if buf or not line.strip().startswith("."):
            buf += line + "\n"
            if apsw.complete(buf):
                buf = ""


@cli.command()
@DATA_DIR
@click.argument("query", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--raw-payload", is_flag=True, help="Print BLOBs (payloads, chunks) as full hex instead of "
              "'<length B> hexprefix'.")
@click.option("--state", "state", metavar="GROUP", help="Query GROUP's state database (store.state(GROUP): "
              "state/group-<id>.db, its tables and raft_applied) instead of raft.db; same read-only rules.")
@friendly
def sql(data_dir: str, query: str | None, fmt: str, as_json: bool, raw_payload: bool, state: str | None) -> None:
    """Run a read-only SQL QUERY against the store (raft.db; chunks.db attached as `chunks`), or with
    --state GROUP against that group's SQL state database.

    Without QUERY: an interactive prompt on a terminal, else the query is read from stdin. At the prompt
    and in scripts, sqlite3's dot-commands .tables .schema .dump .mode .headers .output .read .timer
    (.help lists them). The
    connection is opened read-only with query_only, an authorizer and a statement guard:
    INSERT/UPDATE/DELETE, DDL, ATTACH, VACUUM, ANALYZE, checkpoints and setting PRAGMAs are refused
    with exit code 5 before they run. Views: group_status, snapshot_chain, segments,
    backup_history, recovery_log.

    --state GROUP: the group's state database (store.state): its tables, raft_applied (applied index and
    term) and raft_state_identity, under the same rules. An unknown group, or one without a state
    database, is exit code 3."""
    if as_json:
        fmt = "json"
    shell: SqlShell
    if state is None:
        shell = SqlShell(open_sql_connection(data_dir), fmt, raw_payload)
        banner = ""
    else:
        _, path = state_path(data_dir, state)
        shell = SqlShell(open_state_sql_connection(path, state), fmt, raw_payload)
        banner = f"State database of group {state!r} ({os.path.relpath(path, data_dir)}): .tables lists its tables."
    try:
        if query is None:
            if sys.stdin.isatty():
                shell.run(_prompt_lines(banner), bail=False)
                return
            query = sys.stdin.read()
        if not query.strip():
            raise click.UsageError("empty query")
        if any(ln.strip().startswith(".") for ln in query.splitlines()):  # a script with dot-commands
            shell.run(iter(query.splitlines()), bail=True)
        else:
            shell.statement(query)
    finally:
        shell.close()
        shell.conn.close()


# ---------------------------------------------------------------------------------------------- log
#: What ``raft-sqlite log --decoder`` calls: ``decode(entry)`` with a :class:`~raft_sqlite.LogEntry`.
Decoder = Callable[[LogEntry], object]


def load_decoder(spec: str) -> Decoder:
    """The callable named by ``--decoder MODULE:FUNCTION`` (``FUNCTION`` may be dotted: ``Class.method``).
    The current directory is searched last, after the installed packages, so a decoder module next to
    the operator works as with ``python -m``. Raises :class:`click.BadParameter` (exit 2) when the
    module cannot be imported or has no such callable."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise click.BadParameter(f"{spec!r} is not MODULE:FUNCTION (e.g. myapp.codec:decode_entry)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 -- any failure of the user's module is a usage error here
        raise click.BadParameter(f"cannot import module {mod_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.BadParameter(f"module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise click.BadParameter(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return cast(Decoder, obj)


def _decoder_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Decoder | None:
    return None if value is None else load_decoder(value)


def _decode(decoder: Decoder, entry: LogEntry) -> tuple[str | None, str | None]:
    """``(decoded text, None)`` or ``(None, "ExcType: message")`` when the decoder raised for this entry."""
    try:
        got = decoder(entry)
    except Exception as exc:  # noqa: BLE001 -- the user's decoder failing on one entry marks that entry only
        return None, f"{type(exc).__name__}: {exc}"
    return ("" if got is None else got if isinstance(got, str) else str(got)), None


def read_log_rows(conn: apsw.Connection, gid: int, lo: int, hi: int, *, newest: bool, limit: int,
                  term: int | None = None, kind: int | None = None, payload_bytes: int = 16,
                  decoder: Decoder | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` log records of group ``gid`` with index in ``lo..hi`` (the newest ones when
    ``newest``), optionally only of ``term``/``kind``, in index order, as ``raft-sqlite log`` shows them;
    and whether more matched. Stored records below ``first_index`` (compacted, awaiting deletion) are
    included and flagged ``compacted`` by the caller's range. Run inside the caller's read transaction."""
    base = gid * SPAN
    where = "key >= ?1 + ?2 AND key <= ?1 + ?3"
    args: list[int] = [base, max(lo, 0), max(hi, -1)]
    if term is not None:
        args.append(term)
        where += f" AND term = ?{len(args)}"
    if kind is not None:
        args.append(kind)
        where += f" AND kind = ?{len(args)}"
    args.append(limit + 1)
    rows: list[dict[str, Any]] = []
    for idx, idx_col, t, k, payload, ptype, crc, seg in conn.execute(
            f"SELECT key - ?1, {INT('idx')}, {INT('term')}, {INT('kind')}, CAST(payload AS BLOB), typeof(payload), "
            f"{INT('crc32')}, {INT('segment')} FROM log_entries WHERE {where} "
            f"ORDER BY key {'DESC' if newest else 'ASC'} LIMIT ?{len(args)}", tuple(args)):
        payload = bytes(payload or b"")
        ok = ptype == "blob" and crc_matches(record_crc(gid, idx_col, t, k, payload), crc)
        r = {"index": idx, "term": t, "kind": KIND_NAMES.get(k, str(k)), "size": len(payload),
             "crc32": f"{crc:08x}" if crc is not None else "-", "crc_ok": ok, "segment": seg,
             "payload_prefix": payload[:payload_bytes].hex()}
        if decoder is not None:
            entry = LogEntry(idx, t, payload, EntryKind(k) if k in KIND_NAMES else k)
            r["decoded"], r["decode_error"] = _decode(decoder, entry)
        rows.append(r)
    more = len(rows) > limit
    rows = rows[:limit]
    if newest:
        rows.reverse()
    return rows, more


def log_hint(name: str, first: int, last: int, snap: int, lo: int, hi: int, found: bool,
             filters: str = "") -> str | None:
    """What to tell the operator about the requested range ``lo..hi`` of a log holding ``first..last``
    (``found``: some entry was shown): why it is empty, or which part of it does not exist."""
    if last < first and not found:
        if first > 1:
            return (f"the log of group {name!r} is empty: entries 1..{first - 1} were compacted (snapshot at {snap}); "
                    f"the next entry will be {first}")
        return f"group {name!r} has no entries"
    if hi < lo:
        return f"the range {lo}..{hi} is empty"
    hints = []
    if lo < first and not found:
        hints.append(f"entries {lo}..{min(hi, first - 1)} were compacted; the log starts at {first}")
    elif lo < first <= hi:
        hints.append(f"entries {lo}..{first - 1} were compacted; the log starts at {first}")
    if hi > last:
        hints.append(f"range {max(lo, last + 1)}..{hi} is past the last index {last}" if lo > last or not found
                     else f"the last index is {last}")
    a, b = max(lo, first), min(hi, last)
    if not found and a <= b:  # part of the range is in the log, yet nothing was shown
        hints.insert(0, f"no entry in {a}..{b} matches {filters}" if filters else f"no entry stored in {a}..{b}")
    return "; ".join(hints) or None


def _log_cells(r: dict[str, Any], payload_bytes: int, first: int, decoded: bool) -> list[str]:
    payload = r["payload_prefix"] + ("..." if r["size"] > payload_bytes else "") if payload_bytes else ""
    if r["index"] < first:
        payload = (payload + " (compacted)").strip()
    cells = [str(r["index"]), str(r["term"]), r["kind"], str(r["size"]), r["crc32"],
             "ok" if r["crc_ok"] else "[bold red]BAD[/]", str(r["segment"]), payload]
    if decoded:
        cells.append(_esc(r["decoded"]) if r["decode_error"] is None
                     else f"[bold red]<decoder error: {_esc(r['decode_error'])}>[/]")
    return cells


_LOG_COLS = ("index", "term", "kind", "size", "crc32", "crc", "segment", "payload")
_LOG_RIGHT = {"index", "term", "size", "segment"}


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt for the block (a follower stops cleanly on either), on the main
    thread only (signal handlers can be set nowhere else)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _follow(conn: apsw.Connection, name: str, gid: int, after: int, interval: float, as_json: bool,
            emit: Callable[[list[dict[str, Any]], int], None], **filters: Any) -> int:
    """Poll the log of group ``gid`` for records after index ``after`` every ``interval`` seconds, read-only,
    and ``emit(rows, first_index)`` them; return on Ctrl-C (the number of CRC failures seen).
    A log cut back below ``after`` (a new leader overwrote it) is said and followed from its new end."""
    bad = 0
    try:
        while True:
            time.sleep(interval)
            with conn:  # one read transaction per poll
                row = conn.execute("SELECT first_index FROM groups WHERE group_id=? AND name=?", (gid, name)).fetchone()
                if row is None:
                    raise CliError(f"group {name!r} was removed while following", EXIT_NOT_FOUND)
                first = row[0]
                last = read_last_index(conn, gid, first)
                if last < after:
                    note = f"log of group {name!r} cut back to {last} (was {after}); following from {last + 1}"
                    if as_json:
                        click.echo(json.dumps({"group": name, "notice": note}))
                    else:
                        err.print(_esc(note))
                    after = last
                    continue
                rows, more = read_log_rows(conn, gid, after + 1, last, newest=False, limit=10_000, **filters)
            if rows:
                emit(rows, first)
                bad += sum(not r["crc_ok"] for r in rows)
            after = rows[-1]["index"] if more else last
    except KeyboardInterrupt:
        return bad


@cli.command("log")
@DATA_DIR
@click.option("--group", "-g", help="Group name (optional when the store holds one group).")
@click.option("--from", "lo", type=U64, help="First index (inclusive).")
@click.option("--to", "hi", type=U64, help="Last index (inclusive).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="At most this many entries (without --from: the newest ones).")
@click.option("--term", "term", type=U64, help="Only entries of this term.")
@click.option("--kind", "kind", type=click.Choice(list(KIND_NAMES.values()), case_sensitive=False),
              help="Only entries of this kind.")
@click.option("--payload-bytes", type=U64, default=16, show_default=True,
              help="Bytes of each payload shown (hex; 0: none).")
@click.option("--decoder", "decoder", metavar="MODULE:FUNCTION", callback=_decoder_option,
              help="Show decoder(entry) in a `decoded` column: a callable taking a raft_sqlite.LogEntry (index, "
                   "term, data, kind) and returning a str. An exception marks that entry only.")
@click.option("--follow", "-f", is_flag=True, help="After the newest entries, keep printing new ones as they are "
              "appended (like tail -f; read-only). Stop with Ctrl-C. With --json: one JSON object per line.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="--follow: seconds between polls.")
@JSON_OPT
@friendly
def log_cmd(data_dir: str, group: str | None, lo: int | None, hi: int | None, limit: int, term: int | None,
            kind: str | None, payload_bytes: int, decoder: Decoder | None, follow: bool, interval: float,
            as_json: bool) -> None:
    """Log entries of a group with term, kind, size, CRC and whether the CRC verifies, a payload preview
    and optionally a decoded form (--decoder). An empty or compacted range says why. Read-only."""
    if follow and hi is not None:
        raise click.UsageError("--follow prints entries as they come: it takes no --to")
    kind_no = None if kind is None else next(k for k, v in KIND_NAMES.items() if v == kind.upper())
    filters: dict[str, Any] = {"term": term, "kind": kind_no, "payload_bytes": payload_bytes, "decoder": decoder}
    described = " and ".join(x for x in (f"term {term}" if term is not None else "",
                                          f"kind {kind.upper()}" if kind else "") if x)
    conn = open_main_readonly(data_dir)
    stack = contextlib.ExitStack()
    try:
        with conn:  # one read transaction: a consistent view while the node writes
            name, gid = _pick_group(conn, group)
            row = conn.execute("SELECT first_index, snapshot_index FROM groups WHERE group_id=?", (gid,)).fetchone()
            assert row is not None  # _pick_group found the group in this read transaction
            first, snap = row
            last = read_last_index(conn, gid, first)
            want_lo = first if lo is None else lo
            want_hi = last if hi is None else hi
            rows, clipped = read_log_rows(conn, gid, want_lo, want_hi, newest=lo is None, limit=limit, **filters)
        hint = log_hint(name, first, last, snap, want_lo, want_hi, bool(rows), described)
        bad = sum(not r["crc_ok"] for r in rows)
        shown = (rows[0]["index"], rows[-1]["index"]) if rows else (want_lo, want_hi)
        for r in rows:
            r["compacted"] = r["index"] < first
        if follow:
            stack.enter_context(_sigterm_interrupts())
            widths = (10, 6, 6, 8, 8, 3, 7, 2 * payload_bytes + 3 if decoder else 0, 0)  # one line per entry
            header = [f"{c:>{w}}" if c in _LOG_RIGHT else f"{c:<{w}}" for c, w in
                      zip(_LOG_COLS, widths, strict=False)] + (["decoded"] if decoder else [])

            def emit(batch: list[dict[str, Any]], first_now: int) -> None:
                for r in batch:
                    if as_json:
                        click.echo(json.dumps({"group": name, **r, "compacted": r["index"] < first_now}))
                    else:
                        cells = _log_cells(r, payload_bytes, first_now, decoder is not None)
                        out.print("  ".join(f"{c:>{w}}" if col in _LOG_RIGHT else f"{c:<{w}}" for col, c, w in
                                            zip((*_LOG_COLS, "decoded"), cells, widths, strict=False)))
                sys.stdout.flush()

            after = rows[-1]["index"] if rows and lo is not None and clipped else max(last, want_lo - 1)
            try:
                if not as_json:
                    out.print(f"group {name!r}: first {first}, last {last}; following"
                              + (f" ({described})" if described else "") + "; Ctrl-C to stop", style="dim")
                    out.print("  ".join(header).rstrip(), style="bold")
                    if hint and not rows:
                        out.print(f"({_esc(hint)})", style="dim")
                emit(rows, first)
            except KeyboardInterrupt:  # stopped before the first poll
                interval = -1.0
            if interval > 0:
                bad += _follow(conn, name, gid, after, interval, as_json, emit, **filters)
        elif as_json:
            _dump_json({"group": name, "first_index": first, "last_index": last, "from": shown[0], "to": shown[1],
                        "filters": {"term": term, "kind": kind.upper() if kind else None}, "entries": rows,
                        "crc_failures": bad, "hint": hint})
        else:
            t = Table(title=f"group {_esc(repr(name))}: first {first}, last {last}; showing {shown[0]}..{shown[1]}"
                      + (f" ({described})" if described else ""), title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False)
            for c in _LOG_COLS + (("decoded",) if decoder else ()):
                t.add_column(c, justify="right" if c in _LOG_RIGHT else "left")
            for r in rows:
                t.add_row(*_log_cells(r, payload_bytes, first, decoder is not None))
            if rows:
                print_wide(t)
            else:
                out.print(t.title or "")
            if hint:
                out.print(f"({_esc(hint)})", style="dim")
            if clipped:
                out.print(f"(limited to {limit} entries; use --limit)", style="dim")
    finally:
        stack.close()
        conn.close()
    if bad:
        raise CliError(f"{bad} entr{'y' if bad == 1 else 'ies'} in the range fail(s) the CRC check; "
                       "run `raft-sqlite verify`", EXIT_CORRUPT)


@cli.command("groups")
@DATA_DIR
@JSON_OPT
@friendly
def groups_cmd(data_dir: str, as_json: bool) -> None:
    """List the node's groups: id, log bounds, term, vote, commit index, newest snapshot index and, for a
    group with a SQL state database (store.state), its applied index. Cheap with thousands of groups (one
    query, plus one index lookup per group and one open per state database); safe while the node runs."""
    conn = open_main_readonly(data_dir)
    try:
        with conn:  # one read transaction: a consistent listing while the node writes
            rows = conn.execute(
                "SELECT g.group_id, g.name, g.first_index, g.snapshot_index, m.current_term, m.voted_for, "
                "m.commit_index FROM groups g LEFT JOIN raft_meta m USING (group_id) ORDER BY g.name").fetchall()
            res = []
            for gid, name, first, snap, term, vote, commit in rows:
                gid = int(cast(int, gid))  # the rowid: always an integer
                top = conn.execute("SELECT key FROM log_entries WHERE key >= ? AND key < ? ORDER BY key DESC LIMIT 1",
                                   (gid * SPAN, (gid + 1) * SPAN)).fetchone()
                # a damaged first index (not an integer) is shown as stored; `verify` reports it
                last = (int(cast(int, top[0])) - gid * SPAN if top else
                        first - 1 if isinstance(first, int) else None)
                res.append({"name": name, "group_id": gid, "first_index": first, "last_index": last, "term": term,
                            "voted_for": vote, "commit_index": commit, "snapshot_index": snap})
    finally:
        conn.close()
    _add_applied(data_dir, res)
    if as_json:
        _dump_json(res)
        return
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    states = any(g["applied"] is not None or "state_error" in g for g in res)
    for col in ("group", "id", "log", "term", "vote", "commit", "snapshot") + (("applied",) if states else ()):
        t.add_column(col, no_wrap=True, justify="left" if col in ("group", "log", "vote") else "right")
    for g in res:
        t.add_row(_esc(str(g["name"])), str(g["group_id"]), f"{g['first_index']}..{g['last_index']}", str(g["term"]),
                  "-" if g["voted_for"] is None else _esc(str(g["voted_for"])), str(g["commit_index"]),
                  str(g["snapshot_index"]), *((_applied_cell(g),) if states else ()))
    print_wide(t)
    out.print(f"{len(res)} group(s)")


# ---------------------------------------------------------------------------------------------- snapshot
@cli.group("snapshot")
def snapshot_group() -> None:
    """Snapshots: list the chains, show one manifest and its structures, export one to a file, verify.

    Read-only like `verify` (raft.db and chunks.db opened with SQLITE_OPEN_READONLY and query_only, one
    read transaction per command): safe while the node runs. ID is a snapshot id from `snapshot list`
    (unique in the node; --group only narrows)."""


@contextlib.contextmanager
def _snapshot_view(data_dir: str) -> Iterator[SnapshotView]:
    """A :class:`SnapshotView` of ``data_dir``; an unknown group or snapshot becomes exit 3."""
    open_main_readonly(data_dir).close()  # the store checks and messages every read command gives
    view = SnapshotView(data_dir)
    try:
        yield view
    except (SnapshotNotFoundError, GroupNotFoundError) as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from None
    finally:
        view.close()


def _utc(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _structure_names(structures: list[Any] | None) -> str:
    if structures is None:
        return "-"
    names = [str(e.get("name")) for e in structures if isinstance(e, dict)]
    return f"{len(names)}: {', '.join(names)}" if names else "0"


def _byte_progress(bar: _BackupProgress, what: str) -> Callable[[int, int], None] | None:
    """``progress(done, total)`` feeding ``bar`` as phase ``what`` (None when the bar is off)."""
    cb = bar.callback
    if cb is None:
        return None

    def progress(done: int, total: int) -> None:
        cb(what, done, total)

    return progress


def snapshot_dict(m: SnapshotMeta) -> dict[str, Any]:
    """One manifest as ``raft-sqlite snapshot --json`` prints it."""
    return {"id": m.id, "group": m.group, "index": m.index, "term": m.term, "kind": m.kind.value,
            "parent_id": m.parent_id, "status": m.status, "source": m.source, "size": m.size,
            "chunk_count": m.chunk_count, "sha256": m.checksum, "created_at": m.created_at,
            "finished_at": m.finished_at, "state_machine": m.structures is not None,
            "structures": None if m.structures is None else m.structures.get("structures")}


@snapshot_group.command("list")
@DATA_DIR
@click.option("--group", "-g", help="Only this group (default: every group).")
@JSON_OPT
@friendly
def snapshot_list(data_dir: str, group: str | None, as_json: bool) -> None:
    """Snapshot chains per group, newest chain first, each from its FULL base through its deltas: id,
    index, term, kind, status, size, chunks, created time and the structures of a state-machine
    snapshot. Snapshots still being written (or interrupted installs) are listed as WRITING."""
    with _snapshot_view(data_dir) as v, v.consistent():
        names = [group] if group is not None else list(v.groups())
        res: list[dict[str, Any]] = []
        for g in names:
            chains = v.chains(g)
            # WRITING: bytes and chunks durably received so far (the manifest's own count comes at finalize)
            writing = [dataclasses.replace(m, size=sum(n for _, n in shape), chunk_count=len(shape))
                       for m in v.manifests(g, status=None) if m.status != "DURABLE"
                       for shape in (v.chunk_shape(m.id),)]
            res.append({"group": g, "chains": [{"base_id": c[0].id, "head_id": c[-1].id, "length": len(c),
                                                 "complete": c[0].kind is SnapshotKind.FULL,
                                                 "snapshots": [snapshot_dict(m) for m in c]} for c in chains],
                        "writing": [snapshot_dict(m) for m in writing]})
    if as_json:
        _dump_json({"groups": res})
        return
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("group", "id", "index", "term", "kind", "status", "size", "chunks", "created (UTC)", "structures"):
        t.add_column(col, no_wrap=True, justify="right" if col in ("index", "term", "size", "chunks") else "left")
    count = 0
    for grp in res:
        for c in grp["chains"]:
            for i, m in enumerate(c["snapshots"]):
                last = i == len(c["snapshots"]) - 1
                sid = str(m["id"]) if i == 0 else ("└ " if last else "├ ") + str(m["id"])
                kind = m["kind"] if c["complete"] or i else f"[bold red]{m['kind']} (parent {m['parent_id']} missing)[/]"
                t.add_row(_esc(grp["group"]), sid, str(m["index"]), str(m["term"]), kind, m["status"],
                          _size(m["size"]), str(m["chunk_count"]), _utc(m["created_at"]),
                          _esc(_structure_names(m["structures"])))
                count += 1
        for m in grp["writing"]:
            t.add_row(_esc(grp["group"]), str(m["id"]), str(m["index"]), str(m["term"]), m["kind"],
                      f"[yellow]{m['status']}[/]", _size(m["size"]), str(m["chunk_count"]), _utc(m["created_at"]), "-")
            count += 1
    if count:
        print_wide(t)
    nchains = sum(len(g["chains"]) for g in res)
    out.print(f"{count} snapshot(s) in {nchains} chain(s), {len(res)} group(s)")


@snapshot_group.command("show")
@DATA_DIR
@click.argument("snapshot_id", metavar="ID", type=U64)
@click.option("--group", "-g", help="The group ID belongs to (optional: ids are unique in the node).")
@JSON_OPT
@friendly
def snapshot_show(data_dir: str, snapshot_id: int, group: str | None, as_json: bool) -> None:
    """One snapshot's manifest, its chain (the FULL base and the deltas up to it, links verified) and, for
    a state-machine snapshot, its structures table (name, mode full/delta, offset, length, sha256)."""
    with _snapshot_view(data_dir) as v, v.consistent():
        m = v.find(snapshot_id, group)
        chain: list[SnapshotMeta] = []
        chain_error = None
        try:
            chain = v.chain(m).metas()
        except SnapshotError as exc:
            chain_error = str(exc)
    doc = {"snapshot": snapshot_dict(m), "chain": [snapshot_dict(c) for c in chain], "chain_error": chain_error}
    if as_json:
        _dump_json(doc)
        return
    head = _Fields()
    head.add_row("snapshot", f"{m.id} of group {_esc(m.group)!r}")
    head.add_row("index / term", f"{m.index} / {m.term}")
    head.add_row("kind", m.kind.value + ("" if m.parent_id is None else f" (parent {m.parent_id})"))
    head.add_row("status / source", f"{m.status} / {m.source}")
    head.add_row("size", f"{_size(m.size)} ({m.size} bytes) in {m.chunk_count} chunk(s)")
    head.add_row("sha256", m.checksum or "-")
    head.add_row("created / finished", f"{_utc(m.created_at)} / {_utc(m.finished_at)} UTC")
    head.add_row("chain", " -> ".join(f"#{c.id} {c.kind.value}@{c.index}" for c in chain) if chain_error is None
                 else f"[bold red]BROKEN[/]: {_esc(chain_error)}")
    head.add_row("state machine", "no (raw bytes)" if m.structures is None else "yes")
    head.print()
    if m.structures is not None:
        t = Table(title="structures", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("name", "mode", "offset", "length", "sha256"):
            t.add_column(col, no_wrap=True, justify="right" if col in ("offset", "length") else "left")
        for e in m.structures.get("structures", []):
            t.add_row(_esc(str(e.get("name"))), str(e.get("mode")), str(e.get("offset")), str(e.get("length")),
                      str(e.get("sha256")))
        print_wide(t)


@snapshot_group.command("export")
@DATA_DIR
@click.argument("snapshot_id", metavar="ID", type=U64)
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@click.option("--group", "-g", help="The group ID belongs to (optional: ids are unique in the node).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@JSON_OPT
@friendly
def snapshot_export(data_dir: str, snapshot_id: int, file: str, group: str | None, quiet: bool,
                    as_json: bool) -> None:
    """Write snapshot ID's bytes to FILE (`-`: stdout), verified while read (CRC32 per chunk, sha256 of
    the whole). FILE is written atomically: a temporary file beside it, fsync'ed, then renamed; on any
    failure nothing is left behind and an existing FILE is untouched (exit 4 for a damaged snapshot).
    FILE inside a data_dir, or over an SQLite database, is refused (exit 5). To stdout: a copy staged in a
    temporary file, verified before its first byte is written."""
    to_stdout = file == "-"
    if to_stdout and as_json:
        raise click.UsageError("--json prints a summary on stdout: it cannot go with FILE '-'")
    # Reading holds one read transaction on the node's files, which its checkpoints cannot pass: it lasts
    # as long as the local write does, never as long as a slow consumer of stdout (a pipe, ssh) takes.
    # So stdout gets a staged, verified copy (an unnamed temporary file) after the transaction ended.
    with contextlib.ExitStack() as stack:
        staged = stack.enter_context(tempfile.TemporaryFile()) if to_stdout else None
        with _snapshot_view(data_dir) as v, v.consistent():
            m = v.find(snapshot_id, group)
            with _BackupProgress(quiet or as_json or to_stdout) as bar:
                progress = _byte_progress(bar, f"snapshot {m.id}")
                try:
                    n = v.export(m, staged, progress) if staged is not None else v.export_file(m, file, progress)
                except OSError as exc:
                    raise CliError(f"cannot write {'a temporary copy' if staged is not None else file}: "
                                   f"{exc.strerror or exc}", EXIT_USAGE) from None
        if staged is not None:
            staged.seek(0)
            shutil.copyfileobj(staged, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
    doc = {"snapshot_id": m.id, "group": m.group, "index": m.index, "term": m.term, "kind": m.kind.value,
           "path": None if to_stdout else os.path.abspath(file), "size": n, "sha256": m.checksum}
    if as_json:
        _dump_json(doc)
    elif not quiet:
        (err if to_stdout else out).print(
            f"exported snapshot {m.id} (group {_esc(m.group)!r}, index {m.index}, {m.kind.value}) to "
            f"{'stdout' if to_stdout else _esc(file)}: {n} bytes, CRC32 and sha256 verified")


@snapshot_group.command("verify")
@DATA_DIR
@click.argument("snapshot_id", metavar="[ID]", required=False, type=U64)
@click.option("--group", "-g", help="Only this group's snapshots (or: the group ID belongs to).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@JSON_OPT
@friendly
def snapshot_verify(data_dir: str, snapshot_id: int | None, group: str | None, quiet: bool, as_json: bool) -> None:
    """Check one snapshot (ID) or every durable one: manifest CRC, chain links, every chunk (CRC32,
    sequence, count, size, sha256) and, for a state-machine snapshot, the structures table and each
    structure's sha256. Exit 1 if anything is wrong. Read-only: safe while the node runs (a snapshot
    retention removes meanwhile is reported as gone, not as a problem)."""
    with _snapshot_view(data_dir) as v, _BackupProgress(quiet or as_json) as bar:
        checks = v.verify(snapshot_id, group, _byte_progress(bar, "verify snapshots"))
    bad = [c for c in checks if not c.ok]
    total = sum(c.size or 0 for c in checks if not c.gone)
    if as_json:
        _dump_json({"ok": not bad, "checked": len(checks), "bytes": total, "problems": sum(len(c.problems) for c in bad),
                    "snapshots": [c.to_dict() for c in checks]})
    else:
        if checks:
            t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
            for col in ("group", "id", "index", "kind", "size", "structures", "result"):
                t.add_column(col, no_wrap=col != "result", overflow="fold",
                             justify="right" if col in ("id", "index", "size") else "left")
            for c in checks:
                result = ("[dim]gone (removed by retention meanwhile)[/]" if c.gone else "[green]ok[/]" if c.ok else
                          "[bold red]" + "; ".join(f"{k}: {_esc(msg)}" for k, msg in c.problems) + "[/]")
                t.add_row(_esc(c.group), str(c.snapshot_id), "-" if c.index is None else str(c.index), c.kind or "-",
                          _size(c.size), "yes" if c.state_machine else "-", result)
            print_wide(t)
        if bad:
            out.print(f"[bold red]snapshot verify FAILED: {len(bad)} of {len(checks)} snapshot(s) have problems[/]")
        else:
            out.print(f"[green]snapshot verify OK: {len(checks)} snapshot(s), {_size(total)} checked[/]")
    if bad:
        sys.exit(EXIT_PROBLEMS)


# ---------------------------------------------------------------------------------------------- write commands
#: ``--recovery`` of the commands that open the store as its node (README: "Repair").
RECOVERY_OPT = click.option(
    "--recovery", type=click.Choice(["strict", "truncate-tail", "partial"], case_sensitive=False),
    default="strict", show_default=True,
    help="Recovery policy of the open: strict refuses damaged data (exit 4); truncate-tail drops a damaged "
         "tail; partial also drops damaged committed entries (marked recovered_partially). See `repair`.")


def _policy(name: str) -> RecoveryPolicy:
    return RecoveryPolicy(name.upper().replace("-", "_"))


def _node_identity(data_dir: str) -> tuple[str, str, FsyncMode]:
    """(node_id, cluster_id, last fsync mode) of a stopped node, refusing (exit 5) if a process has it open."""
    data_dir = _check_dir(data_dir)
    who = store_holder(data_dir)  # NodeStore.open refuses too (DataDirLocked); this says it first
    if who is not None:
        raise CliError(f"refused: {data_dir} is in use by {who.describe()} (is the node running?); stop it "
                       "first, or do this from inside the node process", EXIT_REFUSED)
    conn = open_main_readonly(data_dir)
    try:
        node = _node_record(conn, os.path.join(data_dir, layout.MAIN_DB))
        mode = (conn.execute("SELECT value FROM settings WHERE key='fsync_mode'").fetchone() or ("FULL",))[0]
    finally:
        conn.close()
    return (node["node_id"], node["cluster_id"],
            FsyncMode(mode) if mode in FsyncMode.__members__ else FsyncMode.FULL)


def _open_store_for_write(data_dir: str, recovery: str = "strict") -> NodeStore:
    """Open the store as its own node (identity read from the node record, last fsync mode) under the
    recovery policy ``recovery`` (a ``--recovery`` choice), refusing if another process has it open."""
    node_id, cluster_id, fsync = _node_identity(data_dir)
    return NodeStore.open(data_dir, node_id, cluster_id=cluster_id, fsync=fsync, recovery=_policy(recovery))


@cli.command("remove-group")
@DATA_DIR
@click.argument("group")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@RECOVERY_OPT
@JSON_OPT
@friendly
def remove_group_cmd(data_dir: str, group: str, yes: bool, recovery: str, as_json: bool) -> None:
    """Remove GROUP and everything the node stores for it (log, term/vote/commit, snapshots), in one atomic
    commit (NodeStore.remove_group). Asks for confirmation unless --yes. Refused while another process
    has the store open (exit 5); exit 3 if there is no such group."""
    with _open_store_for_write(data_dir, recovery) as store:
        if group not in store.groups():
            raise CliError(f"no group {group!r} in this store (groups: {', '.join(store.groups()) or 'none'})",
                           EXIT_NOT_FOUND)
        lg = store.log(group)
        what = (f"group {group!r}: log {lg.first_index}..{lg.last_index}, commit index "
                f"{store.metadata(group).commit_index}, {len(store.snapshots(group).list())} snapshot(s)")
        if not yes and not click.confirm(f"remove {what} from {data_dir}? This cannot be undone", default=False):
            raise CliError("not removed", EXIT_REFUSED)
        store.remove_group(group)
    if as_json:
        _dump_json({"removed": group, "data_dir": data_dir})
    else:
        out.print(f"removed {_esc(what)}")


@cli.command()
@DATA_DIR
@click.option("--group", "-g", help="Group name (optional when the store holds one group).")
@click.option("--up-to", type=U64, required=True, help="Discard entries <= this index.")
@RECOVERY_OPT
@JSON_OPT
@friendly
def compact(data_dir: str, group: str | None, up_to: int, recovery: str, as_json: bool) -> None:
    """Compact a group's log up to an index: the guarded compaction (refused, exit 5, unless a DURABLE
    snapshot covers it). first_index moves at once; sealed segments below it are deleted. Refused
    while another process has the store open."""
    with _open_store_for_write(data_dir, recovery) as store:
        if group is None:
            gs = store.groups()
            if len(gs) != 1:
                raise click.UsageError(f"pick a group with --group ({', '.join(gs) or 'no groups'})")
            group = gs[0]
        if group not in store.groups():
            raise CliError(f"no group {group!r} in this store (groups: {', '.join(store.groups())})", EXIT_NOT_FOUND)
        log = store.log(group)
        def seg_count() -> int:
            n: int = store.kernel.read(lambda c: db_scalar(c.execute(
                "SELECT count(*) FROM log_segments s JOIN groups g USING (group_id) WHERE g.name=?", (group,))))
            return n
        before, segs_before = log.first_index, seg_count()
        log.compact(up_to)
        res = {"group": group, "first_index_before": before, "first_index": log.first_index,
               "last_index": log.last_index, "snapshot_index": log.snapshot_index,
               "segments_removed": segs_before - seg_count()}
    if as_json:
        _dump_json(res)
    else:
        out.print(f"group {group!r}: first index {before} -> {res['first_index']} (snapshot {res['snapshot_index']}, "
                  f"last {res['last_index']}); {res['segments_removed']} sealed segment(s) deleted")


@cli.command()
@DATA_DIR
@click.option("--recovery", type=click.Choice(["truncate-tail", "partial"], case_sensitive=False), required=True,
              help="truncate-tail: drop a damaged tail (entries above the commit index, after the first bad "
                   "record). partial: also drop damaged committed entries; the group is then marked "
                   "recovered_partially and must catch up from its leader.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@JSON_OPT
@friendly
def repair(data_dir: str, recovery: str, yes: bool, as_json: bool) -> None:
    """Open a stopped node's store under a non-strict recovery policy, so that what fails validation is
    dropped (and recorded in recovery_log), then close it: the node then opens under STRICT again. First
    runs `verify` and shows what is wrong; asks before dropping anything unless --yes. Exit 0 when the
    store is clean or was repaired; 5 when refused (node running, not confirmed, or the policy cannot
    repair the damage)."""
    _node_identity(data_dir)  # refuses while the node runs, before the long verify
    rep = run_verify(_check_dir(data_dir))
    problems = [str(p) for p in rep.problems]
    if not problems:
        # verify reads the files; the node's own open also checks evidence verify cannot see (the WAL
        # high-water mark): only an open that succeeds under STRICT means there is nothing to repair
        try:
            _open_store_for_write(data_dir).close()
        except (CorruptionError, RecoveryRefused) as exc:
            problems = [f"[open] {exc}"]
    if not problems:
        res: dict[str, Any] = {"repaired": False, "problems": [], "recovery": None}
        if as_json:
            _dump_json(res)
        else:
            out.print("[green]the store verifies clean and opens under STRICT: nothing to repair[/]")
        return
    if not as_json:
        out.print(f"found {len(problems)} problem(s):")
        for p in problems:
            out.print(f"  {_esc(p)}")
    if not yes and not click.confirm(f"open {data_dir} under {recovery.upper()} and drop what fails validation? "
                                     "This cannot be undone (take a backup first)", default=False):
        raise CliError("not repaired", EXIT_REFUSED)
    try:
        with _open_store_for_write(data_dir, recovery) as store:
            report = store.recovery_report
    except (CorruptionError, RecoveryRefused) as exc:
        hint = ("; --recovery partial can drop damaged committed entries (the group then catches up from its "
                "leader)" if recovery.lower() == "truncate-tail" else "; restore from a backup")
        raise CliError(f"refused: {recovery.upper()} cannot repair this store: {exc}{hint}", EXIT_REFUSED) from None
    left = [str(p) for p in run_verify(data_dir).problems]  # what the policy could not drop (e.g. a snapshot)
    res = {"repaired": not left, "problems": problems, "remaining": left, "recovery": json.loads(report.to_json())}
    if as_json:
        _dump_json(res)
    else:
        out.print(_esc(report.summary()))
        for d in report.dropped:
            out.print(f"  dropped: {_esc(json.dumps(d, sort_keys=True))}")
        for d in report.repaired:
            out.print(f"  repaired: {_esc(json.dumps(d, sort_keys=True))}")
        if not left:
            out.print("verify now finds no problem; the node opens under STRICT again")
    if left:
        raise CliError(f"not repaired: {recovery.upper()} left {len(left)} problem(s) that verify still finds: "
                       f"{'; '.join(left[:3])}{' ...' if len(left) > 3 else ''} (restore from a backup)", EXIT_REFUSED)


@cli.command("vacuum")
@DATA_DIR
@RECOVERY_OPT
@JSON_OPT
@friendly
def vacuum_cmd(data_dir: str, recovery: str, as_json: bool) -> None:
    """Give the free pages of a stopped node's raft.db and chunks.db back to the file system (SQLite
    VACUUM, then a WAL truncation); `status` shows how much is free. Validates the store first
    (--recovery). Refused while the node runs (exit 5) or when the disk lacks room for VACUUM's
    temporary copy and WAL (nothing changed). Crash-safe: a crash leaves the old or the new file."""
    from .maintenance import vacuum

    node_id, cluster_id, fsync = _node_identity(data_dir)
    with contextlib.ExitStack() as stack:
        status = None if as_json or not err.is_terminal else stack.enter_context(err.status("opening the store"))

        def progress(name: str) -> None:
            if status is not None:
                status.update(f"VACUUM {name}")

        try:
            rep = vacuum(data_dir, node_id, cluster_id=cluster_id, fsync=fsync, recovery=_policy(recovery),
                         progress=progress)
        except StorageFault as exc:
            if "nothing was changed" in str(exc):
                raise CliError(f"refused: {exc}", EXIT_REFUSED) from None
            raise
    if as_json:
        _dump_json(rep.to_dict())
    else:
        for b, a in zip(rep.before, rep.after):
            out.print(f"{b.name}: {_size(b.file_bytes)} + WAL {_size(b.wal_bytes)} ({_size(b.free_bytes)} free) -> "
                      f"{_size(a.file_bytes)} + WAL {_size(a.wal_bytes)} ({_size(a.free_bytes)} free)")
        out.print(f"reclaimed {_size(rep.reclaimed)} on disk in {rep.duration:.2f} s")
    if rep.held_back:
        raise CliError(f"vacuumed, but a reader in another process (a `sql` prompt, `serve`, a backup) held the WAL "
                       f"of {', '.join(rep.held_back)}: the file shrinks at the node's next complete checkpoint; "
                       "stop the reader and run vacuum again to give the space back now", EXIT_REFUSED)


@cli.command()
@DATA_DIR
@JSON_OPT
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly
def verify(data_dir: str, as_json: bool, quiet: bool) -> None:
    """Full validation: integrity_check of both files, every record CRC, every sealed segment's sidecar
    checksum, metadata and node CRCs, snapshot chunks and chains. Exit 1 if anything is wrong.
    Read-only: safe while the node runs."""
    data_dir = _check_dir(data_dir)
    if as_json or quiet or not err.is_terminal:
        rep = run_verify(data_dir)
    else:
        from rich.progress import (  # deferred: start-up speed (only on a terminal)
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as prog:
            task = prog.add_task("verify", total=None)

            def cb(stage: str, done: int, total: int | None) -> None:
                prog.update(task, description=stage, completed=done, total=total)

            rep = run_verify(data_dir, progress=cb)
    if as_json:
        _dump_json(rep.to_dict())
    else:
        for k, v in rep.integrity.items():
            out.print(f"integrity_check {k}: {v}")
        for w in rep.warnings:
            out.print(f"[yellow]warning:[/] {_esc(w)}")
        if rep.problems:
            t = Table(title="problems", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
            for c in ("kind", "file", "group", "at", "message"):
                t.add_column(c, overflow="fold")
            for p in rep.problems:
                t.add_row(p.kind, p.file, p.group or "-", "-" if p.index is None else str(p.index), p.message)
            out.print(t)
        out.print(("[green]" if rep.ok else "[bold red]") + _esc(rep.summary()) + "[/]")
    if not rep.ok:
        sys.exit(EXIT_PROBLEMS)


@cli.command()
@DATA_DIR
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Write to FILE instead of stdout, atomically (a temporary file in FILE's folder, fsynced, mode "
                   "0644, renamed over FILE): for node_exporter's textfile collector (name it *.prom). Nothing "
                   "is written if reading the store fails.")
@JSON_OPT
@friendly
def metrics(data_dir: str, output: str | None, as_json: bool) -> None:
    """Print the Prometheus text format (or --json) of a (stopped or running) node's metrics, read from its
    files. Points in time are *_timestamp_seconds (unix time): a textfile does not go stale. Histograms
    and counters of a running process (commit and fsync latency, appends) exist only in that process and
    are not persisted: mount raft_sqlite.metrics.StoreMetrics there."""
    try:
        from . import metrics as mod  # deferred: optional dependency prometheus_client (exit 6)
    except ImportError as exc:
        raise CliError(f"metrics need prometheus_client: pip install 'raft_sqlite[metrics]' ({exc})",
                       EXIT_UNAVAILABLE) from None
    families = mod.collect_data_dir(_check_dir(data_dir))
    text = json.dumps(mod.to_json(families), indent=2) + "\n" if as_json else mod.to_text(families)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        mod.write_textfile(output, text)
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc}", EXIT_USAGE) from None


@cli.command()
@DATA_DIR
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. A non-loopback address needs --allow-remote (there is no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="Port to listen on (0: pick a free one; the URL is printed).")
@click.option("--allow-remote", is_flag=True, help="Allow a --host that other machines can reach (prints a warning).")
@friendly
def serve(data_dir: str, host: str, port: int, allow_remote: bool) -> None:
    """A read-only browser view of the node (Datasette; extra `web`): tables, inspection views and canned
    queries (group status, log tail per group, snapshot chains, recovery history, backups) of
    raft.db and chunks.db, payloads shown as size, UTF-8 preview and hex. Files are opened read-only
    (never immutable: it shows the live node), only GET requests and SELECTs are served, and each query
    is one short read transaction (at most 1 s): safe while the node runs. Runs until Ctrl-C.

    Each group's SQL state database (store.state) is served too, as `state-<group>` (`state-g<id>` when the
    name is not plain letters, digits, _ and -, or looks like g<digits>), with the canned query
    raft_applied_position; one that no process has open (no WAL file) is read as an immutable file, so
    that nothing is created beside it."""
    from . import web  # deferred: the optional extra `web` is imported only by this command

    try:
        web.require()
        remote = web.check_host(host, allow_remote)
    except web.WebUnavailable as exc:
        raise CliError(str(exc), EXIT_UNAVAILABLE) from None
    except (web.RemoteRefused, web.ListenError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    checked = _check_dir(data_dir)
    conn = open_main_readonly(checked)  # exit 3/4 before listening: not a store, unreadable, corrupt
    try:
        node = _node_record(conn, os.path.join(checked, layout.MAIN_DB))
        groups = _groups(conn)  # whose state databases to serve too
    finally:
        conn.close()  # closed before the server opens the files through another SQLite library
    if remote:
        err.print(f"[bold yellow]warning:[/] serving on {_esc(host)}, reachable from other machines: anyone who "
                  "can connect can read this node's data (read-only, no authentication)")

    def ready(s: web.Serving) -> None:
        out.print(f"serving {_esc(os.path.abspath(checked))} ({', '.join(s.files)}; node {_esc(node['node_id'])}, "
                  f"cluster {_esc(node['cluster_id'])}) read-only at {s.url}", soft_wrap=True)
        out.print("press Ctrl-C to stop", soft_wrap=True)
        sys.stdout.flush()

    try:
        web.serve(checked, host=host, port=port, on_ready=ready, groups=groups,
                  title=f"raft_sqlite node {node['node_id']} (cluster {node['cluster_id']})")
    except (web.ListenError, web.PathRefused) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    out.print("stopped")


def _backup_module() -> ModuleType:
    try:
        from . import backup  # deferred: optional component, missing in some builds (exit 6)
    except ImportError as exc:
        raise CliError(f"backup support is not available in this build (raft_sqlite.backup: {exc})",
                       EXIT_UNAVAILABLE) from None
    return backup


def _show(obj: Any, as_json: bool) -> None:
    if as_json:
        _dump_json(obj)
        return
    d = json.loads(json.dumps(obj, default=_json_default))
    if isinstance(d, dict):
        for k, v in d.items():
            out.print(f"[bold]{k}[/]: {_esc(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}")
    else:
        out.print(_esc(json.dumps(d, indent=2)))


class _BackupProgress:
    """A rich progress bar on stderr fed by the backup module's ``progress(phase, done, total)``
    callback (``callback`` is None when stderr is not a terminal, with --json or --quiet)."""

    def __init__(self, quiet: bool):
        self.callback: Callable[[str, int, int | None], None] | None = None
        self._prog: Progress | None = None
        if not quiet and err.is_terminal:
            from rich.progress import (  # deferred: start-up speed (only on a terminal)
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            prog = self._prog = Progress(TextColumn("{task.description:<18}"), BarColumn(), DownloadColumn(),
                                         TransferSpeedColumn(), TimeElapsedColumn(), console=err, transient=True)
            self._tasks: dict[str, TaskID] = {}

            def cb(phase: str, done: int, total: int | None) -> None:
                t = self._tasks.get(phase)
                if t is None:
                    t = self._tasks[phase] = prog.add_task(phase, total=total)
                prog.update(t, completed=done, total=total)

            self.callback = cb

    def __enter__(self) -> _BackupProgress:
        if self._prog is not None:
            self._prog.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._prog is not None:
            self._prog.stop()


def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` pairs as fsspec storage options (VALUE read as JSON when it is JSON:
    ``anon=true``, ``client_kwargs={"region_name": "eu-west-1"}``; else kept as a string)."""
    if not pairs:
        return None
    opts: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise CliError(f"--storage-option wants KEY=VALUE, not {p!r}", EXIT_USAGE)
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    return opts


STORAGE_OPT = click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                           help="An fsspec storage option for a URL destination (repeatable), e.g. "
                                "endpoint_url=http://127.0.0.1:9000, key=..., secret=.... Without them each "
                                "backend reads its usual environment and config files (AWS_* for S3).")


@cli.command()
@DATA_DIR
@click.argument("dest", metavar="DEST")
@click.option("--keep", type=click.IntRange(min=1), help="Then prune: keep this many newest backups of the node.")
@click.option("--max-age", type=click.FloatRange(min=0), help="Then prune: remove backups older than this many "
              "seconds (the newest is always kept).")
@click.option("--skip-unchanged", is_flag=True, help="Take no backup when nothing changed since the newest one "
              "(the check is recorded, so the backup age stays fresh).")
@click.option("--compression", type=click.Choice(["zstd", "none"]), default="zstd", show_default=True,
              help="Compression of the objects of a URL backup (a local folder is never compressed).")
@click.option("--compression-level", type=click.IntRange(1, 19), default=1, show_default=True,
              help="zstd level of a URL backup (1: fastest; higher: smaller and slower).")
@click.option("--max-upload-rate", type=click.FloatRange(min=0, min_open=True), metavar="BYTES_PER_S",
              help="Pace the upload of a URL backup (compressed bytes per second).")
@click.option("--stale-after", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="URL backups: prune removes unfinished uploads older than this many seconds.")
@STORAGE_OPT
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@JSON_OPT
@friendly
def backup(data_dir: str, dest: str, keep: int | None, max_age: float | None, skip_unchanged: bool,
           compression: str, compression_level: int, max_upload_rate: float | None, stale_after: float,
           storage_option: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Take a point-in-time backup of a node into DEST: a local folder (DEST/<node_id>/<UTC timestamp>/
    with raft.db, chunks.db and manifest.json, written last) or a URL (s3://bucket/prefix, gs://...,
    file:///...: one compressed object per file, streamed, then the manifest). On a running node it is a
    live backup from this process: read-only, never blocking the node (its point in time is one commit of
    the node); on a stopped node the store is opened and the backup recorded in it."""
    mod = _backup_module()
    opts = _storage_options(storage_option)
    if opts is not None and not is_url(dest):
        raise CliError("--storage-option applies to URL destinations only", EXIT_USAGE)
    checked = _check_dir(data_dir)
    who = store_holder(checked)

    def run(source: Any) -> tuple[Any, list[str]]:
        mgr = mod.HotBackupManager(source, dest, skip_unchanged=skip_unchanged, compression=compression,
                                   compression_level=compression_level, max_upload_rate=max_upload_rate,
                                   stale_after=stale_after, storage_options=opts)
        with _BackupProgress(quiet or as_json) as bar:
            info = mgr.backup(progress=bar.callback)
        return info, mgr.prune(keep=keep, max_age=max_age) if (keep or max_age is not None or mgr.remote) else []

    if who is not None:
        # the node is running: a live backup from this process (read-only, the node is never blocked)
        if not quiet:  # (on stderr: --json output stays clean)
            err.print(f"{_esc(checked)} is in use by {_esc(who.describe())}: taking a live backup (read-only; "
                      "recorded in the backup folder, not in the node's store)")
        info, pruned = run(mod.LiveSource(checked))
    else:
        with _open_store_for_write(data_dir) as store:
            info, pruned = run(store)
    stored = sum(f.get("object_size", f["size"]) for f in info.manifest["files"])
    if as_json:
        _dump_json({"path": info.path, "size": info.size, "stored_size": stored, "skipped": info.skipped,
                    "live": who is not None,
                    "duration": info.duration, "pruned": pruned, "manifest": info.manifest})
        return
    if info.skipped:
        out.print(f"nothing changed since backup {_esc(info.path)} (point in time {info.manifest['created_at']}): "
                  "no new backup")
    else:
        out.print(f"backup {_esc(info.path)}")
        ratio = f" ({_size(stored)} stored, {info.size / max(stored, 1):.1f}x smaller)" if stored != info.size else ""
        out.print(f"  {_size(info.size)}{ratio} in {info.duration:.2f} s; point in time {info.manifest['created_at']}")
        for g in info.manifest["groups"]:
            out.print(f"  group {_esc(g['name'])}: term {g['term']}, commit {g['commit_index']}, log "
                      f"{g['first_index']}..{g['last_index']}, snapshot {g['snapshot_index']}")
    for p in pruned:
        out.print(f"  pruned {_esc(p)}")


@cli.command()
@click.argument("backup_dir", metavar="DEST")
@click.option("--verify", "check", is_flag=True, help="Also check every file's sha256 (reads every backup; "
              "downloads every backup at a URL).")
@STORAGE_OPT
@JSON_OPT
@friendly
def backups(backup_dir: str, check: bool, storage_option: tuple[str, ...], as_json: bool) -> None:
    """List the backups in DEST, a folder or a URL (node by node, newest first by sequence number, not by
    the clock) with age and status: complete, incomplete (no manifest: interrupted, never restorable) or
    corrupt (the manifest does not verify)."""
    mod = _backup_module()
    opts = _storage_options(storage_option)
    if not is_url(backup_dir) and not os.path.isdir(backup_dir):
        raise CliError(f"backup_dir {backup_dir!r} does not exist", EXIT_NOT_FOUND)
    if is_url(backup_dir) and not Remote(backup_dir, opts).exists():
        raise CliError(f"{backup_dir!r} does not exist (no such bucket or folder)", EXIT_NOT_FOUND)
    rows = mod.list_backups(backup_dir, verify=check, storage_options=opts)
    if as_json:
        _dump_json(rows)
        return
    t = Table(title=f"{len(rows)} backup(s) in {_esc(backup_dir)}", title_justify="left")
    for c in ("node", "seq", "created (UTC)", "age", "status", "size", "path"):
        t.add_column(c, justify="right" if c in ("seq", "age", "size") else "left", overflow="fold")
    for b in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b["created_at"]))
        status = {"complete": "[green]complete[/]", "incomplete": "[yellow]incomplete[/]"}.get(
            b["status"], f"[bold red]{b['status']}[/]: {_esc(b['error'] or '')}")
        size = "-" if b["size"] is None else _size(b["size"])
        if b.get("stored_size") is not None:
            size += f" ({_size(b['stored_size'])} stored)"
        t.add_row(_esc(b["node_id"]), "-" if b["seq"] is None else str(b["seq"]), created, _age(b["age"]), status,
                  size, _esc(b["path"]))
    out.print(t)


@cli.command()
@click.argument("backup_path", metavar="BACKUP")
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--latest", is_flag=True, help="BACKUP is a backup root (the folder or URL given to `backup`): "
              "restore the newest backup of --node that verifies.")
@click.option("--node", metavar="NODE_ID", help="With --latest: whose backup to restore.")
@click.option("--node-id", "node_id", metavar="NEW_NODE_ID", help="Re-identify the restored node (a replacement "
              "joining under a new identity); recorded in the restore event. Open it with this id.")
@click.option("--quorum-loss", "--allow-quorum-loss", "allow_quorum_loss", is_flag=True,
              help="State that a majority of the cluster is permanently lost: the restore is recorded as a "
                   "quorum_loss_restore and every group must re-bootstrap its membership from this node "
                   "(entries committed after the backup are lost). Without it the restore is a node "
                   "replacement: the node rejoins its surviving cluster and catches up.")
@click.option("--mode", type=click.Choice(["node-replacement", "quorum-loss"]),
              help="Name the restore kind explicitly; quorum-loss still requires --quorum-loss.")
@STORAGE_OPT
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@JSON_OPT
@friendly
def restore(backup_path: str, data_dir: str, latest: bool, node: str | None, node_id: str | None,
            allow_quorum_loss: bool, mode: str | None, storage_option: tuple[str, ...], quiet: bool,
            as_json: bool) -> None:
    """Restore BACKUP (a backup folder or the URL of one; with --latest a backup root and --node) into a new
    or empty DATA_DIR: the manifest and every checksum are verified before anything is written (a URL
    backup is downloaded and verified first), then the result is opened with STRICT recovery."""
    mod = _backup_module()
    if latest != (node is not None):
        raise CliError("--latest and --node go together", EXIT_USAGE)
    if not is_url(backup_path) and not os.path.exists(backup_path):
        raise CliError(f"backup {backup_path!r} does not exist", EXIT_NOT_FOUND)
    with _BackupProgress(quiet or as_json) as bar:
        info = mod.restore(backup_path, data_dir, allow_quorum_loss=allow_quorum_loss,
                           mode=None if mode is None else mode.replace("-", "_"), progress=bar.callback,
                           latest=latest, node=node, node_id=node_id,
                           storage_options=_storage_options(storage_option))
    if as_json:
        _dump_json({"data_dir": info.data_dir, "backup_path": info.backup_path, "kind": info.kind,
                    "duration": info.duration, "event": info.event})
        return
    out.print(f"restored {_esc(info.backup_path)} into {_esc(info.data_dir)} as a [bold]{info.kind}[/] "
              f"(backup point {info.manifest['created_at']}) in {info.duration:.2f} s")
    if "reidentified_from" in info.event:
        out.print(f"  node {_esc(info.event['reidentified_from'])} re-identified as {_esc(info.event['node_id'])}")
    out.print(f"  next: {_esc(info.event['action'])}")


@cli.command()
@click.argument("dest", metavar="DEST")
@click.option("--node", "node_id", required=True, metavar="NODE_ID", help="Whose newest backup to drill.")
@click.option("--scratch-dir", type=click.Path(file_okay=False, path_type=str),
              help="Where to restore (a new folder in it, removed afterwards; default: the temporary directory).")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the raft_sqlite_restore_drill_* gauges there (Prometheus text, atomically: for "
                   "node_exporter's textfile collector).")
@STORAGE_OPT
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@JSON_OPT
@friendly
def drill(dest: str, node_id: str, scratch_dir: str | None, metrics_file: str | None,
          storage_option: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Restore drill: restore the newest backup of --node from DEST (a folder or a URL) into a scratch folder,
    open it under STRICT recovery, run the full verify, report age, size and result. Exit 0 if it
    restored and verified, 1 if not."""
    mod = _backup_module()
    with _BackupProgress(quiet or as_json) as bar:
        rep = mod.drill(dest, node_id, storage_options=_storage_options(storage_option), scratch_dir=scratch_dir,
                        progress=bar.callback)
    if metrics_file is not None:  # atomic, fsync'ed, 0644: what node_exporter's textfile collector reads
        try:
            fsio.write_output_atomically(metrics_file, rep.metrics_text().encode())
        except OSError as exc:
            raise CliError(f"cannot write {metrics_file}: {exc.strerror or exc}", EXIT_USAGE) from None
    if as_json:
        _dump_json(rep.to_dict())
    else:
        where = "-" if rep.backup_path is None else _esc(rep.backup_path)
        age = "-" if rep.backup_age is None else _age(rep.backup_age)
        if rep.ok:
            out.print(f"[bold green]OK[/]: {where} (age {age}, {_size(rep.size)}) restored, opened under STRICT "
                      f"and verified in {rep.duration:.2f} s")
        else:
            out.print(f"[bold red]FAILED[/]: {where} (age {age}): {_esc(rep.error or '')}")
    if not rep.ok:
        sys.exit(EXIT_PROBLEMS)


# ---------------------------------------------------------------------------------------------- demo
@cli.command("_demo-node", hidden=True)
@click.argument("data_dir")
@click.option("--groups", default=3)
def demo_node(data_dir: str, groups: int) -> None:
    """The demo's node process (:func:`raft_sqlite.demo.run_demo_node`). Runs until killed."""
    run_demo_node(data_dir, groups)


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=str),
              help="Where the demo node keeps its data (default: a temporary directory, removed afterwards).")
@click.option("--groups", type=click.IntRange(1, 16), default=3, show_default=True, help="Raft groups (writer threads).")
@click.option("--min-run", type=click.FloatRange(0.1), default=1.0, show_default=True)
@click.option("--max-run", type=click.FloatRange(0.1), default=3.0, show_default=True,
              help="The node is SIGKILLed at a random moment between --min-run and --max-run seconds.")
@click.option("--seed", type=int, help="Random seed for the kill moment.")
@JSON_OPT
@friendly
def demo(data_dir: str | None, groups: int, min_run: float, max_run: float, seed: int | None,
         as_json: bool) -> None:
    """A node writes (FULL fsync) and reports each acknowledged index; it is SIGKILLed at a random moment;
    the store is reopened and every acknowledged entry is checked (present, CRC, payload). Exit 0 if
    nothing acknowledged was lost, 1 otherwise."""
    def say(text: str) -> None:
        if not as_json:
            out.print(text)

    try:
        res = run_demo(data_dir, groups, min_run, max_run, seed, say)
    except DemoError as exc:
        raise CliError(str(exc), EXIT_PROBLEMS) from None
    result = res.result
    if as_json:
        _dump_json(result)
    else:
        t = Table(title="4. every acknowledged entry checked (present, CRC verified, payload equal)",
                  title_justify="left")
        for c in ("group", "acked", "found", "intact", "lost", "durable, not yet acked", "commit index"):
            t.add_column(c, justify="left" if c == "group" else "right")
        for r in result["groups"]:
            t.add_row(r["group"], str(r["acked"]), str(r["found"]), str(r["intact"]),
                      ("[bold red]" if r["lost"] else "[green]") + str(r["lost"]) + "[/]",
                      str(r["unacked_durable"]), str(r["commit_index"]))
        out.print(t)
        out.print(f"[bold]5.[/] {result['verify']}")
        if result["ok"]:
            out.print(f"[bold green]OK[/]: all {result['acked']} acknowledged entries survived SIGKILL intact.")
        else:
            out.print(f"[bold red]FAILED[/]: {result['lost']} acknowledged entries lost or damaged"
                      + ("" if res.verify_ok else "; verify found problems"))
    if not result["ok"]:
        sys.exit(EXIT_PROBLEMS)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``raft-sqlite``)."""
    cli.main(args=argv, prog_name="raft-sqlite")


if __name__ == "__main__":
    main()
