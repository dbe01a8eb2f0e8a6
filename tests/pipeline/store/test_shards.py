"""Crash safety of the shard writer + ledger: die at every commit point, recover, finish, compare."""

import json

import pytest
import webdataset as wds

from pipeline.core.config import OutputConfig
from pipeline.core.files import file_sha256
from pipeline.store.ledger import SPOOL_DIR, STAGING_DIR, Ledger
from pipeline.store.outputs import write_outputs
from pipeline.store.shards import ShardSink

# Sources with 0..5 samples; with 3 samples per shard, "e" alone overfills a shard.
SOURCES = {"a": 2, "b": 0, "c": 3, "d": 1, "e": 5, "f": 2, "g": 1}


class Died(Exception):
    pass


class DyingLedger(Ledger):
    """Stops the "process" right before its n-th append, as a kill would."""

    def __init__(self, out_dir, appends_left):
        super().__init__(out_dir)
        self.appends_left = appends_left

    def append(self, entry):
        if self.appends_left == 0:
            raise Died()
        self.appends_left -= 1
        super().append(entry)


def source(name, count):
    keys = [f"{name}{i}" for i in range(count)]
    rows = [{"key": k, "shard": None, "duration_s": 1.0} for k in keys]
    entry = {"type": "source", "path": f"/v/{name}.mp4", "source_id": name, "size": 1, "mtime_ns": 1,
             "status": "curated", "samples": rows, "clips": [{"key": k, "status": "kept"} for k in keys],
             "errors": [], "duration_s": 1.0}
    samples = [{"__key__": k, "mp4": f"video-{k}".encode() * 50, "json": json.dumps({"key": k}).encode()} for k in keys]
    return entry, samples


def run(out, ledger):
    state = ledger.recover()
    sink = ShardSink(out, OutputConfig(shard_max_samples=3), ledger, state)
    for name, count in SOURCES.items():
        if name not in state.sources:
            sink.add_source(*source(name, count))
    sink.close()


def shard_keys(out):
    keys = []
    for shard in sorted((out / "shards").glob("*.tar")):
        keys += [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]
    return keys


EXPECTED = sorted(f"{n}{i}" for n, c in SOURCES.items() for i in range(c))


def count_appends(tmp_path):
    out = tmp_path / "count"
    run(out, Ledger(out))
    return len((out / "ledger.jsonl").read_text().splitlines())


def test_uninterrupted_run_writes_every_sample_once(tmp_path):
    out = tmp_path / "out"
    run(out, Ledger(out))
    assert sorted(shard_keys(out)) == EXPECTED
    state = Ledger(out).read()
    assert set(state.sources) == set(SOURCES)
    # A source never straddles a shard boundary unless it alone overfills one.
    for entry in state.sources.values():
        shards = {s["shard"] for s in entry["samples"]}
        assert len(shards) <= 1 or len(entry["samples"]) > 3
    for name, shard in state.shards.items():
        assert shard["sha256"] == file_sha256(out / name)


# The abandoned writer of a "dead" run is garbage-collected with its tar still open; that noise is expected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_killed_at_any_commit_point_then_rerun_gives_the_same_samples(tmp_path):
    total = count_appends(tmp_path)
    assert total >= 5
    for die_at in range(total):
        out = tmp_path / f"out{die_at}"
        with pytest.raises(Died):
            run(out, DyingLedger(out, die_at))
        run(out, Ledger(out))
        keys = shard_keys(out)
        assert sorted(keys) == EXPECTED, f"died before append {die_at}: duplicates or losses"
        assert not list((out / "shards").glob("*.tmp"))
        summary = write_outputs(out, Ledger(out).read())
        index = json.loads((out / "index.json").read_text())
        assert index["total_samples"] == len(EXPECTED) == summary["samples"]
        assert {e["url"] for e in index["shardlist"]} == {f"shards/{p.name}" for p in (out / "shards").glob("*.tar")}


def test_torn_last_ledger_line_is_ignored_and_repaired(tmp_path):
    out = tmp_path / "out"
    run(out, Ledger(out))
    ledger_path = out / "ledger.jsonl"
    ledger_path.write_text(ledger_path.read_text() + '{"type": "source", "sou')
    state = Ledger(out).recover()
    assert set(state.sources) == set(SOURCES)
    assert ledger_path.read_text().endswith("\n")
    Ledger(out).append({"type": "run", "wall_s": 1})
    assert len(Ledger(out).read().runs) == 1


def test_recovery_removes_staged_samples_of_sources_a_crash_left_in_flight(tmp_path):
    out = tmp_path / "out"
    run(out, Ledger(out))
    for scratch in (STAGING_DIR + "/run1", SPOOL_DIR):  # this release's staging, and an earlier release's spool
        (out / scratch).mkdir(parents=True)
        (out / scratch / "00000001.tar").write_bytes(b"half a source")
    state = Ledger(out).recover()
    assert not (out / STAGING_DIR).exists() and not (out / SPOOL_DIR).exists()
    assert set(state.sources) == set(SOURCES)  # committed work is untouched
