"""From finished records to committed shards: the worker stages each kept sample and sends a digest, the driver
assembles a source from digests arriving in any order, and whole sources become shards written by tasks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.core.config import OutputConfig
from pipeline.core.record import Record
from pipeline.store.assemble import DIGEST_MAX_BYTES, SampleStager, SourceCollector, record_digest
from pipeline.store.ledger import STAGING_DIR, Ledger
from pipeline.store.shards import InlineTasks, ShardAssembler, read_shard_samples

PROBE = {"duration_s": 12.0, "fps": 24.0, "width": 64, "height": 48}


def clip(source: str, index: int, planned: int, status: str = "kept") -> Record:
    record = Record(kind="clip", source_path=source, key=f"{source[0]}src-{index:07d}", source_id=f"{source}-id",
                    clips_planned=planned,
                    meta={"clip_id": f"{source}-{index}", "source": {"size": 10, "mtime_ns": 5, "probe": PROBE},
                          "span": {"start_s": index, "end_s": index + 1.0},
                          "clip": {"fps": 24.0, "width": 64, "height": 48, "num_frames": 24, "duration_s": 1.0},
                          "timings": {"probe": 0.5}, "warnings": [{"stage": "probe", "message": "odd"}]})
    record.put_bytes("mp4", bytes([index]) * (1000 + index))  # distinct bytes, sizes not multiples of a tar block
    record.blobs["background"] = np.full((4, 4, 3), index, np.uint8)
    record.meta["background"] = {"method": "test"}
    if status == "dropped":
        record.drop_by("quality", "too_dark")
    elif status == "failed":
        record.fail("faces", "exception", "boom")
    return record


def test_a_source_is_handed_back_whole_in_key_order_and_only_digests_reach_the_driver(tmp_path):
    stager = SampleStager(str(tmp_path), "run1", "hash", rejects_per_reason=1)
    collector = SourceCollector()
    records = [clip("a.mp4", i, 5, status) for i, status in
               enumerate(["kept", "dropped", "kept", "failed", "kept"])]
    random.Random(3).shuffle(records)
    light = [stager.finish(r) for r in records]
    for record in light:  # what travels back: no media, a digest well under the bound
        assert record.blobs == {} and len(json.dumps(record.meta)) < 4096
    assemblies = [collector.add(r) for r in light]
    assert assemblies[:4] == [None] * 4 and assemblies[4] is not None
    assembly = assemblies[4]
    entry = assembly.entry("run1")
    keys = [f"asrc-{i:07d}" for i in range(5)]
    assert [c["key"] for c in entry["clips"]] == keys
    assert [c["status"] for c in entry["clips"]] == ["kept", "dropped", "kept", "failed", "kept"]
    assert [row["key"] for row in entry["samples"]] == [keys[0], keys[2], keys[4]]
    assert entry["errors"] == [{"source": "a.mp4", "key": keys[3], "stage": "faces", "reason": "exception",
                                "message": "boom"}]
    assert entry["timings"] == {"probe": 2.5} and entry["warnings"] == [{"stage": "probe", "message": "odd"}]
    assert (entry["status"], entry["duration_s"], entry["run"]) == ("curated", 12.0, "run1")

    # Each kept sample was written by the worker, as a one-sample tar under the staging area.
    staged = assembly.staged_samples()
    assert [k for k, _ in staged] == [keys[0], keys[2], keys[4]]
    for key, part in staged:
        assert part["rel"] == f"{STAGING_DIR}/run1/{key}.tar" and (tmp_path / part["rel"]).is_file()
        sample = read_shard_samples(tmp_path / part["rel"])[key]
        assert set(sample) == {"__key__", "mp4", "json", "bg.png"}
        assert part["bytes"] == sum(len(v) for k, v in sample.items() if k != "__key__")
    # The dropped clip was staged as an example (rejects_per_reason=1), not as a sample; with no sampler on this
    # collector the driver keeps none of them (the run deletes the staging area at its end).
    assert (tmp_path / STAGING_DIR / "run1" / f"{keys[1]}.tar").is_file() and assembly.staged_rejects() == []

    # The driver groups whole sources into a shard; a task (here: inline) assembles it and deletes the staged files.
    ledger = Ledger(tmp_path)
    shards = ShardAssembler(tmp_path, OutputConfig(), ledger, 0, InlineTasks())
    shards.add_source(entry, staged)
    assert shards.poll() == []  # nothing dispatched yet: the group stays open for more sources
    shards.close()
    state = ledger.read()
    assert list(state.shards) == ["shards/train-000000.tar"] and state.sources["a.mp4-id"]["samples"][0]["shard"] == \
        "shards/train-000000.tar"
    written = read_shard_samples(tmp_path / "shards" / "train-000000.tar")
    assert list(written) == [keys[0], keys[2], keys[4]]
    assert written[keys[2]]["mp4"] == bytes([2]) * 1002
    assert state.shards["shards/train-000000.tar"]["written_by"]["pid"] > 0
    assert not any((tmp_path / part["rel"]).exists() for _, part in staged)
    assert collector.incomplete() == {}


def test_sources_interleave_and_a_source_record_is_whole_at_once(tmp_path):
    stager = SampleStager(str(tmp_path), "r", "hash", 0)
    collector = SourceCollector()
    rejected = Record(kind="source", source_path="c.mp4", source_id="c-id", meta={"source": {"size": 1}})
    rejected.fail("probe", "unreadable", "c.mp4: cannot read")
    assert collector.add(stager.finish(clip("a.mp4", 0, 2))) is None
    assert collector.add(stager.finish(clip("b.mp4", 0, 2))) is None
    whole = collector.add(stager.finish(rejected))
    assert whole.entry("r")["status"] == "rejected" and whole.staged_samples() == []
    assert collector.add(stager.finish(clip("a.mp4", 0, 2))) is None  # the same clip delivered twice counts once
    assert set(collector.incomplete()) == {"a.mp4", "b.mp4"}
    assert collector.incomplete()["a.mp4"].arrived == 1
    done = collector.add(stager.finish(clip("b.mp4", 1, 2)))
    assert done.entry("r")["path"] == "b.mp4" and [k for k, _ in done.staged_samples()] == ["bsrc-0000000",
                                                                                            "bsrc-0000001"]
    assert set(collector.incomplete()) == {"a.mp4"}


def test_a_source_larger_than_a_shard_commits_in_one_group_of_several_shards(tmp_path):
    stager = SampleStager(str(tmp_path), "r", "hash", 0)
    collector = SourceCollector()
    for i in range(5):
        assembly = collector.add(stager.finish(clip("a.mp4", i, 5)))
    small = OutputConfig(shard_max_samples=2)
    ledger = Ledger(tmp_path)
    shards = ShardAssembler(tmp_path, small, ledger, 0, InlineTasks())
    shards.add_source(assembly.entry("r"), assembly.staged_samples())
    shards.close()
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [(e["shard"], e["nsamples"], len(e["sources"])) for e in lines] == [
        ("shards/train-000000.tar", 2, 0), ("shards/train-000001.tar", 2, 0), ("shards/train-000002.tar", 1, 1)]


def test_a_digest_stays_under_its_bound_however_much_a_stage_wrote():
    record = clip("a.mp4", 0, 1)
    for i in range(5000):
        record.warn("faces", f"warning {i} " + "x" * 500)
    record.fail("faces", "exception", "y" * 200_000)
    digest = record_digest(record)
    assert len(json.dumps(digest)) <= DIGEST_MAX_BYTES
    assert digest["warnings"][-1]["message"] == "4981 more warnings cut"
    assert digest["errors"][0]["message"] == "y" * 1000


def test_a_failed_shard_write_leaves_its_sources_uncommitted(tmp_path):
    stager = SampleStager(str(tmp_path), "r", "hash", 0)
    collector = SourceCollector()
    assembly = collector.add(stager.finish(clip("a.mp4", 0, 1)))
    (tmp_path / STAGING_DIR / "r" / "asrc-0000000.tar").unlink()  # the staged sample is gone
    failures = []
    ledger = Ledger(tmp_path)
    shards = ShardAssembler(tmp_path, OutputConfig(), ledger, 0, InlineTasks(),
                            on_failure=lambda sources, exc: failures.append((sources, exc)))
    shards.add_source(assembly.entry("r"), assembly.staged_samples())
    shards.close()
    assert len(failures) == 1 and failures[0][0][0]["path"] == "a.mp4"
    assert ledger.read().sources == {} and not (tmp_path / "shards" / "train-000000.tar").exists()
    with pytest.raises(FileNotFoundError):
        read_shard_samples(tmp_path / STAGING_DIR / "r" / "asrc-0000000.tar")


def test_assembling_a_shard_again_gives_the_same_bytes_until_the_commit_removes_the_staged_samples(tmp_path):
    """A task retried after its worker died mid-write rewrites the same shard: the staged samples stay until the
    driver commits."""
    from pipeline.store.shards import assemble_shard

    stager = SampleStager(str(tmp_path), "r", "hash", 0)
    collector = SourceCollector()
    for i in range(3):
        assembly = collector.add(stager.finish(clip("a.mp4", i, 3)))
    parts = [part["rel"] for _, part in assembly.staged_samples()]
    first = assemble_shard(str(tmp_path), "shards/train-000000.tar", parts)
    again = assemble_shard(str(tmp_path), "shards/train-000000.tar", parts)
    assert first["sha256"] == again["sha256"] and first["keys"] == again["keys"]
    assert all((tmp_path / part).is_file() for part in parts)
