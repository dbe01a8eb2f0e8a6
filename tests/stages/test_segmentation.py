"""The segmentation stage on tiny random-init SAMs of both backends, saved with the libraries' own functions
(segment-anything: `torch.save` of the state dict or safetensors `save_file`, plus sam_config.json; transformers:
`save_pretrained`) and loaded by path through the stage.

Random weights give arbitrary masks, so the tests assert what holds for any weights: shapes, dtypes, values,
alignment with the detections, stats consistent with the masks, batching invariance, and that the weights used
are the weights saved."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage import data
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

from pipeline.core.config import ModelSpec, build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.models.loader import ModelUnavailable
from pipeline.testing.tiny_models import TINY_HF_SAM, TINY_SAM
from stages.segmentation import (
    SamArchitecture,
    SegmentAnythingMasker,
    Segmenter,
    TransformersSamMasker,
    build_sam,
)

WIDTH, HEIGHT = 640, 360
BACKENDS = ["segment-anything", "transformers"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def _shifted(state: dict, seed: int) -> dict:
    """Every weight moved away from anything a fresh init produces, so a loader that re-inits cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def sam_dirs(tmp_path_factory):
    """{"pth": dir, "safetensors": dir} holding the same tiny segment-anything SAM, and the state dict saved."""
    torch.manual_seed(0)
    state = _shifted(build_sam(SamArchitecture(**TINY_SAM)).state_dict(), seed=1)
    dirs = {"pth": tmp_path_factory.mktemp("sam_pth"), "safetensors": tmp_path_factory.mktemp("sam_st")}
    torch.save(state, dirs["pth"] / "tiny_sam.pth")
    save_file(state, str(dirs["safetensors"] / "tiny_sam.safetensors"))
    for path in dirs.values():
        (path / "sam_config.json").write_text(json.dumps(TINY_SAM))
    return dirs, state


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny transformers SamModel + SamProcessor (sized for 64-px inputs) directory, and its state dict."""
    path = tmp_path_factory.mktemp("hf_sam")
    torch.manual_seed(0)
    model = SamModel(SamConfig(**TINY_HF_SAM)).eval()
    model.load_state_dict(_shifted(model.state_dict(), seed=2))
    model.save_pretrained(path)
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    processor.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def model_dir(backend, sam_dirs, hf_dir) -> Path:
    return sam_dirs[0]["pth"] if backend == "segment-anything" else hf_dir[0]


@pytest.fixture(scope="module")
def stages(sam_dirs, hf_dir):
    out = {}
    for backend in BACKENDS:
        config = build_config({}, [f"segmentation.backend={backend}",
                                   f"segmentation.model.path={model_dir(backend, sam_dirs, hf_dir)}"])
        out[backend] = Segmenter(config)
        out[backend].setup()
    return out


@pytest.fixture(scope="module")
def keyframes():
    """Three real 640x360 keyframes that differ: the astronaut, her mirror image, and a zoomed-in crop."""
    base = cv2.resize(data.astronaut(), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    zoomed = cv2.resize(data.astronaut()[40:360, 60:460], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    return np.stack([base, np.ascontiguousarray(base[:, ::-1]), zoomed])


# (keyframe, box): interleaved across keyframes, so masks grouped per keyframe must be put back in this order.
DETECTIONS = [(1, [300, 10, 560, 350]), (0, [180, 10, 380, 160]), (1, [40, 200, 200, 355]),
              (2, [0, 0, 640, 360]), (0, [20, 150, 300, 360])]


def clip_record(keyframes, detections=DETECTIONS, key="clip"):
    """A clip record as grounding leaves it."""
    record = Record(kind="clip", source_path="x.mp4", key=key)
    record.blobs["keyframes"] = keyframes
    record.meta["detections"] = [
        {"id": f"d{i}", "keyframe": frame, "entity": f"e{i % 2}", "label": "person", "box": list(box), "score": 0.5}
        for i, (frame, box) in enumerate(detections)
    ]
    return record


def mismatch(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.astype(bool) != b.astype(bool)))


@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_segment_anything_loads_the_saved_weights(sam_dirs, layout):
    dirs, saved = sam_dirs
    masker = SegmentAnythingMasker.from_spec(ModelSpec(path=str(dirs[layout])))
    loaded = masker.model.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert not masker.model.training
    assert f"tiny_sam.{layout}" in masker.description and "custom vit embed_dim=32" in masker.description


def test_transformers_loads_the_saved_weights(stages, hf_dir):
    _, saved = hf_dir
    model = stages["transformers"].masker.model
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert not model.training


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_align_with_detections_on_real_photos(stages, backend, keyframes):
    stage = stages[backend]
    record = clip_record(keyframes)
    out = run_stage(stage, [record])
    assert out == [record] and record.errors == []
    masks = record.blobs["masks"]
    assert masks.dtype == np.uint8 and masks.shape == (len(DETECTIONS), HEIGHT, WIDTH)
    assert set(np.unique(masks)) <= {0, 1}
    for i, (detection, (frame, box)) in enumerate(zip(record.meta["detections"], DETECTIONS)):
        assert detection["mask_area"] == pytest.approx(masks[i].sum() / (HEIGHT * WIDTH))
        assert isinstance(detection["mask_score"], float) and np.isfinite(detection["mask_score"])
        # Mask i is what the model gives box i on its own keyframe, whatever order the batch ran in.
        alone, score = stage.masker.segment([(keyframes[frame], np.array([box], np.float32))])[0]
        assert mismatch(masks[i], alone[0]) < 1e-3
        assert detection["mask_score"] == pytest.approx(float(score[0]), abs=1e-4)
    # Guard: the masks differ between boxes, so a misaligned mask could not pass the check above by chance.
    assert len({masks[i].tobytes() for i in range(len(masks))}) == len(masks)
    assert record.meta["provenance"]["segmentation"].startswith(backend)
    assert "segmentation" in record.meta["timings"]
    # Masks and stats survive the Arrow row form that carries records between Ray stages.
    again = Record.from_row(record.to_row())
    np.testing.assert_array_equal(again.blobs["masks"], masks)
    assert again.meta["detections"] == record.meta["detections"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_batched_per_keyframe_match_one_at_a_time(stages, backend, keyframes):
    masker = stages[backend].masker
    boxes = np.array([box for _, box in DETECTIONS], np.float32)
    batched_masks, batched_scores = masker.segment([(keyframes[0], boxes)])[0]
    assert batched_masks.shape == (len(boxes), HEIGHT, WIDTH) and batched_masks.dtype == bool
    assert batched_scores.shape == (len(boxes),) and batched_scores.dtype == np.float32
    for i, box in enumerate(boxes):
        alone_masks, alone_scores = masker.segment([(keyframes[0], box[None])])[0]
        assert mismatch(batched_masks[i], alone_masks[0]) < 1e-3
        np.testing.assert_allclose(batched_scores[i], alone_scores[0], atol=1e-5)


def test_transformers_keyframes_batched_through_the_encoder_match_one_by_one(stages, hf_dir, keyframes):
    """Several keyframes with different box counts (padded inside the batch) and sizes in one encoder pass."""
    masker = stages["transformers"].masker
    small = cv2.resize(keyframes[2], (320, 240))
    items = [(keyframes[0], np.array([[10, 10, 300, 300]], np.float32)),
             (keyframes[1], np.array([box for _, box in DETECTIONS], np.float32)),
             (small, np.array([[0, 0, 160, 120], [100, 50, 320, 240]], np.float32))]
    together = masker.segment(items)
    one_by_one = TransformersSamMasker.from_spec(ModelSpec(path=str(hf_dir[0])), max_batch=1).segment(items)
    for (image, boxes), (masks, scores), (masks1, scores1) in zip(items, together, one_by_one):
        assert masks.shape == (len(boxes), *image.shape[:2])
        assert mismatch(masks, masks1) < 1e-3
        np.testing.assert_allclose(scores, scores1, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_of_a_batch_keep_their_own_masks(stages, backend, keyframes):
    """Two records of different sizes in one batch, one without detections."""
    small = np.stack([cv2.resize(f, (320, 180)) for f in keyframes[:2]])
    big = clip_record(keyframes, key="big")
    little = clip_record(small, [(1, [10, 10, 200, 170]), (0, [-20, 50, 400, 200])], key="little")
    empty = clip_record(keyframes[:1], [], key="empty")
    run_stage(stages[backend], [big, little, empty])
    assert [r.errors for r in (big, little, empty)] == [[], [], []]
    assert big.blobs["masks"].shape == (5, HEIGHT, WIDTH)
    assert little.blobs["masks"].shape == (2, 180, 320)
    # Zero detections: an empty stack at keyframe size, so readers never special-case it.
    assert empty.blobs["masks"].shape == (0, HEIGHT, WIDTH) and empty.blobs["masks"].dtype == np.uint8
    assert empty.meta["detections"] == [] and "segmentation" in empty.meta["provenance"]
    alone = clip_record(keyframes[:2], [], key="alone")
    run_stage(stages[backend], [alone])
    assert alone.errors == [] and alone.blobs["masks"].shape == (0, HEIGHT, WIDTH)
    # A box overshooting the frame is clipped for the model; the stored box stays as grounding gave it.
    assert little.meta["detections"][1]["box"] == [-20, 50, 400, 200]
    alone, _ = stages[backend].masker.segment([(small[0], np.array([[0, 50, 320, 180]], np.float32))])[0]
    assert mismatch(little.blobs["masks"][1], alone[0]) < 1e-3


@pytest.mark.parametrize(
    "mutate, reason, message",
    [
        (lambda r: r.blobs.pop("keyframes"), "no_keyframes", "needs uint8 (K, H, W, 3) keyframes"),
        (lambda r: r.meta.pop("detections"), "no_detections", "grounding stage runs before"),
        (lambda r: r.meta["detections"][2].update(keyframe=3), "bad_detection", "detection 2 (d2): keyframe 3"),
        (lambda r: r.meta["detections"][0].update(box=[0, 0, float("nan"), 5]), "bad_detection", "detection 0"),
        (lambda r: r.meta["detections"][1].update(box=[700, 10, 900, 50]), "bad_detection", "empty inside"),
    ],
)
def test_a_bad_record_fails_alone(stages, keyframes, mutate, reason, message):
    bad, good = clip_record(keyframes, key="bad"), clip_record(keyframes, key="good")
    mutate(bad)
    run_stage(stages["segment-anything"], [bad, good])
    assert [e["reason"] for e in bad.errors] == [reason] and message in bad.errors[0]["message"]
    assert "masks" not in bad.blobs and "mask_area" not in str(bad.meta.get("detections"))
    assert good.alive and good.blobs["masks"].shape == (5, HEIGHT, WIDTH)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_runs_and_stays_close_to_float32(stages, backend, sam_dirs, hf_dir, keyframes):
    config = build_config({}, [f"segmentation.backend={backend}", "segmentation.model.dtype=bfloat16",
                               f"segmentation.model.path={model_dir(backend, sam_dirs, hf_dir)}"])
    stage = Segmenter(config)
    stage.setup()
    low, full = clip_record(keyframes), clip_record(keyframes)
    run_stage(stage, [low])
    run_stage(stages[backend], [full])
    assert low.errors == [] and low.blobs["masks"].shape == full.blobs["masks"].shape
    assert mismatch(low.blobs["masks"], full.blobs["masks"]) < 0.05
    assert "dtype=bfloat16" in low.meta["provenance"]["segmentation"]


def _write_code_on_load(marker: Path):
    class RunsCode:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    return RunsCode()


def test_a_pickle_checkpoint_that_carries_code_is_refused(tmp_path, sam_dirs):
    marker = tmp_path / "code_ran"
    state = dict(sam_dirs[1])
    state["extra"] = _write_code_on_load(marker)
    torch.save(state, tmp_path / "sam.pth")
    (tmp_path / "sam_config.json").write_text(json.dumps(TINY_SAM))
    # The file really runs code for a loader without weights_only (segment-anything's own loader is one)...
    torch.load(tmp_path / "sam.pth", weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    # ...and the stage refuses it without running it.
    stage = Segmenter(build_config({}, [f"segmentation.model.path={tmp_path}"]))
    with pytest.raises(ModelUnavailable, match=r"refused.*weights_only=True"):
        stage.setup()
    assert not marker.exists()


def test_sam_config_problems_name_the_fix(tmp_path, sam_dirs):
    spec = ModelSpec(path=str(tmp_path))
    with pytest.raises(ModelUnavailable, match=r"no sam_config.json.*\"model_type\": \"vit_h\""):
        SegmentAnythingMasker.from_spec(spec)
    config = tmp_path / "sam_config.json"
    for content, expected in [
        ({**TINY_SAM, "embed_dims": 32}, r"unknown key 'embed_dims' \(allowed: model_type, checkpoint, embed_dim"),
        ({"model_type": "vit_h", "depth": 2}, r"model_type vit_h fixes the architecture; drop \['depth'\]"),
        ({"model_type": "vit_x"}, r"model_type: Input should be 'vit_h', 'vit_l' or 'vit_b'"),
        ({"embed_dim": 32, "depth": 2}, r"missing \['num_heads', 'global_attn_indexes'\]"),
        ({**TINY_SAM, "global_attn_indexes": [2]}, r"global_attn_indexes \[2\] outside the 2 encoder blocks"),
    ]:
        config.write_text(json.dumps(content))
        with pytest.raises(ModelUnavailable, match=expected):
            SegmentAnythingMasker.from_spec(spec)
    config.write_text(json.dumps(TINY_SAM))
    with pytest.raises(ModelUnavailable, match=r"no checkpoint \(.safetensors, .pth, .pt\)"):
        SegmentAnythingMasker.from_spec(spec)
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes((sam_dirs[0]["pth"] / "tiny_sam.pth").read_bytes())
    with pytest.raises(ModelUnavailable, match=r"several .pth files \(a.pth, b.pth\); name one as \"checkpoint\""):
        SegmentAnythingMasker.from_spec(spec)
    config.write_text(json.dumps({**TINY_SAM, "checkpoint": "b.pth"}))
    assert "b.pth" in SegmentAnythingMasker.from_spec(spec).description
    # Weights of another architecture: torch's key/shape report, attributed to the config.
    config.write_text(json.dumps({**TINY_SAM, "checkpoint": "b.pth", "depth": 3}))
    with pytest.raises(ModelUnavailable, match=r"b.pth does not match the architecture in sam_config.json"):
        SegmentAnythingMasker.from_spec(spec)


def test_explicit_parameters_rebuild_the_registry_architecture():
    """SAM's own defaults plus vit_b's encoder sizes give exactly the registry's vit_b (built on the meta device:
    shapes only, no memory)."""
    from segment_anything import build_sam_vit_b

    with torch.device("meta"):
        registry = build_sam_vit_b(checkpoint=None).state_dict()
        by_type = build_sam(SamArchitecture(model_type="vit_b")).state_dict()
        explicit = build_sam(SamArchitecture(embed_dim=768, depth=12, num_heads=12,
                                             global_attn_indexes=[2, 5, 8, 11])).state_dict()
    shapes = {k: v.shape for k, v in registry.items()}
    assert {k: v.shape for k, v in by_type.items()} == shapes
    assert {k: v.shape for k, v in explicit.items()} == shapes


def test_transformers_processor_sized_for_another_model_is_refused(tmp_path, hf_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((hf_dir[0] / name).read_bytes())
    SamProcessor(SamImageProcessor()).save_pretrained(tmp_path)  # the 1024-px default
    with pytest.raises(ModelUnavailable, match="pads images to 1024x1024 but the model takes 64x64"):
        TransformersSamMasker.from_spec(ModelSpec(path=str(tmp_path)))


def test_stage_contract_and_resources_from_config(tmp_path):
    config = build_config({}, [f"segmentation.model.path={tmp_path / 'nothing'}",
                               "segmentation.resources.num_gpus=0.25", "segmentation.resources.batch_size=4"])
    stage = Segmenter(config)
    assert stage.name == "segmentation" and stage.stateful
    assert stage.resources.num_gpus == 0.25 and stage.resources.batch_size == 4
    with pytest.raises(ModelUnavailable, match="segmentation model .*no such directory"):
        stage.setup()
    with pytest.raises(ValueError, match="segmentation.model is not set"):
        Segmenter(build_config({})).setup()


def test_mobile_sam_real_weights_segment_the_prompted_object():
    """MobileSAM with its real packaged weights: a box around skimage's coffee cup gives the cup (most of the box,
    little outside it), and a box around the astronaut gives her, not the flag or the background."""
    stage = Segmenter(build_config({"segmentation": {"backend": "mobile_sam"}}))
    stage.setup()
    assert "MobileSAM" in stage.masker.description and "mobile_sam.pt" in stage.masker.description
    for image, box in ((data.coffee(), [70, 10, 490, 395]), (data.astronaut(), [100, 5, 370, 512])):
        masks, scores = stage.masker.segment([(image, np.array([box], np.float32))])[0]
        mask = masks[0].astype(bool)
        x0, y0, x1, y1 = box
        inside = mask[y0:y1, x0:x1].sum()
        assert inside / ((x1 - x0) * (y1 - y0)) > 0.4  # the object fills much of its box
        assert inside / mask.sum() > 0.95  # and the mask stays in the box
        assert scores[0] > 0.8


def test_mobile_sam_checkpoint_elsewhere_loads_by_path(tmp_path):
    from stages.segmentation import mobile_sam_checkpoint

    (tmp_path / "mobile_sam.pt").symlink_to(mobile_sam_checkpoint())
    masker = SegmentAnythingMasker.mobile_sam(ModelSpec(path=str(tmp_path)))
    assert str(tmp_path) in masker.description
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailable, match="no checkpoint"):
        SegmentAnythingMasker.mobile_sam(ModelSpec(path=str(empty)))
