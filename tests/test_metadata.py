"""RaftMetadataStore rules, each checked after a reopen."""

import pytest

from raft_sqlite import LogEntry, MetadataError
from tests.conftest import open_store


def test_defaults(store):
    md = store.metadata("g")
    assert (md.current_term, md.voted_for, md.commit_index) == (0, None, 0)
    assert md.hard_state == (0, None, 0)


def test_term_and_vote_rules_survive_reopen(data_dir):
    with open_store(data_dir) as s:
        md = s.metadata("g")
        md.set_term_and_vote(1)
        md.set_term_and_vote(1, "n2")  # first vote in term 1
        md.set_term_and_vote(1, "n2")  # repeating it is a no-op
        with pytest.raises(MetadataError, match="already voted"):
            md.set_term_and_vote(1, "n3")
        with pytest.raises(MetadataError, match="already voted"):
            md.set_term_and_vote(1, None)  # cannot clear it either
    with open_store(data_dir) as s:
        md = s.metadata("g")
        assert md.hard_state == (1, "n2", 0)
        with pytest.raises(MetadataError, match="may not decrease"):
            md.set_term_and_vote(0, None)
        with pytest.raises(MetadataError):
            md.set_term_and_vote(1, "n3")
        md.set_term_and_vote(5, None)  # a new term clears the vote
        md.set_term_and_vote(5, 3)  # int node ids are kept as ints
    with open_store(data_dir) as s:
        assert s.metadata("g").hard_state == (5, 3, 0)
        with pytest.raises(MetadataError):
            s.metadata("g").set_term_and_vote(5, "3")  # "3" is not the vote 3


def test_commit_index_rules_survive_reopen(data_dir):
    with open_store(data_dir) as s:
        md, lg = s.metadata("g"), s.log("g")
        with pytest.raises(MetadataError, match="beyond the last index"):
            md.set_commit_index(1)
        lg.append([LogEntry(i, 1, b"x") for i in range(1, 4)])
        md.set_commit_index(2)
        md.set_commit_index(2)
        with pytest.raises(MetadataError, match="may not decrease"):
            md.set_commit_index(1)
    with open_store(data_dir) as s:
        assert s.metadata("g").commit_index == 2
        s.metadata("g").set_commit_index(3)
    with open_store(data_dir) as s:
        assert s.metadata("g").commit_index == 3


@pytest.mark.parametrize("call", [
    lambda md: md.set_term_and_vote("1"),
    lambda md: md.set_term_and_vote(1.5),
    lambda md: md.set_term_and_vote(1, 2.5),
    lambda md: md.set_term_and_vote(1, b"bytes"),
    lambda md: md.set_commit_index(None),
])
def test_wrong_types(data_dir, call):
    with open_store(data_dir) as s, pytest.raises(TypeError):
        call(s.metadata("g"))
    with open_store(data_dir) as s:
        assert s.metadata("g").hard_state == (0, None, 0)


def test_metadata_crc_checked_on_open(data_dir):
    import apsw

    from raft_sqlite import CorruptionError
    with open_store(data_dir) as s:
        s.metadata("g").set_term_and_vote(3, "n1")
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("UPDATE raft_meta SET current_term=2")
    c.close()
    with pytest.raises(CorruptionError, match="metadata"):
        open_store(data_dir)
