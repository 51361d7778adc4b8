"""Recovery on open: validate before replay, then expose what was found.

Policies are data (:data:`RECOVERY_POLICIES`), printed by ``raft-sqlite status`` and recorded with every
recovery event.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw

log = logging.getLogger("raft_sqlite.recovery")

#: Event kinds a restore records in the restored store's ``recovery_events`` table.
NODE_REPLACEMENT = "node_replacement"
QUORUM_LOSS_RESTORE = "quorum_loss_restore"
RESTORE_EVENT_KINDS = (NODE_REPLACEMENT, QUORUM_LOSS_RESTORE)


class RecoveryPolicy(str, enum.Enum):
    """What ``NodeStore.open`` accepts when local data is corrupt or has an unexpected shape."""

    STRICT = "STRICT"
    TRUNCATE_TAIL = "TRUNCATE_TAIL"
    PARTIAL = "PARTIAL"


RECOVERY_POLICIES: dict[RecoveryPolicy, dict[str, str]] = {
    RecoveryPolicy.STRICT: {
        "accepts": "only data that validates completely and has the expected shape",
        "on_problem": "refuse to open (CorruptionError / RecoveryRefused naming file, group, index)",
        "raft_safety": "safe: nothing acknowledged is ever silently lost",
    },
    RecoveryPolicy.TRUNCATE_TAIL: {
        "accepts": "a corrupt or torn log tail above the commit index",
        "on_problem": "drop the tail from the first bad record on (logged at WARNING, recorded in the event); "
                      "anything at or below the commit index still refuses",
        "raft_safety": "safe for Raft: uncommitted entries may be dropped; the leader re-sends them",
    },
    RecoveryPolicy.PARTIAL: {
        "accepts": "corruption anywhere in the log or snapshots",
        "on_problem": "keep the longest valid log prefix and the newest valid snapshot chain, mark the group "
                      "recovered_partially",
        "raft_safety": "the node may have lost committed entries and votes: it must rejoin as a catch-up "
                       "follower (non-voting until caught up) and never stand for election before that",
    },
}


@dataclass
class RecoveryReport:
    """What one ``NodeStore.open`` validated, dropped and decided."""

    policy: str
    outcome: str = "clean"  # clean | truncated | partial | created
    duration: float = 0.0
    groups: int = 0
    entries_validated: int = 0
    bytes_validated: int = 0
    segments_validated: int = 0
    snapshots_validated: int = 0
    #: JSON-ready rows (to_json); their keys depend on what was dropped/repaired
    dropped: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: schema objects (triggers, views) recreated or dropped by a non-STRICT policy
    repaired: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic, repr=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("started")
        return json.dumps(d, sort_keys=True)

    def summary(self) -> str:
        return (f"recovery {self.outcome} policy={self.policy} groups={self.groups} "
                f"entries={self.entries_validated} bytes={self.bytes_validated} "
                f"segments={self.segments_validated} snapshots={self.snapshots_validated} "
                f"dropped={len(self.dropped)} in {self.duration * 1000:.1f} ms")


def read_restore_event(conn: apsw.Connection) -> dict[str, Any] | None:
    """The newest restore event (``node_replacement`` / ``quorum_loss_restore``) recorded in the raft.db
    behind ``conn``, as ``{"kind", "at", **details}``, or None if the store was never restored.
    (:attr:`NodeStore.restored_from <raft_sqlite.NodeStore.restored_from>` reads it; ``restore`` writes it.)"""
    row = conn.execute("SELECT event_id, kind, at, details FROM recovery_events WHERE kind IN (?, ?) "
                       "ORDER BY event_id DESC LIMIT 1", RESTORE_EVENT_KINDS).fetchone()
    if row is None:
        return None
    details = json.loads(str(row[3])) if row[3] else {}
    return {**details, "event_id": row[0], "kind": row[1], "at": row[2]}
