import numpy as np

from pipeline.config import build_config
from pipeline.record import Record, records_to_table, table_to_records
from pipeline.stage import Stage, run_stage


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


def test_records_roundtrip_through_arrow_with_blobs():
    record = Record(kind="clip", source_path="a.mp4", key="k1", source_id="abc", clips_planned=3, meta={"x": [1, 2]})
    record.put_bytes("mp4", b"\x00\x01binary")
    record.blobs["keyframes"] = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    record.drop_by("f", "why")
    [back] = table_to_records(records_to_table([record]))
    assert back.get_bytes("mp4") == b"\x00\x01binary"
    np.testing.assert_array_equal(back.blobs["keyframes"], record.blobs["keyframes"])
    assert (back.key, back.source_id, back.clips_planned, back.meta, back.drop) == ("k1", "abc", 3, {"x": [1, 2]}, record.drop)
