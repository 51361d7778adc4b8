"""The commit pipeline: the writer queue, leader/follower group commit, fail-stop and NORMAL's interval syncer.

Every write of a store (log, metadata, snapshots, raw statements) is a *request*: a list of ops
``(group name, check, write)``. :meth:`CommitPipeline.submit` queues it; the thread at the front of the
queue leads, applies every queued request in one SQLite transaction, commits once (one fsync) and
publishes the new group states (copy-then-publish, :mod:`raft_sqlite.groupstate`). The pipeline knows
nothing of what the ops write: log, metadata and snapshots build them.

Durability contract: when :meth:`CommitPipeline.run` returns, the op's rows are committed per the fsync
mode; when it raises, nothing of that request was written, except :class:`~raft_sqlite.StorageFault`,
which means "unknown outcome": the pipeline is then fail-stopped (:attr:`CommitPipeline.fault` is set)
and refuses every later write until the store is reopened.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import apsw

from . import fsio
from .errors import (
    CompactionError,
    CorruptionError,
    GroupNotFoundError,
    LogConflictError,
    RaftSqliteError,
    StorageFault,
)
from .groupstate import GroupState, GroupTable, insert_group
from .sqlitewal import HighWaterMark
from .wal import WalWriter

log = logging.getLogger("raft_sqlite.store")  # the store's logger: operators grep for these lines

#: apsw errors that mean the disk or the database failed (fail-stop), not that one statement was refused.
FAULT_ERRORS: tuple[type[apsw.Error], ...] = (
    apsw.IOError, apsw.FullError, apsw.CantOpenError, apsw.CorruptError, apsw.NotADBError, apsw.ProtocolError,
    apsw.ReadOnlyError, apsw.BusyError, apsw.LockedError, apsw.NoMemError)

#: ``check(g) -> result``: validates an op against the group state ``g`` (a private copy it may change);
#: raises to refuse (nothing written).
Check = Callable[[GroupState], Any]
#: ``write(conn, g, result)``: runs the op's SQL on the write connection inside the batch's transaction.
#: A write with the attribute ``deferred = True`` only queues rows on the record writer (no SQL yet).
Write = Callable[[apsw.Connection, Any, Any], Any]
Op = tuple[str | None, Check | None, Write | None]
R = TypeVar("R")


def deferred(write: Write) -> Write:
    """Mark ``write`` as deferred: it only queues rows on the record writer (``WalWriter.pending``), which the
    leader inserts with one ``executemany`` for the whole batch, so it needs no transaction of its own."""
    vars(write)["deferred"] = True
    return write


def translate(exc: apsw.Error, what: str, data_dir: str) -> RaftSqliteError:
    """The typed error for an apsw error raised during ``what`` on the store in ``data_dir``."""
    if isinstance(exc, apsw.ConstraintError):
        msg = str(exc)
        if "no durable snapshot" in msg:
            return CompactionError(msg)
        return LogConflictError(f"{what}: constraint failed: {msg}")
    if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
        return CorruptionError(f"{data_dir}: SQLite reports corruption during {what}: {exc}")
    if not isinstance(exc, FAULT_ERRORS):  # e.g. TooBigError: SQLite refused this statement, nothing failed
        return RaftSqliteError(f"{data_dir}: SQLite refused the {what} ({type(exc).__name__}: {exc})")
    return StorageFault(f"{data_dir}: storage fault during {what} ({type(exc).__name__}: {exc}); "
                        "the outcome of the write is unknown until the store is reopened")


class CommitListener(Protocol):
    """Told about every successful commit (metrics). Called on the committing thread after the batch is
    durable and published; it must be quick and must not write to the store. An exception it raises is
    logged and ignored (a durable write never turns into an error)."""

    def on_commit(self, seconds: float, requests: int) -> None: ...


class SyncListener(Protocol):
    """Told about every sync the store issues itself, outside COMMIT (metrics): ``file`` is ``"wal"``
    (NORMAL mode's interval sync, the background checkpointer's WAL sync), ``"db"`` (raft.db: the
    checkpointer's paced syncs, a checkpoint recorded as durable) or ``"hwm"`` (the WAL high-water mark).
    The WAL sync SQLite makes inside COMMIT (FULL/EXTRA) is not reported: it is part of the commit's
    duration. Same rules as :class:`CommitListener`, and it may be called from any of the store's threads."""

    def on_sync(self, file: str, seconds: float) -> None: ...


class _Replay(Exception):
    """Internal: drop ``req`` from the batch (its SQL already ran) and replay the rest."""

    def __init__(self, req: Request, error: BaseException) -> None:
        super().__init__(str(error))
        self.req, self.error = req, error


class _Carrier(Exception):
    """Internal: carries the exception ``error`` from the committer's inner steps to ``_execute``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Unknown(_Carrier):
    """A rollback after ``error`` failed; the outcome of the batch is unknown."""


class _Interrupted(_Carrier):
    """The leader was interrupted (``error``: KeyboardInterrupt, SystemExit...) before COMMIT and the batch
    was rolled back: every live request was answered "nothing written"; re-raise ``error``."""


class _BatchFailed(_Carrier):
    """Inserting the deferred rows of several requests failed (with ``error``); the batch is rolled back
    and replayed with each request's rows inserted with it."""


def _follow(req: Request) -> BaseException | None:
    """A queued request's wait: until it is done or at the front, then pass the wake-up on along its batch.
    Returns an interrupt caught meanwhile (the caller re-raises it once the protocol is finished).

    ``woken`` is set before the lock is released, so an interrupt at any point (even one raised just after
    acquire() returned, with the lock taken: found by review) is caught without blocking again on a lock
    already consumed. An interrupt must not abandon a queued request (the leader would hand the front to
    it and every later writer would wait forever), nor break the chain of wake-ups."""
    interrupt: BaseException | None = None
    while not req.woken:
        try:
            req.wake.acquire()
        except BaseException as exc:
            interrupt = interrupt or exc
    while req.chain is not None:  # first thing once woken: pass the wake-up on along the batch
        try:
            _wake(req.chain)
            req.chain = None
        except BaseException as exc:
            interrupt = interrupt or exc
    return interrupt


def _wake(r: Request) -> None:
    """Wake the follower ``r`` (idempotent: a second call after an interrupt is harmless)."""
    r.woken = True
    with contextlib.suppress(RuntimeError):  # released already (by a call an interrupt cut short)
        r.wake.release()


class Request:
    """One write request: its ops, and (once ``done``) its ``result`` (one value per op) or ``error``."""

    __slots__ = ("ops", "done", "result", "error", "wake", "chain", "woken", "parts")

    def __init__(self, ops: list[Op], parts: list[Request] | None = None) -> None:
        self.ops = ops  # list of (group name, check, write)
        #: a carrier (:meth:`CommitPipeline.submit_all`): the requests it queues as one writer, each validated,
        #: written and answered on its own
        self.parts = parts
        self.done = False
        self.result: list[Any] | None = None
        self.error: BaseException | None = None
        self.wake: Any = None  # a held lock, created only if the request has to wait behind a leader
        self.chain: Request | None = None  # the next follower of the same batch, woken by this one
        self.woken = False  # set (before ``wake`` is released) when this request's wait is over


@dataclass
class StoreStats:
    """Counters kept by the store (read by metrics and benchmarks)."""

    commits: int = 0
    requests: int = 0
    commit_seconds: float = 0.0
    max_batch: int = 0
    interval_syncs: int = 0


class Tx:
    """The state of one ``store.transaction()`` block: its ops, and the group states they have built."""

    def __init__(self, groups: GroupTable, *, validate: bool = True) -> None:
        self.groups = groups
        self.ops: list[Op] = []
        self.view: dict[str, GroupState] = {}
        #: False for a capture (:meth:`CommitPipeline.capture`): ops are only recorded, and validated when
        #: their request is applied, in queue order
        self.validate = validate

    def group(self, name: str) -> GroupState:
        """The state of ``name`` as the transaction's ops so far leave it."""
        g = self.view.get(name)
        if g is None:
            base = self.groups.get(name)
            if base is None and not self.validate:  # a capture of a group its request will create: new and empty
                base = GroupState(0, name)
            if base is None:
                raise GroupNotFoundError(f"group {name!r} does not exist (it was removed)")
            g = self.view[name] = base.copy()
        return g

    def add(self, name: str, check: Callable[[GroupState], R], write: Write) -> R:
        """Validate an op now (on a trial copy) and queue it for the block's commit (a capture that does not
        validate only records it, and returns None)."""
        if not self.validate:
            self.ops.append((name, check, write))
            return None  # type: ignore[return-value]  # a capture's caller uses the request's results
        g = self.group(name)
        trial = g.copy()
        res = check(trial)
        self.view[name] = trial
        self.ops.append((name, check, write))
        return res


class Capture:
    """The ``with`` block of :meth:`CommitPipeline.capture`, and of ``store.transaction()`` (a plain class: it is
    on the asyncio write path)."""

    __slots__ = ("pipeline", "tx")

    def __init__(self, pipeline: CommitPipeline, tx: Tx) -> None:
        self.pipeline, self.tx = pipeline, tx

    def __enter__(self) -> Tx:
        p = self.pipeline
        if p._current_tx() is not None:
            raise RaftSqliteError("this thread is already inside store.transaction() (blocks do not nest; its "
                                  "writes belong to that block)")
        p.check_open()
        p._tx.tx = self.tx
        return self.tx

    def __exit__(self, *exc: object) -> None:
        self.pipeline._tx.tx = None


class CommitPipeline:
    """Group commit for one store's write connection (see the module docstring).

    Set by the owner once the store is open: :attr:`conn` (the write connection), :attr:`hwm` (the WAL
    high-water mark, noted after each synced commit), :attr:`syncer` (NORMAL's interval syncer)."""

    def __init__(self, data_dir: str, groups: GroupTable, writer: WalWriter, *,
                 slow_commit_warning: float = 1.0) -> None:
        self.data_dir = data_dir
        self.groups = groups
        self.writer = writer
        self.slow_commit_warning = slow_commit_warning
        self.stats = StoreStats()
        self.conn: apsw.Connection | None = None
        self.hwm: HighWaterMark | None = None
        self.syncer: IntervalSyncer | None = None
        #: False until the owner opened the store; True again once it is closed
        self.closed = True
        #: the storage error that made the pipeline fail-stop, or None
        self.fault: BaseException | None = None
        self._listeners: list[CommitListener] = []
        self._mu = threading.Lock()
        self._last_batch = 1
        self._commit_ema = 0.0  # exponential moving average of commit seconds
        self._queue: collections.deque[Request] = collections.deque()
        self._tx = threading.local()
        #: group-commit wait: a held lock the leader blocks on until ``_want`` requests are queued (or a
        #: timeout); released by the writer whose request reaches that number
        self._waiter: Any = None
        self._want = 0

    def add_listener(self, listener: CommitListener) -> None:
        """Call ``listener.on_commit(seconds, requests)`` after every successful commit."""
        self._listeners = [*self._listeners, listener]  # copy-on-write: the committer iterates it unlocked

    def remove_listener(self, listener: CommitListener) -> None:
        """Stop calling ``listener`` (a no-op if it is not attached)."""
        self._listeners = [x for x in self._listeners if x is not listener]

    def synced(self, file: str, seconds: float) -> None:
        """Tell the listeners that have an ``on_sync`` (:class:`SyncListener`) about a sync of ``file``
        that took ``seconds`` (never raises)."""
        for listener in self._listeners:
            fn = getattr(listener, "on_sync", None)
            if fn is None:
                continue
            try:
                fn(file, seconds)
            except Exception:  # a metrics listener must never fail a sync's caller
                log.exception("%s: sync listener %r failed", self.data_dir, listener)

    def fail(self, exc: BaseException) -> None:
        """Make the pipeline fail-stop after ``exc`` (a failed sync outside a commit, e.g. a directory sync
        or the interval syncer): every later write is refused until the store is reopened."""
        self.fault = exc

    def check_open(self) -> None:
        """Raise unless writes are allowed: :class:`RaftSqliteError` when closed, :class:`StorageFault`
        when fail-stopped."""
        if self.closed:
            raise RaftSqliteError("the store is closed")
        if self.fault is not None:
            raise StorageFault(f"{self.data_dir}: the store is fail-stopped after a storage fault "
                               f"({self.fault}); close and reopen it, then reload state from what it shows")

    def _current_tx(self) -> Tx | None:
        tx: Tx | None = getattr(self._tx, "tx", None)
        return tx

    def in_transaction(self) -> bool:
        """True inside a ``store.transaction()`` block on this thread."""
        return self._current_tx() is not None

    def ensure(self, name: str) -> None:
        """Create group ``name`` (its rows, in a commit of its own) unless it exists."""
        if name in self.groups:
            return
        self.check_open()
        self.submit(Request([(name, None, None)]))

    def raw(self, fn: Callable[[apsw.Connection], Any]) -> Any:
        """Run ``fn(conn)`` on the write connection inside the committer's next transaction (serialised
        with every write); returns its result."""
        self.check_open()
        req = Request([(None, None, lambda conn, g, r: fn(conn))])
        self.submit(req)
        assert req.result is not None  # a request that did not raise has its results
        return req.result[0]

    @property
    def queued(self) -> int:
        """Requests in the writer queue now (the leader's batch included)."""
        return len(self._queue)

    def drain(self) -> None:
        """Wait until the current leader finished its commit (at close)."""
        while self._queue:
            time.sleep(0.001)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Group writes (log and metadata, any groups) into one atomic commit with one fsync.

        Inside the block, write calls validate at once against the state the transaction has built
        (a bad call raises and is not added) and return as usual, but nothing is durable until the
        block exits; if the block raises, nothing is written. Reads inside the block see the last
        *committed* state. Transactions do not nest.
        """
        with self.capture(Tx(self.groups)) as tx:
            yield tx
        if tx.ops:
            self.submit(Request(tx.ops))

    def capture(self, tx: Tx | None = None) -> Capture:
        """Bind ``tx`` (default: a new one that records ops without validating them) to this thread for the
        ``with`` block: write calls made in it add their ops to ``tx`` (validated at once if ``tx.validate``)
        and nothing is submitted on exit; the caller submits ``tx.ops`` itself (:meth:`submit_all`). The asyncio
        facade builds its requests this way on the event loop's thread (no await inside the block)."""
        return Capture(self, tx if tx is not None else Tx(self.groups, validate=False))

    def submit_all(self, reqs: list[Request]) -> None:
        """Submit ``reqs`` from this one thread as one writer of the queue: they join the same group commit,
        in order, each validated, written and answered (``done`` with ``result`` or ``error``) on its own,
        exactly as if each had its own thread. Returns when every one is answered; raises only an interrupt
        of this thread (any request it left unanswered is answered "nothing written")."""
        if not reqs:
            return
        carrier = Request([], reqs)
        try:
            self.submit(carrier)
        finally:  # after an interrupt: a part with a result and no error was committed (and published)
            for r in reqs:
                if r.result is None and r.error is None:
                    r.error = RaftSqliteError("the committing thread was interrupted before this write ran; "
                                              "nothing of it was written")
                r.done = True

    def pending_group(self, name: str) -> GroupState:
        """The state of group ``name`` as this thread's open transaction leaves it (else the published one)."""
        tx = self._current_tx()
        try:
            return tx.group(name) if tx is not None else self.groups[name]
        except KeyError:
            raise GroupNotFoundError(f"{self.data_dir}: group {name!r} does not exist (it was removed)") from None

    def run(self, name: str, check: Callable[[GroupState], R], write: Write) -> R:
        """Run one write op (validate with ``check(g)``, then ``write(conn, g, check_result)``)."""
        tx: Tx | None = getattr(self._tx, "tx", None)
        if tx is not None:
            return tx.add(name, check, write)
        if self.closed or self.fault is not None:
            self.check_open()
        req = Request([(name, check, write)])
        self.submit(req)
        assert req.result is not None  # a request that did not raise has its results
        result: R = req.result[0]
        return result

    def submit(self, req: Request) -> None:
        """Group commit (a writer queue, as in LevelDB): the writer at the front of the queue leads; it
        takes every request queued at that moment, applies them in one transaction, commits once (one
        fsync), then wakes its followers (in a chain: each woken follower wakes the next) and hands
        leadership to the new front."""
        q = self._queue
        with self._mu:
            lead = not q
            if not lead:
                req.wake = _allocate_lock()
                req.wake.acquire()
            q.append(req)
            w = self._waiter
            if w is not None and len(q) >= self._want:
                self._waiter = None
                w.release()
        interrupt = None
        if not lead:
            interrupt = _follow(req)
            if req.done:
                if interrupt is not None:
                    raise interrupt
                if req.error is not None:
                    raise req.error
                return
        batch = None
        try:
            if len(q) < self._last_batch:
                self._wait_for_writers(self._last_batch)
            with self._mu:
                batch = list(q)
            self._last_batch = len(batch)
            self._execute(batch)
        finally:
            # whatever happened (even an exception in this thread), the queue moves on: every request
            # of the batch is answered and leadership passes to the next writer
            with self._mu:
                if batch is None:  # interrupted before taking a batch: nothing ran; leave the queue
                    q.popleft()
                    batch = [req]
                else:
                    for _ in batch:
                        q.popleft()
                nxt = q[0] if q else None
            # Every request of the batch is answered, then its followers are woken in a chain: the leader
            # wakes the first, each woken follower the next one. Waking them all at once made the whole
            # batch queue up on the GIL (two context switches per follower instead of one: ~0.6 fewer
            # voluntary switches and 7-10 us less CPU per entry with 8 writers, measured).
            prev: Request | None = None
            for r in reversed(batch):
                if r.result is None and r.error is None and not r.done:
                    r.error = RaftSqliteError("the committing thread was interrupted before this write ran; "
                                              "nothing of it was written")
                if r is not req:
                    r.done = True
                    r.chain = prev
                    prev = r
            if prev is not None:
                _wake(prev)
            if nxt is not None:
                _wake(nxt)
        if interrupt is not None:
            raise interrupt
        if req.error is not None:
            raise req.error

    def _wait_for_writers(self, target: int) -> None:
        """Group-commit wait (cf. PostgreSQL's commit_delay/commit_siblings), by the leader before it takes its
        batch: the previous batch had ``target`` writers, more than are queued now, and they are most likely
        just being woken; block (the GIL released, nothing spinning) for at most a fraction of one commit's
        time so that they join this commit. The writer whose request makes ``target`` releases it at once."""
        with self._mu:
            if len(self._queue) >= target:
                return
            w = self._waiter = _allocate_lock()
            w.acquire()
            self._want = target
        try:
            w.acquire(True, min(0.25 * self._commit_ema, 0.0004))
        finally:
            with self._mu:
                self._waiter = None

    def _execute(self, batch: list[Request]) -> None:
        """Leader: apply every request of ``batch`` in one transaction, commit (one fsync), publish.

        Checks run first and write nothing when they refuse. Append rows are not inserted one request at
        a time: they are collected and inserted with one ``executemany`` at commit (or before any other
        statement), and a lone single-row append runs as one autocommit statement. A request that fails
        (with ANY exception) after some of its SQL ran makes the leader roll back and replay the batch
        without it; one that fails before any of its SQL ran is dropped alone. If the batch fails outside
        any one request (the final insert of deferred rows), it is rolled back and replayed once with
        every request's rows inserted at once, so that the failure is pinned on its request.

        Fail-stop: when the outcome is unknown (a storage error, any exception during COMMIT or after
        it, a rollback that did not end the transaction), :attr:`fault` is set, every request of the
        batch gets :class:`StorageFault`, and every later write is refused until the store is
        reopened. A ``KeyboardInterrupt``/``SystemExit`` is re-raised in the leader after that.
        """
        carriers = [r for r in batch if r.parts is not None]
        if carriers:
            try:
                self._execute([p for r in batch for p in (r.parts if r.parts is not None else (r,))])
            finally:  # a carrier is answered through its parts (submit_all): it has no result of its own
                for c in carriers:
                    c.result, c.done = [], True
            return
        conn = self.conn
        if self.fault is not None or self.closed or conn is None:
            self._refuse(batch)
            return
        t0 = time.perf_counter()
        try:
            self.groups.publish(self._commit_batch(conn, [r for r in batch if not r.done]))
        except _Interrupted as exc:
            raise exc.error from None  # the batch was rolled back and answered: the store stays usable
        except BaseException as exc:
            cause = exc.error if isinstance(exc, _Unknown) else exc
            self._fail_stop(conn, batch, cause)
            if not isinstance(cause, Exception):
                raise cause from None
            return
        finally:
            self.writer.before_sql = None
        self._committed(batch, t0)

    def _refuse(self, batch: list[Request]) -> None:
        """Answer every request of ``batch``: the store is closed or fail-stopped (nothing is written)."""
        for r in batch:
            r.error = StorageFault(f"{self.data_dir}: the store is fail-stopped after a storage fault "
                                   f"({self.fault}); reopen it") if not self.closed else \
                RaftSqliteError("the store is closed")
            r.done = True

    def _commit_batch(self, conn: apsw.Connection, live: list[Request]) -> dict[str, GroupState]:
        """Apply and commit the ``live`` requests, replaying the batch without a request that failed after
        its SQL ran, or once eagerly after a failure outside any request; returns the states to publish.
        Raises :class:`_Unknown` / :class:`_Interrupted` / the failure itself when the batch cannot commit."""
        state = {"eager": False, "committing": False, "autocommit": False}
        while True:
            try:
                return self._apply(conn, live, state)
            except _Replay as rep:
                if not self._rollback(conn):
                    raise _Unknown(rep.error) from rep.error
                exc = rep.error
                rep.req.error = translate(exc, "write", self.data_dir) if isinstance(exc, apsw.Error) else exc
                rep.req.done = True
                live = [r for r in live if r is not rep.req]
            except FAULT_ERRORS:
                raise
            except BaseException as exc:
                self._retry_or_raise(conn, live, state, exc)

    def _retry_or_raise(self, conn: apsw.Connection, live: list[Request], state: dict[str, bool],
                        exc: BaseException) -> None:
        """A failure outside any one request (the final insert of deferred rows, COMMIT), or an interrupt.
        Known outcome only before COMMIT (for an interrupt: before the lone autocommit insert too, which may
        have committed) and once rolled back; otherwise re-raise (fail-stop). Returns to replay the batch
        eagerly (each request's rows inserted with it, so that the failure is pinned on its request)."""
        interrupt = not isinstance(exc, Exception)
        if state["committing"] or (interrupt and state["autocommit"]) or not self._rollback(conn):
            raise exc
        if interrupt:  # nothing of the batch was written: answer everyone, re-raise in the leader
            for r in live:
                if not r.done:
                    r.error = RaftSqliteError(f"the committing thread was interrupted ({type(exc).__name__}) "
                                              "before this write committed; nothing of it was written")
                    r.done = True
            raise _Interrupted(exc) from exc
        if state["eager"]:
            raise exc  # the eager replay failed too
        state["eager"] = True
        log.warning("%s: batch failed outside any request (%s: %s); replaying it", self.data_dir,
                    type(exc).__name__, exc)

    def _committed(self, batch: list[Request], t0: float) -> None:
        """After a successful commit of ``batch`` (led since ``t0``): note the durable WAL, count, answer,
        tell the listeners."""
        if self.hwm is not None and self.syncer is None:
            try:
                self.hwm.note()  # the commit's WAL sync returned: record it as durable
            except OSError as exc:  # the commit is durable; the mark (and its sync) failed: fail-stop
                self.fault = exc
                log.error("%s: writing the WAL high-water mark failed, store is now fail-stop: %s",
                          self.data_dir, exc)
        dt = time.perf_counter() - t0
        self._commit_ema = 0.9 * self._commit_ema + 0.1 * dt
        st = self.stats
        st.commits += 1
        st.requests += len(batch)
        st.commit_seconds += dt
        if len(batch) > st.max_batch:
            st.max_batch = len(batch)
        if self.syncer is not None:
            self.syncer.dirty = True
        for r in batch:
            r.done = True
        if dt > self.slow_commit_warning:
            log.warning("%s: slow commit: %.3f s for %d requests", self.data_dir, dt, len(batch))
        for listener in self._listeners:
            try:
                listener.on_commit(dt, len(batch))
            except Exception:  # a metrics listener must never turn a durable write into an error
                log.exception("%s: commit listener %r failed", self.data_dir, listener)

    def _rollback(self, conn: apsw.Connection) -> bool:
        """Roll back the write connection's open transaction, if any. True when no transaction is open
        afterwards (the outcome of the batch is then known: nothing of it was written)."""
        try:
            if not conn.getautocommit():
                conn.execute("ROLLBACK")
            return bool(conn.getautocommit())
        except BaseException:
            with contextlib.suppress(BaseException):
                return bool(conn.getautocommit())
            return False

    def _fail_stop(self, conn: apsw.Connection, batch: list[Request], exc: BaseException) -> None:
        """The outcome of ``batch`` is unknown: make the store fail-stop (as after a failed fsync)."""
        self.fault = exc
        self._rollback(conn)  # best effort; the store writes nothing more until reopened anyway
        if isinstance(exc, apsw.Error):
            err = translate(exc, "commit", self.data_dir)
            if not isinstance(err, StorageFault):
                err = StorageFault(f"{self.data_dir}: {err}; the outcome of the write is unknown until the store is "
                                   "reopened")
        else:
            err = StorageFault(f"{self.data_dir}: unexpected {type(exc).__name__} on the write path ({exc}); the "
                               "outcome of the write is unknown until the store is reopened")
        err.__cause__ = exc
        log.error("%s: write failed with an unknown outcome, store is now fail-stop: %s: %s", self.data_dir,
                  type(exc).__name__, exc)
        for r in batch:
            if not r.done or r.error is None:
                r.error = err
            r.done = True

    def _apply(self, conn: apsw.Connection, batch: list[Request], state: dict[str, bool]) -> dict[str, GroupState]:
        """Run the requests of ``batch`` and commit; returns the group states to publish. Raises
        :class:`_Replay` when one request must be dropped after SQL ran for it. With
        ``state["eager"]`` every request's deferred rows are inserted at the end of the request;
        ``state["committing"]`` is set once COMMIT is issued (from then on the outcome is unknown if
        anything fails), ``state["autocommit"]`` once the lone autocommit insert is issued (an interrupt
        from then on leaves the outcome unknown)."""
        wal = self.writer
        rows = wal.pending
        rows.clear()
        tx = [False, 0]  # [BEGIN issued, number of times SQL was started]
        eager = state["eager"]

        def sql() -> None:
            if not tx[0]:
                conn.execute("BEGIN IMMEDIATE")
                tx[0] = True
            tx[1] += 1
            if rows:
                if eager:  # the pending rows are the current request's own
                    wal.flush(conn)
                    return
                try:  # rows of earlier requests too: a failure cannot be pinned on the current one
                    wal.flush(conn)
                except FAULT_ERRORS:
                    raise
                except Exception as exc:  # (an interrupt is not a failure of the rows: it propagates)
                    raise _BatchFailed(exc) from exc

        wal.before_sql = sql
        work: dict[str, GroupState] = {}
        for r in batch:
            r.error = None
            mine: dict[str, GroupState] = {}
            mark, touched = len(rows), tx[1]
            try:
                results = self._run_ops(conn, r, work, mine, sql)
                if eager and len(rows) > mark:
                    sql()
            except FAULT_ERRORS + (_BatchFailed,):
                raise  # the disk failed (fail-stop), or the batch's deferred rows (replayed eagerly)
            except Exception as exc:  # any other error: this request alone fails (an interrupt is the
                # leader's, not the request's: it propagates and the whole batch is rolled back)
                if tx[1] != touched:
                    raise _Replay(r, exc) from exc
                del rows[mark:]  # only deferred rows of this request: drop them
                r.error = exc
                continue
            r.result = results
            work.update(mine)
        self._commit(conn, bool(tx[0]), state)
        return work

    def _run_ops(self, conn: apsw.Connection, r: Request, work: dict[str, GroupState],
                 mine: dict[str, GroupState], sql: Callable[[], None]) -> list[Any]:
        """Run the ops of request ``r`` on private copies of their groups' states (kept in ``mine``; ``work``
        holds the states earlier requests of the batch left); returns one result per op. ``sql()`` is called
        before any statement runs (it begins the transaction and flushes deferred rows)."""
        results: list[Any] = []
        for name, check, write in r.ops:
            if name is None:  # a raw op on the write connection (no group)
                assert write is not None  # a raw op always has its write
                sql()
                results.append(write(conn, None, None))
                continue
            g = mine.get(name)
            if g is None or g.removed:
                # a group removed earlier in this request (or, below, in this batch) is gone
                base = None if g is not None else (work.get(name) or self.groups.get(name))
                if base is None or base.removed:
                    if check is not None:  # only a group-creating op (ensure) creates a group: any other op
                        # on a removed one fails (a compaction or snapshot racing remove_group() must not
                        # bring the group back, empty)
                        raise GroupNotFoundError(f"{self.data_dir}: group {name!r} does not exist (it was removed)")
                    sql()
                    base = insert_group(conn, name)
                g = mine[name] = base.copy()
            if check is None:  # a group-creating op: creating the group (above) was all it asked
                results.append(None)
                continue
            assert write is not None  # an op with a check always has its write
            res = check(g)
            if not getattr(write, "deferred", False):
                sql()
            write(conn, g, res)
            results.append(res)
        return results

    def _commit(self, conn: apsw.Connection, began: bool, state: dict[str, bool]) -> None:
        """Insert the batch's deferred rows and commit (one fsync): in the open transaction if one was begun,
        as one autocommit statement for a lone row, else in a transaction of their own."""
        wal = self.writer
        rows = wal.pending
        if began:
            wal.flush(conn)
            state["committing"] = True
            conn.execute("COMMIT")
        elif len(rows) == 1:
            # one autocommit statement: its own durable transaction. An error raised by it wrote nothing,
            # but an interrupt may arrive just after it committed: then the outcome is unknown
            state["autocommit"] = True
            conn.execute(wal.INSERT, rows[0])
            rows.clear()
        elif rows:
            conn.execute("BEGIN IMMEDIATE")
            wal.flush(conn)
            state["committing"] = True
            conn.execute("COMMIT")


class IntervalSyncer(threading.Thread):
    """NORMAL mode: fdatasync the WAL every ``fsync_interval`` seconds when there were commits."""

    def __init__(self, pipeline: CommitPipeline, wal_path: str, interval: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pipeline = pipeline
        self.wal_path = wal_path
        self.interval = interval
        self.dirty = False
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            if self.dirty:
                self.sync(self.wal_path)

    def sync(self, wal: str) -> None:
        """fdatasync ``wal`` now; a failure makes the pipeline fail-stop."""
        self.dirty = False
        hw = self.pipeline.hwm
        state = hw.current() if hw is not None else None
        try:
            t0 = time.perf_counter()
            if not fsio.fdatasync_path(wal):
                return
            self.pipeline.synced("wal", time.perf_counter() - t0)
            self.pipeline.stats.interval_syncs += 1
            if hw is not None:
                hw.note(state)  # everything up to the state read before the sync is durable
        except OSError as exc:  # (also a WAL that cannot even be opened: its unsynced commits may never be durable)
            self.pipeline.fail(exc)
            log.error("%s: WAL sync failed, store is now fail-stop: %s", self.pipeline.data_dir, exc)

    def stop(self) -> None:
        """Stop the thread, syncing once more if commits happened since the last sync."""
        self._stop_evt.set()
        self.join()
        if self.dirty:
            self.sync(self.wal_path)

