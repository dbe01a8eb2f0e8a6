"""Synthetic S2V shards in the pipeline's sample format (docs/shard-format.md), for trainer tests.

Sample i holds i % (max_refs + 1) references (0 .. max_refs): subjects (with groups and attribute words) and objects
cut from real photos, every second one an RGBA `segment` reference; samples with references also have a background
entity and KEY.bg.png; one entity named in the caption never has a reference (no subject_id). Clip sizes cycle over
landscape, portrait and square, so loaders see several buckets. Clips are real H.264 (a pan over a real photo).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from skimage import data

from pipeline.core.video import ClipEncoder
from pipeline.store.shards import image_png, mask_png, sample_json

SIZES = [(96, 64), (64, 96), (80, 80)]  # (width, height): landscape, portrait, square
# (word, kind, attributes, photo): the entities a sample's references are cut from, in rotation.
ENTITIES = [
    ("woman", "subject", {"top": ["spacesuit"], "colors": ["orange"]}, "astronaut"),
    ("cup", "object", {}, "coffee"),
    ("man", "subject", {"accessories": ["camera"]}, "camera"),
    ("rocket", "object", {}, "rocket"),
    ("tabby cat", "object", {}, "chelsea"),
]
BACKGROUNDS = ["grassy lawn", "brick wall", "night sky"]
FPS = 24


def _photo(name: str) -> np.ndarray:
    image = getattr(data, name)()
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]


def _clip(photo: np.ndarray, frames: int, width: int, height: int, shift: int) -> bytes:
    """A slow pan over the photo: texture and motion, not flat colour."""
    big = cv2.resize(photo, (width + frames + shift, height + frames // 2 + shift))
    encoder = ClipEncoder(width, height, FPS, preset="ultrafast")
    for t in range(frames):
        encoder.add(np.ascontiguousarray(big[shift + t // 2 : shift + t // 2 + height, shift + t : shift + t + width]))
    return encoder.finish()


def _phrase(word: str, attributes: dict) -> str:
    if attributes.get("top"):
        return f"a {word} in an {attributes['colors'][0]} {attributes['top'][0]}"
    if attributes.get("accessories"):
        return f"a {word} with a {attributes['accessories'][0]}"
    return f"a {word}"


def synthetic_sample(index: int, n_refs: int, seed: int, frames: int, size: tuple[int, int]) -> dict:
    """One sample: {"__key__", "mp4", "json", "ref{k}.png", "mask{k}.png", "bg.png"} as the pipeline writes them."""
    rng = np.random.default_rng([seed, index])
    width, height = size
    chosen = [ENTITIES[(index + j) % len(ENTITIES)] for j in range(n_refs)]
    unreferenced = ENTITIES[(index + n_refs) % len(ENTITIES)]
    background = BACKGROUNDS[index % len(BACKGROUNDS)]
    parts = [_phrase(word, attrs) for word, _, attrs, _ in chosen] + [_phrase(unreferenced[0], {})]
    caption = f"{' and '.join(parts)} on a {background} while the camera pans right."
    caption = caption[0].upper() + caption[1:]
    source = hashlib.sha256(f"synthetic-{seed}-{index}".encode()).hexdigest()[:16]
    key = f"{source}-{0:07d}-{frames - 1:07d}"
    sample = {"__key__": key, "mp4": _clip(_photo(chosen[0][3] if chosen else "astronaut"), frames, width, height,
                                           int(rng.integers(0, 8)))}
    entities, cursor, groups = [], 0, 0
    for k, (word, kind, attrs, photo) in enumerate(chosen + [unreferenced]):
        start = caption.index(word, cursor)
        cursor = start + len(word)
        entity = {"id": f"e{k}", "kind": kind, "word": word, "span": [start, cursor], "category": word,
                  "taxonomy_group": "human" if kind == "subject" else "object"}
        if kind == "subject":
            entity["attributes"], entity["group"] = attrs, f"g{groups}"
            groups += 1
        if k < n_refs:
            segment = k % 2 == 1
            image = cv2.resize(_photo(photo), (int(rng.integers(24, 72)), int(rng.integers(24, 72))))
            mask = np.zeros(image.shape[:2], bool)
            mask[image.shape[0] // 6 : -image.shape[0] // 6, image.shape[1] // 6 : -image.shape[1] // 6] = True
            if segment:
                image = np.dstack([image, mask.astype(np.uint8) * 255])
            sample[f"ref{k}.png"], sample[f"mask{k}.png"] = image_png(image), mask_png(mask)
            ids = {"subject_id": k, "view_id": 0, "group": entity.get("group")}
            entity.update(subject_id=k, view_id=0, instances=[f"d{k}"], reference={"detection": f"d{k}", "keyframe": 0})
            entity["references"] = [{
                "file": f"ref{k}.png", "mask": f"mask{k}.png", "entity": entity["id"], "detection": f"d{k}",
                "variant": "segment" if segment else "crop", "requested": "segment" if segment else "crop",
                "keyframe": 0, "frame_index": 0, "box": [0, 0, image.shape[1], image.shape[0]],
                "source_clip": source, "source_key": key, **ids,
            }]
        entities.append(entity)
    start = caption.index(background)
    entities.append({"id": f"e{len(entities)}", "kind": "background", "word": background,
                     "span": [start, start + len(background)], "category": background, "taxonomy_group": "scene"})
    plate = None
    if n_refs:
        bg = cv2.resize(_photo("grass"), (width, height))
        sample["bg.png"] = image_png(np.ascontiguousarray(bg))
        plate = {"file": "bg.png", "keyframe": 0, "backend": "opencv-telea", "mask_area": 0.2, "dilate_px": 15}
    meta = {
        "key": key, "clip_id": source, "caption": {"text": caption, "source": "metadata"},
        "clip": {"codec": "h264", "fps": float(FPS), "width": width, "height": height, "num_frames": frames,
                 "duration_s": frames / FPS},
        "entities": entities, "background": plate, "detections": [], "faces": [], "stats": {}, "warnings": [],
        "provenance": {"synthetic": True},
    }
    sample["json"] = sample_json(meta)
    return sample


def write_synthetic_shards(out_dir, n_samples: int, max_refs: int = 3, seed: int = 0, frames: int = 20,
                           size: tuple[int, int] | None = None, samples_per_shard: int = 4,
                           prefix: str = "train") -> list[Path]:
    """Write `n_samples` samples into `{prefix}-NNNNNN.tar` shards of `samples_per_shard`; return the tar paths.
    `size` (width, height) fixes every clip's size; by default sizes cycle over SIZES."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for first in range(0, n_samples, samples_per_shard):
        path = out / f"{prefix}-{len(paths):06d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0.0) as sink:
            for i in range(first, min(first + samples_per_shard, n_samples)):
                sink.write(synthetic_sample(i, i % (max_refs + 1), seed, frames, size or SIZES[i % len(SIZES)]))
        paths.append(path)
    return paths


def read_meta(paths: list[Path]) -> dict[str, dict]:
    """KEY.json of every sample in the shards, by key (what tests check batches against)."""
    metas = {}
    for sample in wds.WebDataset([str(p) for p in paths], shardshuffle=False):
        metas[sample["__key__"]] = json.loads(sample["json"])
    return metas
