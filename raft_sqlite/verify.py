"""Full validation of a node's ``data_dir`` without opening it as a store: ``raft-sqlite verify``.

:func:`verify` reads the database files through read-only connections (``SQLITE_OPEN_READONLY`` and
``PRAGMA query_only``), so it writes nothing, takes no write lock and may run while the node runs. It
checks more than the recovery done on open (which validates only what it must replay):

* ``PRAGMA integrity_check`` of ``raft.db`` and ``chunks.db`` (kind ``integrity``);
* the node record's CRC and format version (``node``), the schema revision (``schema``);
* every group's metadata CRC (``metadata``);
* the CRC32 of every log record still stored, including records below ``first_index`` that wait for
  whole-segment deletion (``record_crc``); contiguity and coverage of ``first_index..last_index``
  (``gap``); terms never decreasing (``term``);
* every sealed segment: its sidecar checksum (CRC32 over the record CRCs packed ``<I`` in index order),
  entry count and byte count (``sidecar``/``segment``); records naming no known segment;
* the log's shape against snapshots and commit index (``shape``): the group's snapshot index equals the
  newest DURABLE snapshot, ``first_index - 1`` is covered by it, ``commit_index <= last_index``;
* every snapshot chunk's CRC32, chunk sequence and count, size and sha256 of DURABLE snapshots
  (``snapshot_chunk``, ``snapshot``), the manifest CRC when :mod:`raft_sqlite.snapshot` provides
  ``manifest_crc``, and delta chains (``snapshot_chain``);
* every SQL state database (``state/group-<id>.db``): ``quick_check``, its identity, the CRC of its
  applied position, and that the log holds what it applied (``state``).

Anything found is a :class:`Problem` in the returned :class:`VerifyReport`; harmless oddities (orphan
chunks of an abandoned snapshot, a snapshot still being written) are ``warnings``. On a running node,
chunks.db is read first and raft.db second; a snapshot that finished meanwhile is checked again on a
fresh read of chunks.db before a problem is reported.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw

from . import layout, migrate
from .dbrows import db_row, db_rows, db_scalar
from .errors import CorruptionError
from .logscan import Finding, RecordScanner, check_sealed_segments
from .metadata import group_crc, meta_crc
from .recovery import check_sql_objects
from .sqlstate import STATE_DIR, read_applied, read_identity
from .wal import SPAN

#: Problem kinds (also the ``kind`` label of ``raft_sqlite_validation_errors_total``).
PROBLEM_KINDS = ("integrity", "node", "schema", "metadata", "record_crc", "gap", "term", "sidecar", "segment",
                 "shape", "snapshot_chunk", "snapshot", "snapshot_chain", "state")

ProgressCallback = Callable[[str, int, int], None]


class NotAStoreError(FileNotFoundError):
    """``data_dir`` does not exist or holds no ``raft.db``."""


def open_readonly(path: str) -> apsw.Connection:
    """A read-only apsw connection on the SQLite file ``path`` that can never write: opened with
    ``SQLITE_OPEN_READONLY`` and ``PRAGMA query_only=1``. Safe beside a running node (it is one more WAL
    reader; it never checkpoints). Raises :class:`NotAStoreError` if the file does not exist and
    ``apsw.NotADBError`` if it is not a database."""
    if not os.path.isfile(path):
        raise NotAStoreError(f"{path}: no such database file")
    # SQLITE_OPEN_URI lets `raft-sqlite sql` ATTACH chunks.db by a (percent-encoded) ``file:`` URI; the
    # absolute path keeps this file's own name literal (only names starting with ``file:`` are URIs)
    conn = apsw.Connection(os.path.abspath(path), flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    conn.setbusytimeout(5000)
    conn.execute("PRAGMA query_only=1")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # NotADBError on a garbage file
    return conn


@dataclass
class Problem:
    """One thing that failed validation."""

    kind: str  #: one of :data:`PROBLEM_KINDS`
    file: str  #: database file name (``raft.db`` / ``chunks.db``)
    message: str
    group: str | None = None
    index: int | None = None  #: log index, segment id or snapshot id, as the message says

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found. ``ok`` is True when there are no problems."""

    data_dir: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    integrity: dict[str, str] = field(default_factory=dict)
    groups: int = 0
    entries_checked: int = 0
    bytes_checked: int = 0
    segments_checked: int = 0
    snapshots_checked: int = 0
    chunks_checked: int = 0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts_by_kind(self) -> dict[str, int]:
        """Number of problems per kind."""
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data (``ok`` included)."""
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} PROBLEM(S)"
        return (f"verify {state}: groups={self.groups} entries={self.entries_checked} bytes={self.bytes_checked} "
                f"segments={self.segments_checked} snapshots={self.snapshots_checked} chunks={self.chunks_checked} "
                f"warnings={len(self.warnings)} in {self.duration:.2f} s")


def verify(data_dir: str | os.PathLike[str], progress: ProgressCallback | None = None) -> VerifyReport:
    """Validate everything stored in ``data_dir`` (see the module docstring) and return a
    :class:`VerifyReport`; never writes. ``progress(stage, done, total)`` is called as work proceeds
    (``total`` counts log records + snapshot chunks + 2 integrity checks). Raises
    :class:`NotAStoreError` if ``data_dir`` holds no ``raft.db``; a file SQLite cannot read at all is
    reported as an ``integrity`` problem, not raised."""
    data_dir = os.fspath(data_dir)
    main_path = os.path.join(data_dir, layout.MAIN_DB)
    chunks_path = os.path.join(data_dir, layout.CHUNKS_DB)
    if not os.path.isdir(data_dir):
        raise NotAStoreError(f"{data_dir}: no such directory")
    if not os.path.isfile(main_path):
        raise NotAStoreError(f"{data_dir}: not a raft_sqlite data_dir (no {layout.MAIN_DB})")
    t0 = time.monotonic()
    rep = VerifyReport(data_dir)
    v = _Verifier(rep, progress)
    try:
        v.run(main_path, chunks_path)
    except UnicodeDecodeError as exc:  # a TEXT column (name, vote, manifest) holding bytes that are not UTF-8
        v.problem("integrity", layout.MAIN_DB, f"{data_dir}: a text column holds bytes that are not UTF-8 ({exc}); "
                  "the checks after it did not run")
    finally:
        v.close()
        rep.duration = time.monotonic() - t0
    return rep


class _Verifier:
    def __init__(self, rep: VerifyReport, progress: ProgressCallback | None) -> None:
        self.rep = rep
        self.progress = progress
        self.done = 0
        self.total = 2
        self.main: apsw.Connection | None = None
        self.main_path = ""
        self.chunks: apsw.Connection | None = None

    def close(self) -> None:
        for c in (self.main, self.chunks):
            if c is not None:
                c.close()

    def tick(self, stage: str, n: int = 1, force: bool = False) -> None:
        before = self.done
        self.done += n
        if self.progress is not None and (force or self.done // 2000 != before // 2000):
            self.progress(stage, self.done, self.total)

    def problem(self, kind: str, file: str, message: str, group: str | None = None, index: int | None = None) -> None:
        self.rep.problems.append(Problem(kind, file, message, group, index))

    def _integrity(self, path: str, name: str) -> None:
        """``PRAGMA integrity_check`` of one file on its own connection (run on a helper thread while the
        rest of the validation proceeds: SQLite does the work without the GIL)."""
        conn = self._open(path, name)
        if conn is None:
            return
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check(100)")]
        except apsw.Error as exc:
            self._unreadable(path, name, exc)
            return
        finally:
            conn.close()
        self.rep.integrity[name] = "ok" if rows == ["ok"] else "; ".join(rows)
        if rows != ["ok"]:
            self.problem("integrity", name, f"{path}: integrity_check: {'; '.join(rows[:5])}")

    def _open(self, path: str, name: str) -> apsw.Connection | None:
        """A read-only connection on ``path``, or None with an ``integrity`` problem recorded."""
        try:
            return open_readonly(path)
        except NotAStoreError:
            self.rep.integrity[name] = "missing"
            self.problem("integrity", name, f"{path}: file is missing")
        except apsw.Error as exc:
            self._unreadable(path, name, exc)
        return None

    def _unreadable(self, path: str, name: str, exc: apsw.Error) -> None:
        self.rep.integrity[name] = f"unreadable: {exc}"
        self.problem("integrity", name, f"{path}: SQLite cannot read it ({type(exc).__name__}: {exc})")

    def run(self, main_path: str, chunks_path: str) -> None:
        self.main_path = main_path
        self.main = self._open(main_path, layout.MAIN_DB)
        if self.main is None:
            return
        self.chunks = self._open(chunks_path, layout.CHUNKS_DB)
        files = [(main_path, layout.MAIN_DB)] + ([(chunks_path, layout.CHUNKS_DB)] if self.chunks is not None else [])
        def integrity() -> None:
            for p, n in files:
                self._integrity(p, n)

        bg = threading.Thread(target=integrity, daemon=True, name="raft_sqlite-integrity")
        bg.start()
        try:
            self._run(main_path, chunks_path)
        finally:
            bg.join()
        self.tick("integrity", 2, force=True)
        if self.progress is not None:
            self.progress("done", self.total, self.total)

    @property
    def _main(self) -> apsw.Connection:
        """The read connection on raft.db (set by :meth:`run` before any check runs)."""
        assert self.main is not None
        return self.main

    def _run(self, main_path: str, chunks_path: str) -> None:
        c = self._main
        started = time.time()
        if self.chunks is not None:
            # chunks.db first, then raft.db: a snapshot finalized in between is re-checked (see _snapshots)
            self.chunks.execute("BEGIN")
            try:
                self.total += db_scalar(self.chunks.execute("SELECT count(*) FROM snapshot_chunks"))
            except apsw.Error as exc:
                self.problem("schema", layout.CHUNKS_DB, f"{chunks_path}: not a raft_sqlite chunk database ({exc})")
                self.chunks.execute("COMMIT")
                self.chunks.close()
                self.chunks = None
        c.execute("BEGIN")  # one consistent read of raft.db
        try:
            self.total += db_scalar(c.execute("SELECT count(*) FROM log_entries"))
        except apsw.Error as exc:
            c.execute("COMMIT")
            self.problem("schema", layout.MAIN_DB, f"{main_path}: not a raft_sqlite database ({exc})")
            return
        try:
            self._sql_objects(main_path)
            self._node(main_path)
            self._groups(main_path)
            self._snapshots(main_path, chunks_path, started)
            self._states(os.path.dirname(main_path))
        finally:
            c.execute("COMMIT")
            if self.chunks is not None:
                self.chunks.execute("COMMIT")

    def _sql_objects(self, path: str) -> None:
        """Triggers and views against their declared text (only at the head revision: an older store
        gets them from its migration on the next open)."""
        if migrate.current_revision(self._main) != layout.MAIN_HEAD:
            return
        for kind, name, what in check_sql_objects(self._main):
            self.problem("schema", layout.MAIN_DB, f"{path}: {kind} {name!r} is {what}"
                         + (" (its SQL differs from the declared text)" if what == "altered" else ""))

    def _node(self, path: str) -> None:
        from .store import node_crc

        c = self._main
        rev = migrate.current_revision(c)
        if rev != layout.MAIN_HEAD:
            self.rep.warnings.append(f"{path}: schema revision {rev!r}, this code's head is {layout.MAIN_HEAD!r} "
                                     "(upgraded on the next open)" if rev else f"{path}: no schema revision")
        row = db_row(c.execute("SELECT node_id, cluster_id, format_version, created_at, crc32 FROM node"))
        if row is None:
            self.problem("node", layout.MAIN_DB, f"{path}: the node record is missing")
            return
        nid, cid, fmt, created, crc = row
        if node_crc(nid, cid, fmt, created) != crc:
            self.problem("node", layout.MAIN_DB, f"{path}: the node record fails its CRC check")
        if fmt > layout.FORMAT_VERSION:
            self.problem("node", layout.MAIN_DB,
                         f"{path}: data format {fmt} is newer than this code supports ({layout.FORMAT_VERSION})")

    def _groups(self, path: str) -> None:
        c = self._main
        rows = db_rows(c.execute(
            "SELECT g.group_id, g.name, g.first_index, g.snapshot_index, m.current_term, m.voted_for, "
            "m.commit_index, m.crc32, g.recovered_partially, g.snapshot_term, g.crc32 FROM groups g "
            "LEFT JOIN raft_meta m USING (group_id) ORDER BY g.group_id"))
        for gid, name, first, snap_idx, term, vote, commit, mcrc, partial, snap_term, gcrc in rows:
            self.rep.groups += 1
            where = f"{path}: group {name!r}"
            if group_crc(gid, name, first, snap_idx, snap_term, partial) != gcrc:
                self.problem("group", layout.MAIN_DB, f"{where}: group row (first index {first}, snapshot "
                             f"{snap_idx}/{snap_term}) fails its CRC check", name)
            if partial:
                self.rep.warnings.append(f"{where}: recovered under PARTIAL: it may have lost committed entries or "
                                         "its vote; it must rejoin as a catch-up follower")
            if term is None:
                self.problem("metadata", layout.MAIN_DB, f"{where}: metadata row is missing", name)
                commit = 0
            elif meta_crc(gid, term, vote, commit) != mcrc:
                self.problem("metadata", layout.MAIN_DB,
                             f"{where}: metadata (term={term}, vote={vote!r}, commit={commit}) fails its CRC check",
                             name)
            durable = db_scalar(c.execute("SELECT max(idx) FROM snapshots WHERE group_id=? AND status='DURABLE'",
                                        (gid,))) or 0
            if durable != snap_idx:
                self.problem("shape", layout.MAIN_DB, f"{where}: snapshot index {snap_idx} in the group record "
                             f"disagrees with the newest durable snapshot {durable}", name)
            if first > 1 and snap_idx < first - 1:
                self.problem("shape", layout.MAIN_DB, f"{where}: first index {first} is above 1 but no durable "
                             f"snapshot covers {first - 1}", name, first)
            last = self._log(where, gid, name, first)
            if commit > last:
                self.problem("shape", layout.MAIN_DB,
                             f"{where}: commit index {commit} is beyond the last index {last}", name, commit)

    def _states(self, data_dir: str) -> None:
        """Each SQL state database (``state/group-<id>.db``, :mod:`raft_sqlite.sqlstate`): SQLite's
        ``quick_check``, its identity (this node and cluster, the group of that id), the CRC of its applied
        position, and that the log holds what it applied (kind ``state``)."""
        folder = os.path.join(data_dir, STATE_DIR)
        if not os.path.isdir(folder):
            return
        c = self._main
        node = db_row(c.execute("SELECT node_id, cluster_id FROM node"))
        groups = {int(r[0]): r[1:] for r in db_rows(c.execute(
            "SELECT group_id, name, snapshot_index, coalesce((SELECT max(key) FROM log_entries WHERE key BETWEEN "
            "group_id * ?1 AND group_id * ?1 + ?1 - 1) - group_id * ?1, 0) FROM groups", (layout.KEY_SPAN,)))}
        for fn in sorted(os.listdir(folder)):
            if not (fn.startswith("group-") and fn.endswith(".db")):
                continue
            path = os.path.join(folder, fn)
            name = f"{STATE_DIR}/{fn}"
            gid_text = fn[len("group-"):-len(".db")]
            g = groups.get(int(gid_text)) if gid_text.isdigit() else None
            if g is None:
                self.rep.warnings.append(f"{path}: state database of no existing group (deleted at the next open)")
                continue
            conn = self._open(path, name)
            if conn is None:
                continue
            try:
                conn.execute("BEGIN")
                rows = [r[0] for r in conn.execute("PRAGMA quick_check(20)")]
                if rows != ["ok"]:
                    self.problem("state", name, f"{path}: quick_check: {'; '.join(map(str, rows[:5]))}", g[0])
                cluster, nid, group, _fmt = read_identity(conn, path)
                if node is not None and (nid, cluster) != tuple(node) or group != g[0]:
                    self.problem("state", name, f"{path}: state database of node {nid!r} cluster {cluster!r} "
                                 f"group {group!r}, not of this node's group {g[0]!r}", g[0])
                index, _term = read_applied(conn, path)
                if index > max(g[1], g[2]):
                    self.problem("state", name, f"{path}: applied up to {index}, beyond the log's last index {g[2]}",
                                 g[0], index)
            except CorruptionError as exc:
                self.problem("state", name, str(exc), g[0])
            except apsw.Error as exc:
                self._unreadable(path, name, exc)
            finally:
                conn.close()

    def _log(self, where: str, gid: int, name: str, first: int) -> int:
        """Check every stored record of the group and its segments; returns the last index.

        Sealed segments with a content digest are checked with one SQLite aggregate each
        (:func:`raft_sqlite.logscan.check_sealed_segment`: presence, keys, types, segment column,
        content digest over every term/kind/payload byte, sidecar over every stored record CRC); every
        other record (open segment, segments sealed before revision 0003, records outside any segment,
        and every segment whose aggregate fails) is checked one by one, which also names the bad index."""
        c = self._main
        segs = {sid: [lo, hi, cnt, nbytes, cks] for sid, lo, hi, cnt, nbytes, cks in c.execute(
            "SELECT segment_id, first_index, last_index, entry_count, bytes, checksum FROM log_segments "
            "WHERE group_id=?", (gid,))}
        problems_before = len(self.rep.problems)
        fast, running, suspects = self._sealed_segments(gid)
        sc = RecordScanner(c, gid, progress=lambda k: self.tick("log", k))
        sc.running.update(running)
        n = 0
        for rng in self._log_ranges(fast):
            if len(rng) == 5:  # a segment checked in SQLite: account for it as a whole
                n += self._whole_segment(where, name, sc, segs[rng[0]][0], rng)
            else:
                n += self._walk_records(where, name, sc, *rng)
        self.rep.entries_checked += n
        last = max(first - 1, sc.prev or 0)
        if n and sc.lowest is not None and sc.lowest > first:  # (n > 0: a record or segment set lowest)
            self.problem("gap", layout.MAIN_DB, f"{where}: log entries {first}..{sc.lowest - 1} are missing (first "
                         f"index {first}, first stored record {sc.lowest})", name, first)
        self._segment_totals(where, name, segs, sc.running)
        self._content_digests(where, name, suspects, self.rep.problems[problems_before:])
        return last

    def _sealed_segments(self, gid: int) -> tuple[dict[int, tuple[int, int, int, int, int]],
                                                  dict[int | None, list[int]], list[tuple[int, int, int]]]:
        """Check the group's sealed segments that have a content digest, one SQLite aggregate each.
        Returns ``(fast, running, suspects)``: ``fast`` maps the first index of each segment that passed
        to ``(segment, last index, min term, max term, bytes)``, ``running`` holds its
        ``[sidecar, records, bytes]`` as the record scanner keeps them, ``suspects`` the ``(segment, first
        index, last index)`` of each that failed (to be checked record by record)."""
        running: dict[int | None, list[int]] = {}  # segment -> [crc, count, bytes]
        fast = {}  # index -> (segment, last index, min term, max term, bytes) of segments checked in SQLite
        suspects = []  # sealed segments whose aggregate check failed (checked record by record below)
        with_digest = db_rows(self._main.execute(
            "SELECT segment_id, first_index, last_index, entry_count, bytes, checksum, content_crc "
            "FROM log_segments WHERE group_id=? AND last_index IS NOT NULL AND content_crc IS NOT NULL "
            "ORDER BY first_index", (gid,)))
        # on parallel read connections; a segment changed since this verify's read transaction began
        # (a running node compacting or truncating) fails there and is checked below on the consistent view
        checked = check_sealed_segments(lambda: open_readonly(self.main_path), gid * SPAN, with_digest)
        for sid, lo, hi, cnt, nbytes, cks, _content in with_digest:
            ok = checked.get(sid)
            if ok is not None and lo not in fast:
                fast[lo] = (sid, hi, *ok)
                running[sid] = [cks, cnt, nbytes]
            elif ok is None:
                suspects.append((sid, lo, hi))
        return fast, running, suspects

    @staticmethod
    def _log_ranges(fast: dict[int, tuple[int, int, int, int, int]]) -> list[tuple[Any, ...]]:
        """The key ranges left to check record by record, in order, around the segments checked in SQLite:
        ``(lo, hi)`` to walk (possibly empty: ``hi < lo``), or a segment of ``fast`` (its 5 values)."""
        ranges: list[tuple[Any, ...]] = []
        at = 1
        for lo in sorted(fast):
            if lo < at:
                continue
            ranges.append((at, lo - 1))
            ranges.append(fast[lo])
            at = fast[lo][1] + 1
        ranges.append((at, SPAN - 1))
        return ranges

    def _whole_segment(self, where: str, name: str, sc: RecordScanner, lo: int,
                       seg: tuple[int, int, int, int, int]) -> int:
        """Account for the segment ``seg`` = ``(segment, last index, min term, max term, bytes)`` starting at
        ``lo``, checked in SQLite, as a whole: gap and term against the records before it, advancing the
        scanner past it. Returns its record count."""
        _sid, hi, tmin, tmax, nbytes = seg
        if sc.lowest is None:
            sc.lowest = lo
        if sc.prev is not None and lo != sc.prev + 1:
            self.problem("gap", layout.MAIN_DB, f"{where}: log gap: indexes {sc.prev + 1}..{lo - 1} are "
                         "missing", name, sc.prev + 1)
        if tmin < sc.last_term:
            self.problem("term", layout.MAIN_DB, f"{where}: term decreases at log entry {lo} "
                         f"({sc.last_term} -> {tmin})", name, lo)
        sc.last_term = max(sc.last_term, tmax)
        sc.prev = hi
        self.rep.bytes_checked += nbytes
        self.tick("log", hi - lo + 1)
        return hi - lo + 1

    def _walk_records(self, where: str, name: str, sc: RecordScanner, r_lo: int, r_hi: int) -> int:
        """Check the records ``r_lo .. r_hi`` one by one, reporting each finding; returns the number of
        records walked."""
        if r_hi < r_lo:
            return 0
        rows, nbytes = sc.rows, sc.nbytes
        for f in sc.walk(r_lo, r_hi):
            self._record_finding(where, name, f)
        self.rep.bytes_checked += sc.nbytes - nbytes
        return sc.rows - rows

    def _record_finding(self, where: str, name: str, f: Finding) -> None:
        """Report the finding ``f`` of the record scanner as a problem."""
        idx, kind = f.idx, f.kind
        if kind == "index":
            self.problem("record_crc", layout.MAIN_DB, f"{where}: log entry {idx} has a damaged index "
                         f"column ({f.idx_col!r})", name, idx)
        elif kind == "gap":
            self.problem("gap", layout.MAIN_DB, f"{where}: log gap: indexes {f.expected}..{idx - 1} are "
                         "missing", name, f.expected)
        elif kind == "crc":
            why = "" if f.ptype == "blob" else f": payload stored as {f.ptype}, not a BLOB"
            self.problem("record_crc", layout.MAIN_DB,
                         f"{where}: CRC mismatch in log entry {idx} (segment {f.segment}){why}", name, idx)
        elif kind == "term":
            self.problem("term", layout.MAIN_DB, f"{where}: term decreases at log entry {idx} "
                         f"({f.last_term} -> {f.term})", name, idx)
        elif kind == "unknown_segment":
            self.problem("segment", layout.MAIN_DB,
                         f"{where}: log entry {idx} names segment {f.segment}, which does not exist", name,
                         idx)
        elif kind == "outside_segment":
            assert f.seg_range is not None  # set for this kind
            self.problem("segment", layout.MAIN_DB, f"{where}: log entry {idx} lies outside its segment "
                         f"{f.segment} ({f.seg_range[0]}..{f.seg_range[1]})", name, idx)
        # "not_own" (named another segment than the one starting at or below it): covered above by
        # "outside_segment" and the per-segment counts and sidecars below

    def _segment_totals(self, where: str, name: str, segs: dict[int, list[Any]],
                        running: dict[int | None, list[int]]) -> None:
        """Compare every sealed segment's row (``segs``: ``[first, last, count, bytes, sidecar]``) with what
        was accepted of it (``running``): record count, sidecar checksum, payload bytes."""
        for sid, (lo, hi, cnt, nbytes, cks) in sorted(segs.items()):
            if hi is None:
                continue  # the open segment: no sidecar yet
            self.rep.segments_checked += 1
            crc, got, gbytes = running.get(sid, (0, 0, 0))
            if got != cnt or got != hi - lo + 1:
                self.problem("segment", layout.MAIN_DB, f"{where}: segment {sid} ({lo}..{hi}) holds {got} records, "
                             f"its row says {cnt}", name, sid)
            elif crc != cks:
                self.problem("sidecar", layout.MAIN_DB,
                             f"{where}: segment {sid} ({lo}..{hi}) fails its sidecar checksum", name, sid)
            if got == cnt and gbytes != nbytes:
                self.problem("segment", layout.MAIN_DB, f"{where}: segment {sid} ({lo}..{hi}) holds {gbytes} payload "
                             f"bytes, its row says {nbytes}", name, sid)

    def _content_digests(self, where: str, name: str, suspects: list[tuple[int, int, int]],
                         found: list[Problem]) -> None:
        """Report a content digest failure for each segment of ``suspects`` (their aggregate failed) for
        which the record-by-record check found nothing (``found``: the group's problems of this pass)."""
        for sid, lo, hi in suspects:
            # every record and the sidecar check out one by one, yet the digest does not: a record was
            # re-signed consistently (CRC and sidecar), or the segment row's digest itself is damaged
            if not any((p.kind in ("record_crc", "gap", "term") and p.index is not None and lo <= p.index <= hi)
                       or (p.kind in ("segment", "sidecar") and p.index == sid) for p in found):
                self.problem("sidecar", layout.MAIN_DB, f"{where}: segment {sid} ({lo}..{hi}) fails its content "
                             "digest", name, sid)

    def _chunks(self, sid: int, name: str | None, where: str, chunks_path: str, status: str, size: int, count: int,
                checksum: str | None) -> tuple[int, list[Problem]]:
        """Check the chunks of snapshot ``sid``; returns ``(chunks read, [Problem])``."""
        chunks = self.chunks
        assert chunks is not None  # _snapshots checks chunks only with chunks.db open
        probs = []
        h = hashlib.sha256()
        total = 0
        seqs = []
        bad = 0
        for seq, data, dtype, ccrc in chunks.execute(
                "SELECT seq, CAST(data AS BLOB), typeof(data), crc32 FROM snapshot_chunks WHERE key >= ? AND key < ? "
                "ORDER BY key", (sid << 32, (sid + 1) << 32)):
            seqs.append(seq)
            self.rep.chunks_checked += 1
            self.tick("snapshots")
            data = data or b""
            if dtype != "blob" or zlib.crc32(data) != ccrc:
                bad += 1
                probs.append(Problem("snapshot_chunk", layout.CHUNKS_DB, f"{chunks_path}: snapshot {sid} chunk {seq} "
                                     "fails its CRC32 check", name, sid))
            h.update(data)
            total += len(data)
        if status != "DURABLE":
            self.rep.warnings.append(f"{where}: status {status} (being written, or abandoned by a crash)")
        elif seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            probs.append(Problem("snapshot", layout.CHUNKS_DB, f"{where}: chunk sequence has gaps", name, sid))
        elif len(seqs) != count:
            probs.append(Problem("snapshot", layout.CHUNKS_DB, f"{where}: {len(seqs)} chunks stored, manifest says "
                                 f"{count}", name, sid))
        elif not bad and total != size:
            probs.append(Problem("snapshot", layout.CHUNKS_DB, f"{where}: chunks hold {total} bytes, manifest says "
                                 f"{size}", name, sid))
        elif not bad and checksum and h.hexdigest() != checksum:
            probs.append(Problem("snapshot", layout.CHUNKS_DB, f"{where}: sha256 of the chunks does not match the "
                                 "manifest", name, sid))
        return len(seqs), probs

    def _snapshots(self, path: str, chunks_path: str, started: float) -> None:
        c = self._main
        manifest_crc: Callable[[apsw.Connection, int], int | None] | None
        try:
            from .snapshot import manifest_crc as snapshot_manifest_crc  # if the snapshot module defines one
            manifest_crc = snapshot_manifest_crc
        except ImportError:
            manifest_crc = None
        rows = db_rows(c.execute(
            "SELECT s.snapshot_id, g.name, s.group_id, s.idx, s.kind, s.parent_id, s.status, s.size, "
            "s.chunk_count, s.checksum, s.finished_at, s.crc32 FROM snapshots s "
            "LEFT JOIN groups g USING (group_id) ORDER BY s.snapshot_id"))
        by_id = {r[0]: r for r in rows}
        seen_chunks = set()
        for sid, name, gid, idx, kind, parent, status, size, count, checksum, finished, crc in rows:
            where = f"{path}: group {name!r} snapshot {sid} (index {idx}, {kind})"
            self.rep.snapshots_checked += 1
            if name is None:
                self.problem("snapshot", layout.MAIN_DB, f"{path}: snapshot {sid} belongs to unknown group {gid}",
                             None, sid)
            if manifest_crc is not None and status == "DURABLE":
                try:
                    ok = manifest_crc(c, sid) == crc
                except (TypeError, ValueError, apsw.Error) as exc:  # the snapshot module's signature may differ
                    self.rep.warnings.append(f"{where}: manifest CRC not checked ({exc})")
                    ok = True
                if not ok:
                    self.problem("snapshot", layout.MAIN_DB, f"{where}: manifest fails its CRC check", name, sid)
            if kind == "DELTA":
                p = by_id.get(parent)
                if p is None:
                    self.problem("snapshot_chain", layout.MAIN_DB, f"{where}: parent snapshot {parent} is missing",
                                 name, sid)
                elif p[2] != gid or p[3] > idx or (status == "DURABLE" and p[6] != "DURABLE"):
                    self.problem("snapshot_chain", layout.MAIN_DB, f"{where}: parent snapshot {parent} (group "
                                 f"{p[1]!r}, index {p[3]}, {p[6]}) cannot be its base", name, sid)
            if self.chunks is None:
                continue
            found = self._chunks(sid, name, where, chunks_path, status, size, count, checksum)
            if found[1] and status == "DURABLE" and finished is not None and finished >= started - 1.0:
                # finished while verify ran: its chunks may be newer than the chunks.db view; look again
                self.chunks.execute("COMMIT")
                self.chunks.execute("BEGIN")
                self.rep.chunks_checked -= found[0]
                found = self._chunks(sid, name, where, chunks_path, status, size, count, checksum)
            self.rep.problems.extend(found[1])
            seen_chunks.add(sid)
        if self.chunks is not None:
            orphans = [r[0] for r in self.chunks.execute("SELECT DISTINCT snapshot_id FROM snapshot_chunks")
                       if r[0] not in by_id]
            for sid in orphans:
                n = db_scalar(self.chunks.execute("SELECT count(*) FROM snapshot_chunks WHERE snapshot_id=?", (sid,)))
                self.rep.warnings.append(f"{chunks_path}: {n} orphan chunk(s) of snapshot {sid} (no manifest; "
                                         "removed by snapshot retention)")
                self.tick("snapshots", n)
