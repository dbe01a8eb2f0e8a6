"""Every model stage in one run: tiny random-init models of the real classes (Qwen2.5-VL, Grounding DINO, SAM,
open_clip), saved with their libraries' own save functions and named in the config by path, curated through the
runner on Ray. Random weights make the content arbitrary; the test asserts that the stages compose: each one's
output is there, in the place and shape the next one and the shard format expect."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds

from pipeline.core.config import build_config
from pipeline.run.runner import curate


@pytest.mark.ray
def test_model_stages_compose_on_ray(tiny_model_dirs, demo_corpus, tmp_path):
    # Metadata captions win over the (gibberish) VLM captions, so taxonomy entities exist and grounding,
    # segmentation, faces and CLIP all get work. The VLM entity path has its own tests: random weights never
    # write valid entity JSON, so with it every clip would (rightly) stop at "entities_malformed".
    small = "{num_cpus: 0.2, batch_size: 4, workers: 1}"  # the five model actors must leave a CPU to the decode tasks
    config = build_config({}, [
        f"caption.model.path={tiny_model_dirs['qwen']}", "caption.max_new_tokens=8", "caption.max_pixels=12544",
        f"caption.resources={small}",
        f"grounding.model.path={tiny_model_dirs['gdino']}", "grounding.box_threshold=0.0",
        "grounding.text_threshold=0.0",
        f"grounding.resources={small}",
        f"segmentation.model.path={tiny_model_dirs['sam']}", f"segmentation.resources={small}",
        f"clip_score.model.path={tiny_model_dirs['clip']}", f"clip_score.resources={small}",
        f"metrics.resources={small}",
        "shots.max_clip_s=4.0", "clips.max_short_side=120", "ray.progress=false", "ray.num_cpus=2",
        # Random boxes would rarely pass real thresholds; these let every object instance through, so the
        # consolidation, reference and inpainting stages get work (their decisions have their own tests).
        ("filters.instances={min_area: 0, max_area: 1, max_iou: 1, min_brightness: 0, min_sharpness: 0, "
        "require_face: false}"),
        "consolidation.min_appearance=-1", "consolidation.max_area_ratio=1000000",
    ])
    config.input.paths = [str(min((demo_corpus / "videos").glob("*.mp4")))]
    config.input.metadata = str(demo_corpus / "metadata.jsonl")
    out = tmp_path / "out"
    summary = curate(config, out)
    flow = summary["last_run"]["flow"]
    assert flow["stages"] == ["probe", "shot_cut", "clip_extract", "quality_stats", "quality_filter", "caption",
                              "entities", "grounding", "segmentation", "faces", "clip_score", "instance_stats",
                              "instance_filter", "consolidation", "tracking", "track_filter", "references",
                              "inpainting", "metrics"]
    assert flow["off"] == ["references.redux", "metrics.dino_i"]
    assert set(flow["substitutes"]) == {"entities", "faces", "inpainting"}
    removed = {reason for step in summary["funnel"] for reason in step["removed"]}
    assert removed <= {"too_dark", "blurry", "no_valid_entity", "subject_absent"}, summary["funnel"]
    index = json.loads((out / "index.json").read_text())
    samples = list(wds.WebDataset([str(out / e["url"]) for e in index["shardlist"]], shardshuffle=False))
    assert samples and len(samples) == summary["samples"]
    detections = 0
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["caption"]["source"] == "metadata"  # kept: replace_metadata_captions is off
        assert meta["entities"] and meta["stats"]["clip"]["caption_alignment"] is not None
        for stage in ("caption", "grounding", "segmentation", "faces", "clip_score"):
            assert stage in meta["provenance"]["stages"], stage
        for det in meta["detections"]:
            assert 0.0 <= det["mask_area"] <= 1.0 and "mask_score" in det
        if meta["detections"]:  # CLIP crop embeddings, row per detection, for object identities
            crops = np.load(io.BytesIO(sample["dclip.npy"]))
            assert crops.shape[0] == len(meta["detections"]) and crops.dtype == np.float32
        references = [r for e in meta["entities"] for r in e.get("references", [])]
        assert references and all(r["file"] in sample and r["mask"] in sample for r in references)
        assert "bg.png" in sample and meta["background"]["backend"] == "opencv-telea"
        # Data-quality metrics with CLIP: CLIP-I from clip_score's embeddings, the background measured by CLIP.
        metrics = meta["stats"]["metrics"]
        clip = f"open_clip {tiny_model_dirs['clip']}"
        assert metrics["backends"]["background"] == metrics["backends"]["clip_i"] == clip
        assert [m["file"] for m in metrics["references"]] == [r["file"] for r in references]
        assert abs(metrics["caption_alignment"] - meta["stats"]["clip"]["caption_alignment"]) < 1e-4
        detections += len(meta["detections"])
    assert detections > 0  # threshold 0: every grounded word yields boxes, and each got a mask
