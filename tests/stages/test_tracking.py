"""Subjects followed through real clips made from real photos: by appearance for objects, by face for people."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.stage import run_stage
from pipeline.models.faces import load_face_backend
from pipeline.testing.clips import CAT, leaving_clip
from stages.tracking import SubjectTracker, TrackFilter, longest_run, sample_indices, track_decision

FACE_BOX = [200, 40, 440, 330]


@pytest.fixture(scope="module")
def stages():
    config = build_config({})
    tracker = SubjectTracker(config)
    tracker.setup()
    return tracker, TrackFilter(config)


def test_frames_are_sampled_at_the_configured_rate():
    assert sample_indices(96, 24.0, 2.0, 32) == [0, 12, 24, 36, 48, 60, 72, 84]
    assert sample_indices(96, 24.0, 24.0, 10) == [0, 11, 21, 32, 42, 53, 63, 74, 84, 95]  # 96 frames, 10 spread
    assert sample_indices(5, 24.0, 2.0, 32) == [0]
    assert longest_run([True, False, True, True, False]) == 2


def test_an_object_that_stays_is_present_throughout(stages):
    record = leaving_clip(data.chelsea(), CAT)
    run_stage(list(stages)[0], [record])
    track = record.meta["entities"][0]["track"]
    assert track["by"] == "appearance" and track["presence"] == 1.0 and track["longest_run_s"] == 4.0
    run_stage(stages[1], [record])
    assert record.alive and "reference" in record.meta["entities"][0]


def test_an_object_that_leaves_after_the_first_second_is_filtered(stages):
    record = leaving_clip(data.chelsea(), CAT, leaves_at=1.0)
    for stage in stages:
        run_stage(stage, [record])
    entity = record.meta["entities"][0]
    assert entity["track"]["present"] == [True, True, False, False, False, False, False, False]
    assert entity["track"]["presence"] == 0.25 and entity["track"]["longest_run_s"] == 1.0
    assert entity["track_rejected"] == "rarely_present" and "reference" not in entity
    assert record.drop == {"stage": "track_filter", "reason": "subject_absent"}
    # The decision reads only the stored stats: looser thresholds keep it (what refilter re-applies).
    assert track_decision(entity["track"], build_config({}, ["filters.tracks.min_presence=0.2"]).filters.tracks) \
        is None


def test_a_person_is_followed_by_face_identity_and_filtered_when_gone(stages):
    faces = load_face_backend(build_config({}).faces)
    for leaves_at, presence in ((None, 1.0), (1.0, 0.25)):
        record = leaving_clip(data.astronaut(), FACE_BOX, leaves_at=leaves_at)
        found = faces.detect(np.ascontiguousarray(record.blobs["keyframes"][0]))
        assert len(found) == 1
        entity = record.meta["entities"][0]
        entity.update(kind="subject", word="woman")
        record.meta["faces"] = [{"keyframe": 0, "detection": "d0", "score": found[0].score}]
        record.blobs["face_embeddings"] = found[0].embedding[None]
        run_stage(stages[0], [record])
        track = entity["track"]
        assert track["by"] == "face" and track["presence"] == presence, track
        assert all(s is None or s >= 0.9 for s, p in zip(track["scores"], track["present"]) if p)
