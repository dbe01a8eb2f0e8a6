"""CLIP scores (open_clip): caption-clip alignment per clip and keyframe embeddings for later stages.

The model is `pipeline.models.clip.ClipScorer`, the one CLIP wrapper; the instance-level category check
(Kaleido: each crop against "a photo of a {category}") calls `ClipScorer.category_scores` on crops. Stats only:
no decision here.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.clip import PROMPT_TEMPLATE, ClipScorer


class ClipScore(Stage):
    """Caption alignment (mean keyframe-caption cosine; None without a caption) into `meta.stats.clip`, the
    keyframe embeddings into `blobs["clip_keyframe_embeddings"]` (float32 (K, D)) for identity clustering, and a
    category score per detection crop (`detection["clip_category_score"]`)."""

    name = "clip_score"
    requires = ("keyframes",)
    stateful = True

    section = "clip_score"  # resources come from config.clip_score.resources

    def setup(self) -> None:
        import open_clip

        spec = self.config.clip_score.model
        if spec is None:
            raise ValueError("clip_score.model is not set; the flow leaves this stage out when it is null")
        self.spec = spec
        self.scorer = ClipScorer.from_spec(spec, role=self.name)
        device = self.scorer.device
        self.description = f"open_clip {open_clip.__version__} {spec.path} dtype={spec.dtype} device={device}"

    def process(self, records: list[Record]) -> list[Record]:
        # Every record carries keyframes (`requires`). One image pass for every keyframe of the batch and one text
        # pass for every caption.
        embeddings = self.scorer.encode_images([frame for r in records for frame in r.blobs["keyframes"]])
        captions = [(r.meta.get("caption") or {}).get("text") or None for r in records]
        caption_embeddings = iter(self.scorer.encode_texts([c for c in captions if c]))
        start = 0
        for record, caption in zip(records, captions):
            own = embeddings[start : start + len(record.blobs["keyframes"])]
            start += len(own)
            alignment = float(np.mean(own @ next(caption_embeddings))) if caption else None
            record.blobs["clip_keyframe_embeddings"] = own
            record.meta.setdefault("stats", {})["clip"] = {"caption_alignment": alignment, "model": self.spec.path}
        self._score_instances(records)
        return records

    def _score_instances(self, records: list[Record]) -> None:
        """Kaleido's CLIP category check, as a stat: each detection's box crop against "a photo of a {category}"
        of its entity (persons against "person"), into `detection["clip_category_score"]`; and the crop's image
        embedding into `blobs["detection_clip"]` (row i = detections[i], zeros for an empty box), which the
        cross-pair pass uses as the identity of objects. One image pass for all crops of the batch; the filter
        that drops low scores reads the stat later."""
        crops, targets, owners = [], [], []
        for record in records:
            categories = {e["id"]: e.get("category") or e.get("word") for e in record.meta.get("entities", [])}
            for i, detection in enumerate(record.meta.get("detections", [])):
                x0, y0, x1, y1 = detection["box"]
                crop = record.blobs["keyframes"][detection["keyframe"]][y0:y1, x0:x1]
                if crop.size == 0:
                    continue
                crops.append(np.ascontiguousarray(crop))
                targets.append(categories.get(detection["entity"]) or detection["label"])
                owners.append((record, i))
        if not crops:
            return
        names = sorted(set(targets))
        embeddings = self.scorer.encode_images(crops)
        scores = embeddings @ self.scorer.encode_texts([PROMPT_TEMPLATE.format(n) for n in names]).T
        for record in records:
            if record.meta.get("detections"):
                record.blobs["detection_clip"] = np.zeros((len(record.meta["detections"]), embeddings.shape[1]),
                                                          np.float32)
        for row, embedding, target, (record, i) in zip(scores, embeddings, targets, owners):
            record.meta["detections"][i]["clip_category_score"] = float(row[names.index(target)])
            record.blobs["detection_clip"][i] = embedding
