import json

import pyarrow.parquet as pq
import pytest

from pipeline.inspection.stats import StatsError, shard_stats
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import summarize, write_outputs


def source(sid, status="curated", clips=(), samples=0, stage=None, reason=None):
    rows = [{"key": f"{sid}-{i}", "duration_s": 2.0} for i in range(samples)]
    return {"type": "source", "path": f"/{sid}.mp4", "source_id": sid, "size": 1, "mtime_ns": 1, "duration_s": 10.0,
            "status": status, "stage": stage, "reason": reason, "samples": rows, "errors": [],
            "clips": [{"key": f"{sid}-c{i}", "status": s, "stage": st, "reason": r}
                      for i, (s, st, r) in enumerate(clips)]}


def ledger_with_entries(out):
    ledger = Ledger(out)
    ledger.append(source("bad", "rejected", stage="probe", reason="not_a_video"))
    ledger.append(source("short", "no_clips", stage="shot_cut", reason="no_usable_shots"))
    kept = ("kept", None, None)
    clips = [kept, kept, ("dropped", "quality_filter", "too_dark"), ("failed", "clip_extract", "truncated")]
    ledger.append({"type": "shard", "shard": "shards/train-000000.tar", "nsamples": 2, "bytes": 10, "sha256": "x",
                   "keys": ["ok-0", "ok-1"], "sources": [source("ok", clips=clips, samples=2)]})
    return ledger


def test_funnel_counts_every_unit_once_in_flow_order(tmp_path):
    summary = summarize(ledger_with_entries(tmp_path).read(), [{"reason": "not_found"}])
    steps = {(s["stage"], s["unit"]): s for s in summary["funnel"]}
    assert [s["stage"] for s in summary["funnel"]] == ["input", "probe", "shot_cut", "clip_plan", "clip_extract",
                                                      "quality_filter", "write"]
    assert steps[("input", "sources")] == {"stage": "input", "unit": "sources", "in": 4, "out": 3,
                                           "removed": {"not_found": 1}}
    assert steps[("probe", "sources")]["removed"] == {"not_a_video": 1}
    assert (steps[("clip_plan", "clips")]["in"], steps[("clip_plan", "clips")]["out"]) == (1, 4)
    assert steps[("clip_extract", "clips")]["out"] == 3 and steps[("quality_filter", "clips")]["out"] == 2
    assert summary["samples"] == 2 and summary["funnel"][-1]["out"] == 2


def test_outputs_and_stats_work_on_a_run_that_never_finished(tmp_path):
    ledger_with_entries(tmp_path)  # no run entry: as if the job were still going
    stats = shard_stats(tmp_path)
    assert stats["samples"] == 2 and stats["last_run"] is None
    assert stats["durations_s"]["mean"] == 2.0
    write_outputs(tmp_path, Ledger(tmp_path).read())
    assert json.loads((tmp_path / "index.json").read_text())["total_samples"] == 2
    assert pq.read_table(tmp_path / "manifest.parquet").num_rows == 2


def test_stats_on_a_directory_that_is_not_an_output(tmp_path):
    with pytest.raises(StatsError, match="no ledger.jsonl"):
        shard_stats(tmp_path)
