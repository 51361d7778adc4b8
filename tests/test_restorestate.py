"""raft_sqlite.restorestate: the one reading of what an interrupted restore left in a data_dir, shared by
NodeStore.open's refusal (``interrupted``) and restore()'s recognition of its own leftovers
(``restore_leftovers``). Each case states both answers, so a rule changed in one place shows here."""

import os

import pytest

from raft_sqlite import layout
from raft_sqlite.restorestate import RestoreState, is_placeholder, read_main_head, read_restore_state

SQLITE_DB = b"SQLite format 3\0" + b"\0" * 200


def _make(d, files):
    for name, data in files.items():
        if data is None:
            os.mkdir(d / name)
        else:
            (d / name).write_bytes(data)


@pytest.mark.parametrize("files, interrupted, leftovers", [
    # empty (the lock file does not count)
    ({}, False, []),
    ({layout.LOCK_FILE: b"{}"}, False, []),
    # the placeholder: interrupted, and everything there is the restore's
    ({layout.MAIN_DB: layout.RESTORE_PLACEHOLDER}, True, [layout.MAIN_DB]),
    ({layout.MAIN_DB: layout.RESTORE_PLACEHOLDER, ".raft.db.restoring": b"x", "chunks.db": b"y",
      layout.LOCK_FILE: b""}, True, [".raft.db.restoring", "chunks.db", layout.MAIN_DB]),
    # only temporaries (died before the placeholder was durable)
    ({".raft.db.tmp": b"x"}, True, [".raft.db.tmp"]),
    ({".chunks.db.restoring": b"x", ".raft.db.restoring-journal": b"j"}, True,
     [".chunks.db.restoring", ".raft.db.restoring-journal"]),
    # temporaries beside an empty raft.db: interrupted for open, but not only ours for a restore
    ({layout.MAIN_DB: b"", ".raft.db.tmp": b"x"}, True, None),
    # temporaries beside a real database: a restore that completed; never refused, never overwritten
    ({layout.MAIN_DB: SQLITE_DB, ".chunks.db.tmp": b"x"}, False, None),
    # a store, or anything else
    ({layout.MAIN_DB: SQLITE_DB}, False, None),
    ({"notes.txt": b"mine"}, False, None),
    ({".raft.db.restoring.bak": b"x"}, False, None),
    # raft.db a directory: no head, not a placeholder
    ({layout.MAIN_DB: None}, False, None),
])
def test_state_rules(tmp_path, files, interrupted, leftovers):
    _make(tmp_path, files)
    st = read_restore_state(str(tmp_path))
    assert st.interrupted is interrupted
    assert st.restore_leftovers() == leftovers
    assert layout.LOCK_FILE not in st.temporaries + st.others


def test_head_and_placeholder(tmp_path):
    p = str(tmp_path / layout.MAIN_DB)
    assert read_main_head(p) == b"" and not is_placeholder(p)
    (tmp_path / layout.MAIN_DB).write_bytes(layout.RESTORE_PLACEHOLDER + b"more")
    assert read_main_head(p) == layout.RESTORE_PLACEHOLDER and is_placeholder(p)
    (tmp_path / layout.MAIN_DB).write_bytes(layout.RESTORE_PLACEHOLDER[:-1])
    assert not is_placeholder(p)


def test_unreadable_is_raised_not_guessed(tmp_path):
    """An OSError other than 'absent'/'a directory' is the caller's to judge (open makes it a
    StorageFault): it must not be read as 'no raft.db', which would let a restore overwrite it."""
    with pytest.raises(FileNotFoundError):
        read_restore_state(str(tmp_path / "missing"))
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    (tmp_path / layout.MAIN_DB).write_bytes(layout.RESTORE_PLACEHOLDER)
    os.chmod(tmp_path / layout.MAIN_DB, 0)
    with pytest.raises(PermissionError):
        read_restore_state(str(tmp_path))


def test_state_is_plain_data():
    st = RestoreState(layout.RESTORE_PLACEHOLDER, (".raft.db.tmp",), ())
    assert st.placeholder and st.interrupted and not st.main_is_database
    assert st.restore_leftovers() == [".raft.db.tmp"]
