"""Consolidation: one identity per entity across the clip's keyframes, and the keyframe its reference comes from.

An entity may have several valid instances (one or more per keyframe). As in PolyVivid, its identity is a clique
of mutually consistent instances: two instances on different keyframes are consistent when their mask areas are
within `consolidation.max_area_ratio` of each other, the colour histograms of their masked pixels correlate at
least `min_appearance`, and, when both hold a face, their face embeddings' cosine is at least
`min_face_similarity`. The largest clique wins (ties: the higher summed detection score). Two instances on one
keyframe are never the same identity.

The reference keyframe is then drawn at random among the clique's keyframes, seeded by `consolidation.seed` and
the clip key (a rerun draws the same). As in LumosX, when the clip has several entities and every draw landed on
one keyframe while some entity could use another, that entity is moved to another keyframe: the references of one
sample should not all be cut from the same frame.

Views (MV-S2V): the reference instance is view 0; further views are taken greedily, up to `references.max_views`,
among the clique's best instance of each other keyframe: the candidate that differs most from every view already
taken, if it differs enough from each of them: head pose (yaw/pitch from the faces stage) changed by at least
`references.min_view_pose` degrees, or appearance (1 - colour-histogram correlation, and 1 - face cosine when both
have a face) changed by at least `references.min_view_change`. A subject that sits still gives one view. Each view
records why it was taken.

Per entity with a valid identity: `instances` (detection ids of the clique), `reference` ({"detection",
"keyframe"}), `views` ([{"view_id", "detection", "keyframe", "pose", "why"}], view 0 first), `subject_id` (0, 1, ...
in entity order: the reference slot the trainer sees) and `view_id` (0, the reference's). A clip with no such
entity is dropped: `consolidation`/`no_valid_entity`.
"""

from __future__ import annotations

import itertools
import random

import cv2
import numpy as np

from pipeline.core.record import Record, clip_rng
from pipeline.core.stage import Stage

MAX_NODES = 12  # cliques are found by trying subsets; an entity rarely has more than a few instances


def appearance(hsv: np.ndarray, mask: np.ndarray | None, box: list[int]) -> np.ndarray:
    """A normalised hue-saturation histogram of the instance's pixels (its mask, else its box) in an HSV frame."""
    if mask is None or not mask.any():
        mask = np.zeros(hsv.shape[:2], np.uint8)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 1
    hist = cv2.calcHist([hsv], [0, 1], mask.astype(np.uint8), [16, 8], [0, 180, 0, 256])
    return cv2.normalize(hist, None).flatten()


def max_clique(nodes: list[int], linked, weight) -> list[int]:
    """The largest set of mutually linked nodes (ties: the heaviest), by trying subsets from the largest down."""
    nodes = sorted(nodes, key=weight, reverse=True)[:MAX_NODES]
    for size in range(len(nodes), 0, -1):
        cliques = [c for c in itertools.combinations(nodes, size)
                   if all(linked(a, b) for a, b in itertools.combinations(c, 2))]
        if cliques:
            return sorted(max(cliques, key=lambda c: sum(weight(n) for n in c)))
    return []


def choose_frames(options: dict[str, list[int]], rng: random.Random) -> dict[str, int]:
    """A keyframe per entity among its options; not all the same when any entity has another option."""
    chosen = {entity: rng.choice(sorted(frames)) for entity, frames in options.items()}
    if len(chosen) > 1 and len(set(chosen.values())) == 1:
        shared = next(iter(chosen.values()))
        movable = [e for e, frames in options.items() if set(frames) - {shared}]
        if movable:
            entity = rng.choice(movable)
            chosen[entity] = rng.choice(sorted(set(options[entity]) - {shared}))
    return chosen


def view_difference(a: dict, b: dict, pose_step: float, change_step: float) -> tuple[float, str]:
    """How far apart two instances are as views, in units of the thresholds (>= 1: a new view), and why.
    `a`/`b`: {"pose": (yaw, pitch) | None, "hist": histogram, "face": embedding | None}."""
    reasons = []
    if a["pose"] is not None and b["pose"] is not None and pose_step > 0:
        turn = float(np.hypot(a["pose"][0] - b["pose"][0], a["pose"][1] - b["pose"][1]))
        reasons.append((turn / pose_step, f"head pose changed {turn:.0f} deg (yaw {a['pose'][0]:+.0f} vs "
                                          f"{b['pose'][0]:+.0f}, pitch {a['pose'][1]:+.0f} vs {b['pose'][1]:+.0f})"))
    if change_step > 0:
        change = 1.0 - float(cv2.compareHist(a["hist"], b["hist"], cv2.HISTCMP_CORREL))
        reasons.append((change / change_step, f"appearance changed {change:.2f} (1 - colour correlation)"))
        if a["face"] is not None and b["face"] is not None:
            change = 1.0 - float(np.dot(a["face"], b["face"]))
            reasons.append((change / change_step, f"face embedding changed {change:.2f} (1 - cosine)"))
    return max(reasons, default=(0.0, "no measure"))


def choose_views(first: int, candidates: list[int], describe, max_views: int, pose_step: float,
                 change_step: float) -> list[tuple[int, str]]:
    """(instance, why) per view: `first` (view 0), then greedily the candidate farthest from every view taken,
    while it is at least one threshold away from each. `describe(i)` gives the view_difference input of i."""
    views = [(first, "reference instance (the drawn keyframe)")]
    left = [c for c in candidates if c != first]
    while len(views) < max_views and left:
        scored = []
        for c in left:
            gaps = [view_difference(describe(c), describe(v), pose_step, change_step) for v, _ in views]
            nearest = min(gaps, key=lambda g: g[0])
            scored.append((nearest[0], c, nearest[1]))
        gap, best, why = max(scored, key=lambda t: (t[0], -t[1]))
        if gap < 1.0:
            break
        views.append((best, f"{why} vs the nearest view taken"))
        left.remove(best)
    return views


class Consolidator(Stage):
    name = "consolidation"

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            self._consolidate(record)
        return records

    def _consolidate(self, record: Record) -> None:
        cfg = self.config.consolidation
        detections = record.meta.get("detections") or []
        masks = record.blobs.get("masks")
        keyframes = record.blobs.get("keyframes")
        faces = record.meta.get("faces", [])
        embeddings = record.blobs.get("face_embeddings")
        face_of: dict[str, np.ndarray] = {}  # detection id -> embedding of the first face found in it
        for row, face in enumerate(faces):
            if face.get("detection") and embeddings is not None and row < len(embeddings):
                face_of.setdefault(face["detection"], embeddings[row])
        hists: dict[int, np.ndarray] = {}
        hsv: dict[int, np.ndarray] = {}  # per keyframe: converted once, shared by its instances

        def hist(i: int) -> np.ndarray:
            if i not in hists:
                d = detections[i]
                mask = masks[i] if masks is not None and len(masks) > i else None
                k = d["keyframe"]
                if k not in hsv:
                    hsv[k] = cv2.cvtColor(np.ascontiguousarray(keyframes[k]), cv2.COLOR_RGB2HSV)
                hists[i] = appearance(hsv[k], mask, d["box"])
            return hists[i]

        def area(i: int) -> float:
            return max(detections[i].get("stats", {}).get("area") or 0.0, 1e-6)

        def linked(a: int, b: int) -> bool:
            da, db = detections[a], detections[b]
            if da["keyframe"] == db["keyframe"]:
                return False
            if max(area(a), area(b)) / min(area(a), area(b)) > cfg.max_area_ratio:
                return False
            if cv2.compareHist(hist(a), hist(b), cv2.HISTCMP_CORREL) < cfg.min_appearance:
                return False
            fa, fb = face_of.get(da["id"]), face_of.get(db["id"])
            return fa is None or fb is None or float(np.dot(fa, fb)) >= cfg.min_face_similarity

        options: dict[str, list[int]] = {}
        cliques: dict[str, list[int]] = {}
        for entity in record.meta.get("entities", []):
            if entity.get("kind") not in ("subject", "object"):
                continue
            nodes = [i for i, d in enumerate(detections)
                     if d.get("entity") == entity["id"] and d.get("part") is None and d.get("valid", True)]
            clique = max_clique(nodes, linked, lambda i: detections[i]["score"]) if nodes else []
            if clique:
                cliques[entity["id"]] = clique
                options[entity["id"]] = sorted({detections[i]["keyframe"] for i in clique})
        if not cliques:
            record.drop_by(self.name, "no_valid_entity")
            return
        chosen = choose_frames(options, clip_rng(cfg.seed, record.key))
        refs = self.config.references
        pose_of = {}  # detection id -> (yaw, pitch) of its best face
        for face in sorted(faces, key=lambda f: f.get("score") or 0):
            if face.get("detection") and face.get("yaw") is not None and face.get("pitch") is not None:
                pose_of[face["detection"]] = (face["yaw"], face["pitch"])

        def describe(i: int) -> dict:
            d = detections[i]["id"]
            return {"pose": pose_of.get(d), "hist": hist(i), "face": face_of.get(d)}

        slot = 0
        for entity in record.meta["entities"]:
            clique = cliques.get(entity["id"])
            if clique is None:
                continue
            frame = chosen[entity["id"]]
            best = max((i for i in clique if detections[i]["keyframe"] == frame), key=lambda i: detections[i]["score"])
            entity["instances"] = [detections[i]["id"] for i in clique]
            entity["reference"] = {"detection": detections[best]["id"], "keyframe": frame}
            # One candidate per other keyframe: its best-scored instance.
            per_frame = {}
            for i in sorted(clique, key=lambda i: -detections[i]["score"]):
                per_frame.setdefault(detections[i]["keyframe"], i)
            views = choose_views(best, [per_frame[k] for k in sorted(per_frame) if k != frame], describe,
                                 refs.max_views, refs.min_view_pose, refs.min_view_change)
            entity["views"] = [{"view_id": n, "detection": detections[i]["id"], "keyframe": detections[i]["keyframe"],
                                "pose": list(pose_of[detections[i]["id"]]) if detections[i]["id"] in pose_of else None,
                                "why": why} for n, (i, why) in enumerate(views)]
            entity["subject_id"], entity["view_id"] = slot, 0
            slot += 1
