"""Reference images of each consolidated entity, each in a variant drawn by the configured mix (Kaleido):

- one per view (MV-S2V): the views consolidation chose (`entity["views"]`, view 0 = the reference instance), each
  with its `view_id` and the `why` of its choice;
- with `references.attributes`, one per attribute region of a subject (LumosX: a subject is a face plus its
  attributes): the best valid `part` detection of the entity per part (top, bottom, hairstyle, accessories,
  footwear), preferably on the reference keyframe, with `attribute` (the part) and `tag` (its word), in the
  subject's `group` so the trainer's LumosX branch holds them with the subject.

Variants, all cut from the entity's reference keyframe around its box grown by `references.pad`:

- `crop`: the RGB crop as it is (background and neighbours included);
- `segment`: the crop as RGBA, its alpha the entity's mask (the box when segmentation did not run);
- `inpaint`: the crop with everything outside the entity's mask regenerated; this stage cuts it and marks it
  `pending`, the `inpainting` stage fills it (FLUX.1-Fill on GPU, OpenCV on CPU);
- `redux`: the crop re-imagined by FLUX Redux (`stages/redux.py`): cut here and marked `pending`, the `redux`
  stage generates it. Without `redux.model` and `redux.base_model` it is unavailable: a draw that lands on it is
  recorded as `requested` and drawn again among the others, so its share goes to them in proportion.

The draw is seeded by `references.seed`, the clip key and the entity id: reruns give the same variants. Each
reference is `{"k", "file": "ref{k}.png", "mask": "mask{k}.png", "entity", "variant", "requested", "detection",
"keyframe", "frame_index", "box", "scores", "source_clip", "source_key", "subject_id", "view_id", "group",
"why", "attribute", "tag"}` (`attribute` and `tag` null for a view of the whole entity);
its pixels are `blobs["ref{k}"]` (H, W, 3 or 4) and its mask `blobs["refmask{k}"]` (H, W) 0/1.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.boxes import clip_box
from pipeline.core.record import Record, clip_rng
from pipeline.core.stage import Stage

VARIANTS = ("crop", "segment", "inpaint", "redux")
UNAVAILABLE = {"redux": "redux.model and redux.base_model are not set"}
PENDING = ("inpaint", "redux")  # variants a later stage makes from the cut crop
MIN_ATTRIBUTE_SHARE = 0.05  # an attribute whose mask inside its person covers less of its crop is not cut


def draw_variant(ratio: dict[str, float], rng, unavailable=UNAVAILABLE) -> tuple[str, str]:
    """(requested, realized): a draw by `ratio`; when it is unavailable, a second draw among the available ones."""
    names = [v for v in VARIANTS if ratio.get(v, 0) > 0]
    requested = rng.choices(names, weights=[ratio[v] for v in names])[0]
    if requested not in unavailable:
        return requested, requested
    available = [v for v in names if v not in unavailable]
    if not available:
        raise ValueError(f"references.ratio gives weight only to unavailable variants ({', '.join(names)})")
    return requested, rng.choices(available, weights=[ratio[v] for v in available])[0]


def padded_box(box, pad: float, width: int, height: int) -> list[int]:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * pad, (y1 - y0) * pad
    return clip_box((x0 - dx, y0 - dy, x1 + dx, y1 + dy), width, height)


class ReferenceCutter(Stage):
    name = "references"

    @property
    def description(self) -> str:  # the provenance line (pipeline.core.stage)
        cfg = self.config.references
        return (f"ratio {cfg.ratio} seed={cfg.seed} pad={cfg.pad}; unavailable: "
                + ("; ".join(f"{v} ({why})" for v, why in self.unavailable.items()) or "none"))

    @property
    def unavailable(self) -> dict[str, str]:
        """Variants this config cannot make, and why (redux without its models)."""
        return {} if self.config.redux.enabled() else UNAVAILABLE

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            self._cut(record)
        return records

    def _cut(self, record: Record) -> None:
        cfg = self.config.references
        detections = {d["id"]: (i, d) for i, d in enumerate(record.meta.get("detections") or [])}
        references: list[dict] = []
        for entity in record.meta.get("entities", []):
            if "reference" not in entity:
                continue
            views = entity.get("views") or [{"view_id": 0, "detection": entity["reference"]["detection"],
                                              "why": "reference instance"}]
            for view in views:
                # View 0 keeps the draw it always had (salt = entity id): adding views changes no existing variant.
                salt = entity["id"] if view["view_id"] == 0 else f"{entity['id']}:view{view['view_id']}"
                self._one(record, references, detections[view["detection"]], entity, salt,
                          {"view_id": view["view_id"], "why": view.get("why"), "attribute": None, "tag": None})
            if cfg.attributes and entity.get("kind") == "subject":
                for part, index_and_detection in attribute_regions(entity, detections).items():
                    person = person_on(entity, detections, index_and_detection[1]["keyframe"])
                    self._one(record, references, index_and_detection, entity, f"{entity['id']}:{part}",
                              {"view_id": 0, "why": f"{part} region ({index_and_detection[1].get('phrase')})",
                               "attribute": part, "tag": index_and_detection[1]["label"]}, within=person)
        record.meta["references"] = references

    def _one(self, record: Record, references: list[dict], index_and_detection: tuple[int, dict], entity: dict,
             salt: str, extra: dict, within: int | None = None) -> None:
        """Cut one reference from a detection and append its entry (the module docstring's fields). `within`: the
        index of a detection whose mask bounds this one's (an attribute lies inside its person: SAM prompted with a
        loose box around a collar may take the wall behind it); a reference left with almost no mask is not cut."""
        cfg = self.config.references
        index, detection = index_and_detection
        keyframes, masks = record.blobs["keyframes"], record.blobs.get("masks")
        frame_of = [k.get("frame") for k in record.meta.get("keyframes", [])]
        k = detection["keyframe"]
        frame = keyframes[k]
        height, width = frame.shape[:2]
        x0, y0, x1, y1 = padded_box(detection["box"], cfg.pad, width, height)
        if masks is not None and len(masks) > index:
            mask = masks[index][y0:y1, x0:x1].astype(np.uint8)
        else:  # no segmentation: the box is the mask
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            bx0, by0, bx1, by1 = detection["box"]
            mask[max(by0 - y0, 0) : by1 - y0, max(bx0 - x0, 0) : bx1 - x0] = 1
        if within is not None and masks is not None and len(masks) > within:
            mask = mask & masks[within][y0:y1, x0:x1].astype(np.uint8)
            if mask.sum() < MIN_ATTRIBUTE_SHARE * mask.size:
                return
        crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
        requested, variant = draw_variant(cfg.ratio, clip_rng(cfg.seed, record.key, salt), self.unavailable)
        n = len(references)
        if variant == "segment":
            crop = np.dstack([crop, mask * 255])
        record.blobs[f"ref{n}"] = crop
        record.blobs[f"refmask{n}"] = mask
        face = next((f for f in record.meta.get("faces", []) if f.get("detection") == detection["id"]), None)
        stats = detection.get("stats", {})
        references.append({
            "k": n,
            "file": f"ref{n}.png",
            "mask": f"mask{n}.png",
            "entity": entity["id"],
            "variant": variant,
            "requested": requested,
            "pending": variant in PENDING,
            "detection": detection["id"],
            "keyframe": k,
            "frame_index": frame_of[k] if k < len(frame_of) else None,
            "box": [x0, y0, x1, y1],
            "scores": {
                "detection": detection.get("score"),
                "mask": detection.get("mask_score"),
                "clip_category": stats.get("clip_category"),
                "face": face.get("score") if face else None,
                "frontal": face.get("frontal") if face else None,
            },
            "source_clip": record.meta["clip_id"],
            "source_key": record.key,
            "subject_id": entity["subject_id"],
            "group": entity.get("group"),
            **extra,
        })


def person_on(entity: dict, detections: dict[str, tuple[int, dict]], keyframe: int) -> int | None:
    """Index of the entity's own (whole-subject) valid instance on `keyframe`, preferring its clique's."""
    instances = set(entity.get("instances") or [])
    own = [(d["id"] not in instances, -(d.get("score") or 0.0), i) for i, d in detections.values()
           if d.get("entity") == entity["id"] and not d.get("part") and d["keyframe"] == keyframe
           and d.get("valid", True)]
    return min(own)[2] if own else None


def attribute_regions(entity: dict, detections: dict[str, tuple[int, dict]]) -> dict[str, tuple[int, dict]]:
    """Per part: the valid part detection of `entity` to cut, on the reference keyframe if it has one there, else
    the best-scored elsewhere."""
    frame = entity["reference"]["keyframe"]
    best: dict[str, tuple[int, dict]] = {}
    for index, detection in detections.values():
        if detection.get("entity") != entity["id"] or not detection.get("part") or not detection.get("valid", True):
            continue
        rank = (detection["keyframe"] == frame, detection.get("score") or 0.0)
        held = best.get(detection["part"])
        if held is None or rank > (held[1]["keyframe"] == frame, held[1].get("score") or 0.0):
            best[detection["part"]] = (index, detection)
    return dict(sorted(best.items()))
