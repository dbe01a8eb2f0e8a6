"""Data-quality metrics per sample: how each reference relates to its clip, as numbers to aggregate and filter on.

OpenS2V-Nexus and Phantom-Data judge subject-to-video pairs by face and CLIP/DINO similarity between the reference
and the video: too similar, and the reference is a copy of the clip (a model learns to paste it); too dissimilar,
and it shows someone else. This stage measures that, plus how much of the clip's background the reference carries.
Stats only: it writes `meta["stats"]["metrics"]` (KEY.json `stats.metrics`) and never drops a sample. Each reference
is compared with the clip's *other* keyframes, since its own keyframe holds its very pixels.

- face identity (references of subject entities, when faces ran): mean cosine of the reference's face embedding
  (the face found in its detection) with the faces of the same entity on the other keyframes, from
  `blobs["face_embeddings"]`; flags `face_copy_paste` (above the threshold) and `face_mismatch` (below).
- CLIP-I (when clip_score ran): mean cosine of the reference detection's crop embedding (`blobs["detection_clip"]`)
  with the other keyframes' embeddings (`blobs["clip_keyframe_embeddings"]`).
- DINO-I (when `metrics.dino_model` is set): the same with DINOv2 embeddings of the crop and the keyframes.
- caption alignment: `stats.clip.caption_alignment`, surfaced as is.
- background decoupling: similarity of the reference's background (pixels outside its mask, as a loader sees them:
  RGBA composited onto grey like trainer/data.py) with the clip's background plate (else the reference keyframe
  outside every instance mask): CLIP cosine when a CLIP model is configured, else HSV histogram correlation.
  Low = well decoupled.

Layout: `{"backends": {...}, "references": [{"file", "entity", "variant", "face_cosine", "face_copy_paste",
"face_mismatch", "clip_i", "dino_i", "background_similarity"}], "summary": {...}, "caption_alignment", "flags"}`,
a key present only when its measure ran for that reference (null when it ran but had nothing to compare).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.config import MetricsConfig, ModelSpec, RunConfig, config_face_thresholds
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.loader import ModelUnavailable, load_pretrained, load_processor

GREY = 127.5  # what a transparent pixel becomes in the trainer's loader (trainer/data.py letterbox)
# HSV histogram: hue carries most of a scene's identity, value separates a grey studio from a grey moon.
HSV_BINS = [16, 4, 4]
HSV_RANGES = [0, 180, 0, 256, 0, 256]
DINO_BATCH = 64
DINO_TYPES = ("dinov2", "dinov2_with_registers")
# Per-reference measures and the per-sample summaries they get: identities are judged by their worst (lowest)
# reference, the face also by its highest (copy-paste), the background by its most coupled (highest).
SUMMARIES = {"face_cosine": ("min", "mean", "max"), "clip_i": ("min", "mean"), "dino_i": ("min", "mean"),
             "background_similarity": ("mean", "max")}


def mean_cosine(vector, rows) -> float | None:
    """Mean cosine of `vector` with each of `rows` (any norms; zero rows, e.g. an empty crop, are left out)."""
    v = np.asarray(vector, np.float64).ravel()
    rows = np.asarray(rows, np.float64).reshape(-1, v.size) if len(rows) else np.zeros((0, v.size))
    norms = np.linalg.norm(rows, axis=1)
    rows = rows[norms > 0] / norms[norms > 0, None]
    if not len(rows) or not np.linalg.norm(v):
        return None
    return round(float(np.mean(rows @ (v / np.linalg.norm(v)))), 4)


def face_row(faces: list[dict], detection: str | None, embeddings) -> int | None:
    """The embedding row of the face found in `detection` (rows of faces.npy follow KEY.json "faces")."""
    row = next((i for i, f in enumerate(faces) if detection and f.get("detection") == detection), None)
    return row if row is not None and embeddings is not None and row < len(embeddings) else None


def entity_face_cosine(vector, entity: str, faces: list[dict], embeddings, skip_keyframe: int | None) -> float | None:
    """Mean cosine of a face embedding with the faces of `entity` in a clip, leaving out keyframe `skip_keyframe`
    (the reference's own, whose face is the reference's); None when the entity has no other face."""
    if embeddings is None:
        return None
    rows = [i for i, f in enumerate(faces) if f.get("entity") == entity and i < len(embeddings)
            and (skip_keyframe is None or f.get("keyframe") != skip_keyframe)]
    return mean_cosine(vector, embeddings[rows]) if rows else None


def face_cosine(reference: dict, faces: list[dict], embeddings) -> float | None:
    """Mean cosine of the reference's face (the face of its `detection`) with its entity's faces on the clip's
    other keyframes; None when either is missing."""
    row = face_row(faces, reference.get("detection"), embeddings)
    if row is None:
        return None
    return entity_face_cosine(embeddings[row], reference.get("entity"), faces, embeddings, reference.get("keyframe"))


def face_flags(cosine: float | None, thresholds: dict[str, float]) -> dict[str, bool]:
    """`face_copy_paste` / `face_mismatch` of a measured cosine; nothing for an unmeasured one (so flag counts
    are out of the references that were measured)."""
    if cosine is None:
        return {}
    return {"face_copy_paste": cosine > thresholds["copy_paste"], "face_mismatch": cosine < thresholds["mismatch"]}


def summarize(references: list[dict]) -> tuple[dict, list[str]]:
    """Per-sample summaries of the per-reference measures (SUMMARIES), and the flags any reference raised."""
    summary = {}
    for name, kinds in SUMMARIES.items():
        values = [r[name] for r in references if isinstance(r.get(name), (int, float))]
        if values:
            for kind in kinds:
                summary[f"{name}_{kind}"] = round(float(getattr(np, kind)(values)), 4)
    flags = sorted({k for r in references for k, v in r.items() if v is True})
    return summary, flags


def with_references(metrics: dict, references: list[dict]) -> dict:
    """`metrics` with new per-reference entries and the summaries and flags recomputed from them."""
    summary, flags = summarize(references)
    return {**metrics, "references": references, "summary": summary, "flags": flags}


def loader_view(image: np.ndarray) -> np.ndarray:
    """uint8 RGB as a training loader sees the stored reference: RGBA composited onto grey."""
    if image.ndim == 3 and image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        rgb = image[..., :3].astype(np.float32) * alpha + GREY * (1.0 - alpha)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


def hsv_histogram(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Normalised hue-saturation-value histogram of the pixels where `mask` is nonzero (all when None); None when
    the mask selects nothing."""
    import cv2

    if mask is not None and not mask.any():
        return None
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None if mask is None else mask.astype(np.uint8), HSV_BINS, HSV_RANGES)
    return cv2.normalize(hist, None).flatten()


def histogram_correlation(a: np.ndarray, b: np.ndarray) -> float:
    import cv2

    return round(float(cv2.compareHist(a, b, cv2.HISTCMP_CORREL)), 4)


def greyed(rgb: np.ndarray, hide: np.ndarray) -> np.ndarray:
    """`rgb` with the pixels where `hide` is nonzero set to the loader's grey: what CLIP sees of a background."""
    out = rgb.copy()
    out[hide.astype(bool)] = round(GREY)
    return out


class SampleMetrics(Stage):
    """Clip record in, the same record out with `meta["stats"]["metrics"]` and `meta["provenance"]["metrics"]`
    (see the module docstring). A record whose metrics cannot be computed keeps its sample: it gets a warning and
    `stats.metrics = {"error": ...}`.

    Stateless unless it loads a model: DINOv2 (`metrics.dino_model`) or CLIP for the background measure (with
    `clip_score.model` and `metrics.background_measure: auto`); CLIP-I itself reuses the embeddings clip_score stored.
    """

    name = "metrics"
    section = "metrics"  # resources come from config.metrics.resources

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.cfg: MetricsConfig = config.metrics
        self.clip_background = self.cfg.background_measure == "auto" and config.clip_score.model is not None
        self.dino = self.dino_processor = self.clip = None
        self.thresholds = config_face_thresholds(config)

    @property
    def stateful(self) -> bool:  # a model lives in an actor; without one this is a cheap CPU pass
        return self.cfg.dino_model is not None or self.clip_background

    def _on_granted_device(self, spec: ModelSpec) -> ModelSpec:
        """`spec` on the CPU unless this stage asks Ray for a GPU: the CLIP spec is clip_score's (`device: cuda` on a
        cluster), and an actor granted no GPU sees none, so loading there would fail every worker."""
        return spec if self.resources.num_gpus > 0 else spec.model_copy(update={"device": "cpu"})

    def setup(self) -> None:
        if self.cfg.dino_model is not None and self.dino is None:
            from transformers import AutoImageProcessor, AutoModel

            role = "metrics.dino_model"
            spec = self._on_granted_device(self.cfg.dino_model)
            self.dino = load_pretrained(AutoModel, spec, role)
            if self.dino.config.model_type not in DINO_TYPES:
                raise ModelUnavailable(f"{role} '{spec.path}' is a {self.dino.config.model_type} model; DINO-I "
                                       f"needs DINOv2 ({', '.join(DINO_TYPES)})")
            self.dino_processor = load_processor(AutoImageProcessor, spec, role)
        if self.clip_background and self.clip is None:
            from pipeline.models.clip import ClipScorer

            self.clip = ClipScorer.from_spec(self._on_granted_device(self.config.clip_score.model), role=self.name)

    def backends(self, record: Record) -> dict:
        faces = self.config.faces
        embeddings = record.blobs.get("face_embeddings")
        width = embeddings.shape[1] if embeddings is not None and embeddings.ndim == 2 else None
        face = None
        if faces.enabled and "faces" in record.meta:
            face = (f"dlib ResNet face descriptor ({width or 128}-d)" if faces.backend == "dlib"
                    else f"insightface ArcFace ({width or 512}-d)")
        clip = self.config.clip_score.model.path if self.config.clip_score.model is not None else None
        return {
            "face": face,
            "clip_i": f"open_clip {clip}" if clip and "clip_keyframe_embeddings" in record.blobs else None,
            "dino_i": f"dinov2 {self.cfg.dino_model.path}" if self.dino is not None else None,
            "background": f"open_clip {clip}" if self.clip is not None else "hsv-histogram-correlation",
        }

    def process(self, records: list[Record]) -> list[Record]:
        self.setup()
        work = []
        for record in records:
            try:
                work.append((record, self._plan(record)))
            except Exception as exc:  # noqa: BLE001 -- a stats stage must not cost a sample
                self._failed(record, exc)
        try:  # one model pass for the whole batch: DINO crops and keyframes, CLIP backgrounds
            embedded = self._embed([plan for _, plan in work])
        except Exception:  # noqa: BLE001 -- find the record the models choke on, spare the others
            embedded = []
            for record, plan in work:
                try:
                    embedded += self._embed([plan])
                except Exception as exc:  # noqa: BLE001
                    self._failed(record, exc)
                    embedded.append(None)
        for (record, plan), vectors in zip(work, embedded):
            if vectors is None:
                continue
            try:
                self._finish(record, plan, *vectors)
            except Exception as exc:  # noqa: BLE001 -- as above
                self._failed(record, exc)
        return records

    def provenance_of(self, record: Record) -> str | None:
        """The backends that measured this record; none when its metrics could not be computed."""
        b = ((record.meta.get("stats") or {}).get("metrics") or {}).get("backends")
        if not b:
            return None
        return (f"face: {b['face'] or 'off'} (copy_paste > {self.thresholds['copy_paste']}, mismatch < "
                f"{self.thresholds['mismatch']}); clip_i: {b['clip_i'] or 'off'}; dino_i: {b['dino_i'] or 'off'}; "
                f"background: {b['background']} on the reference as a loader sees it (RGBA over grey)")

    def _embed(self, plans: list[dict]) -> list[tuple[list, list]]:
        """(DINO vectors, CLIP vectors) per plan, from one pass of each model over all their images."""
        dino = iter(self._embed_dino([image for plan in plans for image in plan["dino"]]))
        clip = iter(self.clip.encode_images([i for plan in plans for i in plan["clip"]]) if self.clip else [])
        return [([next(dino) for _ in plan["dino"]], [next(clip) for _ in plan["clip"]]) for plan in plans]

    def _failed(self, record: Record, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        record.warn(self.name, f"metrics not computed: {message}")
        record.meta.setdefault("stats", {})["metrics"] = {"error": message}

    def _plan(self, record: Record) -> dict:
        """Per reference: what needs no model, now; the images a model must embed, listed for one batch pass."""
        meta, blobs = record.meta, record.blobs
        subjects = {e["id"] for e in meta.get("entities", []) if e.get("kind") == "subject"}
        detections = {d["id"]: i for i, d in enumerate(meta.get("detections") or [])}
        faces, embeddings = meta.get("faces"), blobs.get("face_embeddings")
        keyframes = blobs.get("keyframes")
        keyframe_clip, crop_clip = blobs.get("clip_keyframe_embeddings"), blobs.get("detection_clip")
        backends = self.backends(record)
        plan = {"backends": backends, "dino": [], "clip": [], "jobs": []}
        if self.dino is not None and keyframes is not None:
            plan["dino"] = [np.ascontiguousarray(k) for k in keyframes]
        for ref in meta.get("references", []):
            k, own = ref["k"], ref.get("keyframe")
            entry = {"file": ref["file"], "entity": ref["entity"], "variant": ref.get("variant")}
            if backends["face"] and ref["entity"] in subjects:
                entry["face_cosine"] = face_cosine(ref, faces or [], embeddings)
                entry.update(face_flags(entry["face_cosine"], self.thresholds))
            index = detections.get(ref.get("detection"))
            others = [i for i in range(len(keyframes) if keyframes is not None else 0) if i != own]
            if backends["clip_i"]:
                usable = crop_clip is not None and index is not None and index < len(crop_clip) and others
                entry["clip_i"] = mean_cosine(crop_clip[index], keyframe_clip[others]) if usable else None
            job = {"entry": entry, "others": others}
            if self.dino is not None:
                box = meta["detections"][index]["box"] if index is not None else None
                usable = box is not None and own is not None and keyframes is not None and own < len(keyframes)
                crop = keyframes[own][box[1]:box[3], box[0]:box[2]] if usable else None
                if crop is not None and crop.size and others:
                    job["dino"] = len(plan["dino"])
                    plan["dino"].append(np.ascontiguousarray(crop))
                else:
                    entry["dino_i"] = None
            self._plan_background(record, ref, k, job, plan)
            plan["jobs"].append(job)
        return plan

    def _plan_background(self, record: Record, ref: dict, k: int, job: dict, plan: dict) -> None:
        """The reference's background (outside its mask, as a loader sees it) against the clip's: the plate, else
        the reference keyframe outside every instance mask of that keyframe."""
        image, mask = record.blobs.get(f"ref{k}"), record.blobs.get(f"refmask{k}")
        plate, plate_hide = self._scene_background(record, ref.get("keyframe"))
        if image is None or mask is None or mask.shape != image.shape[:2] or plate is None:
            job["entry"]["background_similarity"] = None
            return
        view = loader_view(image)
        outside = (mask == 0).astype(np.uint8)
        if self.clip is not None:
            if not outside.any():
                job["entry"]["background_similarity"] = None
                return
            job["clip"] = len(plan["clip"])
            plan["clip"] += [greyed(view, 1 - outside), plate if plate_hide is None else greyed(plate, plate_hide)]
            return
        ours = hsv_histogram(view, outside)
        theirs = hsv_histogram(plate, None if plate_hide is None else (plate_hide == 0).astype(np.uint8))
        job["entry"]["background_similarity"] = (histogram_correlation(ours, theirs)
                                                 if ours is not None and theirs is not None else None)

    @staticmethod
    def _scene_background(record: Record, keyframe: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(image, pixels to hide or None): the background plate when the clip has one, else the reference's
        keyframe with every instance of that keyframe hidden (masks, else boxes)."""
        plate = record.blobs.get("background")
        if plate is not None:
            return plate, None
        keyframes = record.blobs.get("keyframes")
        if keyframes is None or keyframe is None or keyframe >= len(keyframes):
            return None, None
        frame = keyframes[keyframe]
        hide = np.zeros(frame.shape[:2], np.uint8)
        masks = record.blobs.get("masks")
        for i, det in enumerate(record.meta.get("detections") or []):
            if det.get("keyframe") != keyframe:
                continue
            if masks is not None and i < len(masks) and masks[i].shape == hide.shape:
                hide |= (masks[i] > 0).astype(np.uint8)
            else:
                x0, y0, x1, y1 = det["box"]
                hide[y0:y1, x0:x1] = 1
        return frame, hide

    def _finish(self, record: Record, plan: dict, dino: list[np.ndarray], clip: list[np.ndarray]) -> None:
        keyframes_dino = dino[:len(record.blobs.get("keyframes", ()))] if self.dino is not None else []
        references = []
        for job in plan["jobs"]:
            entry = job["entry"]
            if "dino" in job:
                entry["dino_i"] = mean_cosine(dino[job["dino"]], np.asarray(keyframes_dino)[job["others"]])
            if "clip" in job:
                ours, theirs = clip[job["clip"]], clip[job["clip"] + 1]
                entry["background_similarity"] = round(float(ours @ theirs), 4)
            references.append(entry)
        metrics = with_references({"backends": plan["backends"]}, references)
        alignment = (record.meta.get("stats") or {}).get("clip", {}).get("caption_alignment")
        if alignment is not None:
            metrics["caption_alignment"] = round(float(alignment), 4)
        record.meta.setdefault("stats", {})["metrics"] = metrics

    def _embed_dino(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """DINOv2 image embeddings (the pooled, layer-normed CLS token), one per uint8 RGB image."""
        if not images:
            return []
        import torch

        out = []
        for start in range(0, len(images), DINO_BATCH):
            inputs = self.dino_processor(images=images[start:start + DINO_BATCH], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.dino.device, dtype=self.dino.dtype)
            with torch.inference_mode():
                pooled = self.dino(pixel_values=pixels).pooler_output
            out.extend(pooled.float().cpu().numpy())
        return out
