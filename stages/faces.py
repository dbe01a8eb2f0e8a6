"""Faces on the keyframes: box, score, 5 landmarks, head pose, a frontal flag and an L2-normalised identity embedding.

The backends (dlib offline by default, insightface buffalo_l from a model directory) live in
`pipeline/models/faces.py`, shared with the tracking stage; both write the same record format.

Stats first: score, size and pose are stored for every kept face; `frontal` is the only decision taken here and
it reads only the stored yaw/pitch and `faces.max_yaw` / `faces.max_pitch`.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.boxes import box_iou, clip_box
from pipeline.core.config import RunConfig
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.faces import DlibFaces, FoundFace, InsightFaces, box_size, load_face_backend


class FaceDetector(Stage):
    """Clip record in, the same record out with `meta["faces"]`, `blobs["face_embeddings"]` (rows in the same
    order) and `meta["provenance"]["faces"]`. A keyframe the backend chokes on is skipped with a warning; a record
    fails only when its keyframes are unusable or every keyframe failed.

    A model that cannot be loaded raises in `setup()`: that is a job-level configuration error (every record
    would fail the same way), so the run stops before it starts instead of failing every clip one by one.
    """

    name = "faces"
    requires = ("keyframes",)

    @property
    def description(self) -> str | None:  # the provenance line (pipeline.core.stage)
        return self.backend.description if getattr(self, "backend", None) is not None else None

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.backend_name = config.faces.backend
        self.backend: DlibFaces | InsightFaces | None = None

    @property
    def stateful(self) -> bool:  # insightface sessions live in an actor; dlib loads in ~1 s per task process
        return self.backend_name == "insightface"

    section = "faces"  # resources come from config.faces.resources

    def setup(self) -> None:
        cfg = self.config.faces
        if not cfg.enabled or self.backend is not None:
            return
        self.backend = load_face_backend(cfg)

    def process(self, records: list[Record]) -> list[Record]:
        if not self.config.faces.enabled:
            return records
        self.setup()
        for record in records:
            self._process_record(record)
        return records

    def _process_record(self, record: Record) -> None:
        cfg = self.config.faces
        frames = record.blobs["keyframes"]
        entries, embeddings, errors = [], [], []
        for k, frame in enumerate(frames):
            try:
                found = self._detect_in_people(record, k, frame)
            except Exception as exc:  # noqa: BLE001 - one bad frame (or a backend hiccup) must not cost the clip its others
                errors.append(f"keyframe {k}: {type(exc).__name__}: {exc}")
                continue
            for face, person in found:
                yaw, pitch, roll = face.pose if face.pose is not None else (None, None, None)
                entries.append({
                    "keyframe": k,
                    "detection": person["id"] if person else None,
                    "entity": person["entity"] if person else None,
                    "box": face.box,
                    "score": round(face.score, 4),
                    "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks],
                    "yaw": _deg(yaw),
                    "pitch": _deg(pitch),
                    "roll": _deg(roll),
                    "frontal": face.pose is not None and abs(yaw) <= cfg.max_yaw and abs(pitch) <= cfg.max_pitch,
                    "size_px": box_size(face.box),
                })
                embeddings.append(face.embedding)
        if len(errors) == len(frames):
            record.fail(self.name, "face_backend", "; ".join(errors))
            return
        for message in errors:
            record.warn(self.name, message)
        record.meta["faces"] = entries
        record.blobs["face_embeddings"] = (
            np.stack(embeddings).astype(np.float32) if embeddings else np.zeros((0, self.backend.dim), np.float32)
        )


    def _detect_in_people(self, record: Record, k: int, frame: np.ndarray) -> list[tuple[FoundFace, dict | None]]:
        """Faces of keyframe k with the person detection each lies in. As in LumosX, faces are searched inside the
        human boxes when grounding ran (a face then belongs to that person, and background faces on posters or
        screens are not subjects); without grounding, the whole keyframe is searched."""
        detections = record.meta.get("detections")
        if detections is None:
            return [(face, None) for face in self.backend.detect(np.ascontiguousarray(frame))]
        subjects = {e["id"] for e in record.meta.get("entities", []) if e["kind"] == "subject"}
        people = [d for d in detections if d["keyframe"] == k and d.get("part") is None
                  and (d["label"] == "person" or d["entity"] in subjects)]
        # Subject boxes first: a face found in both "woman" and "person" boxes is kept once, with the subject.
        people.sort(key=lambda d: (d["entity"] is None, -d["score"]))
        height, width = frame.shape[:2]
        found: list[tuple[FoundFace, dict]] = []
        for person in people:
            x0, y0, x1, y1 = person["box"]
            pad_x, pad_y = (x1 - x0) // 10, (y1 - y0) // 10  # a little context: faces at the box edge still fit
            x0, y0, x1, y1 = clip_box((x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y), width, height)
            if x1 - x0 < self.config.faces.min_face_px or y1 - y0 < self.config.faces.min_face_px:
                continue
            for face in self.backend.detect(np.ascontiguousarray(frame[y0:y1, x0:x1])):
                face = _shifted(face, x0, y0)
                if all(box_iou(face.box, other.box) <= 0.5 for other, _ in found):
                    found.append((face, person))
        return found


def _shifted(face: FoundFace, dx: int, dy: int) -> FoundFace:
    """A face found in a crop, in keyframe coordinates."""
    box = [face.box[0] + dx, face.box[1] + dy, face.box[2] + dx, face.box[3] + dy]
    return FoundFace(box, face.score, face.landmarks + np.array([dx, dy]), face.pose, face.embedding)


def _deg(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)


