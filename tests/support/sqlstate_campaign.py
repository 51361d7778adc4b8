"""The exactly-once SIGKILL campaign of the SQL state machine (``tests/test_sqlstate_sigkill.py``).

* :func:`command`: the payload of log entry ``i`` is a deterministic function of ``(seed, i)``, so the
  parent knows every entry even after the log was compacted. Every command is NON-idempotent: it adds
  to a sum, multiplies, inserts a row whose rowid depends on the rows already there, appends an
  ``applied_log`` row (PRIMARY KEY on the index, no OR IGNORE), and folds its index into a hash chain
  (``ctr``): applying an entry twice, skipping one or reordering them changes the state.
* :func:`apply_entry`: the state machine's ``apply(conn, entry)`` (SQL); :class:`Model`: the same
  commands applied once, in order, in pure Python; :func:`read_tables`: the state's tables as the model
  holds them (exact equality).
* :func:`child_main`: the process the parent SIGKILLs. It opens the store and the state, catches up,
  then loops: append entries, advance the commit index, ``catch_up`` in random batch sizes, snapshot
  (FULL or DELTA by the chain policy) and compact the log behind the snapshot. It prints (flushed):
  ``PH <phase> ...`` when a phase starts and ``END <phase>`` when it ends (open, state, catchup0,
  restore, catchup, snapshot, compact, append, commit), ``K <n>`` once the commit index ``n`` is
  acknowledged, ``C <applied> <target>`` after each applied batch, ``S <index> <kind>`` after a snapshot.
"""

from __future__ import annotations

import os
import random
import sys
import traceback

import apsw

GROUP = "g"
NODE, CLUSTER = "n1", "c1"
KEYS = 40
#: ctr's hash chain: h = (h * MUL + index) % MOD (stays far below 2**63: no REAL overflow in SQLite)
MUL, MOD = 1_000_003, 2_147_483_647
VMOD = 1_000_003

DDL = [
    "CREATE TABLE acc(k INTEGER PRIMARY KEY, v INTEGER NOT NULL, n INTEGER NOT NULL)",
    "CREATE TABLE notes(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX notes_k ON notes(k)",
    "CREATE TABLE tags(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, tag TEXT NOT NULL)",
    "CREATE TABLE applied_log(idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, op TEXT NOT NULL)",
    "CREATE TABLE ctr(id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL, h INTEGER NOT NULL)",
]
#: the same schema with ``tags`` WITHOUT a PRIMARY KEY (a rowid table: its DELTAs are recorded by rowid through
#: SQLITE_SESSION_OBJCONFIG_ROWID). Same rowids, same model. Kept out of the CI campaigns: such DELTAs are
#: wrong once a table has 127+ changes between two snapshots (SQLite's session extension, see
#: test_sqlstate_sigkill.test_delta_of_a_table_without_primary_key)
DDL_NOPK = [d.replace("tags(id INTEGER PRIMARY KEY, ", "tags(") for d in DDL]


def ddl(nopk: bool) -> list[str]:
    """The campaign's schema (``nopk``: ``tags`` without a PRIMARY KEY)."""
    return DDL_NOPK if nopk else DDL


def term_of(i: int) -> int:
    """Term of log entry ``i`` (terms grow along the log)."""
    return 1 + i // 400


def command(seed: int, i: int) -> bytes:
    """The payload of entry ``i``: ``"<op> <args...>"`` (ASCII)."""
    rng = random.Random(f"{seed}/{i}")
    r = rng.random()
    k = rng.randrange(KEYS)
    if r < 0.40:
        return f"add {k} {rng.randint(-1000, 1000)}".encode()
    if r < 0.52:
        return f"mul {k} {rng.randint(2, 5)}".encode()
    if r < 0.60:
        return f"del {k}".encode()
    if r < 0.72:
        return f"note {k} {rng.randint(0, 1500)} {rng.getrandbits(32)}".encode()
    if r < 0.78:
        return f"dropnotes {k}".encode()
    if r < 0.88:
        return f"tag {k} t{rng.getrandbits(20)}".encode()
    if r < 0.93:
        return f"untag {k}".encode()
    if r < 0.97:
        return f"purge {rng.randrange(5)}".encode()
    return b"noop"


def note_body(length: int, salt: int) -> str:
    piece = f"{salt:08x}"
    return (piece * (length // len(piece) + 1))[:length]


def _cmod(a: int, b: int) -> int:
    """SQLite's ``%`` (the sign of the dividend, like C)."""
    r = abs(a) % b
    return r if a >= 0 else -r


def apply_entry(conn: apsw.Connection, e) -> None:
    """The state machine's ``apply``: run the command of entry ``e`` (SQL)."""
    op, *a = e.data.decode().split()
    if op == "add":
        conn.execute("INSERT INTO acc(k, v, n) VALUES (?, ?, 1) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v, "
                     "n = n + 1", (int(a[0]), int(a[1])))
    elif op == "mul":
        conn.execute("UPDATE acc SET v = (v * ? + 1) % ?, n = n + 1 WHERE k = ?", (int(a[1]), VMOD, int(a[0])))
    elif op == "del":
        conn.execute("DELETE FROM acc WHERE k = ?", (int(a[0]),))
    elif op == "note":
        conn.execute("INSERT INTO notes(k, body) VALUES (?, ?)", (int(a[0]), note_body(int(a[1]), int(a[2]))))
    elif op == "dropnotes":
        conn.execute("DELETE FROM notes WHERE k = ?", (int(a[0]),))
    elif op == "tag":
        conn.execute("INSERT INTO tags(k, tag) VALUES (?, ?)", (int(a[0]), a[1]))
    elif op == "untag":
        conn.execute("DELETE FROM tags WHERE k = ?", (int(a[0]),))
    elif op == "purge":
        conn.execute("DELETE FROM applied_log WHERE idx % 5 = ? AND idx < ?", (int(a[0]), e.index - 100))
    elif op != "noop":
        raise ValueError(f"unknown command {e.data!r}")
    conn.execute("INSERT INTO applied_log(idx, term, op) VALUES (?, ?, ?)", (e.index, e.term, op))
    conn.execute("INSERT INTO ctr(id, n, h) VALUES (1, 1, ?) ON CONFLICT(id) DO UPDATE SET n = n + 1, "
                 "h = (h * ? + ?) % ?", (e.index % MOD, MUL, e.index, MOD))


class Model:
    """The commands of entries ``1..at`` applied once, in order, in pure Python."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.at = 0
        self.acc: dict[int, list[int]] = {}
        self.notes: dict[int, tuple[int, str]] = {}
        self.tags: dict[int, tuple[int, str]] = {}  # rowid -> row
        self.applied_log: dict[int, tuple[int, str]] = {}
        self.ctr: tuple[int, int] | None = None

    def advance(self, to: int) -> Model:
        """Apply entries up to ``to`` (from scratch when ``to`` is behind)."""
        if to < self.at:
            self.reset()
        while self.at < to:
            self._apply(self.at + 1)
        return self

    def _apply(self, i: int) -> None:
        op, *a = command(self.seed, i).decode().split()
        if op == "add":
            k, d = int(a[0]), int(a[1])
            if k in self.acc:
                self.acc[k][0] += d
                self.acc[k][1] += 1
            else:
                self.acc[k] = [d, 1]
        elif op == "mul":
            k = int(a[0])
            if k in self.acc:
                self.acc[k][0] = _cmod(self.acc[k][0] * int(a[1]) + 1, VMOD)
                self.acc[k][1] += 1
        elif op == "del":
            self.acc.pop(int(a[0]), None)
        elif op == "note":
            self.notes[max(self.notes, default=0) + 1] = (int(a[0]), note_body(int(a[1]), int(a[2])))
        elif op == "dropnotes":
            self.notes = {r: v for r, v in self.notes.items() if v[0] != int(a[0])}
        elif op == "tag":
            self.tags[max(self.tags, default=0) + 1] = (int(a[0]), a[1])
        elif op == "untag":
            self.tags = {r: v for r, v in self.tags.items() if v[0] != int(a[0])}
        elif op == "purge":
            m = int(a[0])
            self.applied_log = {x: v for x, v in self.applied_log.items() if not (x % 5 == m and x < i - 100)}
        self.applied_log[i] = (term_of(i), op)
        self.ctr = (1, i % MOD) if self.ctr is None else (self.ctr[0] + 1, (self.ctr[1] * MUL + i) % MOD)
        self.at = i

    def tables(self) -> dict[str, list[tuple]]:
        return {
            "acc": sorted((k, v, n) for k, (v, n) in self.acc.items()),
            "notes": sorted((r, k, b) for r, (k, b) in self.notes.items()),
            "tags": sorted((r, k, t) for r, (k, t) in self.tags.items()),
            "applied_log": sorted((x, t, op) for x, (t, op) in self.applied_log.items()),
            "ctr": [] if self.ctr is None else [(1, *self.ctr)],
        }


def read_tables(conn: apsw.Connection) -> dict[str, list[tuple]]:
    """The user tables of a state database, in :meth:`Model.tables`'s form."""
    q = {"acc": "SELECT k, v, n FROM acc", "notes": "SELECT id, k, body FROM notes",
         "tags": "SELECT rowid, k, tag FROM tags", "applied_log": "SELECT idx, term, op FROM applied_log",
         "ctr": "SELECT id, n, h FROM ctr"}
    return {t: sorted(tuple(r) for r in conn.execute(sql)) for t, sql in q.items()}


def read_state_file(path: str) -> tuple[int, dict[str, list[tuple]]] | None:
    """``(applied_index, tables)`` of the state database at ``path`` (a dead child's), read in one read
    transaction on a read-only connection (no checkpoint on close); None if there is no database."""
    if not os.path.exists(path):
        return None
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.execute("BEGIN")
        applied = conn.execute("SELECT applied_index FROM raft_applied WHERE id=1").fetchone()[0]
        tables = read_tables(conn)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return applied, tables


def diff(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> str:
    """A short description of how two states differ ('' when equal)."""

    def short(rows: set) -> list[tuple]:
        return [tuple(x[:20] + "..." if isinstance(x, str) and len(x) > 20 else x for x in r) for r in sorted(rows)[:3]]

    out = []
    for t in want:
        g, w = set(got.get(t, [])), set(want[t])
        if got.get(t, []) != want[t]:
            out.append(f"{t}: {len(got.get(t, []))} rows vs {len(want[t])} expected; extra {short(g - w)} "
                       f"missing {short(w - g)}")
    return "; ".join(out)


# ---------------------------------------------------------------------------------------------- child
def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child_main(argv: list[str] | None = None) -> None:
    """``data_dir seed durable run_seed cap nopk [break]``: run the workload until SIGKILLed (or the commit
    index reaches ``cap``: prints DONE and exits). ``nopk`` 1: :data:`DDL_NOPK`. ``break`` (tests of the
    harness only) = ``lag``: at start-up, move the recorded applied index back (as if it were not written
    with the state), so that catch_up applies entries a second time."""
    argv = sys.argv[1:] if argv is None else argv
    data_dir, seed, durable, run_seed, cap = argv[0], int(argv[1]), argv[2] == "1", int(argv[3]), int(argv[4])
    schema = ddl(argv[5] == "1")
    brk = argv[6] if len(argv) > 6 else ""
    try:
        _child(data_dir, seed, durable, random.Random(run_seed), cap, brk, schema)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        _say(f"ERROR {exc!r}")
        traceback.print_exc()
        sys.exit(1)


def _child(data_dir: str, seed: int, durable: bool, rng: random.Random, cap: int, brk: str,
           schema: list[str]) -> None:
    from raft_sqlite import FsyncMode, LogEntry, NodeStore

    _say("PH open")
    store = NodeStore.open(data_dir, NODE, cluster_id=CLUSTER, fsync=FsyncMode.NORMAL)
    _say("END open")
    if brk == "lag":
        from raft_sqlite.sqlstate import applied_crc, state_file
        path = state_file(data_dir, store.kernel.group(GROUP).gid) if GROUP in store.kernel.groups else ""
        if path and os.path.exists(path):
            c = apsw.Connection(path)
            c.execute("UPDATE raft_applied SET applied_index = max(0, applied_index - 3), crc32 = 0")
            i, t = c.execute("SELECT applied_index, applied_term FROM raft_applied").fetchone()
            c.execute("UPDATE raft_applied SET applied_term = ?, crc32 = ?", (term_of(i) if i else 0,
                                                                             applied_crc(i, term_of(i) if i else 0)))
            c.close()
    _say("PH state")
    st = store.state(GROUP, schema=schema, apply=apply_entry, durable=durable)
    _say("END state")
    lg, md = store.log(GROUP), store.metadata(GROUP)
    kg = store.kernel.group
    if md.current_term == 0:
        md.set_term_and_vote(1, None)

    def progress(applied: int, target: int) -> None:
        _say(f"C {applied} {target}")

    g = kg(GROUP)
    phase = "restore" if st.last_applied + 1 < g.first_index and st.last_applied < g.commit else "catchup0"
    _say(f"PH {phase} {st.last_applied} {g.commit} {g.first_index}")
    st.catch_up(batch=rng.choice([1, 3, 16, 256]), progress=progress)
    _say(f"END {phase}")
    _say(f"R {st.last_applied} {kg(GROUP).commit} {kg(GROUP).first_index}")
    while True:
        g = kg(GROUP)
        if g.commit >= cap:
            _say("DONE")
            store.close()
            return
        if rng.random() < 0.6 or g.last_index == g.commit:
            n = rng.randint(1, 8) if rng.random() < 0.9 else rng.randint(50, 300)
            a = g.last_index + 1
            if term_of(a + n - 1) > md.current_term:
                md.set_term_and_vote(term_of(a + n - 1), None)
            _say(f"PH append {a} {n}")
            lg.append([LogEntry(i, term_of(i), command(seed, i)) for i in range(a, a + n)])
            _say("END append")
        g = kg(GROUP)
        if g.last_index > g.commit and rng.random() < 0.8:
            c = g.last_index if rng.random() < 0.6 else rng.randint(g.commit + 1, g.last_index)
            _say("PH commit")
            md.set_commit_index(c)
            _say(f"K {c}")
        if rng.random() < 0.6:
            _say(f"PH catchup {st.last_applied} {kg(GROUP).commit}")
            st.catch_up(batch=rng.choice([1, 1, 2, 3, 5, 8, 16, 64, 256]), progress=progress)
            _say("END catchup")
        if rng.random() < 0.05 and st.last_applied > 0:
            snaps = store.snapshots(GROUP)
            latest = snaps.latest()
            if latest is None or latest.index < st.last_applied:
                _say(f"PH snapshot {st.last_applied}")
                meta = st.snapshot()
                _say("END snapshot")
                _say(f"S {meta.index} {meta.kind.value}")
                g = kg(GROUP)
                if rng.random() < 0.7 and meta.index >= g.first_index:
                    up_to = rng.randint(g.first_index, meta.index)
                    _say(f"PH compact {up_to}")
                    lg.compact(up_to)
                    _say("END compact")
