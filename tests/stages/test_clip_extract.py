import gc
import weakref

import numpy as np

from pipeline.core.config import build_config
from pipeline.core.stage import run_stage, run_stages
from pipeline.core.video import iter_frames, probe
from pipeline.sources.inputs import source_records
from stages.clip_extract import ClipExtractor, clip_key, output_frame_sources
from stages.probe import Prober
from stages.shot_cut import ShotCutter


def cut(paths, overrides=(), metadata=None):
    config = build_config({}, list(overrides))
    records = source_records([str(p) for p in paths], metadata or {})
    for stage in (Prober(config), ShotCutter(config), ClipExtractor(config)):
        records = run_stage(stage, records)
    return records


def test_resampling_picks_evenly_spaced_source_frames():
    assert output_frame_sources(0, 9, 24, 24) == list(range(10))
    assert output_frame_sources(10, 21, 24, 12) == [10, 12, 14, 16, 18, 20]
    assert len(output_frame_sources(0, 59, 30, 24)) == 48


def test_clips_are_cut_transcoded_and_keyframed(demo_corpus, tmp_path):
    video = min((demo_corpus / "videos").glob("*.mp4"))
    clips = cut([video], ["clips.max_short_side=180", "clips.fps=12", "shots.trim_s=0"])
    assert clips and all(c.kind == "clip" and c.alive for c in clips)
    assert {c.clips_planned for c in clips} == {len(clips)}
    source_frames = list(iter_frames(str(video), size=(320, 180)))
    for clip in clips:
        span = clip.meta["span"]
        assert clip.key == clip_key(clip.source_id, span["first_frame"], span["last_frame"])
        assert "." not in clip.key
        path = tmp_path / f"{clip.key}.mp4"
        path.write_bytes(clip.get_bytes("mp4"))
        info = probe(str(path))
        expected = len(output_frame_sources(span["first_frame"], span["last_frame"], 24.0, 12.0))
        assert (info.width, info.height, info.fps, info.num_frames) == (320, 180, 12.0, expected)
        assert clip.meta["clip"]["num_frames"] == expected
        # Keyframes at 5/50/95% of the clip are the frames of the source at those positions.
        keyframes = clip.blobs["keyframes"]
        assert keyframes.shape == (3, 180, 320, 3)
        for kf, info_kf in zip(keyframes, clip.meta["keyframes"]):
            src = output_frame_sources(span["first_frame"], span["last_frame"], 24.0, 12.0)[info_kf["frame"]]
            diff = np.abs(kf.astype(int) - source_frames[src].astype(int)).mean()
            assert diff < 1.0, (clip.key, info_kf, diff)
        assert [k["at"] for k in clip.meta["keyframes"]] == [0.05, 0.5, 0.95]


def test_captions_come_from_the_metadata_shot_that_covers_the_clip(demo_corpus):
    from pipeline.sources.inputs import load_metadata

    metadata = load_metadata(str(demo_corpus / "metadata.jsonl"))
    video = min((demo_corpus / "videos").glob("*.mp4"))
    clips = cut([video], metadata=metadata)
    entry = metadata[str(video.resolve())]
    for clip in clips:
        mid = (clip.meta["span"]["start_s"] + clip.meta["span"]["end_s"]) / 2
        shot = next(s for s in entry["shots"] if s["start_s"] <= mid < s["end_s"])
        assert clip.meta["caption"] == {"text": shot["caption"], "source": "metadata"}


def test_a_damaged_file_keeps_the_clips_before_the_damage(bad_inputs):
    clips = cut([bad_inputs["truncated_head"]], ["shots.min_clip_s=1.0", "shots.max_clip_s=1.5"])
    kept = [c for c in clips if c.alive]
    assert kept, "frames before the damage should still make clips"
    assert all(c.meta["span"]["last_frame"] < 120 for c in kept)


def test_short_video_is_dropped_with_a_reason(bad_inputs):
    [record] = cut([bad_inputs["good"]], ["shots.min_clip_s=5"])
    assert record.kind == "source" and record.clips_planned == 0
    assert record.drop == {"stage": "shot_cut", "reason": "no_usable_shots"}


def test_a_clip_handed_on_is_let_go_before_the_next_is_cut(demo_corpus):
    """Memory per worker is one clip: nothing in the flow keeps a finished clip of the source alive."""
    config = build_config({}, ["shots.min_clip_s=1.0"])
    video = min((demo_corpus / "videos").glob("*.mp4"))
    stages = [Prober(config), ShotCutter(config), ClipExtractor(config)]
    handed_on = []
    for batch in run_stages(stages, source_records([str(video)], {})):
        gc.collect()
        assert all(ref() is None for ref in handed_on), "an earlier clip is still referenced"
        [clip] = batch
        assert clip.alive and len(clip.get_bytes("mp4")) > 0
        handed_on.append(weakref.ref(clip))
        del batch, clip
    assert len(handed_on) >= 3
