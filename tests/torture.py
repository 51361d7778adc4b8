"""Reusable pieces of the crash and disk-fault torture suite (issue 6).

* :class:`Workload`: a deterministic workload per Raft group, generated from a seed together with its
  *model*: ``states(g)[k]`` is exactly what group ``g`` must hold after its first ``k`` operations
  (``k == 0``: the group does not exist). Operations: group creation, single and batched appends,
  ``truncate_after`` conflicts (alone, or resolved with an append of a newer term in one transaction),
  ``set_term_and_vote``, ``set_commit_index`` and multi-write transactions; snapshot + compaction and
  hot-backup steps are added when :mod:`raft_sqlite.snapshot` / :mod:`raft_sqlite.backup` exist.
* :func:`run_workload` / :func:`run_threaded`: execute it on a store and record, per group, how many
  operations were *acknowledged* (their call returned).
* :func:`check_store`: reopen a data_dir with the normal VFS under STRICT recovery and compare every
  group with the model: after ``acked`` operations the group must be in state ``acked`` or, if an
  operation was in flight, ``acked + 1`` (its outcome is unknown). Anything else is a *lost* write;
  a refused open is *unopenable*.
* :func:`powerloss_run`: one power-loss experiment with :class:`~tests.support.faultvfs.FaultVFS` and its
  ``fsio`` backend (``vfs.fs``): SQLite's files and the files the library writes itself (the WAL mark,
  the files made at creation, the disk reserve, NORMAL's interval syncs) share one model and one crash.
* :func:`writer_main`: the SIGKILL campaign's writer process (prints every acknowledged operation).
* :class:`Tally` / :func:`print_table`: the summary table each campaign prints (crash states only for
  runs that reached their crash point; acknowledged writes split into those the mode promises to keep
  and NORMAL's loss window; seconds summed over seeds).

How a store is put under the fault model: most campaigns create a template store with the normal VFS
once (:func:`make_template`: open + close), copy it for every run, and open the copy with
``vfs=<fault vfs name>`` and ``fsio.installed(vfs.fs)``; the copy's files count as durable as found.
``powerloss_run(None, ...)`` instead creates the store in the run through the model (creation writes
only through apsw and fsio: ``migrate.create`` copies the schema with SQLite's backup), tracking the run
directory so that data_dir's own entry is modelled too. To put checkpoints and WAL restarts (the most
delicate moments of WAL mode) inside a small workload, the harness lowers ``wal_autocheckpoint`` on the
store's write connection (``checkpoint_every``).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import random
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import apsw

from raft_sqlite import FsyncMode, LogEntry, NodeStore, RaftSqliteError, RecoveryPolicy, fsio
from raft_sqlite.wal import SegmentPolicy

try:
    from tests.support import faultvfs
except ImportError:  # pragma: no cover - tests/ itself on sys.path
    from support import faultvfs

NODE, CLUSTER = "n1", "c1"
#: small segments so that rotation, sealing and sidecar checksums are inside every crash window
SEGMENTS = SegmentPolicy(max_entries=12)


def have_module(name: str) -> bool:
    """True if ``raft_sqlite.<name>`` exists and imports (snapshot/backup land in parallel)."""
    try:
        __import__(f"raft_sqlite.{name}")
    except Exception:  # noqa: BLE001 - missing or half-written module: leave its steps out
        return False
    return True


# ---------------------------------------------------------------------------------------------- model
class GState(NamedTuple):
    """What one group holds (``exists`` False: the group does not exist yet)."""

    exists: bool
    first: int = 1
    entries: tuple = ()  # ((index, term, data), ...) from first to last
    term: int = 0
    vote: object = None
    commit: int = 0
    snap: tuple | None = None  # newest durable snapshot: (index, term, data)

    @property
    def last(self) -> int:
        return self.entries[-1][0] if self.entries else self.first - 1


ABSENT = GState(False)


@dataclass(frozen=True)
class Op:
    """One workload operation on ``group``; ``kind`` is one of :data:`OP_KINDS`."""

    kind: str
    group: str
    args: tuple = ()

    def __str__(self):
        a = ", ".join(_short(x) for x in self.args)
        return f"{self.kind}({self.group}: {a})"


def _short(x) -> str:
    if isinstance(x, Op):
        return str(x)
    if isinstance(x, list):
        return f"[{len(x)} entries {x[0].index}..{x[-1].index} t{x[-1].term}]" if x else "[]"
    return repr(x)


OP_KINDS = ("create", "append", "append_batch", "truncate", "term_vote", "commit", "tx", "snapshot", "compact")
#: snapshot chunking used by the workload (small, so a snapshot is several chunks and transactions)
SNAP_CHUNK, SNAP_COMMIT = 16 << 10, 48 << 10


def _payload(rng: random.Random, tag: str) -> bytes:
    r = rng.random()
    n = rng.randint(1, 200) if r < 0.85 else rng.randint(1000, 5000) if r < 0.97 else rng.randint(9000, 20000)
    head = tag.encode()
    return head + rng.randbytes(max(0, n - len(head)))


class _Gen:
    """Generates one group's operations while keeping its model up to date."""

    def __init__(self, group: str, rng: random.Random, snapshots: bool = False):
        self.g, self.rng, self.snapshots = group, rng, snapshots
        self.first, self.entries, self.term, self.vote, self.commit = 1, [], 0, None, 0
        self.snap = None
        self.k = 0  # number of the operation being generated
        self.hist: dict[int, list] = {}  # index -> [(k, term, data), ...]: every write of that index

    @property
    def last(self) -> int:
        return self.entries[-1][0] if self.entries else self.first - 1

    @property
    def last_term(self) -> int:
        return self.entries[-1][1] if self.entries else 0

    def state(self) -> tuple:
        """Compact state after op ``k``: entries are rebuilt from ``hist`` on demand."""
        return (self.k, self.first, self.last, self.term, self.vote, self.commit, self.snap)

    def apply(self, op: Op) -> None:
        k, a = op.kind, op.args
        if k in ("append", "append_batch"):
            self.entries.extend((e.index, e.term, e.data) for e in a[0])
            for e in a[0]:
                self.hist.setdefault(e.index, []).append((self.k, e.term, e.data))
        elif k == "truncate":
            del self.entries[a[0] - self.first + 1:]
        elif k == "term_vote":
            self.term, self.vote = a
        elif k == "commit":
            self.commit = a[0]
        elif k == "snapshot":
            self.snap = a
        elif k == "compact":
            del self.entries[:a[0] - self.first + 1]
            self.first = a[0] + 1
        elif k == "tx":
            for sub in a:
                self.apply(sub)

    def _entries(self, n: int, serial: int) -> list[LogEntry]:
        i0 = self.last + 1
        return [LogEntry(i0 + j, self.term, _payload(self.rng, f"{self.g}:{i0 + j}:{serial}:")) for j in range(n)]

    def _term_vote(self) -> Op:
        r = self.rng.random()
        if self.vote is None and self.term > 0 and r < 0.3:
            return Op("term_vote", self.g, (self.term, self.rng.choice(["n1", "n2", 3])))
        return Op("term_vote", self.g, (self.term + 1, self.rng.choice([None, "n1", "n2", 2])))

    def next(self, serial: int) -> Op:
        """The next operation (and apply it to the model)."""
        rng = self.rng
        snap_index = self.snap[0] if self.snap else 0
        if self.term == 0:
            op = Op("term_vote", self.g, (1, "n1"))
        elif self.snapshots and rng.random() < 0.06 and self.commit > snap_index and self.commit >= self.first:
            i = self.commit
            data = rng.randbytes(rng.randint(1, 120_000))
            op = Op("snapshot", self.g, (i, self.entries[i - self.first][1], data))
        elif self.snapshots and rng.random() < 0.2 and snap_index >= self.first:
            op = Op("compact", self.g, (rng.randint(self.first, snap_index),))
        else:
            r = rng.random()
            if r < 0.28:
                op = Op("append", self.g, (self._entries(1, serial),))
            elif r < 0.46:
                op = Op("append_batch", self.g, (self._entries(rng.randint(2, 9), serial),))
            elif r < 0.56:
                op = self._term_vote()
            elif r < 0.70 and self.last > self.commit:
                op = Op("commit", self.g, (rng.randint(self.commit + 1, self.last),))
            elif r < 0.80 and self.last > self.commit:
                op = Op("truncate", self.g, (rng.randint(max(self.commit, self.first - 1), self.last - 1),))
            elif r < 0.90 and self.last > self.commit:
                # conflict resolution by a new leader: truncate, then append entries of a newer term, atomically
                cut = rng.randint(max(self.commit, self.first - 1), self.last - 1)
                self.apply(Op("truncate", self.g, (cut,)))  # temporarily, to build the append
                tv = Op("term_vote", self.g, (self.term + 1, None))
                self.apply(tv)
                app = Op("append_batch", self.g, (self._entries(rng.randint(1, 4), serial),))
                op = Op("tx", self.g, (Op("truncate", self.g, (cut,)), tv, app))
                self.apply(app)
                return op
            else:
                subs = [Op("append_batch", self.g, (self._entries(rng.randint(1, 5), serial),))]
                self.apply(subs[0])
                if rng.random() < 0.5:
                    subs.append(Op("commit", self.g, (rng.randint(self.commit, self.last),)))
                else:
                    subs.append(self._term_vote())
                self.apply(subs[1])
                return Op("tx", self.g, tuple(subs))
        self.apply(op)
        return op


class _States:
    """``states[k]``: the GState of a group after ``k`` operations, built on demand from the write
    history (a long workload would need quadratic memory to keep every state's entries)."""

    def __init__(self, metas: list, hist: dict):
        self._metas, self._hist = metas, hist

    def __len__(self) -> int:
        return len(self._metas)

    def __getitem__(self, k: int) -> GState:
        if k < 0:
            k += len(self._metas)
        m = self._metas[k]
        if m is None:
            return ABSENT
        kk, first, last, term, vote, commit, snap = m
        es = []
        for i in range(first, last + 1):
            h = self._hist[i]
            j = bisect.bisect_right(h, kk, key=lambda x: x[0]) - 1
            es.append((i, h[j][1], h[j][2]))
        return GState(True, first, tuple(es), term, vote, commit, snap)


class Workload:
    """A deterministic workload: ``ops(g)`` (group ``g``'s operations, the first creates it),
    ``states(g)[k]`` (its model after ``k`` operations) and ``order`` (a seeded interleaving of all
    groups' operations as ``(group, k)`` pairs, k 1-based)."""

    def __init__(self, seed: int, groups=("a", "b", "c"), ops_per_group: int = 12, snapshots: bool | None = None):
        self.seed, self.groups = seed, tuple(groups)
        #: snapshot + compaction steps (default: when raft_sqlite.snapshot is there)
        self.snapshots = have_module("snapshot") if snapshots is None else snapshots
        self._ops: dict[str, list[Op]] = {}
        self._states: dict[str, list[GState]] = {}
        for g in self.groups:
            gen = _Gen(g, random.Random(f"{seed}/{g}"), self.snapshots)
            gen.k = 1
            ops, metas = [Op("create", g)], [None, gen.state()]
            for serial in range(1, ops_per_group):
                gen.k = serial + 1
                ops.append(gen.next(serial))
                metas.append(gen.state())
            self._ops[g], self._states[g] = ops, _States(metas, gen.hist)
        rng = random.Random(f"{seed}/order")
        left = {g: len(self._ops[g]) for g in self.groups}
        done = {g: 0 for g in self.groups}
        self.order: list[tuple[str, int]] = []
        while any(left.values()):
            g = rng.choice([g for g in self.groups if left[g]])
            done[g] += 1
            left[g] -= 1
            self.order.append((g, done[g]))

    def ops(self, g: str) -> list[Op]:
        return self._ops[g]

    def states(self, g: str) -> _States:
        return self._states[g]

    def __len__(self) -> int:
        return len(self.order)


# ---------------------------------------------------------------------------------------------- running
def execute(store: NodeStore, op: Op) -> None:
    """Perform ``op`` on ``store`` (raises whatever the store raises)."""
    k, g, a = op.kind, op.group, op.args
    if k == "create":
        store.log(g)
    elif k in ("append", "append_batch"):
        store.log(g).append(a[0])
    elif k == "truncate":
        store.log(g).truncate_after(a[0])
    elif k == "term_vote":
        store.metadata(g).set_term_and_vote(*a)
    elif k == "commit":
        store.metadata(g).set_commit_index(a[0])
    elif k == "snapshot":
        index, term, data = a
        mgr = store.snapshots(g)
        mgr.chunk_size, mgr.commit_bytes = SNAP_CHUNK, SNAP_COMMIT
        with mgr.write(index, term) as w:
            for off in range(0, len(data), 20_000):
                w.write(data[off:off + 20_000])
    elif k == "compact":
        store.log(g).compact(a[0])
    elif k == "tx":
        with store.transaction():
            for sub in a:
                execute(store, sub)
    else:  # pragma: no cover
        raise ValueError(op)


def open_store(path, *, fsync=FsyncMode.FULL, vfs=None, checkpoint_every: int | None = None, **kw) -> NodeStore:
    """Open node n1/c1 at ``path`` the way the campaigns do (small segments, STRICT recovery)."""
    s = NodeStore.open(path, NODE, cluster_id=CLUSTER, fsync=fsync, vfs=vfs, segment_policy=SEGMENTS,
                       recovery=RecoveryPolicy.STRICT, **kw)
    if checkpoint_every is not None:
        s.kernel.conn.execute(f"PRAGMA wal_autocheckpoint={int(checkpoint_every)}")
    return s


def run_workload(store: NodeStore, wl: Workload, acked: dict, on_ack=None, upto: int | None = None,
                 backups: Backups | None = None, start: int = 0) -> None:
    """Run steps ``start`` to ``upto`` of ``wl.order`` on ``store``; ``acked[g]`` counts returned ops.
    With ``backups``, a hot backup is taken every ``backups.every`` steps."""
    for step, (g, k) in enumerate(wl.order[start:upto], start + 1):
        execute(store, wl.ops(g)[k - 1])
        acked[g] = k
        if on_ack is not None:
            on_ack(g, k)
        if backups is not None and step % backups.every == 0:
            backups.take(store, acked)


class Backups:
    """Hot backups taken during a single-threaded workload (when :mod:`raft_sqlite.backup` is there):
    ``done`` lists ``(backup folder, acked at that point)`` for every backup whose call returned."""

    def __init__(self, backup_dir: str, every: int = 10, on_done=None):
        self.dir, self.every, self.on_done = backup_dir, every, on_done
        self.done: list[tuple[str, dict]] = []

    def take(self, store: NodeStore, acked: dict) -> None:
        from raft_sqlite.backup import HotBackupManager

        at = dict(acked)
        info = HotBackupManager(store, self.dir, step_pause=0).backup()
        self.done.append((info.path, at))
        if self.on_done is not None:
            self.on_done(info.path, at)


def check_backup(path: str, restore_dir: str, wl: Workload, acked: dict) -> Verdict:
    """Restore the backup folder ``path`` into ``restore_dir`` (raft_sqlite.restore verifies every
    checksum first) and check the result is exactly the model state at the backup (nothing in flight)."""
    from raft_sqlite.backup import restore

    try:
        restore(path, restore_dir)
    except Exception as exc:  # noqa: BLE001 - a refused restore is the finding
        return Verdict(False, unopenable=True, acked=sum(acked.values()),
                       detail=f"restore of {path} failed: {type(exc).__name__}: {exc}")
    return check_store(restore_dir, wl, acked, in_flight=False)


def run_threaded(store: NodeStore, wl: Workload, acked: dict, on_ack=None) -> list[BaseException]:
    """One thread per group (their commits coalesce in the group committer). Returns the errors that
    stopped threads (empty if every group finished)."""
    errors: list[BaseException] = []

    def one(g):
        try:
            for k, op in enumerate(wl.ops(g), 1):
                execute(store, op)
                acked[g] = k
                if on_ack is not None:
                    on_ack(g, k)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(g,)) for g in wl.groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def make_template(path) -> str:
    """Create (once) an empty store at ``path`` with the normal VFS (alembic runs here) and close it."""
    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, "raft.db")):
        open_store(path).close()
    return path


def copy_store(template: str, dst: str) -> str:
    """Copy a closed store's files (not -shm) to a fresh ``dst``."""
    os.makedirs(dst, mode=0o700)
    for name in os.listdir(template):
        if not name.endswith("-shm"):
            shutil.copy2(os.path.join(template, name), os.path.join(dst, name))
    return dst


def read_state(store: NodeStore, g: str, snapshots: bool = False) -> GState:
    """What ``store`` holds for group ``g`` (entries read through ``entries()`` and the snapshot
    through ``open()``: record CRCs, chunk CRCs and the snapshot digest are verified)."""
    if g not in store.groups():
        return ABSENT
    lg, md = store.log(g), store.metadata(g)
    first, last = lg.first_index, lg.last_index
    es = tuple((e.index, e.term, e.data) for e in lg.entries(first, last + 1)) if last >= first else ()
    hs = md.hard_state
    snap = None
    if snapshots:
        meta = store.snapshots(g).latest()
        if meta is not None:
            with store.snapshots(g).open(meta) as f:
                snap = (meta.index, meta.term, f.read())
            if (lg.snapshot_index, lg.term(lg.snapshot_index)) != snap[:2]:
                raise AssertionError(f"group {g}: snapshot_index/term {lg.snapshot_index} disagree with the newest "
                                     f"snapshot {snap[:2]}")
    return GState(True, first, es, hs.current_term, hs.voted_for, hs.commit_index, snap)


def _diff(got: GState, want: GState) -> str:
    if got.exists != want.exists:
        return f"exists={got.exists}, expected {want.exists}"
    out = []
    for f in ("first", "last", "term", "vote", "commit", "snap"):
        a, b = getattr(got, f), getattr(want, f)
        if f == "snap":
            a, b = [None if x is None else (x[0], x[1], f"{len(x[2])} bytes crc {zlib.crc32(x[2]):08x}") for x in (a, b)]
        if a != b or type(a) is not type(b):
            out.append(f"{f}={a!r} (expected {b!r})")
    if got.entries != want.entries:
        bad = next((i for i, (x, y) in enumerate(zip(got.entries, want.entries)) if x != y), None)
        if bad is not None:
            out.append(f"entry {got.entries[bad][0]} differs")
        else:
            out.append(f"{len(got.entries)} entries, expected {len(want.entries)}")
    return ", ".join(out) or "equal"


@dataclass
class Verdict:
    """Outcome of checking one crash state."""

    ok: bool
    unopenable: bool = False
    lost: int = 0  # groups whose state matched none of the allowed model states
    acked: int = 0  # acknowledged operations the mode promises to keep (all of them, or NORMAL's floor)
    window: int = 0  # acknowledged operations inside NORMAL's loss window (checked only for consistency)
    detail: str = ""
    in_flight_applied: int = 0  # groups where the in-flight op turned out durable


def check_store(path, wl: Workload, acked: dict, *, floor: dict | None = None, fsync=FsyncMode.FULL,
                in_flight: bool = True) -> Verdict:
    """Reopen ``path`` with the normal VFS (STRICT) and compare each group with the model.

    Group ``g`` must be in state ``k`` for some ``floor[g] <= k <= acked[g] + 1`` (``floor``
    defaults to ``acked``: every acknowledged operation is there; the one in flight may be)."""
    floor = acked if floor is None else floor
    promised = sum(min(floor.get(g, 0), acked.get(g, 0)) for g in acked)
    window = sum(acked.values()) - promised
    try:
        store = open_store(path, fsync=fsync)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return Verdict(False, unopenable=True, acked=promised, window=window,
                       detail=f"reopen failed: {type(exc).__name__}: {exc}")
    v = Verdict(True, acked=promised, window=window)
    try:
        extra = set(store.groups()) - set(wl.groups)
        if extra:
            v.ok, v.detail = False, f"unexpected groups {sorted(extra)}"
        for g in wl.groups:
            states = wl.states(g)
            try:
                got = read_state(store, g, wl.snapshots)
            except Exception as exc:  # noqa: BLE001
                v.ok, v.lost = False, v.lost + 1
                v.detail += f" group {g}: read failed: {type(exc).__name__}: {exc};"
                continue
            lo, hi = floor.get(g, 0), min(acked.get(g, 0) + in_flight, len(states) - 1)
            match = [k for k in range(lo, hi + 1) if states[k] == got and
                     type(states[k].vote) is type(got.vote)]
            if not match:
                v.ok, v.lost = False, v.lost + 1
                v.detail += (f" group {g}: acked {acked.get(g, 0)} (floor {lo}) but state matches no model state "
                             f"in {lo}..{hi}; vs state {acked.get(g, 0)}: {_diff(got, states[acked.get(g, 0)])};")
            elif match[-1] > acked.get(g, 0):
                v.in_flight_applied += 1
    finally:
        store.close()
    return v


# ---------------------------------------------------------------------------------------------- tallies
@dataclass
class Tally:
    """Counters of one campaign (one row of the summary table)."""

    name: str
    crash_states: int = 0  # states checked after a crash that really happened at its crash point
    not_reached: int = 0  # runs that ended before their crash point (checked, but not crash states)
    kills: int = 0
    faults: int = 0
    acked_checked: int = 0  # acknowledged writes the mode promises to keep, checked
    window_checked: int = 0  # NORMAL: acknowledged writes inside the loss window (may be lost)
    retried: int = 0  # creation: crash states whose first open failed (typed) and a retry opened
    lost: int = 0
    unopenable: int = 0
    in_flight_applied: int = 0
    backups: int = 0  # completed hot backups restored and checked
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, v: Verdict, where: str) -> None:
        self.acked_checked += v.acked
        self.window_checked += v.window
        self.lost += v.lost
        self.unopenable += v.unopenable
        self.in_flight_applied += v.in_flight_applied
        if not v.ok and len(self.failures) < 20:
            self.failures.append(f"{where}: {v.detail}")

    def count_run(self, crashed: bool) -> None:
        """Count one run: a crash state if it lost power at its crash point, else a run that ended before it."""
        if crashed:
            self.crash_states += 1
        else:
            self.not_reached += 1

    def assert_clean(self) -> None:
        assert self.lost == 0 and self.unopenable == 0 and not self.failures, \
            f"{self.name}: lost={self.lost} unopenable={self.unopenable}\n" + "\n".join(self.failures)


COLUMNS = ("campaign", "crash states", "runs ended before the crash point", "kills", "faults injected",
           "acked writes checked", "acked in loss window", "backups restored", "lost", "unopenable",
           "opened on retry", "in-flight applied", "seconds")


def table(tallies: list[Tally]) -> str:
    """The summary table as markdown (``seconds``: summed over every seed/part of the campaign)."""
    rows = [[t.name, t.crash_states, t.not_reached, t.kills, t.faults, t.acked_checked, t.window_checked,
             t.backups, t.lost, t.unopenable, t.retried, t.in_flight_applied, f"{t.seconds:.1f}"]
            for t in tallies]
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *rows)]
    fmt = "| " + " | ".join("{:>" + str(w) + "}" for w in widths) + " |"
    lines = [fmt.format(*COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def print_table(title: str, tallies: list[Tally]) -> None:
    """Print the summary (visible with ``pytest -s``) and notes."""
    print(f"\n{title}\n{table(tallies)}", flush=True)
    for t in tallies:
        for n in t.notes:
            print(f"  {t.name}: {n}")


# ---------------------------------------------------------------------------------------------- power loss
_vfs_names = itertools.count()


def new_vfs(root: str) -> faultvfs.FaultVFS:
    """A fresh FaultVFS (unique name) tracking the files under ``root``."""
    return faultvfs.FaultVFS(f"torture{os.getpid()}_{next(_vfs_names)}", root=root)


class SyncTracker:
    """NORMAL mode: records ``acked`` as it was when the last *successful* interval sync of the WAL
    started: the floor of the documented loss window (writes acknowledged after it may be lost)."""

    def __init__(self, store: NodeStore, acked: dict):
        self.floor = {g: 0 for g in acked}
        self.syncs = 0
        syncer = store.kernel.pipeline.syncer
        if syncer is None:
            return
        orig, stats = syncer.sync, store.stats

        def sync(wal):
            before, n = dict(acked), stats.interval_syncs
            orig(wal)
            if stats.interval_syncs > n:  # the fdatasync returned (a failed one does not count)
                self.floor = before
                self.syncs += 1

        syncer.sync = sync


@dataclass
class RunResult:
    crashed: bool
    acked: dict
    error: BaseException | None
    floor: dict | None = None
    vfs: faultvfs.FaultVFS | None = None
    counters: dict | None = None
    store_dir: str = ""  #: where the data_dir is inside a crash image ("": the image is the data_dir)

    def image(self, img: str, mode: str, seed: int = 0) -> str:
        """Write the crash image into ``img``; returns the data_dir inside it (it may not exist)."""
        self.vfs.write_crash_image(img, mode, seed=seed)
        return os.path.join(img, self.store_dir) if self.store_dir else img


def powerloss_run(template: str | None, run_dir: str, wl: Workload, *, fsync=FsyncMode.FULL,
                  crash: dict | None = None, checkpoint_every: int | None = 40, threaded: bool = False,
                  slow_ops: float = 0.0, backups: Backups | None = None) -> RunResult:
    """Copy ``template`` to ``run_dir/live``, open it through a fresh FaultVFS (and its FaultFS) armed
    with ``crash`` (``{"at_sync": n}`` / ``{"at_write": n}``, or None for a dry run), run ``wl`` and
    close. ``template=None``: store *creation* is inside the model too: the store is created by this
    open in the empty ``run_dir/live`` (the FaultVFS tracks ``run_dir``, so that data_dir's own entry
    is modelled; ``RunResult.image`` returns the data_dir inside an image). The returned RunResult
    holds the VFS (write images; then ``vfs.unregister()``)."""
    if template is None:
        os.makedirs(run_dir, exist_ok=True)
        live, vfs = os.path.join(run_dir, "live"), new_vfs(run_dir)
    else:
        live = copy_store(template, os.path.join(run_dir, "live"))
        vfs = new_vfs(live)
    if crash:
        vfs.arm_crash(**crash)
    acked = {g: 0 for g in wl.groups}
    store, err, tracker = None, None, None
    with fsio.installed(vfs.fs):
        try:
            store = open_store(live, fsync=fsync, vfs=vfs.name, checkpoint_every=checkpoint_every,
                               fsync_interval=0.002)
            tracker = SyncTracker(store, acked)
            if threaded:
                errs = run_threaded(store, wl, acked)
                if errs:
                    raise errs[0]
            else:
                run_workload(store, wl, acked, on_ack=(lambda g, k: time.sleep(slow_ops)) if slow_ops else None,
                             backups=backups)
            store.close()
        except (RaftSqliteError, apsw.Error) as exc:
            err = exc
        finally:
            if store is not None:
                store.close()
    return RunResult(vfs.crashed, acked, err, tracker.floor if tracker else {g: 0 for g in wl.groups}, vfs,
                     dict(vfs.counters), "live" if template is None else "")


# ---------------------------------------------------------------------------------------------- SIGKILL writer
def writer_main(argv=None) -> None:
    """``python -c 'from tests.torture import writer_main; writer_main()' DIR SEED OPS MODE THREADED
    [BACKUP_DIR]``: run the workload on DIR and print ``A <group> <k>`` (flushed) after each
    acknowledged op, ``B <folder> a=<k> b=<k> ...`` after each hot backup (single-threaded runs with
    BACKUP_DIR: every 25 ops), then ``DONE``. Exits 3 on an error."""
    argv = sys.argv[1:] if argv is None else argv
    path, seed, ops, mode, threaded = argv[0], int(argv[1]), int(argv[2]), FsyncMode(argv[3]), argv[4] == "1"
    backup_dir = argv[5] if len(argv) > 5 and argv[5] != "-" else None
    wl = Workload(seed, ops_per_group=ops)
    out = sys.stdout
    lock = threading.Lock()

    def ack(g, k):
        with lock:
            out.write(f"A {g} {k}\n")
            out.flush()

    acked = {g: 0 for g in wl.groups}
    try:
        with open_store(path, fsync=mode, checkpoint_every=60, fsync_interval=0.005) as s:
            out.write("OPEN\n")
            out.flush()
            if threaded:
                errs = run_threaded(s, wl, acked, ack)
                if errs:
                    raise errs[0]
            else:
                def backed_up(p, at):
                    with lock:
                        out.write(f"B {p} {' '.join(f'{g}={k}' for g, k in at.items())}\n")
                        out.flush()

                run_workload(s, wl, acked, ack,
                             backups=Backups(backup_dir, 25, backed_up) if backup_dir else None)
    except Exception as exc:  # noqa: BLE001
        out.write(f"ERROR {type(exc).__name__}: {exc}\n")
        out.flush()
        sys.exit(3)
    out.write("DONE\n")
    out.flush()


@contextlib.contextmanager
def quiet():
    """Silence injected-fault reports that apsw can only send to sys.unraisablehook."""
    with faultvfs.quiet_injected_faults():
        yield


# ---------------------------------------------------------------------------------------------- backups and restores under power loss
# (helper block for tests/test_torture_backup.py: hot backups and restores inside the power-loss model)
@dataclass
class BackupRun:
    """One run of :func:`backup_powerloss_run`: ``acked`` (every acknowledged op, including those done
    while the backup copied), ``at_backup`` (acked when the crash-window backup started: exactly what it
    must hold), ``done`` (``(folder, acked at its start)`` of every backup whose call returned: those
    are acknowledged and must survive), ``error`` and the ``vfs``; ``syncs_in_backup``: syncs counted
    from the backup's start to its return."""

    crashed: bool
    acked: dict
    at_backup: dict
    done: list
    error: BaseException | None
    vfs: faultvfs.FaultVFS
    syncs_in_backup: int = 0
    returned: bool = False  # the crash-window backup's call returned


def backup_powerloss_run(template: str, run_dir: str, wl: Workload, *, before: int, crash: dict | None = None,
                         earlier_backup: bool = False, pages_per_step: int = 2) -> BackupRun:
    """Copy ``template`` to ``run_dir/live`` and put ``run_dir`` (the live store *and* the backup folder
    ``run_dir/backups``) under one fresh FaultVFS, its :class:`FaultFS` installed as the fsio backend.
    Run the first ``before`` steps of ``wl`` (with ``earlier_backup``, a backup after the first half of
    them), arm ``crash`` (``{"at_sync": n}`` / ``{"at_write": n}``, counted from the backup's start) and
    take a hot backup while the workload goes on: one more step of ``wl`` every time the backup reports
    copy progress (deterministic interleaving, from the backup's worker thread), then the rest of ``wl``
    after it returned. Returns a :class:`BackupRun` (call ``vfs.write_crash_image``, then
    ``vfs.unregister()``)."""
    from raft_sqlite import fsio
    from raft_sqlite.backup import HotBackupManager

    live = copy_store(template, os.path.join(run_dir, "live"))
    vfs = faultvfs.FaultVFS(f"torture{os.getpid()}_{next(_vfs_names)}", root=run_dir)
    acked = {g: 0 for g in wl.groups}
    at_backup: dict = {}
    done: list = []
    state = {"step": 0, "syncs": 0, "returned": False}
    store, err = None, None

    def next_step():
        if state["step"] < len(wl.order):
            g, k = wl.order[state["step"]]
            execute(store, wl.ops(g)[k - 1])
            acked[g] = k
            state["step"] += 1

    def progress(phase, done, total):
        if not phase.startswith("sha256:"):  # copy progress of raft.db / chunks.db (not the hash threads)
            next_step()

    with fsio.installed(vfs.fs):
        try:
            store = open_store(live, vfs=vfs.name, checkpoint_every=40)
            mgr = HotBackupManager(store, os.path.join(run_dir, "backups"), pages_per_step=pages_per_step,
                                   step_pause=0)
            while state["step"] < before:
                next_step()
                if earlier_backup and state["step"] == before // 2:
                    done.append((mgr.backup().path, dict(acked)))
            at_backup.update(acked)
            if crash:
                vfs.arm_crash(**crash)
            n0 = vfs.counters["syncs"]
            info = mgr.backup(progress=progress)
            state["syncs"] = vfs.counters["syncs"] - n0
            done.append((info.path, dict(at_backup)))
            state["returned"] = True
            while state["step"] < len(wl.order):
                next_step()
            store.close()
        except (RaftSqliteError, apsw.Error, OSError) as exc:
            err = exc
        finally:
            if store is not None:
                with contextlib.suppress(RaftSqliteError, apsw.Error, OSError):
                    store.close()
    return BackupRun(vfs.crashed, acked, at_backup, done, err, vfs, state["syncs"], state["returned"])


@dataclass
class RestoreRun:
    """One run of :func:`restore_powerloss_run`: the ``backup`` folder and ``target`` used (paths in the
    live run, not in an image), ``error``, ``vfs`` and ``syncs`` (counted while restore() ran)."""

    crashed: bool
    backup: str
    target: str
    error: BaseException | None
    vfs: faultvfs.FaultVFS
    syncs: int = 0
    writes: int = 0
    #: syncs counted when the target's raft.db last got its name by a rename (the restored store appears)
    syncs_at_raft_db: int = 0


def restore_powerloss_run(backup_folder: str, run_dir: str, *, crash: dict | None = None,
                          existing_dir: bool = False) -> RestoreRun:
    """Copy the backup folder to ``run_dir/bk`` and restore it into ``run_dir/target`` (created empty
    beforehand with ``existing_dir``) with ``run_dir`` under a fresh FaultVFS: its FaultFS installed as
    the fsio backend, ``restore(vfs=...)`` for its SQLite work, ``crash`` armed when restore() starts."""
    from raft_sqlite import fsio
    from raft_sqlite.backup import restore

    bk = os.path.join(run_dir, "bk")
    shutil.copytree(backup_folder, bk)
    target = os.path.join(run_dir, "target")
    if existing_dir:
        os.mkdir(target, 0o700)
    vfs = faultvfs.FaultVFS(f"torture{os.getpid()}_{next(_vfs_names)}", root=run_dir)
    err = None
    n0, w0 = vfs.counters["syncs"], vfs.counters["writes"]
    at_raft_db = [0]
    replace = vfs.fs.replace

    def watched_replace(src, dst):  # instance attribute: this run's FaultFS only
        replace(src, dst)
        if os.path.basename(dst) == "raft.db":
            at_raft_db[0] = vfs.counters["syncs"] - n0

    vfs.fs.replace = watched_replace
    with fsio.installed(vfs.fs):
        if crash:
            vfs.arm_crash(**crash)
        try:
            restore(bk, target, vfs=vfs.name)
        except (RaftSqliteError, apsw.Error, OSError) as exc:
            err = exc
    return RestoreRun(vfs.crashed, bk, target, err, vfs, vfs.counters["syncs"] - n0, vfs.counters["writes"] - w0,
                      at_raft_db[0])


def check_restored(path: str, wl: Workload, at: dict, backup_path: str) -> Verdict:
    """``path`` (a restored data_dir) opens under STRICT recovery holding exactly the model state at
    ``at`` (nothing in flight) and its restore event naming ``backup_path``."""
    v = check_store(path, wl, at, in_flight=False)
    if not v.unopenable:
        with open_store(path) as s:
            rf = s.restored_from
        if rf is None or rf.get("kind") != "node_replacement" or rf.get("backup_path") != backup_path:
            v.ok, v.lost = False, v.lost + 1
            v.detail += f" restored store lacks its restore event (restored_from={rf!r});"
    return v


def restore_target_outcome(target: str) -> tuple[str, str]:
    """Classify a restore target after a crash (without changing it, except when trying to open it):
    ``("untouched", ...)``: no database file there (absent or empty as before the restore, possibly the
    lock file or temporaries); ``("refused", error)``: NodeStore.open fails with a typed
    :class:`RaftSqliteError`; ``("opens", "")``: it opens (the caller checks its content);
    ``("bad", why)``: anything else (chunks.db without raft.db, an untyped error)."""
    import re

    from raft_sqlite import CorruptionError, layout

    names = sorted(os.listdir(target)) if os.path.isdir(target) else []
    if "raft.db" not in names:
        if "chunks.db" in names:
            return "bad", f"chunks.db without raft.db: {names}"
        if not any(re.match(layout.RESTORE_TEMP_PATTERN, n) for n in names):
            return "untouched", ""
    try:
        open_store(target).close()
    except CorruptionError as exc:
        # the only refusal a restore may leave: the one naming the interrupted restore (placeholder raft.db
        # or its temporaries), whose message says to run the restore again
        if "interrupted restore" not in str(exc):
            return "bad", f"refused for another reason: {exc}"
        return "refused", f"{type(exc).__name__}: {exc}"
    except RaftSqliteError as exc:
        return "bad", f"refused with {type(exc).__name__}, not as an interrupted restore: {exc}"
    except Exception as exc:  # noqa: BLE001 - an untyped failure is the finding
        return "bad", f"untyped error {type(exc).__name__}: {exc}"
    return "opens", ""


def check_restored_copy(backup_folder: str, restore_dir: str, wl: Workload, at: dict) -> Verdict:
    """Restore ``backup_folder`` into ``restore_dir`` (normal file system) and :func:`check_restored` it."""
    from raft_sqlite.backup import restore

    try:
        restore(backup_folder, restore_dir)
    except Exception as exc:  # noqa: BLE001 - a refused restore is the finding
        return Verdict(False, unopenable=True, acked=sum(at.values()),
                       detail=f"restore of {backup_folder} failed: {type(exc).__name__}: {exc}")
    return check_restored(restore_dir, wl, at, backup_folder)
