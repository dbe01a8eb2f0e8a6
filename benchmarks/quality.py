"""How right the quickstart recipe is on real footage, against labels made by eye (benchmarks/quality_labels.yaml).

The evaluation set is only what installed packages ship: three real videos (pipeline/testing/footage.py: a man in
a car, a street with cyclists, a 212 s music video) and scikit-image's photos. The recipe runs offline and without
captions, as a user's own footage usually comes. Measured:

- shots: precision / recall of the detected cuts (within 2 frames) against the labelled cuts;
- faces: precision / recall of the face backend on labelled stills (face counts per image);
- subjects: recall = planned clips with a labelled usable face (>= 32 px, frontal to three-quarter) that give a
  sample with a person subject; recall_any_person = the same over every clip with a person on screen; precision =
  samples whose subject references show a person the labels put in that clip (checked through the face the faces
  stage found in the reference's instance, matched to the labelled identity's face: cosine >= 0.5);
- references: correct = person references whose face matches the clip's labelled identity, of those checkable (the
  clip's person has a labelled identity); views and attribute references per subject.

The baseline is the recipe as it was before people, views, attribute references and tracking (grounding.saliency
.people/attributes off, references.max_views 1, tracking off), run in the same invocation on the same inputs, so
the gains (after - before) say what those changes bought. Prints one JSON line.

    python benchmarks/quality.py [--models models] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import yaml
from rich.console import Console
from skimage import data

from pipeline.core.config import load_config
from pipeline.core.video import probe
from pipeline.models.faces import load_face_backend
from pipeline.run.runner import curate
from pipeline.store.shards import read_shard_samples
from pipeline.testing.footage import footage
from stages.shot_cut import ShotCutter

REPO = Path(__file__).resolve().parents[1]
LABELS = Path(__file__).with_name("quality_labels.yaml")
BEFORE = ["grounding.saliency.people=false", "grounding.saliency.attributes=false", "references.max_views=1",
          "references.attributes=false", "tracking.enabled=false"]
IDENTITY_COSINE = 0.5
CUT_TOLERANCE = 2


def frame_at(path: Path, seconds: float) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    capture.set(cv2.CAP_PROP_POS_MSEC, seconds * 1000)
    ok, frame = capture.read()
    if not ok:
        raise ValueError(f"{path}: no frame at {seconds} s")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def shot_scores(config, labels: dict) -> dict:
    cutter = ShotCutter(config)
    cutter.setup()
    tp = fp = fn = 0
    for name, video in labels["videos"].items():
        path = footage(name)
        info = probe(str(path))
        cuts, _, _ = cutter.detect(str(path), info.fps, info.width, info.height)
        found = [c for c in cuts if c < video["cuts_until_frame"]]
        truth = list(video["cuts"])
        for cut in found:
            match = next((t for t in truth if abs(t - cut) <= CUT_TOLERANCE), None)
            if match is None:
                fp += 1
            else:
                tp += 1
                truth.remove(match)
        fn += len(truth)
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "cuts_labelled": tp + fn}


def still(item: dict) -> np.ndarray:
    if "photo" in item:
        image = getattr(data, item["photo"])()
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]
    return frame_at(footage(item["video"]), item["at"])


def face_scores(faces, labels: dict) -> dict:
    tp = fp = fn = 0
    for item in labels["stills"]:
        found = len(faces.detect(np.ascontiguousarray(still(item))))
        tp += min(found, item["faces"])
        fp += max(0, found - item["faces"])
        fn += max(0, item["faces"] - found)
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "faces_labelled": tp + fn}


def identities(faces, labels: dict) -> dict[tuple[str, str], np.ndarray]:
    """(video, who) -> the face embedding of the labelled identity frame's largest face."""
    out = {}
    for name, video in labels["videos"].items():
        for who, at in (video.get("identities") or {}).items():
            found = faces.detect(np.ascontiguousarray(frame_at(footage(name), at)))
            if not found:
                raise SystemExit(f"no face on the identity frame of {who} ({name} at {at} s): fix the labels")
            out[(name, who)] = max(found, key=lambda f: f.box[2] - f.box[0]).embedding
    return out


def label_of(labels: dict, video: str, start: float, end: float) -> list | None:
    """The labelled span covering most of [start, end] of a video, if any."""
    best, overlap = None, 0.0
    for span in labels["videos"][video]["people"]:
        o = min(end, span[1]) - max(start, span[0])
        if o > overlap:
            best, overlap = span, o
    return best if best is not None and overlap >= 0.5 * (end - start) else None


def subject_scores(out: Path, labels: dict, ids: dict) -> dict:
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    video_of = {c["key"]: Path(c["source"]).stem for c in clips}
    kept = {c["key"] for c in clips if c["status"] == "kept"}
    manifest = [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["cross_base"] is None]
    parts = {row["key"]: read_shard_samples(out / row["shard"], {row["key"]})[row["key"]] for row in manifest}
    metas = {key: json.loads(sample["json"]) for key, sample in parts.items()}
    usable = anyone = usable_hit = anyone_hit = 0
    right_samples = correct = checked = person_samples = 0
    views, attributes, subjects = [], [], 0
    for clip in clips:
        video = video_of[clip["key"]]
        span = label_of(labels, video, clip["start_s"] or 0.0, clip["end_s"] or 0.0)
        meta = metas.get(clip["key"]) if clip["key"] in kept else None
        people = [e for e in (meta or {}).get("entities", [])
                  if e.get("kind") == "subject" and e.get("references")]
        if span is not None:
            anyone += 1
            anyone_hit += bool(people)
            if span[3]:
                usable += 1
                usable_hit += bool(people)
        if not people:
            continue
        person_samples += 1
        identity = ids.get((video, span[2])) if span is not None else None
        faces = meta.get("faces") or []
        npy = parts[clip["key"]].get("faces.npy")
        embeddings = np.load(io.BytesIO(npy), allow_pickle=False) if npy else None
        sample_ok = True
        for entity in people:
            subjects += 1
            whole = [r for r in entity["references"] if not r.get("attribute")]
            views.append(len({r["view_id"] for r in whole}))
            attributes.append(len(entity["references"]) - len(whole))
            for ref in whole:
                row = next((i for i, f in enumerate(faces) if f.get("detection") == ref["detection"]), None)
                if identity is None or row is None or embeddings is None:
                    sample_ok = sample_ok and span is not None
                    continue
                checked += 1
                match = float(np.dot(embeddings[row], identity)) >= IDENTITY_COSINE
                correct += match
                sample_ok = sample_ok and match
        right_samples += sample_ok
    return {
        "recall": ratio(usable_hit, usable), "recall_any_person": ratio(anyone_hit, anyone),
        "precision": ratio(right_samples, person_samples), "clips_with_usable_face": usable,
        "clips_with_a_person": anyone, "samples_with_a_person": person_samples,
        "references_correct": ratio(correct, checked), "references_checked": checked,
        "views_per_subject": round(float(np.mean(views)), 3) if views else None,
        "attribute_references_per_subject": round(float(np.mean(attributes)), 3) if attributes else None,
        "subjects": subjects, "clips": len(clips), "samples": len(manifest),
    }


def run_recipe(videos: Path, out: Path, models: Path, overrides: list[str]) -> float:
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         [f"grounding.model.path={models / 'u2netp'}", *overrides])
    config.input.paths = [str(videos)]
    started = time.perf_counter()
    curate(config, out, console=Console(quiet=True), sequential=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=str(REPO / "models"), help="directory holding u2netp/ (s2v models fetch)")
    parser.add_argument("--keep", help="write the two runs' outputs here (after/ and before/) instead of a temp dir")
    args = parser.parse_args()
    labels = yaml.safe_load(LABELS.read_text())
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="s2v-quality-"))
    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for name in labels["videos"]:
        shutil.copy(footage(name), videos / f"{name}.mp4")
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         [f"grounding.model.path={Path(args.models) / 'u2netp'}"])
    faces = load_face_backend(config.faces)
    ids = identities(faces, labels)
    result: dict = {"shots": shot_scores(config, labels), "faces": face_scores(faces, labels)}
    for name, overrides in (("after", []), ("before", BEFORE)):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        seconds = run_recipe(videos, out, Path(args.models), overrides)
        result[name] = {**subject_scores(out, labels, ids), "wall_s": round(seconds, 1)}
    after, before = result["after"], result["before"]
    # Gains, not ratios: the baseline's recall is often 0 on captionless footage (it had no way to find anyone).
    for key in ("recall", "recall_any_person"):
        result[f"{key}_gain"] = round((after[key] or 0.0) - (before[key] or 0.0), 4)
    result["samples_gain"] = after["samples"] - before["samples"]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
