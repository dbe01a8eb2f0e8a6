"""The offline grounding stand-in: real U2-Net-p weights on real photos, and the binding rules on their own."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.core.config import ModelSpec, build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.models.loader import ModelUnavailable
from stages.saliency_grounding import OBJECT, SaliencyGrounder, bind_regions, saliency_model_file

WIDTH, HEIGHT = 640, 360
WOMAN = (40, 60, 250, 330)  # where the astronaut's head and shoulders are pasted (x0, y0, x1, y1)
CUP = (380, 110, 600, 290)  # where the coffee cup is pasted


def scene() -> np.ndarray:
    """A tinted grass lawn with the astronaut's head and shoulders on the left and the coffee cup on the right."""
    lawn = cv2.resize(data.grass(), (WIDTH, HEIGHT))
    frame = np.stack([lawn * 0.55, lawn * 0.9, lawn * 0.4], axis=-1).astype(np.uint8)
    for (x0, y0, x1, y1), photo, crop in ((WOMAN, data.astronaut(), (0, 150, 330, 420)),
                                         (CUP, data.coffee(), (20, 80, 400, 500))):
        top, left, bottom, right = crop
        patch = cv2.resize(photo[top:bottom, left:right], (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        # An elliptic cutout, as the demo corpus composites its subjects.
        mask = np.zeros(patch.shape[:2], np.uint8)
        cv2.ellipse(mask, ((x1 - x0) // 2, (y1 - y0) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, 1, -1)
        region = frame[y0:y1, x0:x1]
        region[mask > 0] = patch[mask > 0]
    return frame


ENTITIES = [{"id": "e0", "kind": "subject", "word": "woman"}, {"id": "e1", "kind": "object", "word": "cup"},
            {"id": "e2", "kind": "background", "word": "lawn"}]


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def grounder(u2netp_dir):
    stage = SaliencyGrounder(build_config({"grounding": {"backend": "saliency", "model": {"path": str(u2netp_dir)}}}))
    stage.setup()
    return stage


def test_real_weights_box_both_subjects_and_bind_them(grounder):
    frame = scene()
    record = Record(kind="clip", source_path="x.mp4", key="k", meta={"entities": ENTITIES})
    record.blobs["keyframes"] = np.stack([frame, np.ascontiguousarray(frame[:, ::-1])])
    assert run_stage(grounder, [record]) == [record] and record.errors == []
    detections = record.meta["detections"]
    assert [d["id"] for d in detections] == [f"d{i}" for i in range(len(detections))]

    def mirrored(box):
        return (WIDTH - box[2], box[1], WIDTH - box[0], box[3])

    for k, woman, cup in ((0, WOMAN, CUP), (1, mirrored(WOMAN), mirrored(CUP))):
        found = {d["entity"]: d for d in detections if d["keyframe"] == k and d["part"] is None}
        # The astronaut's region holds a frontal face: she is the caption's one human; the cup is what is left.
        assert found["e0"]["label"] == "woman" and iou(found["e0"]["box"], woman) > 0.5, found
        assert found["e1"]["label"] == "cup" and iou(found["e1"]["box"], cup) > 0.5, found
        assert all(0 < d["score"] <= 1 and d["part"] is None for d in found.values())
    assert "U2-Net-p" in record.meta["provenance"]["grounding"]


def test_a_plain_lawn_has_no_salient_region(grounder):
    lawn = np.stack([cv2.resize(data.grass(), (WIDTH, HEIGHT))] * 3, axis=-1)
    record = Record(kind="clip", source_path="x.mp4", key="k", meta={"entities": ENTITIES})
    record.blobs["keyframes"] = lawn[None]
    run_stage(grounder, [record])
    assert record.meta["detections"] == []


def test_a_record_without_keyframes_fails_alone(grounder):
    good = Record(kind="clip", source_path="a.mp4", key="a", meta={"entities": ENTITIES})
    good.blobs["keyframes"] = scene()[None]
    bad = Record(kind="clip", source_path="b.mp4", key="b", meta={"entities": ENTITIES})
    run_stage(grounder, [bad, good])
    assert not bad.alive and bad.errors[0]["reason"] == "no_keyframes"
    assert not good.errors and good.meta["detections"]


def region(label: int, area: float) -> tuple:
    return (label, [0, 0, 1, 1], area, 0.9)


@pytest.mark.parametrize(
    "regions, entities, expected",
    [
        # The one entity no person took is the largest region left; the rest are unnamed objects.
        ([region(1, 0.3), region(3, 0.1)], ENTITIES[1:], [("e1", "cup"), (None, OBJECT)]),
        # Two entities left: no guess.
        ([region(1, 0.3), region(2, 0.2)],
         [{"id": "a", "kind": "object", "word": "cup"}, {"id": "b", "kind": "object", "word": "saucer"}],
         [(None, OBJECT), (None, OBJECT)]),
        # A lone entity with no face found (a profile, a cat) is the largest region.
        ([region(4, 0.1), region(5, 0.05)], [{"id": "c", "kind": "object", "word": "tabby cat"}],
         [("c", "tabby cat"), (None, OBJECT)]),
        ([], ENTITIES, []),
    ],
)
def test_binding_rules_for_regions_without_a_face(regions, entities, expected):
    assert bind_regions(regions, entities) == expected


def test_faces_make_person_subjects_without_a_caption(grounder):
    """Captionless: no entity at all. The astronaut's face makes a 'person' subject with a person box around her
    and top/hairstyle boxes placed from her face; the cup stays an unnamed object."""
    record = Record(kind="clip", source_path="x.mp4", key="k", meta={"entities": []})
    record.blobs["keyframes"] = scene()[None]
    run_stage(grounder, [record])
    entities = record.meta["entities"]
    assert [(e["id"], e["kind"], e["word"], e["origin"], e["group"]) for e in entities] == [
        ("e0", "subject", "person", "face", "g0")]
    people = [d for d in record.meta["detections"] if d["entity"] == "e0" and d["part"] is None]
    assert len(people) == 1 and iou(people[0]["box"], WOMAN) > 0.4, people
    parts = {d["part"]: d for d in record.meta["detections"] if d["part"]}
    assert {"top", "hairstyle"} <= set(parts) and all(p["label"] == p["part"] for p in parts.values())
    x0, y0, x1, y1 = people[0]["box"]
    for part in parts.values():  # inside the person, the hair above the top
        px0, py0, px1, py1 = part["box"]
        assert x0 <= px0 < px1 <= x1 and y0 <= py0 < py1 <= y1, part
    assert parts["hairstyle"]["box"][1] < parts["top"]["box"][1]
    assert any("person subject" in w["message"] for w in record.meta["warnings"])


def test_the_captions_one_human_takes_the_face_and_her_attribute_words(grounder):
    entities = [{"id": "e0", "kind": "subject", "word": "woman", "group": "g0",
                 "attributes": {"top": ["spacesuit"]}}, *ENTITIES[1:]]
    record = Record(kind="clip", source_path="x.mp4", key="k", meta={"entities": [dict(e) for e in entities]})
    record.blobs["keyframes"] = scene()[None]
    run_stage(grounder, [record])
    assert len(record.meta["entities"]) == 3  # nobody added: the one face is the woman's
    parts = {d["part"]: d["label"] for d in record.meta["detections"] if d["entity"] == "e0" and d["part"]}
    assert parts["top"] == "spacesuit" and parts["hairstyle"] == "hairstyle"


def test_missing_weights_name_the_fetch_command(tmp_path):
    with pytest.raises(ModelUnavailable, match="s2v models fetch u2netp"):
        saliency_model_file(ModelSpec(path=str(tmp_path / "nowhere")))
    with pytest.raises(ModelUnavailable, match="has no u2netp.onnx"):
        saliency_model_file(ModelSpec(path=str(tmp_path)))
