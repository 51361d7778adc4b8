"""Bring a node's database files to the schema this code knows, through alembic.

Opening a store that is already current costs one ``SELECT`` per file (the alembic version is compared
with :data:`raft_sqlite.layout.MAIN_HEAD`/``CHUNKS_HEAD``); alembic and SQLAlchemy's engine are loaded
only when a file must actually be created or upgraded.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import apsw

from . import layout
from .errors import CorruptionError, NodeIdentityMismatch, StorageFault

if TYPE_CHECKING:  # imported lazily at run time (see the module docstring)
    import sqlite3

    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger("raft_sqlite.migrate")

#: Alembic's loggers that narrate every run at INFO (plugins set up, "Context impl", one line per
#: revision). While raft_sqlite runs alembic they are held back to DEBUG on ``raft_sqlite.migrate``: a
#: library must not print 15 lines because a store was created. A real upgrade of a node's file is
#: still logged, once, at INFO.
_ALEMBIC_LOGGERS = ("alembic.runtime.migration", "alembic.runtime.plugins")

BRANCHES = {layout.MAIN_DB: ("main", layout.MAIN_HEAD), layout.CHUNKS_DB: ("chunks", layout.CHUNKS_HEAD)}


def current_revision(conn: apsw.Connection) -> str | None:
    """The alembic revision recorded in an open database, or None for a fresh file."""
    row = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='alembic_version'").fetchone()
    if row is None:
        return None
    rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    rev = rows[0][0] if rows else None
    # version_num is the text alembic writes; another type is only in a damaged file: shown as text
    return rev if rev is None or isinstance(rev, str) else str(rev)


def _script_directory() -> tuple[Config, ScriptDirectory]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    # alembic options go through ConfigParser interpolation: a literal '%' in the install path must be doubled
    cfg.set_main_option("script_location", str(importlib.resources.files("raft_sqlite.migrations")).replace("%", "%%"))
    return cfg, ScriptDirectory.from_config(cfg)


def heads() -> dict[str, str]:
    """Head revision per branch as the migration scripts say (used by tests and `status`)."""
    with _alembic_quiet():
        _, script = _script_directory()
    return {next(iter(script.get_revision(h).branch_labels)): h for h in script.get_heads()}


def needs_upgrade(conn: apsw.Connection, db_name: str) -> bool:
    """Fast check: is the file behind ``conn`` (one of :data:`BRANCHES`) behind its head revision?

    True for a fresh file (no tables at all) or an older revision. A file that holds tables but no
    readable revision row is damaged, not fresh: running the migrations on it would write into a
    corrupt store, so it raises :class:`CorruptionError` instead.
    """
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    if "alembic_version" not in tables:
        if tables:
            raise CorruptionError(f"{conn.filename}: holds tables {sorted(tables)} but no schema revision "
                                  "(alembic_version): the file is damaged or not a raft_sqlite database")
        return True
    rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], str) or not rows[0][0]:
        raise CorruptionError(f"{conn.filename}: the schema revision row is damaged ({rows!r})")
    return rows[0][0] != BRANCHES[db_name][1]


def upgrade(path: str, db_name: str) -> bool:
    """Upgrade the database file at ``path`` (one of :data:`BRANCHES`) to its head with alembic.

    Alembic runs through SQLAlchemy's pysqlite driver, i.e. the stdlib's copy of SQLite, not apsw's:
    two SQLite libraries in one process must never have the same file open at once (closing one drops
    the other's POSIX locks and may delete the -shm file), so the caller closes its apsw connections to
    ``path`` first. Returns True when alembic ran. Raises :class:`NodeIdentityMismatch` if the file
    carries a revision this code does not know (written by a newer raft_sqlite).
    """
    import sqlite3

    from sqlalchemy.exc import DBAPIError

    try:
        with _alembic_quiet():  # also around alembic's imports, which log its plugins
            return _upgrade(path, db_name)
    except (sqlite3.Error, DBAPIError) as exc:
        orig = getattr(exc, "orig", None) or exc
        if isinstance(orig, sqlite3.OperationalError) and ("disk I/O" in str(orig) or "full" in str(orig)):
            raise StorageFault(f"{path}: schema migration failed: {orig}") from exc
        raise CorruptionError(f"{path}: schema migration failed, the file is damaged: {orig}") from exc


_schemas: dict[tuple[str, int | None], bytes] = {}  # (db_name, page_size) -> an empty database at head
_schemas_lock = threading.Lock()


def _schema_image(db_name: str, page_size: int | None) -> bytes:
    """The bytes of an empty database file at the head schema of ``db_name``, built once per process
    by alembic in a temporary file outside data_dir."""
    import shutil
    import tempfile

    key = (db_name, page_size)
    with _schemas_lock:
        if key not in _schemas:
            try:
                tmpdir = tempfile.mkdtemp(prefix="raft_sqlite-schema-")
            except OSError as exc:  # no writable temporary directory (TMPDIR): a typed error, not OSError
                raise StorageFault(f"cannot build the schema of a new {db_name}: no usable temporary directory "
                                   f"({exc.strerror or exc}); set TMPDIR to a writable directory") from exc
            try:
                tmp = os.path.join(tmpdir, db_name)
                if page_size is not None:
                    with contextlib.closing(_connect_exact(tmp)) as c:
                        c.execute(f"PRAGMA page_size={int(page_size)}")
                        c.execute("VACUUM")  # writes the empty file with that page size
                upgrade(tmp, db_name)
                with open(tmp, "rb") as f:
                    _schemas[key] = f.read()
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return _schemas[key]


def create(path: str, db_name: str, vfs: str | None = None, page_size: int | None = None) -> None:
    """Give the fresh database file at ``path`` (empty, or pages without any table) the head schema of
    ``db_name`` (one of :data:`BRANCHES`), writing it only through apsw and the VFS ``vfs``.

    Alembic runs through the stdlib's SQLite, which no apsw VFS sees: run on the store's own file, the
    creation of a store would be outside every fault model (a test could not crash it at each of its
    writes and syncs). So the schema is built by alembic once per process in a temporary file outside
    data_dir (with ``page_size``, if given) and copied into ``path`` with SQLite's online backup,
    through ``vfs``, in one WAL transaction: after a crash ``path`` is either still without tables (the
    next open creates it again) or holds the whole schema. Raises :class:`StorageFault` /
    :class:`CorruptionError` as :func:`upgrade` does, apsw errors of the copy as they are.
    """
    image = _schema_image(db_name, page_size)
    src = apsw.Connection(":memory:")
    try:
        src.deserialize("main", image)
        # the header's page size (1 means 65536); PRAGMA page_size of a deserialized database says 4096
        # until its first read
        want = int.from_bytes(image[16:18], "big")
        want = 65536 if want == 1 else want
        dst = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE, vfs=vfs)
        try:
            dst.execute("PRAGMA synchronous=FULL")  # the copy's commit is synced in every mode
            # The page size can change only outside WAL mode (a backup into a WAL database of another page
            # size fails with SQLITE_READONLY): set it on the empty file first, then copy in WAL mode. A
            # crash can leave the file in WAL mode with the default page size: the copy then sets it.
            if dst.execute("PRAGMA page_size").fetchall()[0][0] != want:
                dst.execute("PRAGMA journal_mode=DELETE").fetchall()
                dst.execute(f"PRAGMA page_size={int(want)}")
            dst.execute("PRAGMA journal_mode=WAL").fetchall()
            if dst.execute("PRAGMA page_size").fetchall()[0][0] != want:
                dst.execute("PRAGMA journal_mode=DELETE").fetchall()
            # not ``with``: when step() and the implicit finish() both fail, apsw's __exit__ raises SystemError
            b = dst.backup("main", src, "main")
            try:
                b.step(-1)
            except BaseException:
                with contextlib.suppress(apsw.Error):
                    b.finish()
                raise
            b.finish()
            dst.execute("PRAGMA journal_mode=WAL").fetchall()
        finally:
            dst.close()
    finally:
        src.close()


def _connect_exact(path: str) -> sqlite3.Connection:
    """A stdlib ``sqlite3`` connection on exactly the file ``path``, whatever characters it holds.

    Never a URL or URI: ``sqlite:///{path}`` would let SQLAlchemy parse ``?``, ``#`` and ``%XX`` in the
    path (a ``?`` in data_dir made it create a stray database outside data_dir), and this Python's SQLite
    is built with ``SQLITE_USE_URI``, so a relative path starting with ``file:`` would be read as a URI.
    An absolute path starts with ``/`` and is therefore always taken literally.
    """
    import sqlite3

    return sqlite3.connect(os.path.abspath(path))


def _upgrade(path: str, db_name: str) -> bool:
    branch, head = BRANCHES[db_name]

    with contextlib.closing(_connect_exact(path)) as probe:
        row = probe.execute("SELECT name FROM sqlite_master WHERE name='alembic_version'").fetchone()
        rev = probe.execute("SELECT version_num FROM alembic_version").fetchone()[0] if row else None
    if rev == head:
        return False
    cfg, script = _script_directory()
    if rev is not None:
        try:
            script.get_revision(rev)
        except Exception as exc:  # alembic raises several types for unknown revisions
            raise NodeIdentityMismatch(
                f"{path}: schema revision {rev!r} is newer than this raft_sqlite knows (head {head!r}); "
                "upgrade raft_sqlite to open it") from exc
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # the URL only picks the dialect; ``creator`` opens the exact file (see _connect_exact)
    engine = create_engine("sqlite://", creator=lambda: _connect_exact(path), poolclass=NullPool)
    try:
        with engine.begin() as sa_conn:
            cfg.attributes["connection"] = sa_conn
            command.upgrade(cfg, f"{branch}@head")
    finally:
        engine.dispose()
    if rev is not None:  # a node's existing file moved to a newer schema: worth one line
        log.info("%s: schema upgraded from %s to %s", path, rev, head)
    return True


class _ToDebug(logging.Filter):
    """Drops the INFO records alembic logs on this thread and re-logs them at DEBUG on our logger."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or record.levelno > logging.INFO:
            return True  # another thread's alembic, or a warning: untouched
        log.debug("alembic: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _alembic_quiet() -> Iterator[None]:
    """Alembic's INFO narration of this thread's run goes to DEBUG (see :data:`_ALEMBIC_LOGGERS`)."""
    f = _ToDebug()
    loggers = [logging.getLogger(n) for n in _ALEMBIC_LOGGERS]
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)
