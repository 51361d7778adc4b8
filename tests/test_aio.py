"""The asyncio facade (raft_sqlite.aio): same contract and errors as NodeStore, group commit across coroutines,
async transactions, cancellation, snapshots and backups as async streams and tasks, and a loop that never
waits on the disk. Every test reopens the store synchronously and checks what is durable."""

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time

import apsw
import pytest

from raft_sqlite import (
    FsyncMode,
    GroupNotFoundError,
    HardState,
    LogCompactedError,
    LogConflictError,
    LogEntry,
    LogGapError,
    LogUnavailableError,
    MetadataError,
    RaftSqliteError,
    SnapshotError,
    StorageFault,
    list_backups,
)
from raft_sqlite.aio import AsyncNodeStore
from tests.conftest import ROOT, open_store
from tests.support.faultvfs import FaultVFS, quiet_injected_faults


def aopen(path, **kw):
    kw.setdefault("fsync", FsyncMode.OFF)
    return AsyncNodeStore.open(path, "n1", cluster_id="c1", **kw)


def entries_of(path, group="g"):
    with open_store(path) as s:
        lg = s.log(group)
        return lg.entries(lg.first_index, lg.last_index + 1) if lg.last_index >= lg.first_index else []


def test_contract_and_errors_match_the_sync_store(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log, meta = s.log("g"), s.metadata("g")
            assert (log.first_index, log.last_index, log.last_term) == (1, 0, 0)  # a new group, not created yet
            assert meta.hard_state == HardState(0, None, 0)
            assert await log.append([LogEntry(1, 1, b"a"), LogEntry(2, 1, b"b")]) == 2
            assert await log.append_next(2, [b"c", b"d"]) == 4
            assert await log.append([]) == 4
            with pytest.raises(LogGapError):
                await log.append([LogEntry(9, 2, b"x")])
            with pytest.raises(LogConflictError):
                await log.append([LogEntry(3, 2, b"x")])
            with pytest.raises(LogConflictError):
                await log.append_next(1, [b"old term"])
            with pytest.raises(TypeError):
                await log.append([b"not an entry"])
            with pytest.raises(ValueError):
                await log.append([LogEntry(5, -1, b"x")])
            with pytest.raises(ValueError):
                await meta.set_term_and_vote(2**63, None)
            await meta.set_term_and_vote(2, "n2")
            with pytest.raises(MetadataError):
                await meta.set_term_and_vote(2, "n3")
            await meta.set_commit_index(3)
            with pytest.raises(MetadataError):
                await meta.set_commit_index(2)
            with pytest.raises(MetadataError):
                await meta.set_commit_index(99)
            assert (await log.get(3)).data == b"c"
            assert await log.term(4) == 2
            assert [e.index for e in await log.entries(1, 5, max_bytes=2)] == [1, 2]
            with pytest.raises(LogUnavailableError):
                await log.get(5)
            with pytest.raises(LogConflictError):
                await log.truncate_after(2)  # below the commit index
            await log.truncate_after(3)
            assert log.last_index == 3 and meta.hard_state == HardState(2, "n2", 3)
            with pytest.raises(LogCompactedError):
                await log.get(0)
            assert s.groups() == ["g"]
    asyncio.run(main())
    assert [(e.index, e.term, e.data) for e in entries_of(data_dir)] == [(1, 1, b"a"), (2, 1, b"b"), (3, 2, b"c")]
    with open_store(data_dir) as s:
        assert s.metadata("g").hard_state == HardState(2, "n2", 3)


def test_a_thousand_coroutines_share_commits_in_call_order(data_dir):
    n = 1000

    async def main():
        async with await aopen(data_dir, fsync=FsyncMode.FULL) as s:
            log = s.log("g")
            await log.append_next(1, [b"first"])
            commits0 = s.sync.stats.commits
            got = await asyncio.gather(*[log.append_next(1, [b"%d" % i]) for i in range(n)])
            commits = s.sync.stats.commits - commits0
            batches, reqs = s.committer_stats
            return got, commits, batches, reqs
    got, commits, batches, reqs = asyncio.run(main())
    assert got == list(range(2, n + 2))  # the order the calls were made in, each its own index
    assert commits < n // 10, commits  # shared fsyncs: a handful of commits, not one per coroutine
    assert reqs == n + 1 and batches < n // 10
    es = entries_of(data_dir)
    assert [e.data for e in es[1:]] == [b"%d" % i for i in range(n)]


def test_each_write_of_a_batch_fails_or_commits_on_its_own(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log("g")
            await log.append([LogEntry(1, 1, b"a")])
            return await asyncio.gather(
                log.append([LogEntry(2, 1, b"b")]),
                log.append([LogEntry(2, 1, b"dup")]),   # overlaps what the previous call appended
                log.append([LogEntry(3, 1, b"c")]),
                log.append([LogEntry(7, 1, b"gap")]),
                s.metadata("g").set_commit_index(3),
                s.metadata("g").set_commit_index(2),    # below the one just set
                return_exceptions=True)
    r = asyncio.run(main())
    assert r[0] == 2 and isinstance(r[1], LogConflictError) and r[2] == 3 and isinstance(r[3], LogGapError)
    assert r[4] is None and isinstance(r[5], MetadataError)
    assert [e.data for e in entries_of(data_dir)] == [b"a", b"b", b"c"]
    with open_store(data_dir) as s:
        assert s.metadata("g").commit_index == 3


OPS = ("append", "append_next", "truncate", "term_vote", "commit", "bad_append")


def _random_ops(seed, n=120):
    rnd = random.Random(seed)
    return [(rnd.choice(OPS), rnd.randrange(1, 6), rnd.randrange(0, 40)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_concurrent_calls_give_the_results_of_running_them_in_call_order(tmp_path, seed):
    """Launched together (one gather), the async calls validate at commit in the order they were made: each
    result or error equals that of the same call made sequentially on a NodeStore, and so does the state.
    The arguments are fixed up front (from the sequential run's positions), so both runs make the same calls."""
    ops = _random_ops(seed)
    calls, expected = [], []
    with open_store(tmp_path / "sync") as s:
        log, meta = s.log("g"), s.metadata("g")
        for kind, a, b in ops:
            if kind == "append":
                i, t = log.last_index + 1, log.last_term
                args = ("append", [LogEntry(i + k, t + (k == a - 1), b"s%d" % b) for k in range(a)])
            elif kind == "append_next":
                args = ("append_next", log.last_term + a % 2, [b"n%d" % k for k in range(a)])
            elif kind == "truncate":
                args = ("truncate_after", b)
            elif kind == "term_vote":
                args = ("set_term_and_vote", b // 4, f"n{a}")
            elif kind == "commit":
                args = ("set_commit_index", b)
            else:
                args = ("append", [LogEntry(b, 1, b"bad")])
            calls.append(args)
            target = meta if args[0].startswith("set_") else log
            try:
                expected.append(getattr(target, args[0])(*args[1:]))
            except Exception as exc:
                expected.append(type(exc))
        want_state = (log.last_index, log.last_term, meta.hard_state)
    want_entries = entries_of(tmp_path / "sync")

    async def main():
        async with await aopen(tmp_path / "async") as s:
            log, meta = s.log("g"), s.metadata("g")
            assert await log.append([]) == 0  # an empty append answers at once (and creates nothing)
            assert s.groups() == []  # the first write below creates the group, in its own request
            coros = [getattr(meta if c[0].startswith("set_") else log, c[0])(*c[1:]) for c in calls]
            got = await asyncio.gather(*coros, return_exceptions=True)
            return [type(g) if isinstance(g, Exception) else g for g in got], \
                (log.last_index, log.last_term, meta.hard_state)
    got, state = asyncio.run(main())
    assert got == expected
    assert state == want_state
    assert entries_of(tmp_path / "async") == want_entries


def test_an_async_transaction_commits_once_atomically_across_awaits(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log, meta, other = s.log("g"), s.metadata("g"), s.log("h")
            await s.run(s.sync.log, "g")  # both groups exist before the block (creation is a commit of its own)
            await s.run(s.sync.log, "h")
            c0 = s.sync.stats.commits

            go = asyncio.Event()

            async def outsider():  # a task made before the block: its write is not part of the block
                await go.wait()
                await other.append_next(1, [b"outside"])
            task = asyncio.create_task(outsider())

            async with s.transaction():
                assert await log.append([LogEntry(1, 1, b"a")]) == 1
                go.set()
                await task  # committed on its own while the block is open
                assert other.last_index == 1 and log.last_index == 0
                # a task made inside the block is not in it: its write is refused, loudly (nothing written)
                with pytest.raises(RaftSqliteError, match="task created inside"):
                    await asyncio.gather(meta.set_term_and_vote(1, "n0"))
                with pytest.raises(LogGapError):  # validated at once against the block's state; not added
                    await log.append([LogEntry(5, 1, b"x")])
                assert await log.append_next(1, [b"b"]) == 2  # sees the block's own first append
                await meta.set_term_and_vote(2, "n1")
                await meta.set_commit_index(2)
                assert log.last_index == 0  # reads see the last committed state
            assert log.last_index == 2 and meta.hard_state == HardState(2, "n1", 2)
            assert other.last_index == 1
            assert s.sync.stats.commits - c0 == 2  # the outsider's commit and the block's one

            with pytest.raises(RuntimeError):
                async with s.transaction():
                    await log.append_next(1, [b"discarded"])
                    raise RuntimeError("boom")
            assert log.last_index == 2
            async with s.transaction():
                with pytest.raises(RaftSqliteError, match="nest"):
                    async with s.transaction():
                        pass
                with pytest.raises(RaftSqliteError, match="compact"):
                    await log.compact(1)
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir)] == [b"a", b"b"]
    assert [e.data for e in entries_of(data_dir, "h")] == [b"outside"]


def test_a_task_created_inside_a_block_is_refused_while_it_is_open_and_alone_after(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log("g")
            await log.append_next(1, [b"first"])
            started, release = asyncio.Event(), asyncio.Event()

            async def child():
                with pytest.raises(RaftSqliteError, match="task created inside"):
                    await log.append_next(1, [b"during the block"])
                started.set()
                await release.wait()
                return await log.append_next(1, [b"after the block"])  # an ended block is nothing to it

            async with s.transaction():
                task = asyncio.create_task(child())  # inherits the block's context
                await started.wait()
                await log.append_next(1, [b"in"])
            release.set()
            assert await task == 3
            after = asyncio.create_task(log.append_next(1, [b"later task"]))  # made after the block ended
            assert await after == 4
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir)] == [b"first", b"in", b"after the block", b"later task"]


def test_cancelled_writes_that_started_are_durable_and_unstarted_ones_are_not(data_dir):
    async def main():
        async with await aopen(data_dir, fsync=FsyncMode.FULL) as s:
            log = s.log("g")
            await log.append([])
            started = [asyncio.create_task(log.append_next(1, [b"%d" % i])) for i in range(50)]
            await asyncio.sleep(0)  # every task ran up to its first await: each write is submitted
            for t in started:
                t.cancel()
            never = [asyncio.create_task(log.append_next(1, [b"never"])) for _ in range(5)]
            for t in never:
                t.cancel()  # cancelled before it ran: nothing was submitted
            res = await asyncio.gather(*started, *never, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in res)
        # close() waited for the submitted writes
    asyncio.run(main())
    assert sorted(e.data for e in entries_of(data_dir)) == sorted(b"%d" % i for i in range(50))


class SlowSyncVFS(apsw.VFS):
    """Every sync sleeps ``delay`` seconds (the GIL released), like a slow disk."""

    def __init__(self, name, delay):
        self.delay = delay
        super().__init__(name, "")

    def xOpen(self, name, flags):
        return _SlowFile(self, name, flags)


class _SlowFile(apsw.VFSFile):
    def __init__(self, vfs, name, flags):
        self.vfs = vfs
        super().__init__("", name, flags)

    def xSync(self, flags):
        time.sleep(self.vfs.delay)
        return super().xSync(flags)


def test_the_loop_runs_while_a_commit_waits_for_the_disk(data_dir):
    vfs = SlowSyncVFS("slowsync-aio", 0.2)

    async def main():
        async with await aopen(data_dir, fsync=FsyncMode.FULL, vfs="slowsync-aio") as s:
            log = s.log("g")
            await log.append([])
            ticks = 0

            async def heartbeat():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1
            hb = asyncio.create_task(heartbeat())
            await asyncio.sleep(0.02)
            t0, ticks0 = time.perf_counter(), ticks
            await log.append_next(1, [b"x"])  # its commit syncs the WAL: >= 0.2 s in this VFS
            waited, beats = time.perf_counter() - t0, ticks - ticks0
            hb.cancel()
            return waited, beats
    waited, beats = asyncio.run(main())
    assert waited >= 0.2
    # the loop kept running during the commit's sync: a blocked loop would have ticked at most once
    assert beats >= 10, beats
    assert [e.data for e in entries_of(data_dir)] == [b"x"]
    assert vfs.delay == 0.2  # (keeps the VFS registered until here)


def test_a_storage_fault_fails_the_batch_and_stops_later_writes(data_dir):
    open_store(data_dir).close()
    vfs = FaultVFS("fault-aio", root=str(data_dir))

    async def main():
        async with await aopen(data_dir, vfs="fault-aio") as s:
            log = s.log("g")
            await log.append_next(1, [b"ok"])
            vfs.arm_error("write", 1, sticky=True)
            with quiet_injected_faults():
                res = await asyncio.gather(*[log.append_next(1, [b"lost"]) for _ in range(20)],
                                           return_exceptions=True)
                assert all(isinstance(r, StorageFault) for r in res), res
                with pytest.raises(StorageFault):
                    await log.append_next(1, [b"after"])
                vfs.clear_faults()
                with pytest.raises(StorageFault):  # fail-stop: refused until reopened
                    await log.append_next(1, [b"after"])
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir)] == [b"ok"]


def test_writes_after_close_are_refused(data_dir):
    async def main():
        s = await aopen(data_dir)
        log = s.log("g")
        await log.append_next(1, [b"a"])
        await s.close()
        await s.close()  # idempotent
        with pytest.raises(RaftSqliteError, match="closed"):
            await log.append_next(1, [b"b"])
        with pytest.raises(RaftSqliteError, match="closed"):
            async with s.transaction():
                pass
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir)] == [b"a"]


def test_replay_as_an_async_iterator_and_in_a_thread(data_dir):
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(i, 1, b"%d" % i) for i in range(1, 101)])
        st.metadata("g").set_commit_index(80)

    async def main():
        async with await aopen(data_dir) as s:
            got = [e.index async for e in s.iter_replay("g", chunk=7)]
            seen = []
            last = await s.replay("g", seen.append)
            return got, [e.index for e in seen], last
    got, seen, last = asyncio.run(main())
    assert got == list(range(1, 81)) and seen == got and last == 80


def test_snapshots_as_async_streams(data_dir):
    payload = os.urandom(3 << 20)

    async def main():
        async with await aopen(data_dir) as s:
            log, meta, snaps = s.log("g"), s.metadata("g"), s.snapshots("g")
            await log.append([LogEntry(i, 1, b"e") for i in range(1, 11)])
            await meta.set_commit_index(10)
            async with snaps.write(10, 1) as w:
                for k in range(0, len(payload), 1 << 19):
                    await w.write(payload[k:k + (1 << 19)])
                assert w.offset == len(payload)
            assert w.meta is not None and w.meta.size == len(payload)
            assert (await snaps.latest()) == w.meta
            async with snaps.open(w.meta) as r:
                assert b"".join([c async for c in r]) == payload
            async with snaps.open(w.meta) as r:
                assert await r.read(5) == payload[:5]
                await r.seek(100)
                assert await r.read(3) == payload[100:103]
            with pytest.raises(RuntimeError):
                async with snaps.write(10, 1) as w2:
                    await w2.write(b"discarded")
                    raise RuntimeError("boom")
            assert [m.id for m in await snaps.list()] == [w.meta.id]
            with pytest.raises(SnapshotError):  # not committed: refused when the block is entered
                async with snaps.write(11, 1):
                    pass
            await log.compact(10)
            assert log.first_index == 11
            # a follower's install, suspended and resumed
            async with snaps.install(50, 3) as w3:
                await w3.write(payload[:1000], offset=0)
                await w3.flush()
                await w3.suspend()
            assert (await snaps.pending_install()).index == 50
            async with snaps.install(50, 3) as w4:
                assert w4.resumed and w4.offset == 1000
                await w4.write(payload[1000:], offset=1000)
            assert w4.meta.index == 50 and log.first_index == 51 and await log.term(50) == 3
            return w4.meta
    m = asyncio.run(main())
    with open_store(data_dir) as s, s.snapshots("g").open(m) as r:
        assert r.read() == payload


def test_backup_as_a_task_with_progress_on_the_loop_and_cancellation(tmp_path, data_dir):
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(i, 1, os.urandom(2000)) for i in range(1, 5001)])

    async def main():
        async with await aopen(data_dir) as s:
            loop_thread = threading.get_ident()
            calls = []
            info = await s.backup(tmp_path / "bk", progress=lambda *a: calls.append(threading.get_ident()))
            await asyncio.sleep(0)  # progress callbacks scheduled last are run
            assert calls and set(calls) == {loop_thread}
            task = s.backup(tmp_path / "bk2", step_pause=0.05, pages_per_step=1)
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(ValueError):
                s.backup(tmp_path / "bk3", sync_bytes=-1)
            return info
    info = asyncio.run(main())
    assert [b["path"] for b in list_backups(tmp_path / "bk")] == [info.path]
    assert list_backups(tmp_path / "bk2") == []  # the cancelled copy was removed
    left = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "bk2") for f in fs]
    assert [os.path.basename(p) for p in left] == [".backup.lock"], left


def test_groups_are_created_on_first_await_and_removed_views_refuse(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log(7)
            assert s.groups() == []
            await log.append_next(1, [b"a"])
            assert s.groups() == ["7"]
            assert await s.remove_group(7) is True
            with pytest.raises(GroupNotFoundError):
                await log.append_next(1, [b"b"])
            fresh = s.log(7)
            assert await fresh.append_next(1, [b"c"]) == 1
            with pytest.raises(TypeError):
                s.log(1.5)
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir, "7")] == [b"c"]


CHILD = r"""
import asyncio, sys
from raft_sqlite import FsyncMode
from raft_sqlite.aio import AsyncNodeStore
path, mode = sys.argv[1], sys.argv[2]
async def writer(s, g):
    lg = s.log(g)
    while True:
        i = await lg.append_next(1, [f"{g}:{lg.last_index + 1}".encode()])
        sys.stdout.write(f"{g} {i}\n"); sys.stdout.flush()
async def main():
    s = await AsyncNodeStore.open(path, "n1", cluster_id="c1", fsync=FsyncMode(mode))
    await asyncio.gather(*[writer(s, f"g{k}") for k in range(40)])
asyncio.run(main())
"""


def run_until_acked_then_kill(data_dir, extra):
    """Start CHILD, wait until it acknowledged its first appends (process start and imports vary with the
    machine's load), let it run ``extra`` seconds more, SIGKILL it; returns {group: highest acked index}."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir), FsyncMode.FULL.value], stdout=subprocess.PIPE,
                         env=env, text=True)
    lines, first = [], threading.Event()

    def pump():
        for line in p.stdout:
            lines.append(line)
            first.set()
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    assert first.wait(60), "the child acknowledged nothing within 60 s"
    time.sleep(extra)
    p.send_signal(signal.SIGKILL)
    p.wait()
    th.join(10)
    assert p.returncode == -signal.SIGKILL, f"writer exited with {p.returncode} before the kill"
    acked = {}
    for line in lines:
        if line.endswith("\n"):  # a line cut by the kill was not acknowledged in full
            g, i = line.split()
            acked[g] = max(acked.get(g, 0), int(i))
    return acked


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_never_loses_an_acknowledged_async_append(tmp_path, seed):
    d = tmp_path / "node"
    acked = run_until_acked_then_kill(d, random.Random(seed).uniform(0.1, 0.6))
    assert sum(acked.values()) > 40, acked
    with open_store(d, fsync=FsyncMode.FULL) as s:
        for g, top in acked.items():
            lg = s.log(g)
            assert lg.last_index >= top, (g, lg.last_index, top)
            assert [e.data for e in lg.entries(1, top + 1)] == [f"{g}:{i}".encode() for i in range(1, top + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Found by an independent review (each failed before its fix)


def test_a_transaction_left_in_an_abandoned_async_generator_never_swallows_a_write(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log("g")
            await log.append_next(1, [b"a"])

            async def batches():
                async with s.transaction():
                    await log.append_next(1, [b"in the block"])
                    yield 1
                    yield 2
            gen = batches()  # kept alive: the block stays open, suspended, until the generator is closed
            async for _ in gen:
                break
            assert await log.append_next(1, [b"after"]) == 2  # outside the block: committed alone, at once
            async with s.transaction():  # and a block of its own works
                await log.append_next(1, [b"own block"])
            assert log.last_index == 3
            await gen.aclose()  # the abandoned block is discarded (its own write only)
            async for _ in batches():  # a generator finalized later by another task: the same
                break
            await asyncio.sleep(0.05)
            assert await log.append_next(1, [b"last"]) == 4
            assert await asyncio.create_task(log.append_next(1, [b"child"])) == 5
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir)] == [b"a", b"after", b"own block", b"last", b"child"]


def test_close_completes_even_when_cancelled_and_concurrent_closes_wait_for_it(data_dir):
    async def main():
        s = await aopen(data_dir)
        await s.log("g").append_next(1, [b"a"])
        t = asyncio.create_task(s.close())
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.gather(s.close(), s.close())
        assert s.sync.kernel.closed
    asyncio.run(main())
    with open_store(data_dir) as s:  # the data_dir lock was released
        assert s.log("g").last_index == 1


def test_a_cancelled_open_releases_the_data_dir(data_dir):
    open_store(data_dir).close()

    async def main():
        for delay in (0, 0.001, 0.005, 0.02, 0.1):
            t = asyncio.create_task(aopen(data_dir))
            await asyncio.sleep(delay)
            t.cancel()
            try:
                s = await t
            except asyncio.CancelledError:
                s = None
            if s is not None:
                await s.close()
            deadline = time.monotonic() + 20
            while True:  # the abandoned open is closed in the background: the lock comes free
                try:
                    open_store(data_dir).close()
                    break
                except RaftSqliteError:
                    assert time.monotonic() < deadline, "the cancelled open kept the data_dir locked"
                    await asyncio.sleep(0.02)
    asyncio.run(main())


def test_first_writes_to_a_new_group_keep_call_order_and_started_ones_survive_cancel(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log("new")
            got = await asyncio.gather(*[log.append([LogEntry(i, 1, b"%d" % i)]) for i in range(1, 9)],
                                       return_exceptions=True)
            assert got == list(range(1, 9))
            other = s.log("other")
            t = asyncio.create_task(other.append_next(1, [b"started"]))
            await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir, "new")] == [b"%d" % i for i in range(1, 9)]
    assert [e.data for e in entries_of(data_dir, "other")] == [b"started"]


def _open_fds_under(path):
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                out.append(target)
    return out


def test_close_waits_for_reads_running_in_worker_threads(data_dir):
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(i, 1, b"x" * 1000) for i in range(1, 20001)])

    async def main():
        s = await aopen(data_dir)
        log = s.log("g")
        reads = [asyncio.create_task(log.entries(1, 20001)) for _ in range(4)]
        await asyncio.sleep(0.01)
        await s.close()
        assert all(t.done() for t in reads)
        for t in reads:
            assert len(t.result()) == 20000
    asyncio.run(main())
    assert _open_fds_under(data_dir) == []


def test_a_backup_cancelled_twice_still_ends_only_once_the_copy_stopped(tmp_path, data_dir):
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(i, 1, os.urandom(2000)) for i in range(1, 5001)])

    async def main():
        async with await aopen(data_dir) as s:
            task = s.backup(tmp_path / "bk", step_pause=0.05, pages_per_step=1)
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert list_backups(tmp_path / "bk") == []
            left = [d for d in os.listdir(tmp_path / "bk" / "n1") if not d.startswith(".")]
            assert left == [], left  # the partial folder was removed before the task ended
            info = await s.backup(tmp_path / "bk")  # not BackupBusy: the first copy has let go
            assert os.path.isdir(info.path)
    asyncio.run(main())


def test_an_interrupt_after_commit_does_not_report_a_durable_part_as_unwritten(data_dir):
    from raft_sqlite.commit import Request
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        k, log = s.kernel, s.log("g")
        log.append_next(1, [b"a"])
        reqs = []
        for i in range(3):
            with k.capture() as cap:
                log.append_next(1, [b"%d" % i])
            reqs.append(Request(cap.ops))
        hwm = k.hwm
        orig, fired = hwm.note, []

        def note(*a):
            if not fired:
                fired.append(1)
                raise KeyboardInterrupt  # lands after COMMIT, before the parts are marked done
            return orig(*a)
        hwm.note = note
        try:
            with pytest.raises(KeyboardInterrupt):
                k.submit_all(reqs)
        finally:
            hwm.note = orig
        assert [(r.error, r.result) for r in reqs] == [(None, [2]), (None, [3]), (None, [4])]
    assert [e.data for e in entries_of(data_dir)] == [b"a", b"0", b"1", b"2"]


def test_a_snapshot_stream_cancelled_while_it_starts_is_not_left_active(data_dir, monkeypatch):
    from raft_sqlite import SnapshotWriter
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(i, 1, b"e") for i in range(1, 11)])
        st.metadata("g").set_commit_index(10)
    begin = SnapshotWriter.begin

    def slow_begin(self):  # the writer has started (WRITING manifest, active) when the cancel lands
        started = begin(self)
        time.sleep(0.3)
        return started
    monkeypatch.setattr(SnapshotWriter, "begin", slow_begin)

    async def main():
        async with await aopen(data_dir) as s:
            sstore = s.sync.snapshots("g").chunk_store
            for make in (lambda: s.snapshots("g").write(10, 1), lambda: s.snapshots("g").install(50, 2)):
                async def enter():
                    async with make() as w:
                        await w.write(b"x")
                t = asyncio.create_task(enter())
                await asyncio.sleep(0.1)
                assert sstore.busy()  # started, in its thread
                t.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await t
                deadline = time.monotonic() + 10
                while sstore.busy():
                    assert time.monotonic() < deadline, "a snapshot stream was left active after the cancel"
                    await asyncio.sleep(0.01)
            assert await s.snapshots("g").list() == []  # the local write was discarded
            assert (await s.snapshots("g").pending_install()).index == 50  # the install kept for a resume
            assert await s.remove_group("g") is True
    asyncio.run(main())


def test_another_event_loop_is_refused_before_anything_is_queued(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log("g")
            await log.append_next(1, [b"a"])
            errors = []

            def elsewhere():
                async def other():
                    with pytest.raises(RaftSqliteError, match="another event loop"):
                        await log.append_next(1, [b"from another loop"])
                    with pytest.raises(RaftSqliteError, match="another event loop"):
                        await log.get(1)
                try:
                    asyncio.run(other())
                except BaseException as exc:
                    errors.append(exc)
            await asyncio.to_thread(elsewhere)
            assert errors == []
            assert log.last_index == 1
    asyncio.run(main())
    assert [e.data for e in entries_of(data_dir)] == [b"a"]


def test_every_call_after_close_raises_the_stores_closed_error(tmp_path, data_dir):
    async def main():
        s = await aopen(data_dir)
        log, meta, snaps = s.log("g"), s.metadata("g"), s.snapshots("g")
        await log.append_next(1, [b"a"])
        await s.close()
        calls = [log.get(1), log.term(1), log.entries(1, 2), log.compact(0), log.append_next(1, [b"b"]),
                 log.truncate_after(0), meta.set_commit_index(1), snaps.list(), snaps.latest(), s.pragmas(),
                 s.replay("g"), s.remove_group("g"), s.run(len, [])]
        for c in calls:
            with pytest.raises(RaftSqliteError, match="closed"):
                await c
        with pytest.raises(RaftSqliteError, match="closed"):
            s.backup(tmp_path / "bk")
        with pytest.raises(RaftSqliteError, match="closed"):
            async for _ in s.iter_replay("g"):
                pass
    asyncio.run(main())


def test_transaction_rules_remove_group_nesting_across_stores_and_chunk(tmp_path):
    async def main():
        async with await aopen(tmp_path / "a") as a, await aopen(tmp_path / "b") as b:
            await a.log("g").append_next(1, [b"a"])
            async with a.transaction():
                with pytest.raises(RaftSqliteError, match="remove_group"):
                    await a.remove_group("g")
                async with b.transaction():  # another store's block: not nesting
                    await b.log("g").append_next(1, [b"b"])
                await a.log("g").append_next(1, [b"a2"])
            with pytest.raises(ValueError):
                async for _ in a.iter_replay("g", chunk=0):
                    pass
        return True
    assert asyncio.run(main())
    assert [e.data for e in entries_of(tmp_path / "a")] == [b"a", b"a2"]
    assert [e.data for e in entries_of(tmp_path / "b")] == [b"b"]
    with open_store(tmp_path / "a") as s, pytest.raises(ValueError):
        next(s.iter_replay("g", chunk=0))


# ---------------------------------------------------------------------------------------------------------------
# Found by a second independent review (each failed before its fix)


def test_an_eio_in_the_checkpointers_own_sync_fail_stops_the_store(data_dir, monkeypatch):
    import errno

    from raft_sqlite import pacedvfs

    def eio(fd):
        raise OSError(errno.EIO, "injected EIO")
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        monkeypatch.setattr(pacedvfs.os, "fdatasync", eio)
        lg = s.log("g")
        deadline = time.monotonic() + 20
        i = 0
        while s.fault is None:
            assert time.monotonic() < deadline, "the checkpointer's EIO never fail-stopped the store"
            i += 1
            try:
                lg.append([LogEntry(i, 1, os.urandom(64 << 10))])
            except StorageFault:
                break
            time.sleep(0.001)
        assert isinstance(s.fault, OSError)
        with pytest.raises(StorageFault):
            lg.append([LogEntry(i + 1, 1, b"x")])


def test_close_waits_for_a_snapshot_stream_call_and_leaves_no_connection(data_dir, monkeypatch):
    from raft_sqlite.snapshot import SnapshotStore
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(1, 1, b"e")])
        st.metadata("g").set_commit_index(1)
    real = SnapshotStore.write_chunks

    def slow(self, rows):  # a slow disk: close() certainly lands while a batch is being committed
        time.sleep(0.3)
        return real(self, rows)
    monkeypatch.setattr(SnapshotStore, "write_chunks", slow)

    async def main():
        s = await aopen(data_dir, fsync=FsyncMode.FULL)
        snaps = s.snapshots("g")
        w = snaps.write(1, 1)
        await w.__aenter__()
        big = asyncio.create_task(w.write(os.urandom(8 << 20)))
        await asyncio.sleep(0.1)
        await s.close()
        assert big.done()  # close() waited for the call the stream was making
        with contextlib.suppress(Exception):
            await w.__aexit__(None, None, None)
    asyncio.run(main())
    assert _open_fds_under(data_dir) == []


def test_snapshot_streams_outside_a_block_of_the_same_store_are_allowed(tmp_path):
    async def main():
        async with await aopen(tmp_path / "a") as a, await aopen(tmp_path / "b") as b:
            for s in (a, b):
                await s.log("g").append_next(1, [b"e"])
                await s.metadata("g").set_commit_index(1)
            async with a.transaction():
                async with b.snapshots("g").write(1, 1) as w:  # another store's block: allowed
                    await w.write(b"b's state")
                with pytest.raises(RaftSqliteError, match="inside store.transaction"):
                    async with a.snapshots("g").write(1, 1):
                        pass
            async with a.snapshots("g").write(1, 1) as w2:  # the block ended: allowed
                await w2.write(b"a's state")
            return w.meta, w2.meta
    mb, ma = asyncio.run(main())
    assert mb is not None and ma is not None


def test_an_empty_append_through_a_view_of_a_removed_group_raises_group_not_found(data_dir):
    async def main():
        async with await aopen(data_dir) as s:
            log = s.log("g")
            await log.append_next(1, [b"a"])
            await s.remove_group("g")
            for call in (lambda: log.append([]), lambda: log.append_next(1, []), lambda: log.append_next(1, [b"y"])):
                with pytest.raises(GroupNotFoundError):
                    await call()
            assert s.groups() == []
    asyncio.run(main())


def test_a_pinned_descriptor_follows_a_replaced_file(tmp_path):
    from raft_sqlite.sqlitewal import PinnedFiles
    p = tmp_path / "f"
    p.write_bytes(b"old")
    pins = PinnedFiles()
    try:
        fd1 = pins.fd(str(p))
        assert pins.fd(str(p)) == fd1
        tmp = tmp_path / "g"
        tmp.write_bytes(b"new")
        os.replace(tmp, p)  # a new inode under the same name (a WAL deleted and made again)
        fd2 = pins.fd(str(p))
        assert fd2 != fd1 and os.fstat(fd2).st_ino == os.stat(p).st_ino
        os.fstat(fd1)  # the old descriptor is kept open until close() (closing it early could drop locks)
    finally:
        pins.close()
    with pytest.raises(OSError):
        os.fstat(fd1)


def test_a_checkpointer_that_cannot_start_leaves_no_connection_behind(data_dir, monkeypatch):
    from raft_sqlite import checkpointer
    open_store(data_dir, fsync=FsyncMode.FULL).close()
    real = threading.Thread.start

    def start(self):
        if self.name.startswith("raft_sqlite-checkpoint"):
            raise RuntimeError("can't start new thread")
        return real(self)
    monkeypatch.setattr(checkpointer.threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        open_store(data_dir, fsync=FsyncMode.FULL)
    monkeypatch.setattr(checkpointer.threading.Thread, "start", real)
    assert _open_fds_under(data_dir) == []
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        assert s.groups() == []


def test_close_stops_a_running_backup_instead_of_waiting_for_it(tmp_path, data_dir):
    from raft_sqlite import BackupCancelled
    with open_store(data_dir) as st:
        st.log("g").append([LogEntry(i, 1, os.urandom(2000)) for i in range(1, 5001)])

    async def main():
        s = await aopen(data_dir)
        task = s.backup(tmp_path / "bk", step_pause=0.05, pages_per_step=1)  # would take minutes
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await s.close()
        assert time.monotonic() - t0 < 30
        with pytest.raises(BackupCancelled):
            await task
    asyncio.run(main())
    assert list_backups(tmp_path / "bk") == []


# ---------------------------------------------------------------------------------------------------------------
# anyio users (on its asyncio backend; trio is not supported: the facade uses asyncio futures)


def test_anyio_task_groups_and_cancel_scopes_on_the_asyncio_backend(data_dir):
    anyio = pytest.importorskip("anyio")

    async def main():
        async with await aopen(data_dir, fsync=FsyncMode.FULL) as s:
            log = s.log("g")
            got = []

            async def writer(i):
                got.append(await log.append_next(1, [b"%d" % i]))
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(writer, i)
            assert sorted(got) == list(range(1, 201))
            with anyio.move_on_after(0):  # cancelled at its first await: a started write still commits
                await log.append_next(1, [b"cancelled but submitted"])
            async with s.transaction():
                await log.append_next(1, [b"in block"])
                with pytest.raises(ExceptionGroup) as ei:
                    async with anyio.create_task_group() as tg:  # a child task is not in the block
                        tg.start_soon(writer, 999)
                assert ei.group_contains(RaftSqliteError, match="task created inside")
            with anyio.fail_after(30):
                return await s.snapshots("g").latest(), log.last_index
    latest, last = anyio.run(main, backend="asyncio")
    assert latest is None and last == 202
    datas = [e.data for e in entries_of(data_dir)]
    assert datas[200:] == [b"cancelled but submitted", b"in block"]


def _priority_recorder(monkeypatch, cls, name, seen):
    """Wrap ``cls.name`` so that each call records the calling thread's CPU priority in ``seen``."""
    from raft_sqlite.threadprio import current_thread_priority
    orig = getattr(cls, name)

    def wrapped(*a, **kw):
        seen.append(current_thread_priority())
        return orig(*a, **kw)
    monkeypatch.setattr(cls, name, wrapped)


@pytest.mark.parametrize("background", ["idle", 0, 5])
def test_snapshot_streams_and_backups_run_at_the_background_priority_and_nothing_else_does(
        tmp_path, data_dir, monkeypatch, background):
    """Snapshot streams (the stream's thread and the batch-commit threads it starts) and a backup's copy run
    at the store's ``background`` priority; the loop, the committer and the read pool keep theirs."""
    from raft_sqlite import HotBackupManager, SnapshotWriter
    from raft_sqlite.snapshot import chunks
    from raft_sqlite.threadprio import current_thread_priority
    base = current_thread_priority()
    assert base.startswith("nice+"), "the test needs a normal thread to start from"
    n0 = int(base[5:])
    want = "idle" if background == "idle" else f"nice+{min(19, n0 + background)}"
    streams, batches, copies, reads, controls = [], [], [], [], []
    _priority_recorder(monkeypatch, SnapshotWriter, "write", streams)
    _priority_recorder(monkeypatch, SnapshotWriter, "begin", controls)  # they commit to raft.db: never lowered
    _priority_recorder(monkeypatch, SnapshotWriter, "finish", controls)
    _priority_recorder(monkeypatch, chunks.SnapshotStore, "write_chunks", batches)
    _priority_recorder(monkeypatch, HotBackupManager, "_copy", copies)
    payload = os.urandom(20 << 20)  # > 2 batches of 8 MiB: batch commits on threads the stream starts

    async def main():
        async with await aopen(data_dir, background=background) as s:
            assert s.background == background
            log = s.log("g")
            await log.append([LogEntry(i, 1, b"e") for i in range(1, 11)])
            await s.metadata("g").set_commit_index(10)
            async with s.snapshots("g").write(10, 1) as w:
                for k in range(0, len(payload), 1 << 20):
                    await w.write(payload[k:k + (1 << 20)])
            async with s.snapshots("g").open(w.meta) as r:
                reads.append(await s.run(current_thread_priority))  # the pool: unchanged
                assert await r.read(4) == payload[:4]
            await s.backup(tmp_path / "bk")
            await s.backup(tmp_path / "bk2", nice=0)  # an explicit nice wins over the store's
            await log.append_next(1, [b"after"])
            reads.append(await s.run(current_thread_priority))
            reads.append(current_thread_priority())  # the loop's own thread
            return w.meta
    meta = asyncio.run(main())
    assert streams and set(streams) == {want}, streams
    assert len(batches) >= 2 and set(batches) == {want}, batches
    assert copies == [want, base], copies
    assert reads == [base, base, base]
    assert controls == [base, base], controls
    with open_store(data_dir) as s, s.snapshots("g").open(meta) as r:  # what was streamed is durable
        assert r.read() == payload
    assert len(list_backups(tmp_path / "bk")) == 1 and len(list_backups(tmp_path / "bk2")) == 1


def test_a_bad_background_priority_is_refused_before_anything_is_created(tmp_path):
    for bad, err in (("low", ValueError), (20, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(err):
            asyncio.run(aopen(tmp_path / "n", background=bad))
        assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("nice", ["idle", 5])
def test_a_sync_backup_lowers_only_its_own_workers_and_each_to_the_priority_given(tmp_path, data_dir, nice):
    """``HotBackupManager(nice=...)``: the copy, sha256 and fsync threads run at that priority (progress is
    called from them), the sha256 and fsync threads too although the already lowered copy thread starts them
    and they lower themselves again (nice 5 stays 5, not 10); the caller's thread is left as it was."""
    from raft_sqlite import HotBackupManager
    from raft_sqlite.threadprio import current_thread_priority
    base = current_thread_priority()
    assert base.startswith("nice+"), "the test needs a normal thread to start from"
    want = "idle" if nice == "idle" else f"nice+{min(19, int(base[5:]) + nice)}"
    with open_store(data_dir) as s:
        s.log("g").append([LogEntry(i, 1, os.urandom(1000)) for i in range(1, 2001)])
        seen = set()
        info = HotBackupManager(s, tmp_path / "bk", nice=nice).backup(
            progress=lambda *a: seen.add((threading.get_ident(), current_thread_priority())))
        assert info.size > 0
        assert {p for _, p in seen} == {want} and len({t for t, _ in seen}) >= 2, seen
        assert current_thread_priority() == base
        for bad in ("IDLE", "", 20, -1):
            with pytest.raises(ValueError):
                HotBackupManager(s, tmp_path / "bk", nice=bad)


def test_lowering_a_thread_is_idempotent_and_never_raises_it():
    """``lower_current_thread(n)`` puts a thread at the process's nice + n: again in the same thread, or in a
    thread started by a lowered one (which inherits its priority), it changes nothing; a smaller n never
    raises a thread back."""
    from raft_sqlite.threadprio import current_thread_priority, lower_current_thread
    base = current_thread_priority()
    assert base.startswith("nice+"), "the test needs a normal thread to start from"
    n0 = int(base[5:])
    seen = []

    def child():
        seen.append(current_thread_priority())  # inherited
        lower_current_thread(4)
        seen.append(current_thread_priority())
        lower_current_thread(2)  # smaller: unchanged (a thread cannot raise itself back anyway)
        seen.append(current_thread_priority())

    def parent():
        lower_current_thread(4)
        seen.append(current_thread_priority())
        lower_current_thread(4)
        seen.append(current_thread_priority())
        t = threading.Thread(target=child)
        t.start()
        t.join()
    t = threading.Thread(target=parent)
    t.start()
    t.join()
    assert seen == [f"nice+{min(19, n0 + 4)}"] * 5, seen
    assert current_thread_priority() == base


def test_a_streams_calls_run_in_call_order_and_a_cancelled_one_still_runs(data_dir):
    """A stream's calls run on two threads (data and control) but one at a time, in the order they were made;
    a call whose await was cancelled still runs in its place, and the calls after it are not held up."""
    pieces = [bytes([i]) * (700 + i) for i in range(40)]

    async def main():
        async with await aopen(data_dir) as s:
            await s.log("g").append([LogEntry(1, 1, b"e")])
            await s.metadata("g").set_commit_index(1)
            async with s.snapshots("g").write(1, 1) as w:
                offsets = await asyncio.gather(*[w.write(p) for p in pieces[:20]])
                t = asyncio.create_task(w.write(pieces[20]))
                await asyncio.sleep(0)  # the call is made
                t.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await t
                for p in pieces[21:]:
                    last = await w.write(p)
                assert offsets == list(itertools.accumulate(len(p) for p in pieces[:20]))
                assert last == w.offset == sum(map(len, pieces))
                # the exit (a control call) made while data calls are still queued runs after them
                late = [asyncio.ensure_future(w.write(p)) for p in pieces]
                await asyncio.sleep(0)  # each task has made its call (a task not started yet has made none)
            assert [t.result() for t in late][-1] == 2 * sum(map(len, pieces))
            return w.meta
    meta = asyncio.run(main())
    with open_store(data_dir) as s, s.snapshots("g").open(meta) as r:
        assert r.read() == b"".join(pieces) * 2
