"""Real footage offline, without captions: people become subjects, every input and clip is accounted for, and
dropped clips leave examples to look at. Videos that installed packages ship (pipeline/testing/footage.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from rich.console import Console

from pipeline.cli.main import main
from pipeline.core.config import load_config
from pipeline.run.runner import curate
from pipeline.store.ledger import Ledger
from pipeline.store.shards import read_shard_samples
from pipeline.testing.footage import footage

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.fixture(scope="module")
def captionless_run(u2netp_dir, tmp_path_factory) -> Path:
    """The quickstart recipe, sequential, on two real videos and no metadata at all."""
    videos = tmp_path_factory.mktemp("footage")
    for name in ("carphone", "bikes"):
        shutil.copy(footage(name), videos / f"{name}.mp4")
    config = load_config(CONFIGS / "quickstart.yaml", [f"grounding.model.path={u2netp_dir}",
                                                        "output.rejects_per_reason=2"])
    config.input.paths = [str(videos)]
    out = tmp_path_factory.mktemp("captionless") / "out"
    curate(config, out, console=Console(quiet=True), sequential=True)
    return out


def test_a_captionless_real_video_of_a_person_gives_a_person_sample(captionless_run):
    rows = pq.read_table(captionless_run / "manifest.parquet").to_pylist()
    own = [r for r in rows if r["cross_base"] is None and "carphone" in r["source"]]
    assert own, "no sample from the man in the car"
    shard = captionless_run / own[0]["shard"]
    meta = json.loads(read_shard_samples(shard, {own[0]["key"]})[own[0]["key"]]["json"])
    people = [e for e in meta["entities"] if e.get("origin") == "face"]
    assert people and people[0]["kind"] == "subject" and people[0]["word"] == "person" and people[0]["references"]
    assert people[0]["track"]["by"] == "face" and people[0]["track"]["presence"] >= 0.5  # he is there throughout
    assert meta["caption"] is None
    assert "person subject" in " ".join(w["message"] for w in meta["warnings"])
    assert "faces" in meta["provenance"]["stages"]["grounding"]  # the substitute is named in the provenance


def test_every_input_is_in_sources_parquet_including_one_that_gave_nothing(captionless_run):
    sources = {Path(r["source"]).name: r for r in pq.read_table(captionless_run / "sources.parquet").to_pylist()}
    assert set(sources) == {"carphone.mp4", "bikes.mp4"}
    assert sources["carphone.mp4"]["samples"] >= 1 and sources["carphone.mp4"]["reason"] is None
    # The street clip's shots are all under the 2 s a clip needs: no clip, said so.
    assert (sources["bikes.mp4"]["status"], sources["bikes.mp4"]["reason"]) == ("no_clips", "shot_cut/no_usable_shots")
    clips = pq.read_table(captionless_run / "clips.parquet").to_pylist()
    summary = json.loads((captionless_run / "summary.json").read_text())
    assert len(clips) == summary["clips"] and all(c["status"] in ("kept", "dropped", "failed") for c in clips)
    result = CliRunner().invoke(main, ["shards", "why", str(captionless_run), "bikes.mp4"])
    assert result.exit_code == 0 and "no_clips" in result.output and "no_usable_shots" in result.output


def test_dropped_clips_leave_examples_in_rejects_shards(curated_out, tmp_path):
    """The demo run drops clips (nothing bound, quality): a few per stage and reason are kept apart, with their
    stats and why, drawable by `s2v shards show`, never listed in index.json."""
    state = Ledger(curated_out).read()
    clips = {c["key"]: c for c in pq.read_table(curated_out / "clips.parquet").to_pylist()}
    kept = state.reject_shards()
    dropped = {k: c for k, c in clips.items() if c["status"] == "dropped"}
    assert dropped and kept and set(kept) <= set(dropped)
    per_reason = {}
    for entry in state.rejects.values():
        for key, reason in entry["reasons"].items():
            assert reason == f"{dropped[key]['stage']}/{dropped[key]['reason']}"
            per_reason[reason] = per_reason.get(reason, 0) + 1
    assert max(per_reason.values()) <= 3  # output.rejects_per_reason
    assert all(clips[k]["shard"] == shard for k, shard in kept.items())
    index = json.loads((curated_out / "index.json").read_text())
    assert not any(e["url"].startswith("rejects/") for e in index["shardlist"])
    key = sorted(kept)[0]
    meta = json.loads(read_shard_samples(curated_out / kept[key], {key})[key]["json"])
    assert meta["drop"] == {"stage": dropped[key]["stage"], "reason": dropped[key]["reason"]}
    sheet = CliRunner().invoke(main, ["shards", "show", str(curated_out), key, "--out", str(tmp_path / "r.png")])
    assert sheet.exit_code == 0, sheet.output
    assert (tmp_path / "r.png").stat().st_size > 10_000
    why = CliRunner().invoke(main, ["shards", "why", str(curated_out), key])
    assert f"an example is kept in {kept[key]}" in why.output
