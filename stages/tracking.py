"""Subjects followed through the clip, not only at its three keyframes: is each reference's subject in the video?

A reference is only useful if its subject is in the video it conditions. `tracking` samples `tracking.fps` frames
per second of the clip (at most `tracking.max_frames`, evenly spread; decoded from the clip's own mp4) and looks
for each consolidated entity on each of them:

- by face, for an entity whose instances hold faces (people): the configured face backend finds the faces of the
  frame; the entity is present where one face's embedding has cosine >= `consolidation.min_face_similarity` with
  the mean embedding of the entity's faces (the identity consolidation linked);
- by appearance, for the others (objects, or people whose face was never seen): the entity's reference crop is
  searched in the frame by normalised cross-correlation at three scales (0.8, 1, 1.25 of its box); present where
  the best match reaches `tracking.min_match`.

Stats first: each entity gets `track` = {"by", "frames" (clip frame indices), "present", "scores", "boxes",
"presence" (share of frames present), "longest_run" (frames), "longest_run_s", "sample_fps"}. The decision is
`track_filter`'s, from those stats alone (`track_decision`, `filters.tracks`), so `s2v curate refilter` re-applies
it: an entity below `min_presence` or `min_run_s` loses its reference (`track_rejected` says why); a clip left with
no referenced entity is dropped `track_filter`/`subject_absent`. OpenS2V keeps face tracks of at least 81 frames;
clips here are 2-10 s, so the default asks for half of the clip and a 1 s run.
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from pipeline.core.config import TrackFilterConfig
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.core.video import VideoError, read_frames

SCALES = (0.8, 1.0, 1.25)
MIN_TEMPLATE_PX = 8
# What consolidation gives an entity with an identity: an entity that loses its reference loses these too.
REFERENCE_FIELDS = ("instances", "reference", "subject_id", "view_id", "views")


def sample_indices(num_frames: int, clip_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frame indices at `fps` per second of the clip (the first frame included), at most `max_frames`."""
    if num_frames <= 0:
        return []
    step = max(clip_fps / fps, 1.0) if clip_fps > 0 else 1.0
    indices = sorted({min(round(i * step), num_frames - 1) for i in range(int((num_frames - 1) / step) + 1)})
    if len(indices) > max_frames:
        indices = sorted({indices[round(i * (len(indices) - 1) / (max_frames - 1))] for i in range(max_frames)})
    return indices


def longest_run(present: list[bool]) -> int:
    best = run = 0
    for p in present:
        run = run + 1 if p else 0
        best = max(best, run)
    return best


def track_summary(by: str, frames: list[int], present: list[bool], scores: list[float | None], boxes: list,
                  sample_fps: float) -> dict:
    run = longest_run(present)
    return {"by": by, "frames": frames, "present": present, "scores": scores, "boxes": boxes,
            "presence": round(sum(present) / len(present), 4) if present else 0.0,
            "longest_run": run, "longest_run_s": round(run / sample_fps, 3), "sample_fps": round(sample_fps, 4)}


def match_template(gray: np.ndarray, template: np.ndarray) -> tuple[float, list[int] | None]:
    """Best normalised cross-correlation of `template` in `gray` over SCALES, and the box it was found at."""
    best, where = -1.0, None
    height, width = gray.shape
    for scale in SCALES:
        th, tw = round(template.shape[0] * scale), round(template.shape[1] * scale)
        if min(th, tw) < MIN_TEMPLATE_PX or th > height or tw > width:
            continue
        scaled = cv2.resize(template, (tw, th), interpolation=cv2.INTER_AREA)
        if float(scaled.std()) < 1.0:
            continue  # a flat template correlates with nothing (and NCC divides by its spread)
        result = cv2.matchTemplate(gray, scaled, cv2.TM_CCOEFF_NORMED)
        _, score, _, (x, y) = cv2.minMaxLoc(result)
        if score > best:
            best, where = float(score), [x, y, x + tw, y + th]
    return best, where


def track_decision(track: dict, cfg: TrackFilterConfig) -> str | None:
    """Why an entity with this track loses its reference under these thresholds, or None to keep it."""
    if track["presence"] < cfg.min_presence:
        return "rarely_present"
    if track["longest_run_s"] < cfg.min_run_s:
        return "no_continuous_run"
    return None


def apply_track_decisions(entities: list[dict], cfg: TrackFilterConfig) -> bool:
    """Drop the reference of every entity whose track fails; renumber the subject slots of the rest. True when some
    entity keeps a reference. Shared by `track_filter` and refilter."""
    slot = 0
    for entity in entities:
        if "reference" not in entity:
            continue
        reason = track_decision(entity["track"], cfg) if entity.get("track") else None
        if reason:
            for field in (*REFERENCE_FIELDS, "references"):
                entity.pop(field, None)
            entity["track_rejected"] = reason
            continue
        entity.pop("track_rejected", None)
        entity["subject_id"] = slot
        for reference in entity.get("references") or []:
            reference["subject_id"] = slot
        slot += 1
    return slot > 0


class SubjectTracker(Stage):
    """Each referenced entity's track (see the module docstring) into `entity["track"]`."""

    name = "tracking"
    requires = ("keyframes",)
    stateful = False  # the dlib backend loads in ~1 s per task process; insightface would want an actor
    section = "tracking"

    def setup(self) -> None:
        from pipeline.models.faces import load_face_backend

        self.faces = load_face_backend(self.config.faces) if self.config.faces.enabled else None
        cfg = self.config.tracking
        self.description = (f"{cfg.fps} frames/s (at most {cfg.max_frames}); people by face identity "
                            f"({self.faces.description if self.faces else 'faces off'}), others by normalised "
                            f"cross-correlation of the reference crop >= {cfg.min_match}")

    def process(self, records: list[Record]) -> list[Record]:
        if not hasattr(self, "faces"):
            self.setup()
        for record in records:
            self._track(record)
        return records

    def _track(self, record: Record) -> None:
        entities = [e for e in record.meta.get("entities", []) if "reference" in e]
        if not entities:
            return
        clip = record.meta.get("clip") or {}
        cfg = self.config.tracking
        indices = sample_indices(int(clip.get("num_frames") or 0), float(clip.get("fps") or 0), cfg.fps,
                                 cfg.max_frames)
        if "mp4" not in record.blobs or not indices:
            record.fail(self.name, "no_video", "tracking needs the clip's mp4 and its frame count (meta.clip)")
            return
        try:
            frames = read_frames(io.BytesIO(record.get_bytes("mp4")), indices)
        except VideoError as exc:
            record.fail(self.name, exc.reason, exc.message)
            return
        indices = [i for i in indices if i in frames]
        if not indices:
            record.fail(self.name, "no_frames", "no frame of the clip's mp4 could be decoded")
            return
        duration = float(clip.get("duration_s") or 0) or len(indices) / cfg.fps
        sample_fps = len(indices) / duration
        identities = self._identities(record)
        found_faces = {}
        if identities and self.faces is not None:
            found_faces = {i: self.faces.detect(np.ascontiguousarray(frames[i])) for i in indices}
        grays = {i: cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY) for i in indices}
        for entity in entities:
            identity = identities.get(entity["id"])
            if identity is not None and self.faces is not None:
                entity["track"] = self._by_face(identity, indices, found_faces, sample_fps)
            else:
                entity["track"] = self._by_appearance(record, entity, indices, grays, sample_fps)

    def _identities(self, record: Record) -> dict[str, np.ndarray]:
        """Entity id -> the unit mean embedding of the faces in its consolidated instances."""
        embeddings = record.blobs.get("face_embeddings")
        out = {}
        for entity in record.meta.get("entities", []):
            instances = set(entity.get("instances") or [])
            rows = [row for row, face in enumerate(record.meta.get("faces") or [])
                    if face.get("detection") in instances and embeddings is not None and row < len(embeddings)]
            if rows:
                mean = np.mean(embeddings[rows], axis=0)
                out[entity["id"]] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return out

    def _by_face(self, identity: np.ndarray, indices: list[int], found: dict, sample_fps: float) -> dict:
        threshold = self.config.consolidation.min_face_similarity
        present, scores, boxes = [], [], []
        for i in indices:
            best = max(found[i], key=lambda f: float(np.dot(f.embedding, identity)), default=None)
            score = float(np.dot(best.embedding, identity)) if best is not None else None
            present.append(score is not None and score >= threshold)
            scores.append(None if score is None else round(score, 4))
            boxes.append(best.box if best is not None and present[-1] else None)
        return track_summary("face", indices, present, scores, boxes, sample_fps)

    def _by_appearance(self, record: Record, entity: dict, indices: list[int], grays: dict,
                       sample_fps: float) -> dict:
        detection = next(d for d in record.meta["detections"] if d["id"] == entity["reference"]["detection"])
        x0, y0, x1, y1 = detection["box"]
        keyframe = np.ascontiguousarray(record.blobs["keyframes"][detection["keyframe"]])
        template = cv2.cvtColor(keyframe, cv2.COLOR_RGB2GRAY)[y0:y1, x0:x1]
        present, scores, boxes = [], [], []
        for i in indices:
            score, box = match_template(grays[i], template) if template.size else (-1.0, None)
            present.append(score >= self.config.tracking.min_match)
            scores.append(round(score, 4))
            boxes.append(box if present[-1] else None)
        return track_summary("appearance", indices, present, scores, boxes, sample_fps)


class TrackFilter(Stage):
    """Re-decides references from the tracks alone (see the module docstring)."""

    name = "track_filter"

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            entities = record.meta.get("entities", [])
            if any("reference" in e for e in entities) and not apply_track_decisions(entities,
                                                                                    self.config.filters.tracks):
                record.drop_by(self.name, "subject_absent")
        return records
