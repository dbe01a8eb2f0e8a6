import threading

import numpy as np

from pipeline.core.config import build_config
from pipeline.core.record import Record, records_to_table, table_to_records
from pipeline.core.stage import ABANDONED, FanOutStage, Stage, run_stage, run_stages


class Halver(Stage):
    name = "halver"

    def process(self, records):
        for r in records:
            if r.meta["n"] == 3:
                raise ValueError("three is bad")
            r.meta["half"] = r.meta["n"] / 2
        return records


def test_a_raising_record_is_isolated_and_the_rest_processed():
    records = [Record(kind="clip", source_path=f"{i}.mp4", key=str(i), meta={"n": i}) for i in range(5)]
    records[0].fail("earlier", "broken", "failed before")
    out = {r.key: r for r in run_stage(Halver(build_config()), records)}
    assert len(out) == 5
    assert out["0"].errors == [{"stage": "earlier", "reason": "broken", "message": "failed before"}]
    assert "half" not in out["0"].meta  # dead records are passed through untouched
    assert out["3"].errors[0]["stage"] == "halver" and "three is bad" in out["3"].errors[0]["message"]
    assert [out[k].meta["half"] for k in "124"] == [0.5, 1.0, 2.0]
    assert "halver" in out["1"].meta["timings"]


class Appender(Stage):
    """Appends to each record as it goes, and raises at the bad one: the records before it are already changed."""

    name = "appender"

    def process(self, records):
        for r in records:
            r.meta.setdefault("seen", []).append(self.name)
            if r.meta["n"] == 3:
                raise ValueError("three is bad")
        return records


def test_a_failed_batch_is_retried_from_its_records_as_they_came_in():
    records = [Record(kind="clip", source_path=f"{i}.mp4", key=str(i), meta={"n": i}) for i in range(5)]
    out = {r.key: r for r in run_stage(Appender(build_config()), records)}
    # Records 0-2 went through the failed batch call and their retry: each shows one pass, not two.
    assert [out[k].meta["seen"] for k in "0124"] == [["appender"]] * 4
    assert out["3"].errors[0]["stage"] == "appender" and not out["3"].alive


def test_records_roundtrip_through_arrow_with_blobs():
    record = Record(kind="clip", source_path="a.mp4", key="k1", source_id="abc", clips_planned=3, meta={"x": [1, 2]})
    record.put_bytes("mp4", b"\x00\x01binary")
    record.blobs["keyframes"] = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    record.drop_by("f", "why")
    [back] = table_to_records(records_to_table([record]))
    assert back.get_bytes("mp4") == b"\x00\x01binary"
    np.testing.assert_array_equal(back.blobs["keyframes"], record.blobs["keyframes"])
    assert (back.key, back.source_id, back.clips_planned, back.meta, back.drop) == (
        "k1", "abc", 3, {"x": [1, 2]}, record.drop
    )


RELEASE = threading.Event()  # ends a hung stream once its test is done, so no thread outlives the test


class Splitter(FanOutStage):
    """Splits a record into meta["parts"] parts and finishes them in order; `log` records the order of events."""

    name = "splitter"

    def __init__(self, config, log, fail_at=None, hang_at=None):
        super().__init__(config)
        self.log, self.fail_at, self.hang_at = log, fail_at, hang_at

    def split(self, record):
        return [Record(kind="clip", source_path=record.source_path, key=f"{record.key}-{i}",
                       clips_planned=record.meta["parts"], meta={"n": i}) for i in range(record.meta["parts"])]

    def stream(self, record, parts):
        for part in parts:
            if part.meta["n"] == self.fail_at:
                raise RuntimeError("decoder blew up")
            if part.meta["n"] == self.hang_at:
                RELEASE.wait(30)
            self.log.append(f"made {part.key}")
            yield part


class Logger(Stage):
    name = "logger"

    def __init__(self, config, log):
        super().__init__(config)
        self.log = log

    def process(self, records):
        self.log.extend(f"saw {r.key}" for r in records)
        return records


def test_a_fan_out_hands_each_part_down_the_flow_before_making_the_next():
    log: list[str] = []
    config = build_config()
    source = Record(kind="source", source_path="a.mp4", key="a", meta={"parts": 3})
    batches = list(run_stages([Splitter(config, log), Logger(config, log)], [source]))
    assert [[r.key for r in batch] for batch in batches] == [["a-0"], ["a-1"], ["a-2"]]
    # A worker holds one part at a time: each is through the rest of the flow before the next is made.
    assert log == ["made a-0", "saw a-0", "made a-1", "saw a-1", "made a-2", "saw a-2"]
    assert all("splitter" in r.meta["timings"] for batch in batches for r in batch)


def test_a_fan_out_that_breaks_midway_fails_the_parts_it_did_not_finish():
    log: list[str] = []
    config = build_config()
    source = Record(kind="source", source_path="a.mp4", key="a", meta={"parts": 4})
    out = [r for batch in run_stages([Splitter(config, log, fail_at=2), Logger(config, log)], [source]) for r in batch]
    assert [r.key for r in out] == ["a-0", "a-1", "a-2", "a-3"]  # every planned part comes out, once
    assert [r.alive for r in out] == [True, True, False, False]
    assert {r.errors[0]["reason"] for r in out[2:]} == {"exception"}
    assert "decoder blew up" in out[3].errors[0]["message"]
    assert log == ["made a-0", "saw a-0", "made a-1", "saw a-1"]  # failed parts are not processed downstream


def test_a_fan_out_that_hangs_times_out_the_unfinished_parts_and_a_dead_record_passes_through():
    log: list[str] = []
    config = build_config()
    dead = Record(kind="source", source_path="b.mp4", key="b", meta={"parts": 2})
    dead.drop_by("shot_cut", "no_usable_shots")
    source = Record(kind="source", source_path="a.mp4", key="a", meta={"parts": 3})
    stages = [Splitter(config, log, hang_at=1), Logger(config, log)]
    try:
        out = [r for batch in run_stages(stages, [dead, source], timeout_s=0.5) for r in batch]
    finally:
        RELEASE.set()
        for thread in ABANDONED:
            thread.join(timeout=10)
        ABANDONED.clear()  # else a later in-process StageWorker would think it must replace its process
    assert [r.key for r in out] == ["b", "a-0", "a-1", "a-2"]
    assert out[0] is dead and out[0].drop == {"stage": "shot_cut", "reason": "no_usable_shots"}
    assert out[1].alive and [r.errors[0]["reason"] for r in out[2:]] == ["timeout", "timeout"]
    # What the abandoned call made after its deadline (once released) went nowhere.
    assert [entry for entry in log if entry.startswith("saw")] == ["saw a-0"]


class NeedsKeyframes(Stage):
    """Requires keyframes; fails the record named "bad" itself; notes which records it saw."""

    name = "needs_keyframes"
    requires = ("keyframes",)
    description = "made by hand, v1"

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def process(self, records):
        for record in records:
            self.seen.append(record.key)
            if record.key == "bad":
                record.fail(self.name, "bad", "refused")
        return records


def keyframed(key, frames=...):
    record = Record(kind="clip", source_path="a.mp4", key=key)
    if frames is ...:
        frames = np.zeros((2, 8, 8, 3), np.uint8)
    if frames is not None:
        record.blobs["keyframes"] = frames
    return record


def test_a_record_without_a_required_input_fails_before_the_stage_sees_it_and_keeps_its_place():
    stage = NeedsKeyframes(build_config())
    records = [keyframed("a"), keyframed("none", None), keyframed("gray", np.zeros((2, 8, 8), np.uint8)),
               keyframed("empty", np.zeros((0, 8, 8, 3), np.uint8)), keyframed("b")]
    out = run_stage(stage, records)
    assert stage.seen == ["a", "b"]
    assert [r.key for r in out] == ["a", "none", "gray", "empty", "b"]
    assert [r.errors[0]["reason"] if r.errors else None for r in out] == [None, "no_keyframes", "no_keyframes",
                                                                           "no_keyframes", None]
    assert out[1].errors[0]["message"] == ("needs_keyframes needs uint8 (K, H, W, 3) keyframes, K >= 1; "
                                           "the record has none")
    assert "(2, 8, 8)" in out[2].errors[0]["message"]


def test_the_contract_records_provenance_on_the_records_the_stage_passed_on():
    stage = NeedsKeyframes(build_config())
    out = run_stage(stage, [keyframed("a"), keyframed("bad"), keyframed("none", None)])
    assert out[0].meta["provenance"] == {"needs_keyframes": "made by hand, v1"}
    assert "provenance" not in out[1].meta and "provenance" not in out[2].meta


def test_a_stage_can_say_per_record_what_made_its_output():
    class PerRecord(NeedsKeyframes):
        def provenance_of(self, record):
            return None if record.key == "quiet" else f"for {record.key}"

    out = run_stage(PerRecord(build_config()), [keyframed("a"), keyframed("quiet")])
    assert out[0].meta["provenance"] == {"needs_keyframes": "for a"} and "provenance" not in out[1].meta
