"""The inpainting stage: OpenCV Telea on real photos, and a tiny random-init diffusers FluxFillPipeline saved with
`save_pretrained` and loaded by path through the stage.

Random FLUX weights paint noise, so the FLUX tests assert what holds for any weights: shapes, that only masked
pixels change, reproducibility under a seed, independence from batching, and that the model loaded is the one
configured. Fill quality is asserted on the OpenCV backend, whose output is deterministic and meaningful."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.models.loader import ModelUnavailable
from stages.inpainting import FluxFill, Inpainter, OpenCvFill

WIDTH, HEIGHT = 640, 360
# Working resolution of the FLUX tests; the frames are not multiples of 16, so the resizing is exercised.
FLUX_WIDTH, FLUX_HEIGHT = 150, 90


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def save_tiny_flux_fill(directory: Path, fill: bool = True) -> Path:
    """A random-init FluxFillPipeline of tiny real components, written with `pipeline.save_pretrained(directory)`.

    The VAE has four blocks like FLUX's, so `vae_scale_factor` is 8 and images must be multiples of 16. The Fill
    transformer takes the noisy latents, the masked image's latents (4 * latent_channels each after 2x2 packing)
    and the mask (vae_scale_factor**2 per latent pixel, times 4 after packing). `fill=False` gives a text-to-image
    FLUX transformer (latents only), which a Fill pipeline must refuse. The tokenizers are built offline from small
    inline vocabularies (character-level BPE for CLIP, a unigram word list for T5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    latent, blocks = 4, 4
    scale = 2 ** (blocks - 1)
    words = ["a", "an", "empty", "scene", "with", "nothing", "in", "the", "foreground", "photo", "of"]
    chars = sorted(set("".join(words)))
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        clip_vocab.setdefault(c, len(clip_vocab))
        clip_vocab.setdefault(c + "</w>", len(clip_vocab))
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    tokenizer_2 = T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
        + [(c, -5.0) for c in chars],
        extra_ids=0,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, decoder_start_token_id=0))
    vae = AutoencoderKL(
        block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=latent, norm_num_groups=4, layers_per_block=1,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    in_channels = 4 * latent * 2 + scale * scale * 4 if fill else 4 * latent
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=4 * latent, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    pipeline = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipeline.save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return save_tiny_flux_fill(tmp_path_factory.mktemp("flux_fill"))


def flux_config(path, *overrides):
    return build_config({}, ["inpaint.backend=flux-fill", f"inpaint.model.path={path}", "inpaint.steps=2",
                             "inpaint.max_side=64", *overrides])


@pytest.fixture(scope="module")
def flux_stage(flux_dir):
    stage = Inpainter(flux_config(flux_dir))
    stage.setup()
    return stage


def brick_with_object():
    """(true background, the background with a coffee photo pasted in a rectangle, the rectangle's mask)."""
    background = cv2.resize(cv2.cvtColor(data.brick(), cv2.COLOR_GRAY2RGB), (WIDTH, HEIGHT),
                            interpolation=cv2.INTER_AREA)
    y0, y1, x0, x1 = 100, 260, 220, 440
    pasted = background.copy()
    pasted[y0:y1, x0:x1] = cv2.resize(data.coffee(), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return background, pasted, mask


def real_keyframes(width=WIDTH, height=HEIGHT):
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    return np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA) for p in photos])


def ellipse_mask(height, width, center, axes):
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1, -1)
    return mask


def clip_record(keyframes, key="clip", with_masks=True):
    """A clip record as segmentation and the reference stage leave it: detections (two on keyframe 1, one on
    keyframe 0, and an attribute region on keyframe 1 that the plate must ignore), their masks, and three
    references: a pending `inpaint` one, a `crop` and a `segment`."""
    _, height, width, _ = keyframes.shape
    sx, sy = width / WIDTH, height / HEIGHT

    def box(x0, y0, x1, y1):
        return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]

    record = Record(kind="clip", source_path="x.mp4", key=key)
    record.blobs["keyframes"] = keyframes
    record.meta["detections"] = [
        {"id": "d0", "keyframe": 0, "box": box(100, 50, 300, 300), "part": None},
        {"id": "d1", "keyframe": 1, "box": box(60, 40, 260, 300), "part": None},
        {"id": "d2", "keyframe": 1, "box": box(400, 100, 600, 340), "part": None, "entity": None},
        {"id": "d3", "keyframe": 1, "box": box(300, 0, 380, 60), "part": "top", "entity": "e0"},
    ]
    if with_masks:
        centers = [((200, 175), (100, 125)), ((160, 170), (100, 130)), ((500, 220), (100, 120)),
                   ((340, 30), (40, 30))]
        record.blobs["masks"] = np.stack([
            ellipse_mask(height, width, (int(cx * sx), int(cy * sy)), (int(ax * sx), int(ay * sy)))
            for (cx, cy), (ax, ay) in centers
        ])
    crop = np.ascontiguousarray(keyframes[0][20:140, 30:120])
    record.meta["references"] = [
        {"k": 0, "variant": "inpaint", "pending": True, "entity": "e0"},
        {"k": 1, "variant": "crop", "entity": "e0"},
        {"k": 2, "variant": "segment", "pending": True, "entity": "e1"},
    ]
    for k in range(3):
        record.blobs[f"ref{k}"] = crop.copy()
        record.blobs[f"refmask{k}"] = ellipse_mask(*crop.shape[:2], (crop.shape[1] // 2, crop.shape[0] // 2),
                                                   (crop.shape[1] // 3, crop.shape[0] // 3))
    return record


def dilated_union(masks, indices, dilate_px):
    union = np.zeros(masks.shape[1:], np.uint8)
    for i in indices:
        union |= masks[i]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    return cv2.dilate(union, kernel) > 0


def test_opencv_fill_recovers_the_background_inside_the_mask_only():
    background, pasted, mask = brick_with_object()
    filled = OpenCvFill().fill(pasted, mask)
    assert filled.shape == pasted.shape and filled.dtype == np.uint8
    inside = mask > 0
    before = np.abs(pasted.astype(int) - background)[inside].mean()
    after = np.abs(filled.astype(int) - background)[inside].mean()
    # Telea is smooth, the bricks are not, so the texture stays as error (~16 levels); the coffee cup was ~68.
    assert after * 3 < before, (before, after)
    assert abs(filled[inside].mean() - background[inside].mean()) < 10
    assert np.array_equal(filled[~inside], pasted[~inside])


def test_opencv_fill_at_reduced_size_is_as_good_and_degenerate_masks():
    background, pasted, mask = brick_with_object()
    inside = mask > 0
    reduced = OpenCvFill(max_side=256).fill(pasted, mask)
    full = cv2.inpaint(pasted, mask, 3, cv2.INPAINT_TELEA)  # what the fallback would cost without resizing

    def error(image):
        return np.abs(image.astype(int) - background)[inside].mean()

    assert error(reduced) < 1.2 * error(full)
    assert np.array_equal(reduced[~inside], pasted[~inside])
    assert np.array_equal(OpenCvFill().fill(pasted, np.zeros_like(mask)), pasted)
    assert (OpenCvFill().fill(pasted, np.ones_like(mask)) == 128).all()  # nothing known to fill from
    with pytest.raises(ValueError, match="does not match"):
        OpenCvFill().fill(pasted, mask[:10])


def test_inpainter_opencv_plate_and_references():
    config = build_config({}, ["background.dilate_px=9"])
    stage = Inpainter(config)
    assert not stage.stateful and stage.resources == config.inpaint.resources
    keyframes = real_keyframes()
    good = clip_record(keyframes, key="good")
    no_keyframes = clip_record(keyframes, key="bare")
    del no_keyframes.blobs["keyframes"]
    untouched = {k: good.blobs[f"ref{k}"].copy() for k in (1, 2)}
    crop, subject = good.blobs["ref0"].copy(), good.blobs["refmask0"] > 0

    out = run_stage(stage, [good, no_keyframes])

    assert [r.key for r in out] == ["good", "bare"]
    assert good.alive and not good.errors
    assert no_keyframes.errors == [{"stage": "inpainting", "reason": "no_keyframes",
                                    "message": no_keyframes.errors[0]["message"]}]
    plate = good.blobs["background"]
    assert plate.shape == (HEIGHT, WIDTH, 3) and plate.dtype == np.uint8
    hole = dilated_union(good.blobs["masks"], [1, 2], 9)  # keyframe 1's instances; not d3, an attribute region
    meta = good.meta["background"]
    assert meta == {"keyframe": 1, "backend": "opencv-telea", "mask_area": pytest.approx(hole.mean()),
                    "dilate_px": 9}
    assert np.array_equal(plate[~hole], keyframes[1][~hole])
    assert (plate[hole] != keyframes[1][hole]).any(axis=-1).mean() > 0.5
    # The inpaint reference: the subject as cut, its surroundings generated, and the reference marked done.
    ref = good.meta["references"][0]
    assert ref["pending"] is False and ref["inpaint_backend"].startswith("opencv-telea: opencv")
    assert np.array_equal(good.blobs["ref0"][subject], crop[subject])
    assert (good.blobs["ref0"][~subject] != crop[~subject]).any()
    # Other variants are not this stage's business.
    assert good.meta["references"][1] == {"k": 1, "variant": "crop", "entity": "e0"}
    assert good.meta["references"][2] == {"k": 2, "variant": "segment", "pending": True, "entity": "e1"}
    for k, before in untouched.items():
        assert np.array_equal(good.blobs[f"ref{k}"], before)
    assert good.meta["provenance"]["inpainting"] == stage.filler.description
    assert "timings" in good.meta and "background" not in no_keyframes.blobs


def test_inpainter_box_fallback_keyframe_fallback_and_empty_clip():
    stage = Inpainter(build_config({}, ["background.dilate_px=0", "background.keyframe=7"]))
    keyframes = real_keyframes()
    boxes = clip_record(keyframes, key="boxes", with_masks=False)
    empty = clip_record(keyframes, key="empty")
    empty.meta["detections"], empty.blobs["masks"] = [], np.zeros((0, HEIGHT, WIDTH), np.uint8)
    empty.meta["references"] = []

    run_stage(stage, [boxes, empty])

    assert boxes.alive and empty.alive
    # Keyframe 7 of 3: the middle one, with a warning; without masks the boxes are filled as rectangles.
    assert boxes.meta["background"]["keyframe"] == 1
    assert any("past the clip's 3 keyframes" in w["message"] for w in boxes.meta["warnings"])
    hole = np.zeros((HEIGHT, WIDTH), bool)
    hole[40:300, 60:260] = hole[100:340, 400:600] = True
    assert boxes.meta["background"]["mask_area"] == pytest.approx(hole.mean())
    assert np.array_equal(boxes.blobs["background"][~hole], keyframes[1][~hole])
    # No detections at all: the plate is the keyframe itself.
    assert empty.meta["background"]["mask_area"] == 0.0
    assert np.array_equal(empty.blobs["background"], keyframes[1])


@pytest.mark.parametrize("damage, reason", [
    (lambda r: r.blobs.__setitem__("masks", r.blobs["masks"][:, :10]), "bad_mask"),
    (lambda r: r.blobs.__setitem__("masks", r.blobs["masks"][:2]), "bad_mask"),
    (lambda r: r.blobs.__setitem__("refmask0", r.blobs["refmask0"][:5]), "bad_mask"),
    (lambda r: r.blobs.pop("ref0"), "bad_reference"),
    (lambda r: r.blobs.__setitem__("keyframes", r.blobs["keyframes"][..., 0]), "no_keyframes"),
])
def test_a_bad_record_fails_alone_and_unchanged(damage, reason):
    stage = Inpainter(build_config({}, []))
    keyframes = real_keyframes()
    bad, good = clip_record(keyframes, key="bad"), clip_record(keyframes, key="good")
    damage(bad)

    run_stage(stage, [bad, good])

    assert [e["reason"] for e in bad.errors] == [reason]
    assert "background" not in bad.meta and bad.meta["references"][0]["pending"] is True
    assert good.alive and "background" in good.blobs


def test_empty_subject_mask_leaves_the_reference_with_a_warning():
    stage = Inpainter(build_config({}, ["background.enabled=false"]))
    record = clip_record(real_keyframes())
    record.blobs["refmask0"][:] = 0
    before = record.blobs["ref0"].copy()
    run_stage(stage, [record])
    assert record.alive and "background" not in record.meta and "background" not in record.blobs
    assert record.meta["references"][0]["pending"] is False
    assert record.meta["references"][0]["inpaint_skipped"] == "empty subject mask"
    assert np.array_equal(record.blobs["ref0"], before)
    assert any("subject mask is empty" in w["message"] for w in record.meta["warnings"])


def test_flux_fill_stage_loads_by_path_and_fills_inside_the_masks(flux_stage, flux_dir):
    assert flux_stage.stateful
    assert isinstance(flux_stage.filler, FluxFill) and flux_stage.filler.multiple == 16
    keyframes = real_keyframes(FLUX_WIDTH, FLUX_HEIGHT)
    records = [clip_record(keyframes, key="a"), clip_record(keyframes, key="b")]
    crop, subject = records[0].blobs["ref0"].copy(), records[0].blobs["refmask0"] > 0

    run_stage(flux_stage, records)

    record = records[0]
    assert record.alive
    plate = record.blobs["background"]
    assert plate.shape == (FLUX_HEIGHT, FLUX_WIDTH, 3) and plate.dtype == np.uint8
    hole = dilated_union(record.blobs["masks"], [1, 2], 15)
    assert record.meta["background"]["backend"] == "flux-fill"
    assert np.array_equal(plate[~hole], keyframes[1][~hole])
    assert (plate[hole] != keyframes[1][hole]).any()
    ref = record.blobs["ref0"]
    assert ref.shape == crop.shape and np.array_equal(ref[subject], crop[subject])
    assert record.meta["references"][0]["pending"] is False
    provenance = record.meta["provenance"]["inpainting"]
    assert provenance.startswith("flux-fill: diffusers") and str(flux_dir) in provenance and "steps=2" in provenance
    # Same inputs, same seed: the same pixels, whichever record of the batch.
    assert np.array_equal(records[1].blobs["background"], plate)
    assert np.array_equal(records[1].blobs["ref0"], ref)


def test_flux_fill_is_reproducible_and_independent_of_batching(flux_stage, flux_dir):
    keyframes = real_keyframes(FLUX_WIDTH, FLUX_HEIGHT)
    hole = ellipse_mask(FLUX_HEIGHT, FLUX_WIDTH, (75, 45), (30, 20))
    other = ellipse_mask(FLUX_HEIGHT, FLUX_WIDTH, (40, 30), (20, 15))
    filler = flux_stage.filler
    first = filler.fill(keyframes[0], hole)
    assert np.array_equal(filler.fill(keyframes[0], hole), first)
    batched = filler.fill_many([(keyframes[2], other), (keyframes[0], hole)])
    assert np.abs(batched[1].astype(int) - first).max() <= 1  # batched matmuls may round differently
    reseeded = Inpainter(flux_config(flux_dir, "inpaint.seed=1"))
    reseeded.setup()
    assert not np.array_equal(reseeded.filler.fill(keyframes[0], hole), first)


def test_flux_fill_working_size(flux_stage):
    filler = flux_stage.filler
    assert filler.working_size(90, 150) == (32, 64)
    assert filler.working_size(10, 12) == (16, 16)
    assert filler.working_size(64, 64) == (64, 64)
    assert all(side <= 64 and side % 16 == 0 for side in filler.working_size(1080, 1920))


def test_flux_fill_refuses_a_missing_or_wrong_model(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelUnavailable, match="inpainting model .*no-such-model.* is not available"):
        Inpainter(flux_config(missing)).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="no model_index.json"):
        Inpainter(flux_config(tmp_path / "empty")).setup()
    text_to_image = save_tiny_flux_fill(tmp_path / "t2i", fill=False)
    with pytest.raises(ModelUnavailable, match="not a FLUX Fill model: its transformer takes 16 input channels"):
        Inpainter(flux_config(text_to_image)).setup()


def test_a_missing_flux_fill_directory_fails_preflight(tmp_path, u2netp_dir):
    from pipeline.core.config import ConfigError, load_config
    from stages import preflight

    config = load_config("configs/quickstart.yaml", [
        f"grounding.model.path={u2netp_dir}", "inpaint.backend=flux-fill",
        f"inpaint.model.path={tmp_path / 'no-such-fill'}"])
    with pytest.raises(ConfigError, match="inpaint model .*no-such-fill"):
        preflight(config)
