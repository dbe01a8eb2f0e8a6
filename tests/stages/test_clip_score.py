"""ClipScorer and the clip_score stage on a tiny random-init open_clip CLIP, saved in the `local-dir:` layout
(open_clip_config.json + open_clip_model.safetensors) and loaded by path through the project's loader.

Random weights carry no meaning, so the tests assert what holds for any weights: norms, shapes, identities,
batching invariance, and that the stage's numbers are the scorer's numbers."""

import json

import cv2
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from skimage import data

from pipeline.core.config import ModelSpec, build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.models.clip import ClipScorer
from pipeline.models.loader import ModelUnavailable
from pipeline.testing.tiny_models import TINY_CLIP
from stages.clip_score import ClipScore

CATEGORIES = ["person", "cat", "cup", "rocket"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(model directory, the state dict saved there)."""
    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    # Shift every weight away from anything a fresh init produces, so a loader that re-inits cannot pass.
    generator = torch.Generator().manual_seed(1234)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    return path, state


@pytest.fixture(scope="module")
def reference(tiny_clip):
    """The expectation, computed without the code under test: the saved weights in a plain `open_clip.CLIP`, with
    open_clip's own eval transform and tokenizer. Returns (encode_images, encode_texts), unit rows."""
    from PIL import Image

    model = open_clip.CLIP(**TINY_CLIP)
    model.load_state_dict(tiny_clip[1])
    model.eval()
    transform = open_clip.image_transform(TINY_CLIP["vision_cfg"]["image_size"], is_train=False)

    def unit(features):
        return (features / features.norm(dim=-1, keepdim=True)).numpy()

    def images(frames):
        with torch.no_grad():
            return unit(model.encode_image(torch.stack([transform(Image.fromarray(f)) for f in frames])))

    def texts(strings):
        with torch.no_grad():
            return unit(model.encode_text(open_clip.tokenize(strings)))

    return images, texts


@pytest.fixture(scope="module")
def scorer(tiny_clip):
    return ClipScorer.from_spec(ModelSpec(path=str(tiny_clip[0])))


@pytest.fixture(scope="module")
def stage(tiny_clip):
    stage = ClipScore(build_config({}, [f"clip_score.model.path={tiny_clip[0]}"]))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def photos():
    """Real photos of different sizes and aspect ratios (the model's own resize and centre crop apply)."""
    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def clip_record(keyframes, caption):
    """A clip record as clip extraction leaves it: keyframes share one size (here 120x160)."""
    record = Record(kind="clip", source_path="x.mp4", key=f"k{len(keyframes)}")
    record.blobs["keyframes"] = np.stack([cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA) for f in keyframes])
    record.meta["caption"] = {"text": caption, "source": "metadata"} if caption is not None else None
    return record


def test_loader_reads_the_saved_weights(scorer, tiny_clip):
    _, saved = tiny_clip
    loaded = scorer.model.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert not scorer.model.training


def test_embeddings_are_unit_norm_float32(scorer, photos):
    images = scorer.encode_images(photos)
    texts = scorer.encode_texts(["an astronaut", "a cat on a sofa", "a cup of coffee"])
    assert images.shape == (4, 32) and texts.shape == (3, 32)
    assert images.dtype == texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    # Different photos map to different points (a constant or input-blind encoder would fail here).
    assert (images @ images.T)[~np.eye(4, dtype=bool)].max() < 0.9999
    assert scorer.encode_images([]).shape == (0, 32) and scorer.encode_texts([]).shape == (0, 32)


def test_identical_images_have_cosine_one_and_alignment_is_deterministic(scorer, photos):
    a, b = scorer.encode_images([photos[0], photos[0].copy()])
    assert float(a @ b) == pytest.approx(1.0, abs=1e-6)
    caption = "an astronaut in a white suit"
    first = scorer.alignment([photos[0]] * 3, caption)
    assert scorer.alignment([photos[0]] * 3, caption) == first
    single = float(scorer.encode_images([photos[0]])[0] @ scorer.encode_texts([caption])[0])
    assert first == pytest.approx(single, abs=1e-6)
    assert scorer.alignment([photos[0]] * 3, "a rocket on a launch pad") != pytest.approx(first, abs=1e-6)


def test_embeddings_are_those_of_plain_open_clip_on_the_saved_weights(scorer, reference, photos):
    images, texts = reference
    strings = ["an astronaut", "a cat on a sofa", "a cup of coffee"]
    np.testing.assert_allclose(scorer.encode_images(photos), images(photos), atol=1e-5)
    np.testing.assert_allclose(scorer.encode_texts(strings), texts(strings), atol=1e-5)


def test_category_scores_are_cosines_against_the_prompt_template(scorer, reference, photos):
    images, texts = reference
    scores = scorer.category_scores(photos[:3], CATEGORIES)
    assert scores.shape == (3, len(CATEGORIES)) and scores.dtype == np.float32
    prompts = texts([f"a photo of a {c}" for c in CATEGORIES])
    np.testing.assert_allclose(scores, images(photos[:3]) @ prompts.T, atol=1e-5)
    bare = images(photos[:3]) @ texts(CATEGORIES).T
    assert not np.allclose(scores, bare, atol=1e-4)
    assert np.all(np.abs(scores) <= 1 + 1e-5)


def test_batching_matches_one_by_one(tiny_clip, scorer, photos):
    texts = ["a cat", "an astronaut holding a flag next to a rocket on a sunny day", "cup"]
    batched_images, batched_texts = scorer.encode_images(photos), scorer.encode_texts(texts)
    single_images = np.concatenate([scorer.encode_images([p]) for p in photos])
    single_texts = np.concatenate([scorer.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batched_images, single_images, atol=1e-5)
    np.testing.assert_allclose(batched_texts, single_texts, atol=1e-5)
    chunked = ClipScorer.from_spec(ModelSpec(path=str(tiny_clip[0])), max_batch=3)
    np.testing.assert_allclose(chunked.encode_images(photos), batched_images, atol=1e-5)
    np.testing.assert_allclose(chunked.encode_texts(texts), batched_texts, atol=1e-5)


def test_stage_stores_alignment_and_embeddings_through_run_stage(stage, reference, tiny_clip, photos):
    images, texts = reference
    captioned = clip_record(photos[:3], "an astronaut, a cat and a cup of coffee")
    uncaptioned = clip_record(photos[1:3], None)
    empty_caption = clip_record(photos[3:], "")
    out = run_stage(stage, [captioned, uncaptioned, empty_caption])
    assert [r.errors for r in out] == [[], [], []]
    clip_stats = captioned.meta["stats"]["clip"]
    assert clip_stats["model"] == str(tiny_clip[0])
    expected = images(captioned.blobs["keyframes"]) @ texts(["an astronaut, a cat and a cup of coffee"])[0]
    assert clip_stats["caption_alignment"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert uncaptioned.meta["stats"]["clip"]["caption_alignment"] is None
    assert empty_caption.meta["stats"]["clip"]["caption_alignment"] is None
    for record in out:
        embeddings = record.blobs["clip_keyframe_embeddings"]
        assert embeddings.dtype == np.float32 and embeddings.shape == (len(record.blobs["keyframes"]), 32)
        np.testing.assert_allclose(embeddings, images(record.blobs["keyframes"]), atol=1e-5)
        assert record.meta["provenance"]["clip_score"].startswith("open_clip")
        assert "clip_score" in record.meta["timings"]
    # The embeddings survive the Arrow row form that carries records between Ray stages.
    again = Record.from_row(captioned.to_row())
    np.testing.assert_array_equal(again.blobs["clip_keyframe_embeddings"], captioned.blobs["clip_keyframe_embeddings"])


def test_record_without_keyframes_fails_alone(stage, photos):
    broken = Record(kind="clip", source_path="x.mp4", key="broken")
    good = clip_record(photos[:1], "an astronaut")
    run_stage(stage, [broken, good])
    assert broken.errors == [{"stage": "clip_score", "reason": "no_keyframes",
                              "message": "clip_score needs uint8 (K, H, W, 3) keyframes, K >= 1; the record has none"}]
    assert good.alive and isinstance(good.meta["stats"]["clip"]["caption_alignment"], float)


def test_stage_contract_and_resources_from_config(tiny_clip):
    config = build_config({}, [f"clip_score.model.path={tiny_clip[0]}", "clip_score.resources.num_gpus=0.5"])
    stage = ClipScore(config)
    assert stage.name == "clip_score" and stage.stateful
    assert stage.resources.num_gpus == 0.5


def test_missing_model_raises_model_unavailable_naming_the_role(tmp_path, tiny_clip):
    stage = ClipScore(build_config({}, [f"clip_score.model.path={tmp_path / 'nothing'}"]))
    with pytest.raises(ModelUnavailable, match="clip_score model .*no such directory"):
        stage.setup()
    with pytest.raises(ModelUnavailable, match="clip_score model .*no open_clip_config.json"):
        ClipScorer.from_spec(ModelSpec(path=str(tmp_path)))
    # A config without weights would make open_clip random-init with only a log line; the scorer refuses.
    (tmp_path / "open_clip_config.json").write_text((tiny_clip[0] / "open_clip_config.json").read_text())
    with pytest.raises(ModelUnavailable, match="no weights file"):
        ClipScorer.from_spec(ModelSpec(path=str(tmp_path)))


def test_each_detection_crop_gets_its_category_score(stage, reference, photos):
    images, texts = reference
    record = clip_record([photos[0], photos[1]], "a woman")
    record.meta["entities"] = [{"id": "e0", "kind": "subject", "word": "woman", "category": "woman"}]
    record.meta["detections"] = [
        {"id": "d0", "keyframe": 0, "entity": "e0", "label": "woman", "box": [10, 10, 50, 60], "score": 0.9},
        {"id": "d1", "keyframe": 1, "entity": None, "label": "person", "box": [0, 0, 30, 30], "score": 0.8},
    ]
    [out] = run_stage(stage, [record])
    frames = out.blobs["keyframes"]
    crops = [frames[0][10:60, 10:50], frames[1][0:30, 0:30]]
    prompts = texts(["a photo of a woman", "a photo of a person"])
    expected = [float(images([crops[0]])[0] @ prompts[0]), float(images([crops[1]])[0] @ prompts[1])]
    got = [d["clip_category_score"] for d in out.meta["detections"]]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The crop embeddings are kept, row per detection, for the cross-pair pass's object identities.
    np.testing.assert_allclose(out.blobs["detection_clip"], images(crops), atol=1e-5)
