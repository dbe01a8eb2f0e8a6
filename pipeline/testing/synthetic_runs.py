"""Committed runs written the way a real one is (ShardSink + ledger, real PNG references and masks cut from
skimage photos, unit face embeddings with faces.npy rows aligned to KEY.json "faces"), for the tests of the
post-passes and inspection tools. Only the mp4 members are placeholder bytes: nothing that reads these runs decodes
them."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import yaml
from skimage import data

from pipeline.core.config import OutputConfig, RunConfig
from pipeline.postpass.cross_pairs import build_cross_pairs
from pipeline.store.ledger import Ledger, as_storage
from pipeline.store.shards import ShardSink, image_png, mask_png, npy_bytes, sample_json

CLIPS_PER_SOURCE = 5
DIM = 128
PICTURES = [data.astronaut(), data.chelsea(), data.coffee()]


def identity_of(source: int, clip: int) -> int:
    """Sources 0-29: pairs of sources share a person; 30-34: one person per source (partners only in other clips
    of the same source); 35-39 and later: a new person in every clip (no partner anywhere)."""
    if source < 30:
        return source // 2
    if source < 35:
        return 1000 + source
    return 10_000 + source * CLIPS_PER_SOURCE + clip


def embedding(identity: int, key: str) -> np.ndarray:
    person = np.random.default_rng(identity).normal(size=DIM)
    person /= np.linalg.norm(person)
    noisy = person + np.random.default_rng(zlib.crc32(key.encode())).normal(scale=0.01, size=DIM)
    return (noisy / np.linalg.norm(noisy)).astype(np.float32)


def picture_crop(source: int, clip: int, height: int, width: int) -> np.ndarray:
    picture = PICTURES[source % len(PICTURES)]
    y, x = (clip * 37) % (picture.shape[0] - 200), (source * 23) % (picture.shape[1] - 200)
    return np.ascontiguousarray(
        cv2.resize(picture[y:y + 200, x:x + 200], (width, height), interpolation=cv2.INTER_AREA)
    )


def ellipse_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2, height // 2), (width // 2 - 4, height // 2 - 2), 0, 0, 360, 1, -1)
    return mask


def source_entry_and_samples(source: int):
    """One curated source with CLIPS_PER_SOURCE kept clips, as the runner would hand them to ShardSink."""
    sid = f"{source:016x}"
    rows, clips, samples = [], [], []
    for clip in range(CLIPS_PER_SOURCE):
        key = f"{sid}-{clip * 100:07d}-{clip * 100 + 90:07d}"
        n = source * CLIPS_PER_SOURCE + clip
        faces = [{"detection": "d9", "entity": None, "keyframe": 1, "box": [0, 0, 8, 8], "score": 0.9, "frontal": True},
                 {"detection": "d0", "entity": "e0", "keyframe": 1, "box": [10, 5, 30, 25], "score": 0.9,
                  "frontal": True}]
        # Row 0 is a bystander's face, row 1 the subject's: the pass must pick the row by detection id.
        table = np.stack([embedding(1_000_000 + n, key), embedding(identity_of(source, clip), key)])
        entities, blobs = [], {}
        with_refs = n % 10 != 9  # every tenth sample has nothing to replace
        names = [("e0", "subject", "d0")] + ([("e1", "object", "d1")] if clip == 1 else [])
        for k, (eid, kind, det) in enumerate(names if with_refs else []):
            variant = "segment" if (n + k) % 2 == 0 else "crop"
            ref = picture_crop(source, clip + 7 * k, 64, 48)
            mask = ellipse_mask(64, 48)
            blobs[f"ref{k}.png"] = image_png(np.dstack([ref, mask * 255]) if variant == "segment" else ref)
            blobs[f"mask{k}.png"] = mask_png(mask)
            entities.append({"id": eid, "kind": kind, "group": f"g{k}", "subject_id": k, "view_id": 0,
                             "reference": {"detection": det, "keyframe": 1},
                             "references": [{"file": f"ref{k}.png", "mask": f"mask{k}.png", "entity": eid,
                                             "variant": variant, "requested": variant, "detection": det,
                                             "keyframe": 1, "frame_index": 45, "box": [10, 5, 58, 69],
                                             "scores": {"detection": 0.9}, "source_clip": f"clip-{key}",
                                             "source_key": key, "subject_id": k, "view_id": 0, "group": f"g{k}"}]})
        entities.append({"id": "e9", "kind": "background", "word": "wall"})
        with_bg = not (clip == 3 and source % 4 == 0)
        meta = {"key": key, "clip_id": f"clip-{key}", "source": {"id": sid, "path": f"/v/{source}.mp4"},
                "entities": entities, "faces": faces, "detections": [],
                "background": {"keyframe": 1, "file": "bg.png"} if with_bg else None,
                "caption": {"text": f"clip {n}"}}
        sample = {"__key__": key, "mp4": b"\x00\x00\x00\x18ftypmp42" + key.encode(), "json": sample_json(meta),
                  "faces.npy": npy_bytes(table), **blobs}
        if with_bg:
            sample["bg.png"] = image_png(picture_crop(source, clip, 96, 128))
        samples.append(sample)
        rows.append({"key": key, "shard": None, "source": f"/v/{source}.mp4", "source_id": sid, "duration_s": 3.0})
        clips.append({"key": key, "status": "kept", "stage": None, "reason": None})
    entry = {"type": "source", "path": f"/v/{source}.mp4", "source_id": sid, "size": 1, "mtime_ns": 1,
             "duration_s": 20.0, "status": "curated", "samples": rows, "clips": clips, "errors": [], "warnings": []}
    return entry, samples


def commit_sources(out, sources, shard_max_samples=64):
    ledger = Ledger(out)
    state = ledger.recover()
    sink = ShardSink(out, OutputConfig(shard_max_samples=shard_max_samples), ledger, state)
    for source in sources:
        sink.add_source(*source_entry_and_samples(source))
    sink.close()


def config(**cross):
    return RunConfig.model_validate({"cross_pairs": cross, "output": {"shard_max_samples": 64}})


def run_pass(out, cfg=None):
    ledger = Ledger(out)
    return build_cross_pairs(out, cfg or config(), ledger, ledger.recover())


CATEGORIES = ["woman", "man", "girl"]


def write_config(out: Path, ratio=None, share=0.4) -> RunConfig:
    cfg = RunConfig.model_validate({"references": {"ratio": ratio or {"crop": 1.0, "segment": 3.0}},
                                    "cross_pairs": {"share": share}, "output": {"shard_max_samples": 64}})
    body = {"config_hash": cfg.hash(), "pipeline_version": "test", **cfg.model_dump(mode="json")}
    (out / "config.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return cfg


def metrics_of(n: int) -> dict:
    """A plausible stats.metrics: per-reference entries with flags, plus plain numbers and a string."""
    return {"face": [{"cosine": 0.5 + 0.01 * n, "copy_paste": n % 4 == 0, "identity_mismatch": False}],
            "clip_i": 0.3, "background": {"similarity": 0.2 + 0.001 * n, "model": "tiny"},
            "flags": ["copy_paste"] if n % 4 == 0 else []}


def enrich(meta: dict, n: int, metrics: bool) -> dict:
    for entity in meta["entities"]:
        if entity["kind"] == "subject":
            entity.update(category=CATEGORIES[n % 3], word=CATEGORIES[n % 3],
                          attributes={"top": ["shirt"], "colors": ["red" if n % 2 else "blue"]})
        elif entity["kind"] == "object":
            entity.update(category="cup", word="cup")
        else:
            entity["category"] = "wall"
    meta["detections"] = [
        {"id": "d0", "valid": True, "rejected": [],
         "stats": {"area": 0.1, "max_iou": 0.0, "brightness": 100.0 + n, "sharpness": 300.0, "clip_category": None,
                   "face": {"score": 0.9, "frontal": True}, "human": True}},
        {"id": "d1", "valid": False, "rejected": ["too_small"],
         "stats": {"area": 0.004, "max_iou": 0.2, "brightness": 90.0, "sharpness": 50.0, "clip_category": None,
                   "face": None, "human": False}},
    ]
    for face in meta["faces"]:
        face.update(yaw=-5.0 + n % 10, pitch=2.0, size_px=20)
    meta["stats"] = {"quality": {"brightness_mean": 100.0, "sharpness_median": 300.0}}
    if metrics:
        meta["stats"]["metrics"] = metrics_of(n)
    return meta


def synthetic_run(out: Path, sources, shard_max_samples: int = 64, metrics: bool = False, cross: bool = False,
                  finished: bool = True) -> Path:
    """A committed run: CLIPS_PER_SOURCE samples per source, optionally its cross pass and a run line."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = write_config(out)
    ledger = Ledger(out)
    sink = ShardSink(out, OutputConfig(shard_max_samples=shard_max_samples), ledger, ledger.recover())
    for source in sources:
        entry, samples = source_entry_and_samples(source)
        for i, (sample, row, clip) in enumerate(zip(samples, entry["samples"], entry["clips"])):
            n = source * CLIPS_PER_SOURCE + i
            meta = enrich(json.loads(sample["json"]), n, metrics)
            sample["json"] = sample_json(meta)
            made = Counter(r["variant"] for e in meta["entities"] for r in e.get("references") or [])
            clip.update(variants=dict(made), requested=dict(made), instances={"total": 2, "valid": 1,
                                                                              "rejected": {"too_small": 1}})
            row.update(fps=24.0, width=128, height=96, brightness=100.0 + n, sharpness=300.0, faces=2,
                       frontal_faces=2, entities=len(meta["entities"]))
        sink.add_source(entry, samples)
    sink.close()
    if cross:
        run_pass(out, cfg)
    if finished:
        n = len(list(sources)) * CLIPS_PER_SOURCE
        ledger.append({"type": "run", "run": out.name[:12], "started": 0.0, "wall_s": 10.0, "cpus": 2.0,
                       "sources": len(list(sources)), "clips": n, "samples": n, "video_s": 20.0 * len(list(sources)),
                       "clips_per_s": n / 10.0, "video_hours_per_day_per_core": 20.0 * len(list(sources)) / 3600
                       / (10.0 / 86400) / 2, "mode": "sequential", "flow": {}, "version": "test"})
    return out


def sample_set(out) -> dict[str, tuple]:
    """Each sample's key with what defines it (clip span, references), minus run-specific fields. `out`: a path or
    a URI."""
    with as_storage(out).open_read("manifest.parquet") as f:
        rows = pq.read_table(f).to_pylist()
    return {r["key"]: (r["start_s"], r["end_s"], r["num_frames"], r["subjects"], r["caption"]) for r in rows}
