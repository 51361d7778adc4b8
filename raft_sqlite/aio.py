"""asyncio facade: :class:`AsyncNodeStore`, the store from an event loop that never waits on the disk.

Same contract and errors as :class:`~raft_sqlite.NodeStore`; every call that may touch the disk is awaited.

How a write travels (``await log.append(...)``, ``append_next``, ``truncate_after``, ``set_term_and_vote``,
``set_commit_index``, ``clear_recovered_partially``):

1. On the loop's thread, the synchronous method runs inside :meth:`Kernel.capture`: its arguments are checked
   (``TypeError``/``ValueError`` are raised at once, nothing queued) and its op is recorded, not run.
2. The op list goes to the store's *committer thread* (:class:`_Committer`), which submits everything queued
   while the previous commit ran as separate requests of ONE group commit (:meth:`Kernel.submit_all`): a
   thousand coroutines appending at once share a handful of fsyncs, in the order their calls were made, and
   each gets its own result or error, exactly as from :class:`~raft_sqlite.NodeStore`.
3. The committer completes the batch's futures with one ``call_soon_threadsafe``.

Reads, compaction, snapshots, replay and backups run on a small thread pool of the store (snapshot streams on
a thread of their own, so that one stream's calls always run on one thread).

Cancellation: a write is submitted when its coroutine starts running (before its first await). Cancelling
the await after that does NOT withdraw it: it commits (or fails) like every other queued write, and
:meth:`AsyncNodeStore.close` waits for it. A cancelled read or compaction finishes in its thread, its result
dropped. A cancelled backup task stops the copy (:class:`~raft_sqlite.BackupCancelled`, nothing kept).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import sys
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .args import int_arg
from .backup import BackupInfo, HotBackupManager
from .commit import Op, Request, Tx
from .entry import EntryKind, LogEntry
from .errors import GroupNotFoundError, RaftSqliteError
from .groupstate import Vote
from .kernel import Kernel
from .log import PersistentRaftLog
from .metadata import HardState, RaftMetadataStore
from .snapshot import SnapshotKind, SnapshotManager, SnapshotMeta, SnapshotReader, SnapshotWriter
from .store import NodeStore
from .threadprio import IDLE, Priority, lower_current_thread, priority_arg

__all__ = ["AsyncNodeStore", "AsyncRaftLog", "AsyncRaftMetadata", "AsyncSnapshotManager", "AsyncSnapshotReader",
           "AsyncSnapshotWriter", "AsyncTransaction"]

T = TypeVar("T")
log = logging.getLogger("raft_sqlite.aio")

#: the async transaction of the running task (a task created inside the block inherits it, as contextvars do)
_CURRENT_TX: contextvars.ContextVar[AsyncTransaction | None] = contextvars.ContextVar("raft_sqlite_aio_tx",
                                                                                      default=None)

#: worker threads of a store's pool (reads, compaction, replay, backup, snapshot metadata)
POOL_THREADS = 4


def _log_abandoned(f: asyncio.Future[Any]) -> None:
    """Retrieve (and log) the error of an open or close nobody awaits any more (a cancelled ``open()``)."""
    if not f.cancelled() and f.exception() is not None:
        log.warning("an abandoned open/close of an AsyncNodeStore failed: %r", f.exception())


def _settle(items: list[tuple[Request, asyncio.Future[list[Any]]]]) -> None:
    """On the loop: complete the futures of a committed batch (a cancelled one is skipped: its write stands)."""
    for req, fut in items:
        if fut.done():
            continue
        if req.error is not None:
            fut.set_exception(req.error)
        else:
            fut.set_result(req.result if req.result is not None else [])


class _Committer:
    """The thread that submits the coroutines' writes: everything queued while it was committing goes, in
    call order, into its next :meth:`Kernel.submit_all` (one group commit), and the loop is told once."""

    def __init__(self, kernel: Kernel, loop: asyncio.AbstractEventLoop) -> None:
        self._kernel = kernel
        self._loop = loop
        self._items: list[tuple[Request, asyncio.Future[list[Any]]]] = []
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._stopping = False
        #: batches submitted and requests in them (benchmarks read them)
        self.batches = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name=f"raft-sqlite-aio-committer:{kernel.node_id}",
                                        daemon=True)
        self._thread.start()

    def submit(self, ops: list[Op]) -> asyncio.Future[list[Any]]:
        """Queue one request (on the loop's thread); its future gets the request's results or error."""
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        with self._mu:
            if self._stopping:
                raise RaftSqliteError("the store is closed")
            self._items.append((Request(ops), fut))
            if len(self._items) == 1:
                self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._stopping:
                    self._cv.wait()
                items, self._items = self._items, []
            if not items:
                return  # stopping, and nothing is left
            reqs = [r for r, _ in items]
            with contextlib.suppress(BaseException):  # an interrupt of this thread: submit_all answered every
                self._kernel.submit_all(reqs)  # request all the same (those it left unwritten: "nothing written")
            self.batches += 1
            self.requests += len(reqs)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting (the writes stand)
                self._loop.call_soon_threadsafe(_settle, items)

    def stop(self) -> None:
        """Refuse new writes, let the queued ones commit, and end the thread (blocking: run it off the loop)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()


class AsyncNodeStore:
    """An open :class:`~raft_sqlite.NodeStore` driven from one asyncio event loop.

    ``store = await AsyncNodeStore.open(data_dir, node_id, cluster_id=..., ...)`` takes the same arguments as
    :meth:`NodeStore.open`; ``async with store:`` closes it. Use it from the loop it was opened on. The
    underlying :attr:`sync` store may be used from other threads at the same time (it is thread-safe).
    """

    def __init__(self, store: NodeStore, loop: asyncio.AbstractEventLoop,  # use AsyncNodeStore.open()
                 background: Priority = IDLE) -> None:
        self._store = store
        #: CPU priority of the store's background threads: snapshot streams and backups
        self.background: Priority = priority_arg("background", background)
        self._kernel = store.kernel
        self._loop = loop
        self._pool = concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="raft-sqlite-aio")
        self._committer = _Committer(self._kernel, loop)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._streams: set[_OwnThread] = set()  # snapshot streams' threads (close waits for their calls)
        self._backups: set[threading.Event] = set()  # cancel events of running backups (close sets them)

    @classmethod
    async def open(cls, data_dir: str | os.PathLike[str], node_id: str, *, background: Priority = IDLE,
                   **kwargs: Any) -> AsyncNodeStore:
        """Open (creating if needed) the store, in a worker thread: the arguments and errors of
        :meth:`NodeStore.open` (recovery runs there too).

        ``background`` is the CPU priority of the threads that stream snapshots and copy backups
        (:mod:`raft_sqlite.threadprio`): ``"idle"`` (the default: Linux's ``SCHED_IDLE``, so that the event
        loop and the committer get a CPU as soon as they wake; on a machine whose CPUs are saturated that
        work only gets their idle time), or a nice increment 0..19 (0: the loop's own priority)."""
        background = priority_arg("background", background)
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        state: dict[str, Any] = {"cancelled": False, "store": None}

        def opener() -> NodeStore:
            st = NodeStore.open(data_dir, node_id, **kwargs)
            with lock:
                abandoned = state["cancelled"]
                state["store"] = st
            if abandoned:  # the caller was cancelled while the open ran: nobody will close it
                st.close()
            return st

        fut = loop.run_in_executor(None, opener)
        try:
            store = await asyncio.shield(fut)
        except asyncio.CancelledError:
            with lock:
                state["cancelled"] = True
                opened = state["store"]
            if opened is not None:  # the open had finished: close it, off the loop (it releases the data_dir)
                loop.run_in_executor(None, opened.close).add_done_callback(_log_abandoned)
            else:
                fut.add_done_callback(_log_abandoned)
            raise
        return cls(store, loop, background)

    @property
    def sync(self) -> NodeStore:
        """The synchronous store underneath (thread-safe; for calls this facade does not wrap)."""
        return self._store

    @property
    def node_id(self) -> str:
        """The node's id."""
        return self._store.node_id

    @property
    def data_dir(self) -> str:
        """The store's data_dir."""
        return self._store.data_dir

    @property
    def committer_stats(self) -> tuple[int, int]:
        """(batches, requests) the committer thread has submitted: requests / batches is the mean number of
        coroutines' writes per group commit."""
        return self._committer.batches, self._committer.requests

    async def close(self) -> None:
        """Refuse new calls, let every write already submitted commit and every call running in a worker thread
        finish, then close the store. Idempotent; concurrent calls all wait for the one close; cancelling a
        ``close()`` does not stop it (it completes in the background)."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(asyncio.to_thread(self._close_blocking))
        await asyncio.shield(self._closing)

    def _close_blocking(self) -> None:
        try:
            self._committer.stop()
            for cancel in list(self._backups):  # a running backup stops at its next step (and removes its copy)
                cancel.set()
            self._pool.shutdown(wait=True)  # reads, compactions, backups in the pool end first
            for stream in list(self._streams):  # and the call a snapshot stream is making
                stream.wait()
        finally:
            self._store.close()

    async def __aenter__(self) -> AsyncNodeStore:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the store's thread pool (any blocking call on :attr:`sync` or a view)."""
        self._check_usable()
        return await self._loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _check_usable(self) -> None:
        """Raise unless the store is open and this is its event loop (before anything is queued)."""
        if self._closed:
            raise RaftSqliteError("the store is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self._loop:
            raise RaftSqliteError("this AsyncNodeStore belongs to another event loop (or is used outside one); "
                                  "use it from the loop it was opened on, or use store.sync from threads")

    def _submit(self, call: Callable[[], Any], create: str | None = None) -> asyncio.Future[list[Any]]:
        """Run the synchronous write ``call`` captured (see the module docstring): inside an async transaction,
        validated now and added to it; otherwise submitted to the committer, after creating group ``create``
        in the same request if it does not exist. Returns the future of its results (already done when no
        commit is needed)."""
        self._check_usable()
        atx = _block_for(self)
        if atx is None:
            with self._kernel.capture() as cap:
                value = call()
            if cap.ops:
                if create is not None and create not in self._kernel.groups:  # the group's creation goes first,
                    cap.ops.insert(0, (create, None, None))  # in the same request (ordered, atomic with the write)
                return self._committer.submit(cap.ops)
        else:
            value = atx.add(call)
        done: asyncio.Future[list[Any]] = self._loop.create_future()
        done.set_result([value])  # in a transaction: the block's tentative answer; else nothing to commit
        return done

    def _has_group(self, name: str) -> bool:
        return name in self._kernel.groups

    # ------------------------------------------------------------------ groups and views
    def log(self, group: str | int = "default") -> AsyncRaftLog:
        """The async view of ``group``'s log (the group is created by the first awaited call, if new)."""
        return AsyncRaftLog(self, Kernel.name_of(group))

    def metadata(self, group: str | int = "default") -> AsyncRaftMetadata:
        """The async view of ``group``'s term, vote and commit index."""
        return AsyncRaftMetadata(self, Kernel.name_of(group))

    def snapshots(self, group: str | int = "default") -> AsyncSnapshotManager:
        """The async view of ``group``'s snapshots."""
        return AsyncSnapshotManager(self, Kernel.name_of(group))

    def groups(self) -> list[str]:
        """Names of the groups this node hosts (from memory: no await needed)."""
        return self._store.groups()

    async def remove_group(self, group: str | int) -> bool:
        """:meth:`NodeStore.remove_group`, in a worker thread (refused inside :meth:`transaction`, as there)."""
        if _block_for(self) is not None:
            raise RaftSqliteError("remove_group() cannot run inside store.transaction(): its chunks are deleted "
                                  "after its own commit")
        return await self.run(self._store.remove_group, group)

    def transaction(self) -> AsyncTransaction:
        """``async with store.transaction():`` the writes awaited in the block (any groups) commit together,
        atomically, with one fsync, when the block exits; each call validates at once against the state the
        block has built (a bad call raises and is not added); an exception in the block writes nothing.
        Bound to the running task (and tasks created inside the block), not to a thread. Does not nest."""
        return AsyncTransaction(self)

    async def pragmas(self) -> dict[str, object]:
        """:meth:`NodeStore.pragmas`."""
        return await self.run(self._store.pragmas)

    # ------------------------------------------------------------------ replay and backup
    async def replay(self, group: str | int = "default", apply: Callable[[LogEntry], object] | None = None, *,
                     upto: int | None = None) -> int:
        """:meth:`NodeStore.replay` in a worker thread (registered structures restored, then ``apply(entry)``
        called there, in order). To apply on the loop instead, use :meth:`iter_replay`."""
        return await self.run(self._store.replay, group, apply, upto=upto)

    def iter_replay(self, group: str | int = "default", *, upto: int | None = None, chunk: int = 8192,
                    start: int | None = None) -> AsyncIterator[LogEntry]:
        """``async for entry in store.iter_replay(group)``: :meth:`NodeStore.iter_replay`, read ``chunk``
        entries at a time in a worker thread (the loop runs between chunks)."""
        chunk = int_arg("chunk", chunk, 1, 1 << 30)
        self._check_usable()
        return self._replayed(self._store.iter_replay(group, upto=upto, chunk=chunk, start=start), chunk)

    async def _replayed(self, it: Iterator[LogEntry], chunk: int) -> AsyncIterator[LogEntry]:
        while True:
            batch = await self.run(lambda: list(itertools.islice(it, chunk)))
            if not batch:
                return
            for e in batch:
                yield e

    def backup(self, backup_dir: str | os.PathLike[str], *,
               progress: Callable[[str, int, int], None] | None = None, **options: Any) -> asyncio.Task[BackupInfo]:
        """Start a hot backup (:class:`~raft_sqlite.HotBackupManager` with ``options``) as a task; await it for
        the :class:`~raft_sqlite.BackupInfo`. ``progress(file, done, total)`` is called on the loop.
        Cancelling the task stops the copy (nothing is kept) and waits until it has stopped. Bad options raise
        here, before any task starts. The copy's threads run at the store's ``background`` priority unless
        ``nice`` is given."""
        self._check_usable()
        options.setdefault("nice", self.background)
        mgr = HotBackupManager(self._store, backup_dir, **options)
        cancel = threading.Event()
        self._backups.add(cancel)
        loop = self._loop

        def report(*args: Any) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, *args)

        async def run() -> BackupInfo:
            try:
                fut = loop.run_in_executor(self._pool, functools.partial(mgr.backup, progress=report, cancel=cancel))
            except RuntimeError:  # the pool was shut down: the store closed before the task ran
                self._backups.discard(cancel)
                raise RaftSqliteError("the store is closed") from None
            fut.add_done_callback(lambda _: self._backups.discard(cancel))
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                while not fut.done():  # the copy stops at its next step and removes what it wrote; the task
                    with contextlib.suppress(asyncio.CancelledError):  # ends only then, however often cancelled
                        await asyncio.wait({fut})
                if not fut.cancelled():
                    fut.exception()  # retrieved: its error (BackupCancelled) is the cancellation's
                raise

        return loop.create_task(run(), name=f"raft-sqlite backup of {self.node_id}")


def _block_for(store: AsyncNodeStore) -> AsyncTransaction | None:
    """The open ``store.transaction()`` block this call is made in, or None.

    "In" means awaited from the block's own frame: that frame is on the call stack (a coroutine's ``f_back``
    is the coroutine that awaits it). The block's context variable alone is not enough: it stays set in its
    task while an async generator that opened the block is suspended (or abandoned, until it is finalized),
    and a write the task makes meanwhile, outside the block, must not join it (it would be discarded with
    the block and its caller told it succeeded); and tasks created inside the block inherit it. So: the
    block's frame on the stack: join it; the block's own task elsewhere: not in the block (commit alone); a
    task that inherited an open block: refused (``RaftSqliteError``: await the write in the block itself, so
    that it is atomic with it, or after it); an ended block: nothing."""
    atx = _CURRENT_TX.get()
    if atx is None or atx.store is not store or atx.ended:
        return None
    f: types.FrameType | None = sys._getframe(1)
    while f is not None:
        if f is atx.frame:
            return atx
        f = f.f_back
    if asyncio.current_task() is atx.task:
        return None
    raise RaftSqliteError("a write from a task created inside an open store.transaction() block: it is not part "
                          "of the block (await the write in the block itself to make it atomic with it, or "
                          "after the block)")


class AsyncTransaction:
    """``async with store.transaction():`` (see :meth:`AsyncNodeStore.transaction`)."""

    def __init__(self, store: AsyncNodeStore) -> None:
        self.store = store
        self._tx: Tx | None = None
        self._token: contextvars.Token[AsyncTransaction | None] | None = None
        #: True once the block exited (its writes committed or discarded): later writes bound to it from
        #: another task (one created inside the block) are refused
        self.ended = False
        #: the task that entered the block, and the frame of its ``async with``
        self.task: asyncio.Task[Any] | None = None
        self.frame: types.FrameType | None = None

    async def __aenter__(self) -> AsyncTransaction:
        if _block_for(self.store) is not None:
            raise RaftSqliteError("store.transaction() does not nest")
        if self._tx is not None or self.ended:
            raise RaftSqliteError("this transaction was already used")
        self.store._check_usable()
        self._tx = self.store.sync.kernel.new_transaction()
        self.task = asyncio.current_task()
        self.frame = sys._getframe(1)  # the coroutine (or async generator) running the ``async with``
        self._token = _CURRENT_TX.set(self)
        return self

    def add(self, call: Callable[[], T]) -> T:
        """Validate the write ``call`` now against the block's state and add its op (on the loop's thread)."""
        if self.ended or self._tx is None:
            raise RaftSqliteError("this transaction has ended: its writes were already committed or discarded")
        with self.store.sync.kernel.capture(self._tx):
            return call()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._token is not None and self._tx is not None  # set by __aenter__
        self.ended = True  # first: whatever happens below, nothing more joins this block
        self.frame = None
        with contextlib.suppress(ValueError):  # exited in another context (an async generator finalized by
            _CURRENT_TX.reset(self._token)  # another task): that context keeps the ended block (ignored)
        if et is not None or not self._tx.ops:
            return  # an exception in the block: nothing is written
        self.store._check_usable()
        await self.store._committer.submit(self._tx.ops)


class _GroupView:
    """What the log and metadata views share: the group's creation by the first write, and the write path."""

    def __init__(self, store: AsyncNodeStore, name: str) -> None:
        self._s = store
        self.group = name
        self._seen = store._has_group(name)

    def _create(self) -> str | None:
        """The group to create with the next write: this view's, if it never saw it exist (once seen, a removal
        is final for the view: the sync view underneath raises GroupNotFoundError)."""
        if not self._seen and self._s._has_group(self.group):
            self._seen = True
        return None if self._seen else self.group

    async def _ensure(self) -> None:
        """Create a group never seen, off the loop (before a read, or a write in a transaction, which validates
        against existing groups)."""
        if self._create() is not None:
            await self._s.run(self._s.sync.log, self.group)
            self._seen = True

    async def _write(self, call: Callable[[], Any]) -> Any:
        if self._seen and not self._s._has_group(self.group):  # removed since this view saw it: final for the
            raise GroupNotFoundError(f"{self._s.data_dir}: group {self.group!r} does not exist (it was removed)")
        if _block_for(self._s) is not None:
            await self._ensure()
        res = await self._s._submit(call, self._create())
        self._create()  # a write that created the group: the view has seen it now (an empty append creates none)
        return res[-1]


class AsyncRaftLog(_GroupView):
    """The async view of one group's :class:`~raft_sqlite.PersistentRaftLog` (``store.log(group)``).

    Positions (:attr:`first_index`, :attr:`last_index`, ...) are read from memory, without await. A group that
    does not exist yet reads as a new, empty one and is created by the view's first write, in the same commit
    (by a read: first, as ``NodeStore.log(name)`` does); once the view has seen its group, a removal is final
    for it (:class:`~raft_sqlite.GroupNotFoundError`), as for ``NodeStore`` views."""

    def __init__(self, store: AsyncNodeStore, name: str) -> None:
        super().__init__(store, name)
        self._log = PersistentRaftLog(store.sync.kernel, name)

    @property
    def first_index(self) -> int:
        """Index of the first entry still held."""
        return self._log.first_index if self._create() is None else 1

    @property
    def last_index(self) -> int:
        """Index of the last entry (``first_index - 1`` when empty)."""
        return self._log.last_index if self._create() is None else 0

    @property
    def last_term(self) -> int:
        """Term of the last entry (or of the snapshot; 0 at first)."""
        return self._log.last_term if self._create() is None else 0

    @property
    def snapshot_index(self) -> int:
        """Index of the newest durable snapshot (0 if none)."""
        return self._log.snapshot_index if self._create() is None else 0

    async def append(self, entries: Sequence[LogEntry]) -> int:
        """:meth:`PersistentRaftLog.append`: durable when the await returns. An empty ``entries`` answers the
        last committed index at once."""
        v = self._log
        last: int = await self._write(lambda: v.append(entries))
        return last

    async def append_next(self, term: int, payloads: Sequence[bytes], kind: EntryKind = EntryKind.NORMAL) -> int:
        """:meth:`PersistentRaftLog.append_next`: the leader's path; concurrent coroutines share commits. Inside
        :meth:`AsyncNodeStore.transaction` the index returned is the block's own view: another coroutine's
        append to the same group that commits while the block is open comes first, and the block's entries
        then follow it."""
        v = self._log
        last: int = await self._write(lambda: v.append_next(term, payloads, kind))
        return last

    async def truncate_after(self, index: int) -> None:
        """:meth:`PersistentRaftLog.truncate_after`."""
        v = self._log
        await self._write(lambda: v.truncate_after(index))

    async def compact(self, up_to: int) -> None:
        """:meth:`PersistentRaftLog.compact` in a worker thread (it commits segment by segment, so it is not
        part of an async transaction: refused inside one)."""
        if _block_for(self._s) is not None:
            raise RaftSqliteError("compact() cannot run inside store.transaction(): it commits segment by segment")
        await self._ensure()
        await self._s.run(self._log.compact, up_to)

    async def get(self, index: int) -> LogEntry:
        """:meth:`PersistentRaftLog.get`, in a worker thread."""
        await self._ensure()
        return await self._s.run(self._log.get, index)

    async def term(self, index: int) -> int:
        """:meth:`PersistentRaftLog.term`, in a worker thread."""
        await self._ensure()
        return await self._s.run(self._log.term, index)

    async def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[LogEntry]:
        """:meth:`PersistentRaftLog.entries`, in a worker thread."""
        await self._ensure()
        return await self._s.run(self._log.entries, lo, hi, max_bytes)

    def __repr__(self) -> str:
        return f"<AsyncRaftLog {self.group!r}>"


class AsyncRaftMetadata(_GroupView):
    """The async view of one group's :class:`~raft_sqlite.RaftMetadataStore` (``store.metadata(group)``); a
    group is created by the first write, as for :class:`AsyncRaftLog`."""

    def __init__(self, store: AsyncNodeStore, name: str) -> None:
        super().__init__(store, name)
        self._meta = RaftMetadataStore(store.sync.kernel, name)

    @property
    def hard_state(self) -> HardState:
        """``HardState(current_term, voted_for, commit_index)`` read at one instant."""
        return self._meta.hard_state if self._create() is None else HardState(0, None, 0)

    @property
    def current_term(self) -> int:
        """The latest term this node has seen."""
        return self.hard_state.current_term

    @property
    def voted_for(self) -> Vote:
        """The candidate voted for in ``current_term``, or None."""
        return self.hard_state.voted_for

    @property
    def commit_index(self) -> int:
        """The highest index known to be committed."""
        return self.hard_state.commit_index

    @property
    def recovered_partially(self) -> bool:
        """:attr:`RaftMetadataStore.recovered_partially`."""
        return self._meta.recovered_partially if self._create() is None else False

    async def set_term_and_vote(self, term: int, voted_for: Vote = None) -> None:
        """:meth:`RaftMetadataStore.set_term_and_vote`: durable when the await returns."""
        v = self._meta
        await self._write(lambda: v.set_term_and_vote(term, voted_for))

    async def set_commit_index(self, index: int) -> None:
        """:meth:`RaftMetadataStore.set_commit_index`."""
        v = self._meta
        await self._write(lambda: v.set_commit_index(index))

    async def clear_recovered_partially(self) -> None:
        """:meth:`RaftMetadataStore.clear_recovered_partially`."""
        await self._write(self._meta.clear_recovered_partially)

    def __repr__(self) -> str:
        return f"<AsyncRaftMetadata {self.group!r}>"


class _OwnThread:
    """The threads of one snapshot stream, and the order of its calls.

    Its data calls (``write``, ``flush``, ``read``, ``seek``, the chunks of ``async for``) run on one thread at
    the store's ``background`` priority, and so do the threads that thread starts (a writer's batch commits).
    Its control calls (the start, ``suspend``, the block's exit: finalize, abort, close) run on a second thread
    at the loop's own priority: they commit to raft.db through the group commit, where the thread that
    submits first leads the commit of every write queued behind it (the committer's too), and a leader in
    ``SCHED_IDLE`` would hold them all up whenever the CPUs are busy.

    The calls run one at a time and in the order they were made, whichever thread runs them (a number per
    call, taken on the loop's thread); a call that was made runs even if its await is cancelled (its result
    is dropped), so that the calls made after it can run. Registered with the store until shut down, so that
    ``close()`` waits for the call it is making."""

    def __init__(self, store: AsyncNodeStore, name: str) -> None:
        self._store = store
        self._data = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=functools.partial(lower_current_thread, store.background))
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-control")
        self._turn = threading.Condition()
        self._made = 0  # calls made (on the loop's thread)
        self._ran = 0  # calls finished: the call made as number ``_ran`` runs next
        store._streams.add(self)

    def _submit(self, ex: concurrent.futures.ThreadPoolExecutor, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        n = self._made

        def in_turn() -> T:
            with self._turn:
                while self._ran != n:
                    self._turn.wait()
            try:
                return fn()
            finally:
                with self._turn:
                    self._ran += 1
                    self._turn.notify_all()
        fut = ex.submit(in_turn)  # RuntimeError once shut down: then no number was taken
        self._made += 1
        return fut

    async def _await(self, ex: concurrent.futures.ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        inner = asyncio.wrap_future(self._submit(ex, fn))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            inner.add_done_callback(lambda f: f.cancelled() or f.exception())  # dropped, and retrieved
            raise

    def wait(self) -> None:
        """Block until the call in progress (and any queued) has finished (from a worker thread)."""
        self._control.shutdown(wait=True)
        self._data.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A data call, on the background thread."""
        return await self._await(self._data, functools.partial(fn, *args))

    async def control(self, fn: Callable[..., T], *args: Any) -> T:
        """A control call, on the thread at the loop's priority."""
        return await self._await(self._control, functools.partial(fn, *args))

    async def start(self, fn: Callable[[], T], undo: Callable[[T], object]) -> T:
        """Start the stream: ``fn()`` as a control call (the store open and this its loop, else
        RaftSqliteError). If ``fn`` fails, the threads end. If the await is cancelled, ``undo(result)`` runs
        once ``fn`` has finished (a stream started for a caller that is gone is closed, not left active), then
        the threads end."""
        try:
            self._store._check_usable()
            fut = asyncio.wrap_future(self._submit(self._control, fn))
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def cleanup(f: asyncio.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._submit(self._control, functools.partial(undo, f.result()))
                self.shutdown()
            fut.add_done_callback(cleanup)
            raise
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        self._store._streams.discard(self)
        self._control.shutdown(wait=False)
        self._data.shutdown(wait=False)


class AsyncSnapshotManager:
    """The async view of one group's :class:`~raft_sqlite.SnapshotManager` (``store.snapshots(group)``)."""

    def __init__(self, store: AsyncNodeStore, name: str) -> None:
        self._s = store
        self.group = name

    def _sync(self) -> SnapshotManager:
        """The synchronous manager underneath (blocking: creates the group if new; called off the loop)."""
        return self._s.sync.snapshots(self.group)

    async def list(self) -> list[SnapshotMeta]:
        """:meth:`SnapshotManager.list`."""
        return await self._s.run(lambda: self._sync().list())

    async def latest(self) -> SnapshotMeta | None:
        """:meth:`SnapshotManager.latest`."""
        return await self._s.run(lambda: self._sync().latest())

    async def pending_install(self) -> SnapshotMeta | None:
        """:meth:`SnapshotManager.pending_install`."""
        return await self._s.run(lambda: self._sync().pending_install())

    async def verify(self, meta: SnapshotMeta | None = None) -> int:
        """:meth:`SnapshotManager.verify`, in a worker thread."""
        return await self._s.run(lambda: self._sync().verify(meta))

    async def retain(self, keep_chains: int | None = None) -> builtins.list[int]:
        """:meth:`SnapshotManager.retain`."""
        return await self._s.run(lambda: self._sync().retain(keep_chains))

    def write(self, index: int, term: int, *, kind: SnapshotKind = SnapshotKind.FULL,
              parent: SnapshotMeta | None = None, structures: Any = None) -> AsyncSnapshotWriter:
        """``async with snaps.write(index, term) as w: await w.write(data)``: :meth:`SnapshotManager.write`
        as an async stream (same preconditions and errors, checked when the block is entered)."""
        return AsyncSnapshotWriter(self, lambda m: m.write(index, term, kind=kind, parent=parent,
                                                           structures=structures))

    def install(self, index: int, term: int) -> AsyncSnapshotWriter:
        """``async with snaps.install(index, term) as w``: :meth:`SnapshotManager.install` as an async stream
        (``w.offset`` tells where the leader must continue)."""
        return AsyncSnapshotWriter(self, lambda m: m.install(index, term))

    def open(self, meta: SnapshotMeta, *, verify_digest: bool = True) -> AsyncSnapshotReader:
        """``async with snaps.open(meta) as r``: :meth:`SnapshotManager.open` as an async stream."""
        return AsyncSnapshotReader(self, lambda m: m.open(meta, verify_digest=verify_digest))


class AsyncSnapshotWriter:
    """An async :class:`~raft_sqlite.SnapshotWriter`: ``await w.write(data)``, ``await w.flush()``; the block's
    clean exit finalizes it (:attr:`meta` is then set), an exception discards it (unless it was suspended). Its
    calls run one at a time, in order: the data (``write``, ``flush``) on a thread at the store's ``background``
    priority, the start, ``suspend`` and the exit (which commit to raft.db) on one at the loop's."""

    def __init__(self, mgr: AsyncSnapshotManager, make: Callable[[SnapshotManager], SnapshotWriter]) -> None:
        self._mgr = mgr
        self._make = make
        self._w: SnapshotWriter | None = None
        self._suspended = False
        self._thread = _OwnThread(mgr._s, "raft-sqlite-aio-snapshot")

    def _writer(self) -> SnapshotWriter:
        if self._w is None:
            raise RaftSqliteError("use the snapshot writer inside `async with`")
        return self._w

    async def __aenter__(self) -> AsyncSnapshotWriter:
        if _block_for(self._mgr._s) is not None:
            self._thread.shutdown()
            raise RaftSqliteError("a snapshot cannot be written inside store.transaction()")

        def undo(w: SnapshotWriter) -> None:  # a cancelled start: an install is kept for a resume, else discarded
            if w.install:
                w.suspend()
            else:
                w.abort()
        self._w = await self._thread.start(lambda: self._make(self._mgr._sync()).__enter__(), undo)
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if not self._suspended:
                await self._thread.control(self._writer().__exit__, et, ev, tb)
        finally:
            self._thread.shutdown()

    @property
    def offset(self) -> int:
        """Bytes written so far (where the next write must start)."""
        return self._writer().offset

    @property
    def durable_offset(self) -> int:
        """Bytes known durable."""
        return self._writer().durable_offset

    @property
    def meta(self) -> SnapshotMeta | None:
        """The manifest once finalized (after the block), else None."""
        return self._w.meta if self._w is not None else None

    @property
    def resumed(self) -> bool:
        """True when an install resumed a partial one (see :meth:`SnapshotManager.install`)."""
        return bool(self._writer().resumed)

    async def write(self, data: bytes | bytearray | memoryview, offset: int | None = None) -> int:
        """:meth:`SnapshotWriter.write`; returns the new :attr:`offset`."""
        return await self._thread.call(self._writer().write, data, offset)

    async def flush(self) -> int:
        """:meth:`SnapshotWriter.flush`: everything written so far is durable when the await returns."""
        return await self._thread.call(self._writer().flush)

    async def suspend(self) -> int:
        """:meth:`SnapshotWriter.suspend`: the install is kept for a later resume, and the block's exit then
        leaves it as it is (neither finalized nor discarded)."""
        off = await self._thread.control(self._writer().suspend)
        self._suspended = True
        return off


class AsyncSnapshotReader:
    """An async :class:`~raft_sqlite.SnapshotReader`: ``await r.read(n)``, ``async for chunk in r`` (chunks
    CRC-checked, the sha256 verified at the end of a sequential read). Its calls run one at a time, in order:
    reads on a thread at the store's ``background`` priority, the start and close on one at the loop's."""

    def __init__(self, mgr: AsyncSnapshotManager, make: Callable[[SnapshotManager], SnapshotReader]) -> None:
        self._mgr = mgr
        self._make = make
        self._r: SnapshotReader | None = None
        self._thread = _OwnThread(mgr._s, "raft-sqlite-aio-snapshot-reader")

    def _reader(self) -> SnapshotReader:
        if self._r is None:
            raise RaftSqliteError("use the snapshot reader inside `async with`")
        return self._r

    async def __aenter__(self) -> AsyncSnapshotReader:
        self._r = await self._thread.start(lambda: self._make(self._mgr._sync()), lambda r: r.close())
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._thread.control(self._reader().close)
        finally:
            self._thread.shutdown()

    async def read(self, size: int | None = -1) -> bytes:
        """:meth:`SnapshotReader.read`."""
        return await self._thread.call(self._reader().read, size)

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """:meth:`SnapshotReader.seek`."""
        return await self._thread.call(self._reader().seek, offset, whence)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        it = self._reader().chunks()
        done = object()
        while True:
            piece = await self._thread.call(next, it, done)
            if piece is done:
                return
            assert isinstance(piece, bytes)
            yield piece
