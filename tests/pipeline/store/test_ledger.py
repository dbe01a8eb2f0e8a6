"""The ledger on an object store (a real S3-compatible server on 127.0.0.1): one object per commit, read back in
commit order, and recovery that deletes every shard, example and staged sample no commit names."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import OutputConfig
from pipeline.core.storage import UnsafeFile, open_storage
from pipeline.store.ledger import Ledger
from pipeline.store.shards import InlineTasks, ShardAssembler, stage_sample


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket("ledger-test")
    return s3_server


def test_commits_are_objects_in_commit_order_and_recovery_removes_what_none_names(s3):
    out = "s3://ledger-test/out"
    store = open_storage(out)
    ledger = Ledger(out)
    assert not ledger.exists() and ledger.name == "ledger/"
    staged = [(f"k{i}", stage_sample(out, "run1", {"__key__": f"k{i}", "json": b"{}", "mp4": b"v" * 100}))
              for i in range(3)]
    entry = {"type": "source", "path": "s3://videos/a.mp4", "source_id": "a" * 64, "size": 1, "mtime_ns": 2,
             "samples": [{"key": f"k{i}", "shard": None} for i in range(3)], "clips": [], "errors": []}
    shards = ShardAssembler(out, OutputConfig(shard_max_samples=2), ledger, 0, InlineTasks())
    shards.add_source(entry, staged)
    shards.close()
    ledger.append_many([{"type": "source", "path": "s3://videos/b.mp4", "source_id": "b" * 64, "size": 1,
                         "mtime_ns": 2, "samples": [], "clips": [], "errors": []}])
    segments = sorted(e.rel for e in store.list("ledger"))
    assert segments == ["ledger/000000000000.jsonl", "ledger/000000000001.jsonl"]
    # One commit, one object: both shard lines of the source larger than a shard, the last carrying the source.
    lines = [json.loads(line) for line in store.read_text(segments[0]).splitlines()]
    assert [(e["shard"], len(e["sources"])) for e in lines] == [("shards/train-000000.tar", 0),
                                                                ("shards/train-000001.tar", 1)]
    # A fresh reader (another process) sees the same state and numbers its next commit after the last one; an
    # object under ledger/ that is not a numbered commit is not ours and is ignored.
    store.write_text("ledger/notes.jsonl", '{"type": "source", "source_id": "stray"}')
    state = Ledger(out).read()
    assert set(state.sources) == {"a" * 64, "b" * 64} and len(state.shards) == 2
    # Debris of a crash: a shard published but never committed, an example without its line, staged samples.
    store.write_bytes("shards/train-000002.tar", b"uncommitted")
    store.write_bytes("rejects/rejects-000000.tar", b"uncommitted")
    stage_sample(out, "run2", {"__key__": "k9", "json": b"{}"})
    state = Ledger(out).recover()
    assert sorted(e.rel for e in store.list()) == [*segments, "ledger/notes.jsonl", "shards/train-000000.tar",
                                                   "shards/train-000001.tar"]
    again = Ledger(out)
    again.append({"type": "run", "wall_s": 1})
    assert "ledger/000000000002.jsonl" in {e.rel for e in store.list("ledger")}
    assert len(Ledger(out).read().runs) == 1


def test_a_ledger_that_is_a_link_to_a_device_is_refused_not_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").symlink_to("/dev/zero")  # read until memory runs out, before
    with pytest.raises(UnsafeFile, match="ledger.jsonl is a symbolic link"):
        Ledger(out).read()
    with pytest.raises(UnsafeFile):
        Ledger(out).append({"type": "run"})  # and never appended to through the link


def test_recovery_deletes_nothing_through_a_linked_shards_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train-000000.tar").write_bytes(b"someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").symlink_to(elsewhere)
    Ledger(out).append({"type": "run"})
    with pytest.raises(UnsafeFile, match="shards is a symbolic link"):
        Ledger(out).recover()  # it would delete every file there that no commit names
    assert (elsewhere / "train-000000.tar").read_bytes() == b"someone else's file"


def test_over_long_and_malformed_ledger_lines_are_left_out(tmp_path, caplog, monkeypatch):
    from pipeline.core.untrusted import read_limits

    out = tmp_path / "out"
    Ledger(out).append({"type": "source", "source_id": "s1", "path": "/v/a.mp4", "samples": []})
    with open(out / "ledger.jsonl", "a") as f:
        f.write('{"type": "source", "source_id": "' + "x" * 3_000_000 + '"}\n')
        f.write('{"type": "shard", "shard": ["not", "a", "path"], "keys": 5}\n')
        f.write('{"type": "source", "source_id": "s2", "path": "/v/b.mp4", "samples": []}\n')
    monkeypatch.setenv("S2V_LIMIT_MAX_JSON_MB", "1")
    read_limits.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            state = Ledger(out).read()
    finally:
        read_limits.cache_clear()
    assert sorted(state.sources) == ["s1", "s2"] and not state.shards
    assert "a line over 1048576 bytes left out" in caplog.text and "1 lines are not ledger entries" in caplog.text
