"""The PySyncObj adapter's durability invariant, checked on crash images (issue 19).

**No ack, vote or callback leaves a node before what it depends on is durable.** The adapter batches a
node's journal writes and holds its outgoing messages and client callbacks until one commit makes them
durable (the durability gate). These tests run a 3-node PySyncObj cluster in this process (TCP on
127.0.0.1, ``autoTick=False``: the test thread ticks every node, so nothing races), every journal in FULL
mode on a store opened through one :class:`~tests.support.faultvfs.FaultVFS` whose root holds the three
data_dirs. Every message a node hands to its real transport (what the gate releases) and every client
callback is checked against a ``lose`` crash image (only what was fsynced survives) of the nodes' stores,
opened with STRICT recovery:

- ``next_node_idx`` (success, n): the sender's image holds every index < n with the term its view had;
- ``response_vote`` for term t: the voter's image has term > t, or term t and the vote for the candidate;
- ``request_vote`` for term t: the candidate's image has term > t, or term t and its vote for itself;
- ``append_entries`` of term t: the leader's image has term >= t, every entry of its view up to prevLogIdx
  and the entries carried (same term and payload);
- ``apply_command_response`` with a log index: the leader's image holds that entry;
- a SUCCESS callback: the command's entry is in the calling node's image and in the images of a majority.

A term above the message's is accepted for votes: a node whose durable term is higher can never vote
again in the message's term, which is all a vote promises (the batched journal may have replaced a
queued vote by a later term before the commit). The checker must be able to fail: a test breaks the
journal's ``sync`` and sees each kind of check fire. A fail-stop test makes one follower's commit fail
(an injected fsync error) and checks that the node goes silent, its journal refuses writes, a later
callback gets UNKNOWN_OUTCOME and its crash image holds everything it acknowledged.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shutil
import time

import pytest

pysyncobj = pytest.importorskip("pysyncobj")

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated  # noqa: E402 (after importorskip)
from pysyncobj import syncobj as pso_syncobj  # noqa: E402 (after importorskip)
from pysyncobj.transport import TCPTransport  # noqa: E402 (after importorskip)

from raft_sqlite import FsyncMode, NodeStore, RecoveryPolicy, fsio  # noqa: E402 (after importorskip)
from raft_sqlite.errors import RaftSqliteError  # noqa: E402 (after importorskip)
from raft_sqlite.integrations.pysyncobj import (  # noqa: E402 (after importorskip)
    DEFAULT_CLUSTER_ID,
    DEFAULT_GROUP,
    RaftSqliteJournal,
    create_journal,
    patch_pysyncobj,
)
from tests.support.faultvfs import FaultVFS, quiet_injected_faults  # noqa: E402
from tests.support.net import free_addrs  # noqa: E402

_vfs_names = itertools.count()

#: message types whose dependency the checker verifies (the others carry no durable promise)
CHECKED = ("next_node_idx", "response_vote", "request_vote", "append_entries", "apply_command_response",
           "callback")


class KV(SyncObj):
    """A replicated dict; ``set`` returns its key."""

    def __init__(self, addr, partners, conf, transport_class):
        super().__init__(addr, partners, conf, transportClass=transport_class)
        self.__data = {}

    @replicated
    def set(self, key, value):
        self.__data[key] = value
        return key

    def get(self, key):
        return self.__data.get(key)


class Image:
    """What one node's store holds in a crash image (read once, the store closed again)."""

    def __init__(self, path: str, name: str):
        with NodeStore.open(path, name, cluster_id=DEFAULT_CLUSTER_ID, fsync=FsyncMode.OFF,
                            recovery=RecoveryPolicy.STRICT) as s:
            lg, md = s.log(DEFAULT_GROUP), s.metadata(DEFAULT_GROUP)
            self.entries = {e.index: (e.term, e.data) for e in lg.entries(lg.first_index, lg.last_index + 1)} \
                if lg.last_index >= lg.first_index else {}
            self.snapshot_index = lg.snapshot_index
            self.term, self.vote = md.current_term, md.voted_for

    def holds(self, idx: int, term: int, data: bytes | None = None) -> bool:
        """The image has entry ``idx`` of ``term`` (and payload ``data`` if given)."""
        got = self.entries.get(idx)
        return got is not None and got[0] == term and (data is None or got[1] == data)


class Checker:
    """Observes every exit of every node and checks it against crash images (see the module docstring).

    A ``lose`` image depends only on the durable state of the FaultVFS's model, which changes only at a
    sync (SQLite's xSync, the fsio backend's fsync/fdatasync/sync_dir; all counted in
    ``vfs.counters["syncs"]``): images are therefore taken once per value of that counter and read once
    per node, however many messages are checked against them."""

    def __init__(self, vfs: FaultVFS, root: str, imgroot: str):
        self.vfs, self.root, self.imgroot = vfs, root, imgroot
        self.checked = collections.Counter()  # kind -> checks that ran
        self.violations: list[str] = []
        self.violated = collections.Counter()  # kind -> violations found
        self.released_log = collections.defaultdict(list)  # node name -> (to, message, view) of checked messages
        self.sent = collections.Counter()  # node name -> messages handed to its real transport
        self.unchecked = collections.Counter()  # message types without a durable dependency
        self.outcomes: dict[str, object] = {}  # command marker -> FAIL_REASON its callback got
        self.journals: dict[str, RaftSqliteJournal] = {}  # node name -> journal
        self.names: dict[str, str] = {}  # address -> node name
        self.transports: dict[str, TCPTransport] = {}  # address -> transport
        self.images_taken = 0
        self._queued: dict[int, tuple] = {}  # id(message) -> (message, sender's view {idx: term} when queued)
        self._key = None
        self._dir = None
        self._images: dict[str, Image] = {}
        self._seq = itertools.count()
        self.verify_cache_every = 20  # every n-th reuse of a cached image is compared with a fresh one
        self.cache_verified = 0
        self._reuses = itertools.count(1)

    # ---------------------------------------------------------------------------------------- images
    def image(self, name: str) -> Image:
        """The crash image of node ``name`` as of now."""
        key = self.vfs.counters["syncs"]
        if key != self._key:
            self.drop_images()
            self._dir = self._write_image()
            self._key = key
            self.images_taken += 1
        img = self._images.get(name)
        if img is None:
            img = self._images[name] = Image(os.path.join(self._dir, name), name)
        elif self.verify_cache_every and next(self._reuses) % self.verify_cache_every == 0:
            # the cache's premise (no durable change without a sync): a fresh image must read the same
            fresh_dir = self._write_image()
            fresh = Image(os.path.join(fresh_dir, name), name)
            shutil.rmtree(fresh_dir, ignore_errors=True)
            self.cache_verified += 1
            if vars(fresh) != vars(img):
                self._violation("cache", f"{name}: a fresh crash image differs from the one cached at sync {key}")
        return img

    def image_dir(self, name: str) -> str:
        """The directory of node ``name`` in the current crash image (take one with :meth:`image`)."""
        return os.path.join(self._dir, name)

    def _write_image(self) -> str:
        path = os.path.join(self.imgroot, f"img{next(self._seq)}")
        self.vfs.write_crash_image(path, mode="lose")
        for d, _dirs, files in os.walk(path):  # the store's own modes (else every open warns it tightened them)
            os.chmod(d, 0o700)
            for f in files:
                os.chmod(os.path.join(d, f), 0o600)
        return path

    def drop_images(self) -> None:
        """Forget the current images (the next check takes new ones)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._key, self._dir, self._images = None, None, {}

    # ---------------------------------------------------------------------------------------- exits
    def journal_factory(self, journal_file):
        """``createJournal`` for SyncObj: under the FaultVFS's root a FULL store on the FaultVFS, remembered
        by node name; elsewhere the adapter's own (FULL)."""
        if os.path.dirname(os.path.abspath(journal_file)) != os.path.abspath(self.root):
            return create_journal(journal_file, fsync=FsyncMode.FULL)
        j = create_journal(journal_file, fsync=FsyncMode.FULL, vfs=self.vfs.name)
        self.journals[os.path.basename(os.fspath(journal_file))] = j
        return j

    def transport_class(self):
        """A TCPTransport whose ``send`` (what the durability gate releases to) reports to this checker."""
        checker = self

        class ObservedTransport(TCPTransport):
            def __init__(self, syncObj, selfNode, otherNodes):
                super().__init__(syncObj, selfNode, otherNodes)
                self.observed_addr = selfNode.id
                checker.transports[selfNode.id] = self

            def send(self, node, message):
                checker.released(self.observed_addr, node, message)
                return super().send(node, message)

        return ObservedTransport

    def observe_queue(self, addr: str) -> None:
        """Wrap the node's gated ``send`` (the gate replaced the transport's) to record the sender's view
        when a message is queued: what the message depends on is the state it was built from."""
        t = self.transports[addr]
        gated = t.__dict__.get("send")
        assert gated is not None, "the durability gate is not installed on this node's transport"
        journal = self.journals[self.names[addr]]

        def send(node, message):
            self._queued[id(message)] = (message, {e[1]: e[2] for e in journal[:]})
            return gated(node, message)

        t.send = send

    def released(self, addr: str, node, message) -> None:
        """A message leaves node ``addr``: check what it depends on against the sender's crash image."""
        name = self.names[addr]
        self.sent[name] += 1
        rec = self._queued.pop(id(message), None)
        kind = message.get("type")
        if rec is None or rec[0] is not message:
            self._violation(kind, f"{name}: {kind} left without passing the gate's queue")
            return
        view = rec[1]
        if self.dependency(addr, node.id, message, view, None) == "unchecked":
            self.unchecked[kind] += 1
            return
        self.checked[kind] += 1
        self.released_log[name].append((node.id, message, view))
        bad = self.dependency(addr, node.id, message, view, self.image(name))
        if bad is not None:
            self._violation(kind, f"{name} -> {self.names.get(node.id, node.id)}: {kind}: {bad}")

    def _violation(self, kind: str, text: str) -> None:
        self.violated[kind] += 1
        self.violations.append(text)

    def dependency(self, addr: str, to: str, message: dict, view: dict, img: Image | None) -> str | None:
        """What is missing from ``img`` (the sender's crash image) for ``message`` sent by ``addr`` to ``to``
        from a log ``view`` ({idx: term}); None if nothing is. With ``img=None``: "unchecked" for a message
        that depends on nothing durable (a failure answer, a forwarded command, a snapshot part, ...)."""
        kind = message.get("type")
        if kind == "next_node_idx" and message["success"]:
            return img and self._prefix(img, view, message["next_node_idx"] - 1)
        if kind in ("response_vote", "request_vote"):
            if img is None:
                return None
            t, who = message["term"], to if kind == "response_vote" else addr
            if img.term > t or (img.term == t and img.vote == who):
                return None
            return f"vote for {who} in term {t}; image: term {img.term}, vote {img.vote!r}"
        if kind == "append_entries" and "prevLogIdx" in message:
            if img is None:
                return None
            if img.term < message["term"]:
                return f"term {message['term']}; image term {img.term}"
            bad = self._prefix(img, view, message["prevLogIdx"])
            for cmd, idx, term in message.get("entries", []):
                if bad is None and not img.holds(idx, term, bytes(cmd)):
                    bad = f"carried entry {idx} (term {term}) not in the image"
            return bad
        if kind == "apply_command_response" and "log_idx" in message:
            if img is None or img.holds(message["log_idx"], message["log_term"]):
                return None
            return f"entry {message['log_idx']} (term {message['log_term']}) not in the image"
        return "unchecked"

    @staticmethod
    def _prefix(img: Image, view: dict, upto: int) -> str | None:
        """None if ``img`` holds every index <= ``upto`` of the sender's log with the view's terms."""
        for i in range(1, upto + 1):
            if i <= img.snapshot_index:
                continue
            if i not in view:
                return f"index {i} is not in the sender's view"
            if not img.holds(i, view[i]):
                return f"index {i} (term {view[i]}) not in the image (image last: {max(img.entries, default=0)})"
        return None

    def callback(self, name: str, marker: str):
        """The client callback of the command carrying ``marker``, submitted on node ``name``."""
        def cb(res, err):
            self.outcomes[marker] = err
            if err != FAIL_REASON.SUCCESS:
                return
            self.checked["callback"] += 1
            needle = marker.encode()
            found = [e for e in self.journals[name][:] if needle in bytes(e[0])]
            if len(found) != 1:
                self._violation("callback", f"{name}: callback {marker}: {len(found)} entries carry it in the view")
                return
            cmd, idx, term = found[0]
            if not self.image(name).holds(idx, term, bytes(cmd)):
                self._violation("callback", f"{name}: callback {marker}: entry {idx} not in the node's own image")
            holders = [n for n in self.journals if self.image(n).holds(idx, term, bytes(cmd))]
            if len(holders) * 2 <= len(self.journals):
                self._violation("callback", f"{name}: callback {marker}: entry {idx} durable only on {holders}")
        return cb


class Cluster:
    """Three KV nodes on the checker's FaultVFS, ticked by the test thread."""

    def __init__(self, checker: Checker, n: int = 3):
        self.checker = checker
        self.addrs = free_addrs(n)
        self.nodes: dict[str, KV] = {}
        self.alive: list[str] = []
        self.errors = collections.Counter()  # node name -> exceptions its doTick raised
        for i, addr in enumerate(self.addrs):
            checker.names[addr] = f"n{i}"
            self.start(f"n{i}")

    def start(self, name: str) -> None:
        """Start (or restart, on its data_dir as it is) node ``name``."""
        addr = next(a for a, n in self.checker.names.items() if n == name)
        conf = SyncObjConf(autoTick=False, journalFile=os.path.join(self.checker.root, name),
                           raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05,
                           connectionRetryTime=0.2)
        self.nodes[name] = KV(addr, [a for a in self.addrs if a != addr], conf, self.checker.transport_class())
        self.checker.observe_queue(addr)
        self.alive.append(name)

    def tick(self, wait: float = 0.003) -> None:
        for name in list(self.alive):
            try:
                self.nodes[name].doTick(wait)
            except RaftSqliteError:
                self.errors[name] += 1  # a fail-stopped node's journal refuses the writes of a message

    def run_until(self, cond, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            if cond():
                return True
        return False

    def leader(self) -> str | None:
        """The alive node that considers itself leader (None if none does)."""
        for name in self.alive:
            st = self.nodes[name].getStatus()
            if st["leader"] is not None and st["leader"].id == st["self"].id:
                return name
        return None

    def stop(self, name: str) -> None:
        """Destroy node ``name`` (its sockets close; its journal closes its store)."""
        self.alive.remove(name)
        self.nodes[name].destroy()

    def submit(self, name: str, keys) -> list[str]:
        """Submit ``set(key, ...)`` on node ``name`` with a checked callback for each key."""
        for k in keys:
            self.nodes[name].set(k, name, callback=self.checker.callback(name, k))
        return list(keys)

    def destroy(self) -> None:
        for name in list(self.alive):
            with contextlib.suppress(Exception):
                self.stop(name)


@contextlib.contextmanager
def observed_cluster(tmp_path):
    """A started :class:`Cluster` (a leader elected) with its :class:`Checker`, torn down on exit."""
    root = os.path.join(tmp_path, "cluster")
    imgroot = os.path.join(tmp_path, "images")
    os.makedirs(root, mode=0o700)
    os.makedirs(imgroot)
    vfs = FaultVFS(f"psodur{os.getpid()}_{next(_vfs_names)}", root=root)
    checker = Checker(vfs, root, imgroot)
    cluster = None
    try:
        with fsio.installed(vfs.fs), quiet_injected_faults(), patch_pysyncobj():
            orig = pso_syncobj.createJournal
            pso_syncobj.createJournal = checker.journal_factory
            try:
                cluster = Cluster(checker)
                assert cluster.run_until(lambda: cluster.leader() is not None), "no leader elected"
                yield cluster, checker
            finally:
                pso_syncobj.createJournal = orig
    finally:
        if cluster is not None:
            cluster.destroy()
        checker.drop_images()
        vfs.unregister()


def _workload(cluster: Cluster, checker: Checker, per_wave: int, waves: int = 3, elections: int = 1,
              restart: bool = False) -> None:
    """Waves of commands on the leader and through a follower (each wave waits for its callbacks); then
    ``elections`` times: the leader is stopped, the two others elect a new leader (votes, a new leader's
    AppendEntries), with ``restart`` the stopped node (holding entries no other node has) starts again on
    its data_dir, and more waves."""
    for phase in range(elections + 1):
        leader = cluster.leader()
        follower = next(n for n in cluster.alive if n != leader)
        for w in range(waves):
            keys = cluster.submit(leader, [f"p{phase}w{w}L{i:03d}" for i in range(per_wave)])
            keys += cluster.submit(follower, [f"p{phase}w{w}F{i:03d}" for i in range(max(1, per_wave // 2))])
            assert cluster.run_until(lambda: all(k in checker.outcomes for k in keys)), \
                f"phase {phase}: {sum(k in checker.outcomes for k in keys)}/{len(keys)} callbacks"
            assert all(checker.outcomes[k] == FAIL_REASON.SUCCESS for k in keys), \
                {k: checker.outcomes[k] for k in keys if checker.outcomes[k] != FAIL_REASON.SUCCESS}
        if phase < elections:
            if restart:
                # entries only the old leader gets (durable there, never replicated): the new leader puts
                # others at those indices, so the restarted node truncates them (deleteEntriesFrom, batched)
                cluster.submit(leader, [f"p{phase}orphan{i}" for i in range(3)])
                cluster.nodes[leader].doTick(0.0)
            cluster.stop(leader)
            assert cluster.run_until(lambda: cluster.leader() not in (None, leader)), "no new leader"
            if restart:
                cluster.start(leader)
                orphans = [e for e in checker.journals[leader][:] if b"orphan" in bytes(e[0])]
                assert len(orphans) == 3, "the old leader's own entries are not in its log"
                assert cluster.run_until(lambda: not any(b"orphan" in bytes(e[0]) for e in
                                                         checker.journals[leader][:])), "never truncated"


def _check_invariant(tmp_path, **workload):
    t0 = time.monotonic()
    with observed_cluster(tmp_path) as (cluster, checker):
        _workload(cluster, checker, **workload)
        assert checker.violations == [], checker.violations[:10]
        for kind, at_least in (("next_node_idx", 10), ("append_entries", 10), ("request_vote", 2),
                               ("response_vote", 2), ("apply_command_response", 6), ("callback", 30)):
            assert checker.checked[kind] >= at_least, (kind, dict(checker.checked))
        assert checker.images_taken >= 10 and checker.cache_verified >= 3, (checker.images_taken,
                                                                             checker.cache_verified)
    print(f"checked {dict(checker.checked)}, unchecked {dict(checker.unchecked)}, "
          f"{checker.images_taken} images, {checker.cache_verified} cache checks, {time.monotonic() - t0:.1f}s")


def test_no_message_or_callback_leaves_before_what_it_depends_on_is_durable(tmp_path):
    _check_invariant(tmp_path, per_wave=8, restart=True)


@pytest.mark.slow
def test_no_message_or_callback_leaves_before_what_it_depends_on_is_durable_soak(tmp_path):
    """Longer: 6 elections, the stopped leader restarted each time (it catches up as a follower)."""
    _check_invariant(tmp_path, per_wave=20, waves=4, elections=6, restart=True)


def _sync_never(orig):
    def sync(self):
        return False  # leaves every write queued: nothing the node sends is durable
    return sync


def _sync_every_other(orig):
    calls = itertools.count()

    def sync(self):
        if next(calls) % 2:
            return False  # this batch stays queued past the release that needed it
        return orig(self)
    return sync


@pytest.mark.parametrize("mutation", [_sync_never, _sync_every_other], ids=["sync_never", "sync_every_other"])
def test_the_checker_fires_when_the_journal_does_not_sync_before_release(tmp_path, monkeypatch, mutation):
    """The same checker on a broken gate (the journal's ``sync`` skips commits): it must report violations,
    with ``sync_never`` of every checked kind (each check can fail)."""
    monkeypatch.setattr(RaftSqliteJournal, "sync", mutation(RaftSqliteJournal.sync))
    with observed_cluster(tmp_path) as (cluster, checker):
        _workload(cluster, checker, per_wave=8)
    assert checker.violations
    print(f"{len(checker.violations)} violations {dict(checker.violated)}; checked {dict(checker.checked)}")
    if mutation is _sync_never:
        for kind in CHECKED:
            assert checker.violated[kind] > 0, (kind, dict(checker.violated))


def journal_of(checker: Checker, name: str) -> RaftSqliteJournal:
    return checker.journals[name]


def _fail_next_sync(cluster: Cluster, victim: str, timeout: float = 10.0) -> int:
    """Tick the cluster with an fsync error armed around ``victim``'s ticks only (the FaultVFS is shared by
    the three stores) until one of them attempted a sync; returns the victim's sent count at that point."""
    vfs = cluster.checker.vfs
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in list(cluster.alive):
            if name != victim:
                cluster.nodes[name].doTick(0.003)
                continue
            syncs = vfs.counters["syncs"]
            vfs.arm_error("sync", nth=1)
            try:
                cluster.nodes[name].doTick(0.003)
            except RaftSqliteError:  # a failed write outside the gate's sync raises out of the tick
                cluster.errors[name] += 1
            finally:
                vfs.clear_faults()
            if vfs.counters["syncs"] > syncs:
                return cluster.checker.sent[victim]
    raise AssertionError(f"{victim} never synced")


def test_a_failed_commit_fail_stops_the_node_and_its_image_holds_all_it_acknowledged(tmp_path):
    """An fsync error injected into one follower's commit: from then on nothing leaves that node (counted at
    its real transport), its journal refuses writes, a command it forwarded earlier completes with
    UNKNOWN_OUTCOME, the two others go on; its crash image, reopened, holds everything it acknowledged,
    and a node restarted on that image catches up."""
    with observed_cluster(tmp_path) as (cluster, checker):
        leader = cluster.leader()
        victim = next(n for n in cluster.alive if n != leader)
        keys = cluster.submit(leader, [f"pre{i}" for i in range(5)]) + cluster.submit(victim, ["preF"])
        assert cluster.run_until(lambda: all(checker.outcomes.get(k) == FAIL_REASON.SUCCESS for k in keys))

        # the victim forwards a command; the next sync of the victim's own tick fails
        cluster.submit(victim, ["doomed"])
        failed = _fail_next_sync(cluster, victim)
        assert journal_of(checker, victim).pending > 0  # the failed commit was the gate's (a queued batch)

        # the leader and the third node commit "doomed"; the victim learns the commit index from a heartbeat
        # (its view still holds the entry whose commit failed), applies it and calls back: UNKNOWN_OUTCOME
        assert cluster.run_until(lambda: "doomed" in checker.outcomes, timeout=10), \
            (cluster.errors, {n: cluster.nodes[n].getStatus()["commit_idx"] for n in cluster.alive})
        # the victim is silent from now on; the leader and the third node still commit
        more = cluster.submit(leader, [f"post{i}" for i in range(5)])
        assert cluster.run_until(lambda: all(checker.outcomes.get(k) == FAIL_REASON.SUCCESS for k in more),
                                 timeout=10), {k: checker.outcomes.get(k) for k in more}
        for _ in range(100):  # more heartbeats reach the victim
            cluster.tick()
        assert checker.sent[victim] == failed, "the fail-stopped node sent a message"
        assert checker.outcomes["doomed"] == FAIL_REASON.UNKNOWN_OUTCOME
        journal = journal_of(checker, victim)
        last = journal[-1]
        with pytest.raises(RaftSqliteError):
            journal.add(b"x", last[1] + 1, last[2])
        with pytest.raises(RaftSqliteError):
            journal.setCurrentTerm(journal.getCurrentTerm() + 1, None)
        assert checker.violations == [], checker.violations[:10]

        # "restart": the victim's crash image holds every entry and vote it acknowledged
        cluster.stop(victim)
        checker.drop_images()
        img = checker.image(victim)
        addr = next(a for a, n in checker.names.items() if n == victim)
        gone = [(m["type"], bad) for to, m, view in checker.released_log[victim]
                if (bad := checker.dependency(addr, to, m, view, img)) is not None]
        assert checker.released_log[victim] and gone == []
        restart_dir = os.path.join(tmp_path, "restart", victim)
        shutil.copytree(checker.image_dir(victim), restart_dir)
        partners = [a for a in cluster.addrs if a != addr]
        node = KV(addr, partners, SyncObjConf(autoTick=False, journalFile=restart_dir, raftMinTimeout=0.3,
                                              raftMaxTimeout=0.6, appendEntriesPeriod=0.05), TCPTransport)
        try:
            ok = cluster.run_until(lambda: (node.doTick(0.003), node.get("post4"))[1] == leader, timeout=15)
            assert ok and node.get("pre0") == leader, "the restarted node did not catch up"
        finally:
            node.destroy()


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_command_submitted_to_a_fail_stopped_node_gets_a_callback(tmp_path, role):
    """After its commit failed, a node still accepts commands from its clients: each must be answered
    (UNKNOWN_OUTCOME or another failure), never left waiting forever."""
    with observed_cluster(tmp_path) as (cluster, checker):
        leader = cluster.leader()
        victim = leader if role == "leader" else next(n for n in cluster.alive if n != leader)
        cluster.submit(leader, ["first"])
        _fail_next_sync(cluster, victim)
        late = cluster.submit(victim, [f"late{i}" for i in range(3)])
        cluster.run_until(lambda: all(k in checker.outcomes for k in late), timeout=2)
        got = {k: checker.outcomes.get(k) for k in late}
        assert all(r is not None and r != FAIL_REASON.SUCCESS for r in got.values()), got


def test_an_autotick_node_whose_commit_fails_answers_every_client_and_stops(tmp_path):
    """autoTick (the default): after an injected fsync error in the gate's commit, every client callback
    still pending is answered UNKNOWN_OUTCOME (none waits forever), a command submitted later is answered at
    once, and the SyncObj is destroyed (its tick thread stops, as a crashed process would)."""
    root = os.path.join(tmp_path, "single")
    os.makedirs(root)
    vfs = FaultVFS(f"psodur{os.getpid()}_{next(_vfs_names)}", root=root)
    addr = free_addrs(1)[0]
    outcomes = collections.defaultdict(list)
    node = None
    try:
        with fsio.installed(vfs.fs), quiet_injected_faults(), patch_pysyncobj():
            def factory(path):
                return create_journal(path, fsync=FsyncMode.FULL, vfs=vfs.name)
            orig = pso_syncobj.createJournal
            pso_syncobj.createJournal = factory
            try:
                node = KV(addr, [], SyncObjConf(journalFile=os.path.join(root, "n1"), appendEntriesPeriod=0.05),
                          TCPTransport)
            finally:
                pso_syncobj.createJournal = orig
            deadline = time.monotonic() + 15
            while not node.isReady():
                assert time.monotonic() < deadline, "single node never became ready"
                time.sleep(0.02)
            assert node.set("warm", 1, sync=True, timeout=10) == "warm"
            vfs.arm_error("sync", nth=1, sticky=True)
            for i in range(20):
                node.set(f"k{i}", i, callback=lambda res, err, i=i: outcomes[i].append(err))
            deadline = time.monotonic() + 15
            while (len(outcomes) < 20 or node.tick_thread_alive()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not node.tick_thread_alive(), "the node kept ticking after its commit failed"
            assert len(outcomes) == 20 and all(len(v) == 1 for v in outcomes.values()), dict(outcomes)
            assert set(e for v in outcomes.values() for e in v) == {FAIL_REASON.UNKNOWN_OUTCOME}, dict(outcomes)
            late = []
            node.set("late", 1, callback=lambda res, err: late.append(err))
            assert late == [FAIL_REASON.UNKNOWN_OUTCOME]
            vfs.clear_faults()
    finally:
        if node is not None:
            node.destroy()
        vfs.unregister()
