"""`s2v shards stats`: numbers of a real curated run checked against its shards and manifest; partial, empty and
several output directories; data-quality metrics of any layout.

The synthetic runs are committed the way a real one is (ShardSink + ledger, real PNGs; pipeline.testing.synthetic_runs'
builder), with detections, categories and metrics added to KEY.json; only the mp4 members are placeholder bytes,
which the statistics never open.
"""

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from click.testing import CliRunner
from rich.console import Console

from pipeline.inspection.stats import StatsError, combined_stats, load_run, print_stats, shard_stats
from pipeline.store.ledger import Ledger
from pipeline.testing.synthetic_runs import CLIPS_PER_SOURCE, synthetic_run, write_config


def terminal(summary: dict) -> str:
    console = Console(record=True, width=160, file=io.StringIO())
    print_stats(summary, console)
    return console.export_text()


# ---------------------------------------------------------------------------------------------------------------


def test_stats_of_a_curated_run_agree_with_its_shards_and_manifest(curated_out):
    stats = shard_stats(curated_out)
    index = json.loads((curated_out / "index.json").read_text())
    urls = [str(curated_out / s["url"]) for s in index["shardlist"]]
    own = [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False) if not s["__key__"].endswith("-x")]
    manifest = [r for r in pq.read_table(curated_out / "manifest.parquet").to_pylist() if not r["cross_base"]]
    assert stats["samples"] == stats["content"]["samples_read"] == len(own) == len(manifest) > 0

    content = stats["content"]
    assert content["per_sample"]["entities"] == {str(n): c for n, c in sorted(Counter(len(m["entities"])
                                                                                      for m in own).items())}
    assert sum(content["kinds"].values()) == sum(r["entities"] for r in manifest)
    refs = [r for m in own for e in m["entities"] for r in e.get("references") or []]
    assert sum(content["categories_with_references"].values()) == sum(
        1 for m in own for e in m["entities"] if e.get("references"))
    assert stats["faces"]["count"] == sum(r["faces"] for r in manifest)
    assert stats["faces"]["frontal"] == sum(r["frontal_faces"] for r in manifest)
    assert stats["clip_shapes"]["resolutions"] == dict(Counter(f"{r['width']}x{r['height']}" for r in manifest))

    config = yaml.safe_load((curated_out / "config.yaml").read_text())
    ratio = config["references"]["ratio"]
    mix = {m["variant"]: m for m in stats["variant_mix"]}
    assert {v: pytest.approx(m["configured"]) for v, m in mix.items()} == {
        v: r / sum(ratio.values()) for v, r in ratio.items()}
    assert sum(m["made"] for m in mix.values()) == len(refs) > 0
    assert {v: m["made"] for v, m in mix.items() if m["made"]} == dict(Counter(r["variant"] for r in refs))
    assert stats["cross_share"]["configured"] == config["cross_pairs"]["share"]
    assert stats["thresholds"]["quality"] == config["filters"]["quality"]

    run = stats["last_run"]
    total = stats["throughput"]["total"]
    assert total["clips_per_s"] == pytest.approx(sum(r["clips"] for r in stats["runs"])
                                                 / sum(r["wall_s"] for r in stats["runs"]))
    if len(stats["runs"]) == 1:
        assert total["video_hours_per_day_per_core"] == pytest.approx(run["video_hours_per_day_per_core"])
    assert stats["problems"] == [] and stats["uncommitted_shards"] == []

    text = terminal(stats)
    for title in ("Funnel", "Reference variants", "configured ratio", "Counts per sample", "Top categories",
                  "Throughput", "Clip durations", "Data-quality metrics", "references.background_similarity"):
        assert title in text, title
    top = next(iter(content["categories"]))
    assert top in text


def test_a_curated_run_writes_data_quality_metrics_for_every_reference(curated_out):
    """The quickstart recipe (dlib faces, no CLIP) measures face identity and background decoupling per
    reference into KEY.json stats.metrics, and the statistics pool them."""
    index = json.loads((curated_out / "index.json").read_text())
    samples = [json.loads(s["json"]) for s in wds.WebDataset([str(curated_out / s["url"]) for s in index["shardlist"]],
                                                             shardshuffle=False)]
    own = [m for m in samples if "cross_pair" not in m]
    measured = Counter()
    for meta in samples:
        metrics = meta["stats"]["metrics"]
        refs = [r for e in meta["entities"] for r in e.get("references") or []]
        assert [r["file"] for r in metrics["references"]] == [r["file"] for r in refs]
        assert metrics["backends"] == {"face": "dlib ResNet face descriptor (128-d)", "clip_i": None,
                                       "dino_i": None, "background": "hsv-histogram-correlation"}
        assert "caption_alignment" not in metrics  # no clip_score.model in the quickstart
        assert ("replaced" in metrics) == ("cross_pair" in meta)
        subjects = {e["id"] for e in meta["entities"] if e["kind"] == "subject"}
        for entry in metrics["references"]:
            assert ("face_cosine" in entry) == (entry["entity"] in subjects)
            if entry.get("cross"):
                continue
            assert -1 <= entry["background_similarity"] <= 1
            measured["background"] += 1
            if entry.get("face_cosine") is not None:
                measured["face"] += 1
                assert entry["face_copy_paste"] == (entry["face_cosine"] > 0.98)
        assert metrics["flags"] == sorted({k for r in metrics["references"] for k, v in r.items() if v is True})
    assert measured["background"] > 0 and measured["face"] > 0
    stats = shard_stats(curated_out)["metrics"]
    assert stats["values"]["references.background_similarity"]["count"] == sum(
        1 for m in own for r in m["stats"]["metrics"]["references"])
    flagged = sum(1 for m in own if "face_copy_paste" in m["stats"]["metrics"]["flags"])
    assert stats["samples_flagged"].get("face_copy_paste", {"true": 0})["true"] == flagged


def test_partial_run_counts_only_committed_shards(tmp_path):
    out = synthetic_run(tmp_path / "run", range(4), shard_max_samples=CLIPS_PER_SOURCE, finished=False)
    assert shard_stats(out)["samples"] == 20
    # The job is still writing its fourth shard: its ledger line is not there yet (a torn start of it is), and the
    # shard is still under its .tmp name.
    lines = (out / "ledger.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    (out / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    (out / last["shard"]).rename(out / (last["shard"] + ".tmp"))

    stats = shard_stats(out)
    assert stats["samples"] == stats["content"]["samples_read"] == 15 and stats["shards"] == 3
    assert stats["uncommitted_shards"] == [Path(last["shard"]).name + ".tmp"]
    assert stats["last_run"] is None and stats["throughput"]["runs"] == []
    text = terminal(stats)
    assert "no finished run yet" in text and "being written" in text


def test_a_committed_shard_that_cannot_be_read_is_reported_not_fatal(tmp_path):
    out = synthetic_run(tmp_path / "run", range(2), shard_max_samples=CLIPS_PER_SOURCE)
    first = min(Ledger(out).read().shards)
    (out / first).unlink()
    stats = shard_stats(out)
    assert stats["samples"] == 10 and stats["content"]["samples_read"] == 5
    assert any(first in p for p in stats["problems"])
    assert first in terminal(stats)


def test_empty_and_not_yet_committed_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_config(empty)
    # A run whose only source was rejected: a ledger, 0 samples.
    Ledger(empty).append({"type": "source", "path": "/x.mp4", "source_id": "x", "size": 1, "mtime_ns": 1,
                          "duration_s": None, "status": "rejected", "stage": "probe", "reason": "not_a_video",
                          "samples": [], "clips": [], "errors": []})
    stats = shard_stats(empty)
    assert stats["samples"] == 0 and stats["funnel"][1]["removed"] == {"not_a_video": 1}
    assert stats["content"]["samples_read"] == 0 and stats["durations_s"]["histogram"] == []
    assert "not_a_video" in terminal(stats)

    started = tmp_path / "started"
    (started / "shards").mkdir(parents=True)
    write_config(started)
    (started / "shards" / "train-000000.tar.tmp").write_bytes(b"")
    stats = shard_stats(started)
    assert stats["samples"] == 0 and stats["uncommitted_shards"] == ["train-000000.tar.tmp"]
    assert any("committed nothing yet" in p for p in stats["problems"])

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(StatsError, match="no ledger.jsonl"):
        shard_stats(nothing)


def test_several_directories_add_up(tmp_path):
    a = synthetic_run(tmp_path / "a", range(6), cross=True)
    b = synthetic_run(tmp_path / "b", range(10, 12), metrics=True)
    one, two = shard_stats(a), shard_stats(b)
    assert one["cross_pairs"]["samples"] > 0 and two["cross_pairs"] is None
    both = combined_stats([a, b])
    for key in ("sources", "clips", "samples", "shards", "bytes"):
        assert both[key] == one[key] + two[key], key
    assert both["funnel"][-1]["out"] == both["samples"] == 40
    assert both["content"]["samples_read"] == 40
    assert both["content"]["categories"]["cup (object)"] == (one["content"]["categories"]["cup (object)"]
                                                              + two["content"]["categories"]["cup (object)"])
    cross = one["cross_pairs"]["samples"]
    assert both["cross_share"]["share"] == pytest.approx(cross / (40 + cross))
    assert both["cross_share"]["configured"] == 0.4
    assert [d["samples"] for d in both["directories"]] == [30, 10]
    assert both["throughput"]["total"]["clips"] == 40 and len(both["throughput"]["runs"]) == 2
    assert both["references"]["total"] == one["references"]["total"] + two["references"]["total"]
    text = terminal(both)
    assert "Directories" in text and str(a) in text and "total" in text

    # The CLI's --json output of several directories stays a list, one summary per directory.
    from pipeline.cli.main import main

    result = CliRunner().invoke(main, ["shards", "stats", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [s["samples"] for s in listed] == [30, 10] and listed[1]["metrics"]["values"]


def test_data_quality_metrics_of_any_layout_are_pooled(tmp_path):
    out = synthetic_run(tmp_path / "m", range(2), metrics=True)
    numbers, flags = load_run(out).facts.metric_values()
    assert set(numbers) == {"face.cosine", "clip_i", "background.similarity"}  # strings are not metrics
    assert list(numbers["face.cosine"]) == pytest.approx([0.5 + 0.01 * n for n in range(10)])
    assert flags == {"face.copy_paste": (3, 10), "face.identity_mismatch": (0, 10)}
    stats = shard_stats(out)
    assert stats["metrics"]["flags"]["face.copy_paste"] == {"true": 3, "of": 10}
    assert stats["metrics"]["values"]["clip_i"]["mean"] == pytest.approx(0.3)
    # The samples' "flags" lists: how many samples carry each flag, of the samples with metrics.
    assert stats["metrics"]["samples_flagged"] == {"copy_paste": {"true": 3, "of": 10}}
    text = terminal(stats)
    assert "Data-quality metrics" in text and "samples flagged copy_paste" in text and "3 (30.0 %)" in text
    # Without metrics in KEY.json: nothing to show and no table.
    plain = shard_stats(synthetic_run(tmp_path / "p", range(1)))
    assert plain["metrics"] == {"values": {}, "flags": {}, "samples_flagged": {}}
    assert "Data-quality metrics" not in terminal(plain)


def test_copy_of_a_run_reads_the_same(tmp_path):
    """Nothing is cached: a copy (another path, same files) reads the same numbers; a changed copy, new ones."""
    out = synthetic_run(tmp_path / "orig", range(2))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first, second = shard_stats(out), shard_stats(copy)
    assert {k: v for k, v in first.items() if k not in ("out_dir",)} == {
        k: v for k, v in second.items() if k not in ("out_dir",)}
    synthetic_run(copy, range(5, 6))
    assert shard_stats(copy)["samples"] == first["samples"] + 5
