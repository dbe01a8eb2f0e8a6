"""Items/s of each model stage on this machine's CPU: the offline real-weight backends (dlib faces, taxonomy
entities, U2-Net-p saliency grounding, MobileSAM segmentation, tracking by face and by appearance) and tiny
random-init models of the production classes (Qwen2.5-VL, Grounding DINO, SAM, open_clip), which measure the
stage's own overhead around the model, not production model speed.

Each stage runs through `run_stage` on clip records made from real photos (3 keyframes of 640x360 per clip).
Prints one JSON object on its last line: {"<stage>": {"items_per_s", "items", "model"}, ...}.
Production-size numbers need a GPU machine; record them in docs/performance.md when one is available.

    python benchmarks/model_stages.py [--clips 8] [--models models]

The saliency row needs `s2v models fetch u2netp --dir models` first (it is skipped, and says so, without it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.testing.tiny_models import build_tiny_models

REPO = Path(__file__).resolve().parents[1]
CAPTION = "A smiling woman in an orange spacesuit holds a cup of coffee next to a tabby cat on a brick wall."


def clip_records(count: int) -> list[Record]:
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    frames = np.stack([cv2.resize(p, (640, 360), interpolation=cv2.INTER_AREA) for p in photos])
    records = []
    for i in range(count):
        record = Record(kind="clip", source_path="bench.mp4", key=f"k{i}")
        record.blobs["keyframes"] = frames.copy()
        record.meta["caption"] = {"text": CAPTION, "source": "metadata"}
        records.append(record)
    return records


def measure(stage_cls, overrides: list[str], records: list[Record], batch: int) -> float:
    stage = stage_cls(build_config({}, overrides))
    stage.setup()
    run_stage(stage, [r for r in records[:1]])  # warm-up: first-call costs are not throughput
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        run_stage(stage, records[i : i + batch])
    return len(records) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--models", default="models", help="where `s2v models fetch` put u2netp/")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per worker, as in a run
    from stages.captioning import Captioner
    from stages.clip_score import ClipScore
    from stages.entities import EntityExtractor
    from stages.faces import FaceDetector
    from stages.grounding import Grounder
    from stages.saliency_grounding import SaliencyGrounder
    from stages.segmentation import Segmenter

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = build_tiny_models(Path(tmp))
        plan = [
            ("entities", EntityExtractor, [], "taxonomy (real)"),
            ("faces", FaceDetector, [], "dlib HOG + ResNet-128 (real weights)"),
            ("caption", Captioner, [f"caption.model.path={models['qwen']}", "caption.max_new_tokens=16",
                                    "caption.replace_metadata_captions=true"], "tiny Qwen2.5-VL"),
            ("grounding", Grounder, [f"grounding.model.path={models['gdino']}"], "tiny Grounding DINO"),
            ("clip_score", ClipScore, [f"clip_score.model.path={models['clip']}"], "tiny open_clip ViT"),
        ]
        u2netp = Path(args.models) / "u2netp"
        if (u2netp / "u2netp.onnx").is_file():
            plan.append(("grounding_saliency", SaliencyGrounder,
                         ["grounding.backend=saliency", f"grounding.model.path={u2netp}"],
                         "U2-Net-p + dlib HOG binding (real weights)"))
        else:
            results["grounding_saliency"] = {"skipped": f"no {u2netp}/u2netp.onnx: run s2v models fetch u2netp"}
        for name, cls, overrides, model in plan:
            fresh = clip_records(args.clips)
            if name.startswith("grounding"):  # grounding needs entities
                fresh = run_stage(EntityExtractor(build_config()), fresh)
            rate = measure(cls, overrides, fresh, args.batch)
            results[name] = {"items_per_s": round(rate, 2), "items": args.clips, "model": model}
        # Segmentation needs detections: give every keyframe three boxes.
        fresh = clip_records(args.clips)
        for record in fresh:
            record.meta["detections"] = [
                {"id": f"d{k * 3 + j}", "keyframe": k, "entity": None, "label": "person",
                 "box": [40 + 150 * j, 40, 180 + 150 * j, 300], "score": 0.9}
                for k in range(3) for j in range(3)
            ]
        rate = measure(Segmenter, [f"segmentation.model.path={models['sam']}"], fresh, args.batch)
        results["segmentation"] = {"items_per_s": round(rate, 2), "items": args.clips, "model": "tiny SAM (9 boxes)"}
        rate = measure(Segmenter, ["segmentation.backend=mobile_sam"], fresh, args.batch)
        results["segmentation_mobile_sam"] = {"items_per_s": round(rate, 2), "items": args.clips,
                                              "model": "MobileSAM vit_t, real weights (9 boxes)"}
        # Tracking needs a real clip: a 4 s 640x360 mp4 of a photo moving on a lawn, followed by face (the
        # astronaut: dlib on 8 sampled frames) and by appearance (the cat: template matching).
        from pipeline.models.faces import load_face_backend
        from pipeline.testing.clips import CAT, leaving_clip
        from stages.tracking import SubjectTracker

        faces = load_face_backend(build_config().faces)
        for name, photo, box, by_face in (("tracking_face", data.astronaut(), [200, 40, 440, 330], True),
                                          ("tracking_appearance", data.chelsea(), CAT, False)):
            fresh = [leaving_clip(photo, box, key=f"k{i}") for i in range(args.clips)]
            if by_face:
                for record in fresh:
                    found = faces.detect(np.ascontiguousarray(record.blobs["keyframes"][0]))
                    record.meta["entities"][0]["kind"] = "subject"
                    record.meta["faces"] = [{"keyframe": 0, "detection": "d0", "score": found[0].score}]
                    record.blobs["face_embeddings"] = found[0].embedding[None]
            rate = measure(SubjectTracker, [], fresh, args.batch)
            results[name] = {"items_per_s": round(rate, 2), "items": args.clips,
                             "model": "4 s clip, 8 frames: " + ("dlib faces" if by_face else "template matching")}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
