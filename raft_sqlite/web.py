"""``raft-sqlite serve``: a read-only browser view of a (live) node, built on Datasette.

What it serves: ``raft.db`` (tables, the inspection views of :mod:`raft_sqlite.sqlobjects` and the
:data:`CANNED_QUERIES`: group status, log tail per group, snapshot chains, recovery history, backups), ``chunks.db``
(snapshot chunk blobs) and every group's SQL state database (``store.state(group)``, named as
:func:`state_db_name`, with :data:`STATE_QUERIES`), each as its own Datasette database. BLOB cells
(payloads, chunks) are shown as size + UTF-8 preview + hex prefix (:func:`payload_preview`), as text: never
rendered as HTML, never executed.

Why it is safe beside a running node, in layers:

* HTTP: only GET and HEAD reach Datasette (:func:`read_only_asgi`); every other method gets 405, so no
  canned query, plugin or form can be POSTed to. No canned query is declared writable.
* Datasette: only SELECT statements run (its own check), downloads of whole database files are off.
* SQLite: every file is opened ``mode=ro`` (Datasette's mode for a *mutable* file: it reads the live WAL;
  ``immutable=1`` would read stale or torn data while the node writes), each connection sets
  ``PRAGMA query_only`` and an authorizer (:func:`authorizer`) that denies anything but reading (the state
  databases too).
* Locks: a reader never takes the write lock and never checkpoints; each query runs in its own short
  read transaction, bounded by Datasette's time limit (``sql_time_limit_ms``, 1 s), so the node's
  checkpoints are delayed by at most that long and never blocked by an idle browser page.
* Network: it listens on loopback unless told otherwise (:func:`check_host`); there is no
  authentication, so a non-loopback address needs ``allow_remote`` and prints a warning.

Datasette and uvicorn are the optional extra ``web``; this module imports them only when a server is
built (:func:`require`), so importing it never fails and a missing package is :class:`WebUnavailable`.
Run it in its own process (the CLI does): Datasette reads through Python's ``sqlite3`` and a node through
apsw's SQLite, and two SQLite libraries must not have the same file open in one process.
"""

from __future__ import annotations

import codecs
import contextlib
import ipaddress
import os
import re
import signal
import socket
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import layout
from .dbrows import read_only_authorizer
from .errors import RaftSqliteError
from .sqlstate import STATE_DIR, state_file

#: bytes of a BLOB shown as UTF-8 text / as hex in a cell
PREVIEW_TEXT_BYTES = 96
PREVIEW_HEX_BYTES = 32
#: Datasette database names (the file names without ``.db``)
MAIN_NAME = os.path.splitext(layout.MAIN_DB)[0]
CHUNKS_NAME = os.path.splitext(layout.CHUNKS_DB)[0]
_KIND = "CASE e.kind WHEN 0 THEN 'NORMAL' WHEN 1 THEN 'CONFIG' WHEN 2 THEN 'NOOP' ELSE e.kind END"

#: name -> Datasette canned query on raft.db (all read-only SELECTs on the tables and views). The names differ
#: from every table and view name (a canned query would hide the table or view of the same name).
CANNED_QUERIES: dict[str, dict[str, Any]] = {
    "group_overview": {
        "title": "Group status",
        "description": "One row per Raft group: term, vote, commit index, log bounds, entries, bytes, segments, "
                       "snapshot index and ages (the group_status view).",
        "sql": "SELECT * FROM group_status ORDER BY name",
    },
    "log_tail": {
        "title": "Log tail of a group",
        "description": "The newest 100 log entries of a group (newest first) with term, kind, size, CRC and a "
                       "payload preview. Parameter: the group's name.",
        "sql": f"""SELECT e.idx AS "index", e.term, {_KIND} AS kind, length(e.payload) AS size,
       printf('%08x', e.crc32) AS crc32, e.segment, e.idx < g.first_index AS compacted, e.payload
FROM groups g JOIN log_entries e
  ON e.key >= (g.group_id << {layout.KEY_SHIFT}) AND e.key < ((g.group_id + 1) << {layout.KEY_SHIFT})
WHERE g.name = :group
ORDER BY e.key DESC
LIMIT 100""",
        "params": ["group"],
    },
    "snapshot_chains": {
        "title": "Snapshot chains",
        "description": "One row per snapshot manifest with its chain: base_id is the FULL snapshot the chain "
                       "starts from (empty: the chain is broken), chain_depth the DELTA links above it.",
        "sql": "SELECT * FROM snapshot_chain ORDER BY group_name, idx, snapshot_id",
    },
    "recovery_history": {
        "title": "Recovery history",
        "description": "Every open, restore and recovery of this node, newest first (the recovery_log view).",
        "sql": "SELECT * FROM recovery_log ORDER BY event_id DESC",
    },
    "recent_backups": {
        "title": "Backups",
        "description": "Backups recorded by this node, newest first (the backup_history view; live backups "
                       "taken from another process are recorded in the backup folder only).",
        "sql": "SELECT * FROM backup_history ORDER BY backup_id DESC",
    },
}


#: Datasette names of the state databases start with this (raft.db and chunks.db are ``raft`` and ``chunks``)
STATE_PREFIX = "state-"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_NAME = re.compile(r"g[0-9]+")

#: name -> Datasette canned query on every state database (names in the ``raft_`` namespace of the state
#: machine's own tables, so that they hide no application table of that name but a reserved one)
STATE_QUERIES: dict[str, dict[str, Any]] = {
    "raft_applied_position": {
        "title": "Applied position",
        "description": "The last log entry applied to this state (index and term, committed in the same "
                       "transaction as its changes) and whose state it is.",
        "sql": "SELECT a.applied_index, a.applied_term, i.group_name, i.node_id, i.cluster_id, i.format, "
               "datetime(i.created_at, 'unixepoch') AS created_utc FROM raft_applied a, raft_state_identity i",
    },
}


def state_db_name(group: str, gid: int) -> str:
    """The Datasette name of group ``group``'s state database: ``state-<group>`` when the name is plain
    (letters, digits, ``_``, ``-``; at most 64) and not of the form ``g<digits>``, else ``state-g<gid>``. The
    two forms never meet, so every group gets its own name whatever the names of the others."""
    if _PLAIN_NAME.fullmatch(group) and not _ID_NAME.fullmatch(group):
        return STATE_PREFIX + group
    return f"{STATE_PREFIX}g{gid}"


@dataclass(frozen=True)
class StateDb:
    """A state database served: its Datasette ``name``, its group and the file (served ``mode=ro`` through its
    WAL like raft.db: a state database keeps its WAL file across opens, so nothing is created)."""

    name: str
    group: str
    group_id: int
    path: str


def state_databases(data_dir: str, groups: Mapping[str, int]) -> list[StateDb]:
    """The state databases of ``groups`` (name -> group id, from raft.db) present in ``data_dir``, by name."""
    found = []
    for group, gid in groups.items():
        path = os.path.abspath(state_file(data_dir, gid))
        if os.path.isfile(path):
            found.append(StateDb(state_db_name(group, gid), group, gid, path))
    return sorted(found, key=lambda d: d.name)


def is_served(database: str) -> bool:
    """Whether ``database`` is one this module serves (the hooks act on these only)."""
    return database in (MAIN_NAME, CHUNKS_NAME) or database.startswith(STATE_PREFIX)


class WebUnavailable(RaftSqliteError):
    """Datasette or uvicorn is not installed (``pip install 'raft_sqlite[web]'``)."""


class RemoteRefused(RaftSqliteError):
    """The address to listen on is not a loopback address and remote access was not allowed."""


class PathRefused(RaftSqliteError):
    """The data_dir's path holds a character Datasette would read as part of an SQLite URI (``?``, ``#``,
    ``%``): it builds ``file:PATH?mode=ro`` without escaping, so such a path could open another file, or
    open read-write. Refused rather than served wrong."""


class ListenError(RaftSqliteError):
    """The address could not be resolved or bound (in use, not an address of this machine)."""


def require() -> tuple[ModuleType, ModuleType]:
    """The ``datasette.app`` and ``uvicorn`` modules, imported here; :class:`WebUnavailable` if missing."""
    try:
        import datasette.app  # deferred: optional extra ``web``
        import uvicorn  # deferred: optional extra ``web``
    except ImportError as exc:
        raise WebUnavailable(f"the browser view needs Datasette: pip install 'raft_sqlite[web]' ({exc})") from None
    return datasette.app, uvicorn


# ---------------------------------------------------------------------------------------------- rendering
def payload_preview(value: bytes) -> str:
    """How a BLOB cell is shown: ``<size> B``, the first :data:`PREVIEW_TEXT_BYTES` as text when they
    decode as UTF-8 (control characters shown as ``\\xNN``), and the first :data:`PREVIEW_HEX_BYTES` as hex;
    ``…`` marks a cut. Plain text: Datasette escapes it (a ``<script>`` payload is shown, not run)."""
    data = bytes(value)
    parts = [f"{len(data):,} B"]
    head = data[:PREVIEW_TEXT_BYTES]
    try:
        # final=False: a multi-byte character cut by the preview length is dropped, not an error
        text = codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=len(data) <= len(head))
    except UnicodeDecodeError:
        text = None
    if text is not None and data:
        shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
        parts.append(f"utf-8: {shown}{'…' if len(data) > len(head) else ''}")
    if data:
        parts.append(f"hex: {data[:PREVIEW_HEX_BYTES].hex()}{'…' if len(data) > PREVIEW_HEX_BYTES else ''}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------- read-only
#: The served connections' authorizer: reading, functions, recursive CTEs, read transactions and reading
#: a PRAGMA are allowed; everything else (INSERT/UPDATE/DELETE, DDL, ATTACH, setting a PRAGMA) is denied
#: before the statement runs. One with the `sql` command's (``dbrows.read_only_authorizer``).
authorizer = read_only_authorizer()


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


def read_only_asgi(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI ``app`` so that only GET and HEAD requests reach it; any other method is answered
    ``405 Method Not Allowed`` (with ``Allow: GET, HEAD``) without calling it."""

    async def guarded(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope.get("method", "GET") not in ("GET", "HEAD"):
            body = b"raft-sqlite serve is read-only: only GET and HEAD requests are accepted\n"
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", b"GET, HEAD"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return guarded


class RaftSqliteWebHooks:
    """The in-process Datasette plugin (registered by :func:`build_app`); its hooks act on the databases
    this module serves only."""

    @staticmethod
    def render_cell(value: Any, database: str) -> str | None:
        """BLOB cells of raft.db / chunks.db / state databases as :func:`payload_preview` (plain text:
        Datasette escapes it)."""
        if is_served(database) and isinstance(value, (bytes, bytearray, memoryview)):
            return payload_preview(bytes(value))
        return None

    @staticmethod
    def prepare_connection(conn: sqlite3.Connection, database: str) -> None:
        """``query_only`` and :func:`authorizer` on every connection to raft.db / chunks.db / a state database."""
        if is_served(database):
            conn.execute("PRAGMA query_only=1")
            conn.set_authorizer(authorizer)


_PLUGIN_NAME = "raft_sqlite.web"


def _register_plugin() -> None:
    """Register :class:`RaftSqliteWebHooks` with Datasette's plugin manager, in this process, once."""
    from datasette import hookimpl  # deferred: optional extra ``web``
    from datasette.plugins import pm  # deferred: optional extra ``web``

    if pm.get_plugin(_PLUGIN_NAME) is None:
        hookimpl(RaftSqliteWebHooks.render_cell)
        hookimpl(RaftSqliteWebHooks.prepare_connection)
        pm.register(RaftSqliteWebHooks, name=_PLUGIN_NAME)


def _quiet_handled_errors() -> None:
    """Datasette prints every exception it turns into an error page (a 404, a refused write statement) to
    the server's console as a rich traceback with local variables, when rich is importable (it is: the CLI
    uses it). The page already says what went wrong; the console stays quiet."""
    import datasette.handle_exception  # deferred: optional extra ``web``

    datasette.handle_exception.rich = None


# ---------------------------------------------------------------------------------------------- app
def metadata(title: str, states: list[StateDb] | None = None) -> dict[str, Any]:
    """Datasette metadata: title, descriptions, the canned queries, log entries newest first."""
    meta: dict[str, Any] = {
        "title": title,
        "description": "Read-only view of a raft_sqlite node (raft-sqlite serve). Payloads are shown as "
                       "size | utf-8 preview | hex prefix. Nothing here can write to the node.",
        "databases": {
            MAIN_NAME: {
                "description": "The node's log, Raft metadata, snapshot manifests, backups and recovery events, "
                               "with the inspection views.",
                "queries": CANNED_QUERIES,
                "tables": {"log_entries": {"sort_desc": "key"}},
            },
            CHUNKS_NAME: {"description": "Snapshot chunk blobs (snapshot_id, seq, data, crc32)."},
        },
    }
    for st in states or ():
        meta["databases"][st.name] = {
            "description": f"SQL state database of group {st.group!r} (id {st.group_id}, "
                           f"{os.path.join(STATE_DIR, os.path.basename(st.path))}): the application's tables, "
                           "raft_applied (the last applied entry) and raft_state_identity.",
            "queries": STATE_QUERIES,
        }
    return meta


def build_app(data_dir: str, *, title: str, groups: Mapping[str, int] | None = None) -> ASGIApp:
    """The read-only ASGI application serving ``data_dir`` (raft.db and, when present, chunks.db),
    opened ``mode=ro`` (never immutable: the node is live), and the state databases of ``groups`` (name ->
    group id) that exist (:class:`StateDb`). :class:`WebUnavailable` without Datasette."""
    bad = sorted(set("?#%") & set(os.path.abspath(data_dir)))
    if bad:
        raise PathRefused(f"cannot serve {data_dir!r}: its path holds {' '.join(bad)}, which Datasette would read as "
                          "part of the SQLite URI it builds (another file, or opened read-write); move or symlink the "
                          "data_dir to a plain path")
    ds_app, _ = require()
    _register_plugin()
    _quiet_handled_errors()
    files = [os.path.abspath(os.path.join(data_dir, name)) for name in (layout.MAIN_DB, layout.CHUNKS_DB)
             if os.path.isfile(os.path.join(data_dir, name))]
    states = state_databases(data_dir, groups or {})
    ds = ds_app.Datasette(
        files=files, metadata=metadata(title, states), cors=False,
        settings={"allow_download": False, "default_cache_ttl": 0, "suggest_facets": False,
                  "sql_time_limit_ms": 1000},
    )
    from datasette.database import Database  # deferred: optional extra ``web``

    for st in states:
        ds.add_database(Database(ds, path=st.path, is_mutable=True), name=st.name)
    app: ASGIApp = ds.app()
    return read_only_asgi(app)


# ---------------------------------------------------------------------------------------------- network
def _addresses(host: str) -> list[tuple[int, str]]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenError(f"cannot resolve --host {host!r}: {exc}") from None
    return [(int(fam), str(addr[0])) for fam, _t, _p, _c, addr in infos]


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    addrs = _addresses(host)
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for _f, a in addrs)


def check_host(host: str, allow_remote: bool) -> bool:
    """Refuse (:class:`RemoteRefused`) a non-loopback ``host`` unless ``allow_remote``; returns whether
    the server will be reachable from other machines."""
    if is_loopback(host):
        return False
    if not allow_remote:
        raise RemoteRefused(f"--host {host!r} is not a loopback address: the browser view has no authentication "
                            "and would show the node's data to anyone who can reach it; pass --allow-remote "
                            "to serve it there anyway")
    return True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port chosen by the OS)."""
    fam, addr = _addresses(host)[0]
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT/`` of a bound socket (IPv6 addresses in brackets)."""
    addr, port = sock.getsockname()[:2]
    return f"http://{f'[{addr}]' if ':' in addr else addr}:{port}/"


@dataclass
class Serving:
    """What :func:`serve` reports once it listens: the URL to open and the files served."""

    url: str
    files: list[str]


def serve(data_dir: str, *, host: str = "127.0.0.1", port: int = 8001, title: str = "raft_sqlite node",
          on_ready: Callable[[Serving], None] | None = None, groups: Mapping[str, int] | None = None) -> None:
    """Serve ``data_dir`` read-only on ``host:port`` until interrupted (Ctrl-C / SIGINT, SIGTERM: a
    graceful shutdown); ``groups`` (name -> group id): whose state databases to serve too. ``on_ready`` is
    called once the socket listens (``port=0``: the URL has the port chosen). The caller checks the host
    first (:func:`check_host`)."""
    _, uvicorn = require()
    app = build_app(data_dir, title=title, groups=groups)
    sock = bind(host, port)
    try:
        if on_ready is not None:
            files = [n for n in (layout.MAIN_DB, layout.CHUNKS_DB) if os.path.isfile(os.path.join(data_dir, n))]
            files += [os.path.join(STATE_DIR, os.path.basename(st.path))
                      for st in state_databases(data_dir, groups or {})]
            on_ready(Serving(url_of(sock), files))
        server = _server_class(uvicorn)(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _server_class(uvicorn: ModuleType) -> type[Any]:
    """uvicorn's Server, stopping gracefully on SIGINT and SIGTERM and then returning (uvicorn's own
    handling re-raises the signal after shutdown, which surfaces as a KeyboardInterrupt traceback)."""

    class Server(uvicorn.Server):  # type: ignore[misc,name-defined]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

    return Server
