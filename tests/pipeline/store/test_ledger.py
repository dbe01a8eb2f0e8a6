"""The ledger on an object store (a real S3-compatible server on 127.0.0.1): one object per commit, read back in
commit order, and recovery that deletes every shard, example and staged sample no commit names."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import OutputConfig
from pipeline.core.storage import open_storage
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
