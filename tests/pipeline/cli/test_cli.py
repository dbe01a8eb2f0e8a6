"""End to end through the `s2v` command on a local Ray: real videos in, real WebDataset shards out."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.core.files import file_sha256
from pipeline.store.ledger import Ledger
from pipeline.testing.loopback import LoopbackCluster

S2V = [sys.executable, "-m", "pipeline.cli.main"]
QUIET = ["--set", "ray.progress=false", "--set", "ray.num_cpus=2"]


def s2v(*args, check=True, timeout=600):
    proc = subprocess.run([*S2V, *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_shards(out: Path) -> list[dict]:
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / e["url"]) for e in index["shardlist"]]
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


@pytest.fixture(scope="module")
def inputs(demo_corpus, bad_inputs, tmp_path_factory) -> Path:
    """The demo videos and every bad input in one directory tree."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(demo_corpus / "videos", root / "demo")
    shutil.copytree(bad_inputs["good"].parent, root / "bad")
    shutil.copy(bad_inputs["good"], root / "bad" / "good_copy.mp4")  # same bytes under another name
    return root


@pytest.fixture(scope="module")
def quickstart(u2netp_dir) -> list[str]:
    """The quickstart recipe, with its saliency weights where the session fixture fetched them."""
    return ["--config", "configs/quickstart.yaml", "--set", f"grounding.model.path={u2netp_dir}"]


@pytest.fixture(scope="module")
def curated(inputs, demo_corpus, quickstart, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    proc = s2v("curate", "run", *quickstart, "--input", str(inputs),
               "--metadata", str(demo_corpus / "metadata.jsonl"), "--output", str(out), *QUIET)
    assert "Traceback" not in proc.stderr
    return out


def test_shards_read_back_with_upstream_webdataset(curated):
    index = json.loads((curated / "index.json").read_text())
    samples = read_shards(curated)
    assert len(samples) == index["total_samples"] > 0
    assert sum(e["nsamples"] for e in index["shardlist"]) == len(samples)
    for entry in index["shardlist"]:
        assert file_sha256(curated / entry["url"]) == entry["sha256"]
        assert (curated / entry["url"]).stat().st_size == entry["filesize"]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    manifest = pq.read_table(curated / "manifest.parquet").to_pylist()
    assert sorted(keys) == [row["key"] for row in manifest]
    with_faces = bound = 0
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["mp4"][4:8] == b"ftyp"
        if "/demo/" in meta["source"]["path"]:  # captioned by the metadata file, so entities are found
            kinds = {e["kind"] for e in meta["entities"]}
            assert kinds & {"subject", "object"} and "background" in kinds, meta["caption"]
        masks = sorted(k for k in sample if k.startswith("dmask"))
        assert len(masks) == len(meta["detections"])  # one MobileSAM mask per salient-region box
        bound += sum(d["entity"] is not None for d in meta["detections"])
        if meta["faces"]:
            with_faces += 1
            embeddings = np.load(io.BytesIO(sample["faces.npy"]))
            assert embeddings.shape == (len(meta["faces"]), 128)  # dlib's real ResNet embeddings
        assert meta["key"] == sample["__key__"]
        assert (meta["provenance"]["config_hash"]
                and meta["provenance"]["stages"]["shot_cut"].startswith("pyscenedetect"))
        assert meta["span"]["end_s"] > meta["span"]["start_s"]
    assert with_faces > 0  # the demo's astronaut is a real frontal face
    assert bound > 0  # salient regions tied to caption entities (the astronaut by her face)
    assert not list(curated.rglob("*.tmp"))


def test_samples_are_complete_s2v_samples(curated):
    """References with their masks, a background plate, and every file KEY.json names."""
    import cv2

    variants = set()
    for sample in read_shards(curated):
        meta = json.loads(sample["json"])
        named = [meta["background"]["file"]] + [name for e in meta["entities"] for r in e.get("references", [])
                                                 for name in (r["file"], r["mask"])]
        assert named and all(name in sample for name in named), (sorted(sample), named)
        bg = cv2.imdecode(np.frombuffer(sample["bg.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert bg.shape == (meta["clip"]["height"], meta["clip"]["width"], 3)
        for entity in meta["entities"]:
            for ref in entity.get("references", []):
                image = cv2.imdecode(np.frombuffer(sample[ref["file"]], np.uint8), cv2.IMREAD_UNCHANGED)
                mask = cv2.imdecode(np.frombuffer(sample[ref["mask"]], np.uint8), cv2.IMREAD_UNCHANGED)
                assert image.shape[:2] == mask.shape and image.shape[2] == (4 if ref["variant"] == "segment" else 3)
                assert ref["source_clip"] == meta["clip_id"] and entity["instances"]
                variants.add(ref["variant"])
    # Which variants two references draw depends on their keys (the demo's bytes): the mix itself is checked on
    # 200 clips in tests/stages/test_consolidation.py; here every drawn variant must be a real one.
    assert variants and variants <= {"crop", "segment", "inpaint"}
    summary = json.loads((curated / "summary.json").read_text())
    assert set(summary["references"]["variants"]) == variants and summary["instances"]["valid"] > 0
    table = s2v("shards", "stats", str(curated)).stdout
    assert "Reference variants" in table


def test_index_is_readable_by_wids(curated, tmp_path):
    import wids

    dataset = wids.ShardListDataset(str(curated / "index.json"), cache_dir=str(tmp_path / "wids"))
    keys = {dataset[i]["__key__"] for i in range(len(dataset))}
    assert keys == {s["__key__"] for s in read_shards(curated)}


def test_manifest_columns_and_captions(curated):
    manifest = pq.read_table(curated / "manifest.parquet")
    for column in ("key", "shard", "source", "start_s", "end_s", "fps", "width", "height"):
        assert column in manifest.column_names
    rows = manifest.to_pylist()
    demo_rows = [r for r in rows if "/demo/" in r["source"]]
    assert demo_rows and all(r["caption"] for r in demo_rows)  # from the metadata file
    assert all(r["fps"] == 24.0 and min(r["width"], r["height"]) <= 360 for r in rows)


def test_every_bad_input_is_recorded_and_the_good_one_curated(curated, inputs):
    errors = pq.read_table(curated / "errors.parquet").to_pylist()
    by_file = {Path(e["source"]).stem: e for e in errors}
    expected = {"zero_bytes": "empty_file", "text": "not_a_video", "jpeg": "not_a_video",
                "audio_only": "no_video_stream", "truncated_tail": "not_a_video",
                "three_frames": "too_few_frames", "huge": "too_large"}
    for name, reason in expected.items():
        assert by_file[name]["reason"] == reason and by_file[name]["stage"] == "probe", by_file.get(name)
        assert by_file[name]["message"]
    # The good file is curated: its clips were cut and judged. It has no caption, so no entity to take a
    # reference from, and consolidation drops its clips for that reason (not as a bad input). good_copy.mp4 has the
    # same bytes: whichever of the two finished first is curated, the other is recorded as its duplicate.
    state = Ledger(curated).read()
    [good] = [e for e in state.sources.values() if Path(e["path"]).stem in ("good", "good_copy")]
    [duplicate] = state.duplicates.values()
    assert {Path(good["path"]).name, Path(duplicate["path"]).name} == {"good.mp4", "good_copy.mp4"}
    assert good["status"] == "curated" and good["clips"]
    assert {(c["stage"], c["reason"]) for c in good["clips"]} <= {("consolidation", "no_valid_entity"),
                                                                   ("quality_filter", "blurry")}, good["clips"]
    summary = json.loads((curated / "summary.json").read_text())
    probe_step = next(s for s in summary["funnel"] if s["stage"] == "probe")
    assert sum(probe_step["removed"].values()) == len(expected)
    assert summary["duplicates"] == 1  # good.mp4 and good_copy.mp4 have the same content: curated once


def test_summary_funnel_adds_up(curated):
    summary = json.loads((curated / "summary.json").read_text())
    steps = summary["funnel"]
    for step in steps:
        if step["stage"] not in ("clip_plan", "write"):
            assert step["in"] - step["out"] == sum(step["removed"].values()), step
    assert steps[-1]["out"] == summary["samples"]
    run = summary["last_run"]
    assert run["clips_per_s"] > 0 and run["video_hours_per_day_per_core"] > 0 and run["cpus"] == 2
    # The quickstart says which design models it replaced with offline substitutes, and which stages were off.
    assert set(run["flow"]["substitutes"]) == {"caption", "entities", "grounding", "segmentation", "faces",
                                               "inpainting", "metrics"}
    assert run["flow"]["off"] == ["clip_score", "references.redux", "metrics.dino_i"]


def test_rerun_skips_committed_sources_and_duplicates_nothing(curated, inputs, demo_corpus, quickstart):
    before = sorted(s["__key__"] for s in read_shards(curated))
    summary_before = json.loads((curated / "summary.json").read_text())
    proc = s2v("curate", "run", *quickstart, "--input", str(inputs),
               "--input", str(inputs / "missing.mp4"), "--metadata", str(demo_corpus / "metadata.jsonl"),
               "--output", str(curated), *QUIET)
    assert "0 to process" in proc.stderr and "missing.mp4" in proc.stderr
    assert sorted(s["__key__"] for s in read_shards(curated)) == before
    summary = json.loads((curated / "summary.json").read_text())
    assert summary["runs"] == summary_before["runs"]  # nothing ran, so no run is recorded
    # The pattern that matched nothing is committed with the run's errors, so stats still count it later.
    stats = json.loads(s2v("shards", "stats", str(curated), "--json").stdout)
    assert stats["funnel"][0]["removed"]["not_found"] == 1


def test_stats_json_and_table(curated):
    stats = json.loads(s2v("shards", "stats", str(curated), "--json").stdout)
    assert stats["samples"] == json.loads((curated / "summary.json").read_text())["samples"]
    assert stats["durations_s"]["min"] >= 2.0
    table = s2v("shards", "stats", str(curated)).stdout
    assert "Funnel" in table and "quality_filter" in table


def test_killed_run_resumes_to_the_same_sample_set(curated, inputs, demo_corpus, quickstart, tmp_path):
    out = tmp_path / "killed"
    args = [*S2V, "curate", "run", *quickstart, "--input", str(inputs),
            "--metadata", str(demo_corpus / "metadata.jsonl"), "--output", str(out), *QUIET,
            "--set", "output.shard_max_samples=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ledger.exists() and '"type":"shard"' in ledger.read_text():
            break
        time.sleep(0.05)
    # Kill the driver and the Ray processes it started (same session), as a crash or Ctrl-\ would.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert '"type":"run"' not in ledger.read_text(), "the run finished before it could be killed"
    s2v(*args[len(S2V):])
    assert sorted(s["__key__"] for s in read_shards(out)) == sorted(s["__key__"] for s in read_shards(curated))


def test_config_errors_are_one_clear_line(tmp_path):
    proc = s2v("curate", "run", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
               "--set", "shots.backend=magic", check=False)
    assert proc.returncode == 2
    assert "shots.backend" in proc.stderr and "transnetv2" in proc.stderr and "Traceback" not in proc.stderr


def test_shots_command_prints_cuts_as_json(demo_corpus):
    truth = json.loads((demo_corpus / "ground_truth.json").read_text())
    name = min(truth)
    result = json.loads(s2v("shots", str(demo_corpus / "videos" / name), "--json").stdout)
    assert result["fps"] == truth[name]["fps"]
    assert len(result["cuts"]) == len(truth[name]["cuts"])
    assert all(abs(a - b) <= 2 for a, b in zip(result["cuts"], truth[name]["cuts"]))
    assert result["shots"][0][0] == 0 and result["shots"][-1][1] == truth[name]["num_frames"] - 1


@pytest.mark.cluster
def test_runs_on_an_existing_cluster_given_by_address(tmp_path, bad_inputs):
    """`--address` joins a running Ray cluster (a one-node loopback cluster) instead of starting one."""
    with LoopbackCluster(nodes=1, cpus_per_node=3) as cluster:
        out = tmp_path / "out"
        proc = subprocess.run([*S2V, "curate", "run", "--input", str(bad_inputs["good"]), "--output", str(out),
                               "--address", cluster.address, "--set", "ray.progress=false"],
                              check=False, env=cluster.client_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(read_shards(out)) == summary["samples"] > 0
    # The cluster offers 3 CPUs, the machine has 2: the job saw the cluster, not an embedded Ray of its own.
    assert summary["last_run"]["cpus"] == 3


def test_a_missing_model_fails_before_any_work(tmp_path, bad_inputs):
    out = tmp_path / "o"
    proc = s2v("curate", "run", "--input", str(bad_inputs["good"]), "--output", str(out),
               "--set", f"clip_score.model.path={tmp_path / 'no-such-clip'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "clip_score model" in proc.stderr and "no-such-clip" in proc.stderr
    assert not (out / "config.yaml").exists()  # nothing pinned by a run that never started
