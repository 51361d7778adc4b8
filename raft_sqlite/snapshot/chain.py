"""Delta chains: :class:`DeltaSnapshot` (one link: a DELTA and the snapshot it applies on) and
:class:`SnapshotChain` (a FULL base and its ordered deltas, links verified)."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import SnapshotError
from .manifest import SnapshotKind, SnapshotMeta


class SnapshotSource(Protocol):
    """What :meth:`SnapshotChain.load` reads: a group's durable snapshots
    (:class:`~raft_sqlite.snapshot.SnapshotManager` is one; a protocol, so this module does not import
    the manager, which imports it)."""

    @property
    def group(self) -> str:
        """The group's name (for error messages)."""
        ...

    def list(self) -> builtins.list[SnapshotMeta]:
        """The group's DURABLE snapshots."""
        ...


@dataclass(frozen=True)
class DeltaSnapshot:
    """One link of a :class:`SnapshotChain`: a DELTA snapshot and the snapshot it applies on.

    A delta records only what changed since ``parent``; applying it requires the state restored from
    ``parent`` (and, recursively, the chain below it)."""

    meta: SnapshotMeta
    parent: SnapshotMeta

    def verify_link(self) -> None:
        """Raise :class:`SnapshotError` unless this link is sound: kind DELTA, ``parent_id`` names the
        parent, same group, the parent is DURABLE, older (smaller id) and at an index no higher."""
        m, p = self.meta, self.parent
        where = f"group {m.group!r}: snapshot chain link {p.id} -> {m.id}"
        if m.kind is not SnapshotKind.DELTA:
            raise SnapshotError(f"{where}: child is not a DELTA")
        if m.parent_id != p.id:
            raise SnapshotError(f"{where}: child names parent {m.parent_id}")
        if p.group != m.group:
            raise SnapshotError(f"{where}: parent belongs to group {p.group!r}")
        if p.status != "DURABLE":
            raise SnapshotError(f"{where}: parent is {p.status}")
        if not (p.id < m.id and p.index <= m.index):
            raise SnapshotError(f"{where}: out of order (parent index {p.index}, child index {m.index})")


def chains_of(metas: builtins.list[SnapshotMeta]) -> builtins.list[builtins.list[SnapshotMeta]]:
    """``metas`` (one group's durable snapshots) grouped into chains, each list base first, newest chain
    first (see :meth:`SnapshotManager.chains <raft_sqlite.snapshot.SnapshotManager.chains>`). A snapshot
    whose parent is not among ``metas`` starts a (broken) chain of its own."""
    by_id = {m.id: m for m in metas}
    root: dict[int, int] = {}

    def root_of(m: SnapshotMeta) -> int:
        r = root.get(m.id)
        if r is None:
            p = by_id.get(m.parent_id) if m.kind is SnapshotKind.DELTA and m.parent_id is not None else None
            r = m.id if p is None or p.id >= m.id else root_of(p)
            root[m.id] = r
        return r

    groups: dict[int, builtins.list[SnapshotMeta]] = {}
    for m in metas:
        groups.setdefault(root_of(m), []).append(m)
    out = [sorted(v, key=lambda m: m.id) for v in groups.values()]
    out.sort(key=lambda c: max((m.index, m.id) for m in c), reverse=True)
    return out


class SnapshotChain:
    """A FULL base snapshot plus its ordered deltas, oldest first: restoring applies ``base`` and then
    every delta in order. Build with :meth:`load` (which verifies every link)."""

    def __init__(self, base: SnapshotMeta, deltas: list[DeltaSnapshot]):
        self.base = base
        self.deltas = deltas

    @classmethod
    def load(cls, mgr: SnapshotSource, head: SnapshotMeta) -> SnapshotChain:
        """The chain ending at ``head``, walking parent links down to a FULL base. Raises
        :class:`SnapshotError` for a missing parent or a broken link (see
        :meth:`DeltaSnapshot.verify_link`) and :class:`CorruptionError` for a bad manifest."""
        by_id = {m.id: m for m in mgr.list()}
        links: list[DeltaSnapshot] = []
        cur = head
        seen: set[int] = set()
        while cur.kind is SnapshotKind.DELTA:
            if cur.id in seen:
                raise SnapshotError(f"group {mgr.group!r}: snapshot chain has a cycle at {cur.id}")
            seen.add(cur.id)
            parent = by_id.get(cur.parent_id) if cur.parent_id is not None else None
            if parent is None:
                raise SnapshotError(f"group {mgr.group!r}: snapshot {cur.id} names parent {cur.parent_id}, "
                                    "which is not a durable snapshot of this group")
            link = DeltaSnapshot(cur, parent)
            link.verify_link()
            links.append(link)
            cur = parent
        links.reverse()
        return cls(cur, links)

    @property
    def head(self) -> SnapshotMeta:
        """The newest snapshot of the chain."""
        return self.deltas[-1].meta if self.deltas else self.base

    def metas(self) -> list[SnapshotMeta]:
        """Base first, then every delta in order."""
        return [self.base] + [d.meta for d in self.deltas]

    def __iter__(self) -> Iterator[SnapshotMeta]:
        return iter(self.metas())

    def __len__(self) -> int:
        return 1 + len(self.deltas)

    def __repr__(self) -> str:
        return f"<SnapshotChain base={self.base.id} deltas={[d.meta.id for d in self.deltas]}>"

