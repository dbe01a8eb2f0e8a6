"""SampleMetrics: face identity with dlib's real weights on real photos, background decoupling on real photos, CLIP-I
and the CLIP background measure on a tiny open_clip model, DINO-I on a tiny random DINOv2 saved with
save_pretrained; all through `run_stage`, after the real stages that produce what the metrics read.

Random weights carry no meaning, so the model tests assert what holds for any weights (identical inputs score 1,
different ones less) and that the stage's numbers are the model's numbers."""

import json

import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.core.config import FACE_THRESHOLDS, ConfigError, ModelSpec, build_config, face_thresholds
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.models.clip import ClipScorer
from pipeline.testing.clips import ASTRONAUT, ASTRONAUT_MIRRORED, CAMERAMAN, COFFEE
from pipeline.testing.tiny_models import TINY_CLIP
from stages import build_flow, describe_flow
from stages.clip_score import ClipScore
from stages.faces import FaceDetector
from stages.metrics import SampleMetrics, loader_view
from stages.references import ReferenceCutter

CROP_ONLY = "references.ratio={crop: 1, segment: 0, inpaint: 0, redux: 0}"
SEGMENT_ONLY = "references.ratio={crop: 0, segment: 1, inpaint: 0, redux: 0}"


def person_clip(frames, overrides=()) -> Record:
    """A clip whose keyframes each hold one person of subject entity e0 (a whole-frame detection, as grounding
    would give), its faces found by the real dlib stage and its reference cut from keyframe 0 by the real
    reference stage: what the metrics stage receives after the S2V stages."""
    config = build_config({}, [CROP_ONLY, *overrides])
    record = Record(kind="clip", source_path="clip.mp4", key="k")
    record.blobs["keyframes"] = np.stack(frames)
    height, width = frames[0].shape[:2]
    record.meta.update(
        clip_id="c0",
        keyframes=[{"at": i / 2, "frame": i} for i in range(len(frames))],
        detections=[{"id": f"d{i}", "keyframe": i, "box": [0, 0, width, height], "label": "woman", "entity": "e0",
                     "part": None, "score": 0.9} for i in range(len(frames))],
        entities=[{"id": "e0", "kind": "subject", "word": "woman", "reference": {"detection": "d0", "keyframe": 0},
                   "subject_id": 0, "view_id": 0, "group": "g0"}],
    )
    [record] = run_stage(FaceDetector(config), [record])
    [record] = run_stage(ReferenceCutter(config), [record])
    assert record.alive, record.errors
    return record


def measure(record: Record, overrides=()) -> dict:
    [record] = run_stage(SampleMetrics(build_config({}, [CROP_ONLY, *overrides])), [record])
    assert record.alive and "metrics" in record.meta["provenance"], record.errors
    return record.meta["stats"]["metrics"]


# --- face identity: dlib, real weights, real photos ----------------------------------------------------------------


@pytest.fixture(scope="module")
def same_person():
    """The astronaut on keyframe 0 (the reference) and mirrored on keyframe 1: the same face (dlib: 0.99)."""
    return person_clip([ASTRONAUT, ASTRONAUT_MIRRORED])


@pytest.fixture(scope="module")
def other_person():
    """The astronaut on keyframe 0 and the cameraman on keyframe 1, both bound to one entity (a consolidation
    mistake the metric is there to catch; dlib: 0.84)."""
    return person_clip([ASTRONAUT, CAMERAMAN], ["faces.min_score=0.2"])  # his face scores 0.28


def test_the_same_face_scores_above_another_persons_and_the_flags_follow(same_person, other_person):
    same, other = measure(same_person), measure(other_person)
    for record in (same_person, other_person):
        assert {f["keyframe"] for f in record.meta["faces"]} == {0, 1}
    [a], [b] = same["references"], other["references"]
    assert a["file"] == "ref0.png" and a["entity"] == "e0" and a["variant"] == "crop"
    assert a["face_cosine"] > b["face_cosine"] + 0.1
    # The stored number is the cosine of the two stored face embeddings (the reference's own keyframe left out).
    embeddings = same_person.blobs["face_embeddings"]
    assert a["face_cosine"] == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-4)
    # dlib defaults: a photo against its mirror image is a near copy; the cameraman is someone else.
    assert a["face_copy_paste"] and not a["face_mismatch"] and same["flags"] == ["face_copy_paste"]
    assert b["face_mismatch"] and not b["face_copy_paste"] and other["flags"] == ["face_mismatch"]
    assert same["backends"]["face"] == "dlib ResNet face descriptor (128-d)"
    assert same["summary"]["face_cosine_min"] == same["summary"]["face_cosine_mean"] == a["face_cosine"]


def test_thresholds_come_from_config_else_from_the_backend(same_person):
    cosine = measure(same_person)["references"][0]["face_cosine"]
    above = measure(same_person, [f"metrics.face_copy_paste={cosine + 0.005:.4f}"])["references"][0]
    assert not above["face_copy_paste"]
    below = measure(same_person, [f"metrics.face_mismatch={cosine + 0.001:.4f}",
                                  "metrics.face_copy_paste=0.9999"])["references"][0]
    assert below["face_mismatch"] and not below["face_copy_paste"]
    assert face_thresholds(None, None, "insightface") == FACE_THRESHOLDS["insightface"]
    assert face_thresholds(0.5, None, "dlib") == {"copy_paste": 0.5, "mismatch": FACE_THRESHOLDS["dlib"]["mismatch"]}
    with pytest.raises(ConfigError, match="face_copy_paste"):
        build_config({}, ["metrics.face_copy_paste=0.3", "metrics.face_mismatch=0.4"])


def test_no_face_on_the_other_keyframes_is_unmeasured_not_flagged():
    record = person_clip([ASTRONAUT, COFFEE])
    metrics = measure(record)
    [ref] = metrics["references"]
    assert ref["face_cosine"] is None and "face_copy_paste" not in ref and metrics["flags"] == []
    assert "face_cosine_mean" not in metrics["summary"]


# --- background decoupling ------------------------------------------------------------------------------------------


def scene(photo: np.ndarray, width: int = 320, height: int = 180) -> np.ndarray:
    return np.ascontiguousarray(cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA))


def subject_on(background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's head and shoulders pasted in an ellipse in the middle of `background`, and that mask."""
    height, width = background.shape[:2]
    person = cv2.resize(data.astronaut()[0:300, 100:360], (width // 3, height * 2 // 3))
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2, height // 2), (width // 6, height // 3), 0, 0, 360, 1, -1)
    out = background.copy()
    y0, x0 = height // 2 - height // 3, width // 2 - width // 6
    region = out[y0:y0 + person.shape[0], x0:x0 + person.shape[1]]
    inside = mask[y0:y0 + person.shape[0], x0:x0 + person.shape[1]].astype(bool)
    region[inside] = person[inside]
    return out, mask


def background_record(plate: np.ndarray, references: list[tuple[np.ndarray, np.ndarray, str]]) -> Record:
    """A clip with a background plate and object references (image, mask, variant) as the S2V stages leave them."""
    record = Record(kind="clip", source_path="clip.mp4", key="bg")
    record.blobs["keyframes"] = np.stack([plate, plate])
    record.blobs["background"] = plate
    record.meta.update(entities=[{"id": f"e{k}", "kind": "object"} for k in range(len(references))],
                       references=[], detections=[])
    for k, (image, mask, variant) in enumerate(references):
        record.blobs[f"ref{k}"] = np.dstack([image, mask * 255]) if variant == "segment" else image
        record.blobs[f"refmask{k}"] = mask
        record.meta["references"].append({"k": k, "file": f"ref{k}.png", "entity": f"e{k}", "variant": variant,
                                          "detection": None, "keyframe": 0})
    return record


def test_a_reference_on_the_clips_own_background_scores_above_one_on_another():
    plate = scene(data.coffee())
    own, mask = subject_on(plate)
    elsewhere, _ = subject_on(scene(data.chelsea()))
    metrics = measure(background_record(plate, [(own, mask, "crop"), (elsewhere, mask, "crop"),
                                                (own, mask, "segment")]))
    coupled, decoupled, segment = (r["background_similarity"] for r in metrics["references"])
    assert coupled > 0.9 and coupled > decoupled + 0.3, (coupled, decoupled)
    # A segment reference's background is what a loader shows: transparent, i.e. flat grey.
    assert segment < coupled - 0.3 and np.all(loader_view(np.dstack([own, mask * 0])) == 128)
    assert metrics["backends"]["background"] == "hsv-histogram-correlation"
    assert metrics["summary"]["background_similarity_max"] == coupled
    assert "face_cosine" not in metrics["references"][0]  # objects have no face to compare


def test_without_a_plate_the_keyframe_outside_every_instance_is_the_clips_background():
    plate = scene(data.coffee())
    own, mask = subject_on(plate)
    elsewhere, _ = subject_on(scene(data.chelsea()))
    record = background_record(plate, [(own, mask, "crop"), (elsewhere, mask, "crop")])
    del record.blobs["background"]
    record.blobs["keyframes"] = np.stack([own, own])  # the subject stands in the keyframe ...
    record.blobs["masks"] = mask[None]  # ... and its instance mask hides it from the clip's background
    record.meta["detections"] = [{"id": "d0", "keyframe": 0, "box": [0, 0, 1, 1]}]
    coupled, decoupled = (r["background_similarity"] for r in measure(record)["references"])
    assert coupled > 0.9 and coupled > decoupled + 0.3


def test_a_broken_record_keeps_its_sample_with_a_warning():
    record = background_record(scene(data.coffee()), [])
    record.meta["references"] = [{"k": 0}]  # no file, no entity: nothing to measure
    [record] = run_stage(SampleMetrics(build_config({}, [])), [record])
    assert record.alive and "error" in record.meta["stats"]["metrics"]
    assert record.meta["warnings"][0]["stage"] == "metrics"


# --- CLIP: CLIP-I from clip_score's embeddings, and the CLIP background measure ------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random open_clip CLIP in the `local-dir:` layout (test_clip_score.py's architecture)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    return path


def test_clip_i_is_the_reference_crop_against_the_other_keyframes_and_caption_alignment_is_surfaced(tiny_clip):
    clip = f"clip_score.model.path={tiny_clip}"
    record = person_clip([ASTRONAUT, ASTRONAUT_MIRRORED, COFFEE], [clip])
    record.meta["caption"] = {"text": "a woman in a spacesuit", "source": "metadata"}
    scoring = ClipScore(build_config({}, [clip]))
    scoring.setup()
    [record] = run_stage(scoring, [record])
    stage = SampleMetrics(build_config({}, [CROP_ONLY, clip]))
    assert stage.stateful  # it loads CLIP for the background measure
    [record] = run_stage(stage, [record])
    metrics = record.meta["stats"]["metrics"]
    [ref] = metrics["references"]
    scorer = ClipScorer.from_spec(ModelSpec(path=str(tiny_clip)))
    frames = record.blobs["keyframes"]
    crop, others = scorer.encode_images([frames[0]]), scorer.encode_images([frames[1], frames[2]])
    assert ref["clip_i"] == pytest.approx(float(np.mean(others @ crop[0])), abs=1e-3)
    assert metrics["caption_alignment"] == pytest.approx(record.meta["stats"]["clip"]["caption_alignment"], abs=1e-4)
    assert metrics["backends"]["clip_i"] == metrics["backends"]["background"] == f"open_clip {tiny_clip}"
    assert metrics["summary"]["clip_i_mean"] == ref["clip_i"]


def test_clip_background_scores_one_for_the_plate_itself(tiny_clip):
    plate = scene(data.coffee())
    nothing = np.zeros(plate.shape[:2], np.uint8)  # no subject: the whole reference is background
    record = background_record(plate, [(plate, nothing, "crop"), (scene(data.chelsea()), nothing, "crop")])
    # clip_score's spec names CUDA (as on a cluster), but this stage was granted no GPU: its CLIP runs on the CPU
    # (this machine has no CUDA, so loading it there would fail).
    metrics = measure(record, [f"clip_score.model.path={tiny_clip}", "clip_score.model.device=cuda"])
    same, other = (r["background_similarity"] for r in metrics["references"])
    assert same == pytest.approx(1.0, abs=1e-3) and other < 0.999  # random weights: every image scores high
    hsv = measure(record, [f"clip_score.model.path={tiny_clip}", "metrics.background_measure=hsv"])
    assert hsv["backends"]["background"] == "hsv-histogram-correlation"


# --- DINO-I: a tiny random DINOv2 saved with save_pretrained ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=64, patch_size=16)).save_pretrained(path)
    # DINOv2's own preprocessing (resize the short side, centre crop, ImageNet normalisation), at 64 px.
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def test_dino_i_with_a_dinov2_loaded_by_path(tiny_dino):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    # Keyframes 0 and 1 are one photo, keyframe 2 another: the whole-frame crop of keyframe 0 is keyframe 1.
    record = person_clip([ASTRONAUT, ASTRONAUT, COFFEE])
    config = build_config({}, [CROP_ONLY, f"metrics.dino_model={tiny_dino}"])  # a bare path reads as {path: ...}
    assert config.metrics.dino_model.path == str(tiny_dino)
    stage = SampleMetrics(config)
    assert stage.stateful and not SampleMetrics(build_config({}, [])).stateful
    [record] = run_stage(stage, [record])
    metrics = record.meta["stats"]["metrics"]
    [ref] = metrics["references"]
    model, processor = AutoModel.from_pretrained(tiny_dino).eval(), AutoImageProcessor.from_pretrained(tiny_dino)
    with torch.inference_mode():
        pooled = model(**processor(images=list(record.blobs["keyframes"]), return_tensors="pt")).pooler_output
    unit = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert unit[0] @ unit[1] == pytest.approx(1.0, abs=1e-4) and unit[0] @ unit[2] < 0.999
    assert ref["dino_i"] == pytest.approx(float(np.mean([unit[0] @ unit[1], unit[0] @ unit[2]])), abs=1e-3)
    assert metrics["backends"]["dino_i"] == f"dinov2 {tiny_dino}" and metrics["summary"]["dino_i_min"] == ref["dino_i"]
    assert "dino_i" not in measure(person_clip([ASTRONAUT, COFFEE]))["references"][0]


# --- the flow -----------------------------------------------------------------------------------------------------


def test_metrics_run_last_and_say_what_they_substitute(u2netp_dir):
    config = build_config({}, [f"grounding.model.path={u2netp_dir}", "grounding.backend=saliency"])
    assert build_flow(config)[-1] is SampleMetrics
    flow = describe_flow(config)
    assert "metrics.dino_i" in flow["off"] and "HSV" in flow["substitutes"]["metrics"]
    off = build_config({}, [f"grounding.model.path={u2netp_dir}", "grounding.backend=saliency",
                            "metrics.enabled=false"])
    assert SampleMetrics not in build_flow(off) and "metrics" in describe_flow(off)["off"]
    assert json.loads(config.model_dump_json())["metrics"]["background_measure"] == "auto"
