"""Assembling sources on the driver: records arrive in any order, kept clips are spooled to disk as they come, and
a source's entry and samples come out in key order once all of its clips are in."""

from __future__ import annotations

import random
import tarfile

import numpy as np

from pipeline.core.record import Record
from pipeline.store.assemble import SourceCollector

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


def test_a_source_is_handed_back_whole_in_key_order_whatever_order_its_clips_arrive(tmp_path):
    collector = SourceCollector(tmp_path / "spool", "hash")
    records = [clip("a.mp4", i, 5, status) for i, status in
               enumerate(["kept", "dropped", "kept", "failed", "kept"])]
    random.Random(3).shuffle(records)
    assemblies = [collector.add(r) for r in records]
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

    samples = assembly.samples
    assert len(samples) == 3 and assembly.samples.path.is_file()
    assert samples.nbytes == sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
    read = list(samples)
    assert [s["__key__"] for s in read] == [keys[0], keys[2], keys[4]]
    for sample, index in zip(read, (0, 2, 4)):
        assert sample["mp4"] == bytes([index]) * (1000 + index)
        assert set(sample) == {"__key__", "mp4", "json", "bg.png"}
    # The spool is a plain tar of the samples' files, and goes once the source is handed on.
    with tarfile.open(samples.path) as tar:
        assert len(tar.getnames()) == 9
    samples.discard()
    assert not samples.path.exists()
    assert collector.incomplete() == {}


def test_sources_interleave_and_a_source_record_is_whole_at_once(tmp_path):
    collector = SourceCollector(tmp_path / "spool", "hash")
    rejected = Record(kind="source", source_path="c.mp4", source_id="c-id", meta={"source": {"size": 1}})
    rejected.fail("probe", "unreadable", "c.mp4: cannot read")
    assert collector.add(clip("a.mp4", 0, 2)) is None
    assert collector.add(clip("b.mp4", 0, 2)) is None
    whole = collector.add(rejected)
    assert whole.entry("r")["status"] == "rejected" and len(whole.samples) == 0
    assert collector.add(clip("a.mp4", 0, 2)) is None  # the same clip delivered twice counts once
    assert set(collector.incomplete()) == {"a.mp4", "b.mp4"}
    assert collector.incomplete()["a.mp4"].arrived == 1
    done = collector.add(clip("b.mp4", 1, 2))
    assert (done.entry("r")["path"] == "b.mp4"
            and [s["__key__"] for s in done.samples] == ["bsrc-0000000", "bsrc-0000001"])
    assert set(collector.incomplete()) == {"a.mp4"}
