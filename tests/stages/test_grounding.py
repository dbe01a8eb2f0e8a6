"""Grounder on a tiny random-init GroundingDinoForObjectDetection (tiny Swin + 1-layer BERT, d_model 32, 2 decoder
layers, 30 queries) with a BertTokenizer from a tiny vocab.txt, saved with `save_pretrained` and loaded by path
through the project's loader.

Random weights give arbitrary boxes and scores, so the tests assert what holds for any weights (structure, bounds,
thresholds, batching invariance, weights round trip) and, on a copy whose box head is pinned, the box decoding.
"""

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.testing.tiny_models import save_tiny_grounding_dino
from stages.grounding import Grounder, Query, build_prompt, fit_queries, grounding_queries, match_phrase


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_grounding_dino")
    return path, save_tiny_grounding_dino(path)


def make_stage(model_dir, *overrides) -> Grounder:
    stage = Grounder(build_config({}, [f"grounding.model.path={model_dir}", *overrides]))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def stage(tiny_model):
    return make_stage(tiny_model[0])


@pytest.fixture(scope="module")
def loose_stage(tiny_model):
    """Thresholds at 0: every query of every keyframe is a detection (random weights score anything)."""
    return make_stage(tiny_model[0], "grounding.box_threshold=0.0", "grounding.text_threshold=0.0")


def frame(image, width=160, height=120):
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


ASTRONAUT, COFFEE = data.astronaut(), data.coffee()
WOMAN_CUP = [
    {"id": "e0", "kind": "subject", "word": "woman", "category": "woman"},
    {"id": "e1", "kind": "object", "word": "cup", "category": "cup"},
    {"id": "e2", "kind": "background", "word": "sky", "category": "sky"},
]


def clip_record(key, images, entities, size=(160, 120)) -> Record:
    record = Record(kind="clip", source_path=f"{key}.mp4", key=key)
    record.blobs["keyframes"] = np.stack([frame(image, *size) for image in images])
    record.meta["entities"] = [dict(e) for e in entities]
    return record


def ground(stage, records):
    return run_stage(stage, records)


# --- pure functions ----------------------------------------------------------------------------------------------

def test_prompt_has_subjects_and_objects_then_person_and_no_background():
    queries = grounding_queries(WOMAN_CUP)
    assert queries == [Query("woman", "e0"), Query("cup", "e1"), Query("person", None)]
    assert build_prompt(queries) == "woman . cup . person ."


def test_prompt_normalises_words_and_asks_each_phrase_once():
    entities = [
        {"id": "e0", "kind": "object", "word": "Coffee  Cup", "category": "cup"},
        {"id": "e1", "kind": "object", "word": "coffee cup", "category": "mug"},
        {"id": "e2", "kind": "object", "word": "st. bernard", "category": "dog"},
    ]
    assert build_prompt(grounding_queries(entities)) == "coffee cup . st bernard ."  # no subject: no "person"
    subject_person = [{"id": "e0", "kind": "subject", "word": "Person", "category": "person"}]
    assert grounding_queries(subject_person) == [Query("person", "e0")]
    assert grounding_queries([]) == [] and build_prompt([]) == ""
    assert grounding_queries([WOMAN_CUP[2]]) == []


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("cup", 1),
        ("person", 3),
        ("red car", 2),
        ("red", 2),  # part of a query
        ("car red", 2),
        ("woman. cup. person. [SEP]", 0),  # runs over several queries: all tie, the first in the prompt wins
        (". cup.. [SEP]", 1),
        ("cup woman", 0),
        ("lasses", 4),  # a word piece of "sunglasses"
        ("##lasses", 4),
        ("wo", None),  # too short a piece to mean anything
        ("", None),
        ("[SEP]", None),
        ("...", None),
        ("dog", None),
    ],
)
def test_phrase_maps_to_its_query(phrase, expected):
    assert match_phrase(phrase, ["woman", "cup", "red car", "person", "sunglasses"]) == expected


# --- the model ---------------------------------------------------------------------------------------------------

def test_loader_reads_the_saved_weights(stage, tiny_model):
    _, saved = tiny_model
    loaded = stage.model.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert not stage.model.training
    assert "GroundingDinoForObjectDetection" in stage.description and str(tiny_model[0]) in stage.description


def test_detections_on_real_photos_have_the_record_format(loose_stage):
    record = clip_record("a", [ASTRONAUT, COFFEE, ASTRONAUT[:, ::-1]], WOMAN_CUP)
    [out] = ground(loose_stage, [record])
    assert out.alive, out.errors
    detections = out.meta["detections"]
    assert out.meta["provenance"]["grounding"] == loose_stage.description
    # Thresholds 0: each of the 30 queries on each keyframe yields a box (minus any clipped to nothing).
    assert 0.8 * 3 * 30 <= len(detections) <= 3 * 30
    assert [d["id"] for d in detections] == [f"d{i}" for i in range(len(detections))]
    assert set(detections[0]) == {"id", "keyframe", "entity", "label", "part", "phrase", "box", "score"}
    labels = {"woman": "e0", "cup": "e1", "person": None}
    for d in detections:
        assert d["keyframe"] in (0, 1, 2)
        assert labels[d["label"]] == d["entity"]  # "sky" is background: never a label
        assert all(type(v) is int for v in d["box"])
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
        assert type(d["score"]) is float and 0.0 < d["score"] <= 1.0
    order = [(d["keyframe"], -d["score"]) for d in detections]
    assert order == sorted(order)
    assert {d["keyframe"] for d in detections} == {0, 1, 2}
    # Real images through random weights still give image-dependent boxes, not one constant box.
    assert len({tuple(d["box"]) for d in detections}) > 10


def test_box_threshold_filters(tiny_model, stage, loose_stage):
    strict = make_stage(tiny_model[0], "grounding.box_threshold=1.0")
    images = [ASTRONAUT, COFFEE]
    [none] = ground(strict, [clip_record("a", images, WOMAN_CUP)])
    assert none.alive and none.meta["detections"] == []
    [default] = ground(stage, [clip_record("a", images, WOMAN_CUP)])
    [loose] = ground(loose_stage, [clip_record("a", images, WOMAN_CUP)])
    assert all(d["score"] > 0.25 for d in default.meta["detections"])
    # At the default text threshold the phrases vary ("woman", "person", "woman . person", ...: 46 boxes, 4 of them
    # persons with these seeded weights); each maps to its query's entity, "person" to none.
    entity_of = {"woman": "e0", "cup": "e1", "person": None}
    assert all(entity_of[d["label"]] == d["entity"] for d in default.meta["detections"])
    assert any(d["label"] == "person" and d["entity"] is None for d in default.meta["detections"])
    assert len(default.meta["detections"]) < len(loose.meta["detections"])
    assert len(loose.meta["detections"]) > 0


def test_batched_records_match_one_at_a_time(loose_stage):
    def records():
        return [
            clip_record("a", [ASTRONAUT, COFFEE], WOMAN_CUP),
            clip_record("b", [COFFEE], [WOMAN_CUP[1]]),  # shorter prompt: text padding in the same pass
            clip_record("c", [ASTRONAUT, ASTRONAUT[::-1]], WOMAN_CUP, size=(120, 160)),  # other size: own pass
            clip_record("d", [COFFEE], []),
        ]

    alone = [ground(loose_stage, [r])[0].meta["detections"] for r in records()]
    batched = [r.meta["detections"] for r in ground(loose_stage, records())]
    loose_stage.max_images_per_pass = 2
    try:
        chunked = [r.meta["detections"] for r in ground(loose_stage, records())]
    finally:
        loose_stage.max_images_per_pass = Grounder.max_images_per_pass
    assert alone[3] == [] and alone[1] and alone[2]
    for one, many, few in zip(alone, batched, chunked):
        for other in (many, few):
            assert len(other) == len(one)
            for a, b in zip(one, other):
                assert (a["keyframe"], a["entity"], a["label"]) == (b["keyframe"], b["entity"], b["label"])
                assert np.abs(np.subtract(a["box"], b["box"])).max() <= 1  # float noise may flip a rounding
                assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_record_without_entities_or_keyframes(stage):
    empty = clip_record("a", [ASTRONAUT], [])
    background_only = clip_record("b", [ASTRONAUT], [WOMAN_CUP[2]])
    no_frames = clip_record("c", [ASTRONAUT], WOMAN_CUP)
    del no_frames.blobs["keyframes"]
    no_frames_no_entities = Record(kind="clip", source_path="d.mp4", key="d")
    out = ground(stage, [empty, background_only, no_frames, no_frames_no_entities])
    assert out[0].meta["detections"] == [] and out[0].alive
    assert out[1].meta["detections"] == [] and out[1].alive
    assert not out[2].alive and out[2].errors[0]["reason"] == "no_keyframes"
    # The stage requires keyframes (the stage contract): a clip without them fails even with nothing to ground.
    assert not out[3].alive and out[3].errors[0]["reason"] == "no_keyframes"


def test_box_decoding_scales_and_clips_to_the_keyframe(tmp_path):
    # Pinned head: sigmoid saturates to (cx, cy, w, h) = (1, 0, 1, 1) of the frame, i.e. corners (0.5, -0.5) to
    # (1.5, 0.5); scaled to 160x120 that is (80, -60, 240, 60), clipped to the frame (80, 0, 160, 60).
    save_tiny_grounding_dino(tmp_path, box_bias=[30.0, -30.0, 30.0, 30.0])
    pinned = make_stage(tmp_path, "grounding.box_threshold=0.0", "grounding.text_threshold=0.0")
    [out] = ground(pinned, [clip_record("a", [ASTRONAUT, COFFEE], WOMAN_CUP)])
    boxes = {tuple(d["box"]) for d in out.meta["detections"]}
    assert boxes == {(80, 0, 160, 60)}
    # Portrait keyframes: x scales with the width, y with the height.
    [out] = ground(pinned, [clip_record("b", [ASTRONAUT], WOMAN_CUP, size=(90, 200))])
    assert {tuple(d["box"]) for d in out.meta["detections"]} == {(45, 0, 90, 100)}



def test_prompt_longer_than_the_model_takes_drops_the_last_queries_with_a_warning(loose_stage):
    # Each out-of-vocabulary word is "[UNK] ." (2 tokens): 3 + 40 queries make an 88-token prompt, and the tiny
    # model takes 64 (the real ones 256). transformers' model raises on a longer prompt instead of cutting it.
    extra = [{"id": f"e{i}", "kind": "object", "word": f"thing{i}", "category": f"c{i}"} for i in range(3, 43)]
    [out] = ground(loose_stage, [clip_record("a", [ASTRONAUT, COFFEE], WOMAN_CUP + extra)])
    assert out.alive and out.meta["detections"]
    [warning] = [w["message"] for w in out.meta["warnings"] if w["stage"] == "grounding"]
    # 64 tokens = [CLS] + [SEP] + 31 queries: woman, cup, thing3..thing30 and person; thing31..thing42 go.
    assert "over the model's 64 tokens" in warning
    assert warning.endswith("not grounded: " + ", ".join(f"thing{i}" for i in range(31, 43)))


def test_fit_queries_keeps_person_and_drops_from_the_end():
    queries = [Query("woman", "e0"), Query("red car", "e1"), Query("cup", "e2"), Query("person", None)]
    def count(qs):  # one token per word and per delimiter, plus [CLS] and [SEP]
        return len(build_prompt(qs).split()) + 2
    assert fit_queries(queries, count, 100) == (queries, [])
    assert fit_queries(queries, count, 8) == ([queries[0], queries[3]], [queries[1], queries[2]])
    assert fit_queries(queries, count, 2) == ([queries[3]], queries[:3])  # nothing left to drop: the model decides


def test_subject_attributes_are_grounded_as_parts_of_their_subject():
    entities = [
        {"id": "e0", "kind": "subject", "word": "woman", "attributes": {"top": ["spacesuit"], "colors": ["orange"],
                                                                        "accessories": ["watch"]}},
        {"id": "e1", "kind": "object", "word": "cup"},
    ]
    queries = grounding_queries(entities)
    assert [(q.text, q.entity, q.part) for q in queries] == [
        ("woman", "e0", None), ("cup", "e1", None), ("spacesuit", "e0", "top"), ("watch", "e0", "accessories"),
        ("person", None, None),
    ]  # colours name no region of their own
