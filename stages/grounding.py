"""Open-vocabulary boxes on the keyframes: Grounding DINO grounds every subject and object entity word, plus
"person" whenever the clip has a subject (humans are also grounded as persons, for face search and for the VLM's
box prior). Background entities are scenes, not instances, and get no boxes. The thresholds default to
OpenS2V-Nexus's (box 0.25, text 0.25); Kaleido uses the same model family for its instance boxes.

The model runs through `transformers.GroundingDinoForObjectDetection` with the real IDEA-Research
grounding-dino-tiny/base weights. The `groundingdino-py` package is not used: it calls
`get_extended_attention_mask`, which transformers 5 removed, so it needs transformers 4.x, and transformers 4.x
conflicts with diffusers 0.42 over huggingface-hub.

Output, per clip: `meta["detections"]`, a list of
`{"id": "d0", "keyframe": k, "entity": "e1" | None, "label": query, "phrase": text, "box": [x0, y0, x1, y1],
"score": s}` sorted by keyframe, then score (highest first). `label` is the query the detected phrase maps to
(an entity word, or "person" with `entity` None); `phrase` is the text the model tied to the box; `box` is in
keyframe pixels, rounded and clipped to the frame. No NMS here: overlapping boxes are a later filter's call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.boxes import clip_box
from pipeline.core.names import GROUNDED_KINDS, PERSON
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.loader import load_pretrained, load_processor

GROUNDED_PARTS = ("top", "bottom", "accessories", "hairstyle", "footwear")
# Characters that would split or end a phrase in a Grounding DINO prompt ("." and "?" are its delimiter tokens).
_DELIMITERS = re.compile(r"[.?]+")
_SPECIAL_TOKEN = re.compile(r"\[[^\]]*\]")  # [CLS], [SEP], [PAD], ... in a decoded label


@dataclass(frozen=True)
class Query:
    """One phrase of the prompt and the entity it stands for (None: the extra "person" query)."""

    text: str
    entity: str | None
    part: str | None = None  # for a subject's attribute (LumosX): "top", "bottom", "accessories", "hairstyle", ...


def normalize_phrase(text: str) -> str:
    """Lowercase, no delimiter characters, single spaces: the form a phrase takes in the prompt."""
    return " ".join(_DELIMITERS.sub(" ", text.lower()).split())


def grounding_queries(entities: Sequence[dict]) -> list[Query]:
    """The phrases to ground for these entities, in entity order: subject and object words, then the attribute
    words of subjects that name a visible region (clothing, accessories, hairstyle, footwear; LumosX masks these
    so a subject's attributes get references of their own), then "person" when there is a subject. A phrase asked
    twice is asked once, for the first entity that names it; a subject whose word is "person" keeps that query
    (its detections are then both the subject's and the persons')."""
    queries: list[Query] = []
    seen: set[str] = set()
    for entity in entities:
        text = normalize_phrase(entity.get("word") or "")
        if entity.get("kind") in GROUNDED_KINDS and text and text not in seen:
            seen.add(text)
            queries.append(Query(text, entity["id"]))
    for entity in entities:
        for part in GROUNDED_PARTS:
            for word in (entity.get("attributes") or {}).get(part, []) if entity.get("kind") == "subject" else []:
                text = normalize_phrase(word)
                if text and text not in seen:
                    seen.add(text)
                    queries.append(Query(text, entity["id"], part))
    if PERSON not in seen and any(e.get("kind") == "subject" for e in entities):
        queries.append(Query(PERSON, None))
    return queries


def build_prompt(queries: Sequence[Query]) -> str:
    """Grounding DINO's text input: lowercase phrases separated by " . " and ending with "." (as it was trained)."""
    return " . ".join(q.text for q in queries) + " ." if queries else ""


def fit_queries(queries: Sequence[Query], count_tokens, max_tokens: int) -> tuple[list[Query], list[Query]]:
    """(kept, dropped): the queries whose prompt fits in `max_tokens` (`count_tokens(queries)` counts [CLS] and
    [SEP] too). transformers' Grounding DINO fails on a longer prompt rather than cutting it, and a cut inside a
    phrase would ground half a word, so whole queries go, the last first; "person" stays (face search needs it)."""
    kept, dropped = list(queries), []
    while count_tokens(kept) > max_tokens:
        last = max((i for i, q in enumerate(kept) if q.text != PERSON), default=None)
        if last is None:
            break
        dropped.insert(0, kept.pop(last))
    return kept, dropped


def phrase_segments(phrase: str) -> list[str]:
    """The phrases in a decoded label: split at the delimiters, special tokens dropped, lowercase, single spaces."""
    segments = (" ".join(s.split()) for s in _DELIMITERS.split(_SPECIAL_TOKEN.sub(" ", phrase.lower())))
    return [s for s in segments if s]


def match_phrase(phrase: str, queries: Sequence[str]) -> int | None:
    """Index of the query a detected phrase stands for, or None when it shares nothing with any of them.

    The post-processor's phrase is the decoded text of the prompt tokens scoring above the text threshold for a
    box, so it may be a query ("cup"), part of one ("red" of "red car"), a word piece ("##lasses"), or run over
    several queries ("woman. cup. [SEP]") when the threshold is low. The first part of the phrase that is exactly
    a query wins; otherwise each phrase word scores 1 for a word of the query and 0.5 for a piece (3+ letters) of
    one, and the best total wins, ties going to the query that comes first in the prompt.
    """
    segments = phrase_segments(phrase)
    for segment in segments:
        if segment in queries:
            return list(queries).index(segment)
    words = [w.removeprefix("##") for s in segments for w in s.split()]
    best, best_score = None, 0.0
    for index, query in enumerate(queries):
        query_words = query.split()
        score = sum(1.0 if w in query_words else 0.5 if len(w) >= 3 and any(w in q for q in query_words) else 0.0
                    for w in words)
        if score > best_score:
            best, best_score = index, score
    return best


class Grounder(Stage):
    """Grounding DINO boxes for the entities of each clip into `meta["detections"]` (see the module docstring)."""

    name = "grounding"
    requires = ("keyframes",)
    stateful = True
    # Images per forward pass: bounds peak accelerator memory (Grounding DINO resizes to 800 px short side).
    max_images_per_pass = 16

    section = "grounding"  # resources come from config.grounding.resources

    def setup(self) -> None:
        import transformers
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        config = self.config.grounding
        if config.model is None:
            raise ValueError("grounding.model is not set; the flow leaves this stage out when it is null")
        self.spec = config.model
        self.model = load_pretrained(GroundingDinoForObjectDetection, self.spec, role=self.name)
        self.processor = load_processor(AutoProcessor, self.spec, role=self.name)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.description = (
            f"transformers {transformers.__version__} GroundingDinoForObjectDetection {self.spec.path} "
            f"box_threshold={config.box_threshold} text_threshold={config.text_threshold} "
            f"dtype={self.spec.dtype} device={self.device}"
        )

    def queries_for(self, record: Record) -> list[Query]:
        return grounding_queries(record.meta.get("entities") or [])

    def process(self, records: list[Record]) -> list[Record]:
        # (record index, keyframe index, image, prompt) for every keyframe that has something to ground.
        jobs: list[tuple[int, int, np.ndarray, str]] = []
        queries_of: dict[int, list[Query]] = {}
        for index, record in enumerate(records):
            queries = self.queries_for(record)
            record.meta["detections"] = []
            if not queries:
                continue
            queries, dropped = fit_queries(queries, self._prompt_tokens, self.model.config.max_text_len)
            if dropped:
                record.warn(self.name, f"prompt is over the model's {self.model.config.max_text_len} tokens; "
                            f"not grounded: {', '.join(q.text for q in dropped)}")
            queries_of[index] = queries
            prompt = build_prompt(queries)
            jobs.extend((index, k, frame, prompt) for k, frame in enumerate(record.blobs["keyframes"]))

        found: dict[int, list[dict]] = {index: [] for index in queries_of}
        # One pass per image size (chunked): mixed sizes would be padded to a common canvas, and the padding changes
        # the backbone features, so a clip's boxes would depend on which clips shared its batch (and a resumed run
        # would not reproduce them). Prompts of different lengths share a pass: text padding is masked.
        by_shape: dict[tuple[int, int], list] = {}
        for job in jobs:
            by_shape.setdefault(job[2].shape[:2], []).append(job)
        for group in by_shape.values():
            for start in range(0, len(group), self.max_images_per_pass):
                chunk = group[start : start + self.max_images_per_pass]
                results = self._detect([job[2] for job in chunk], [job[3] for job in chunk])
                for (index, k, frame, _), result in zip(chunk, results):
                    found[index].extend(self._to_detections(result, k, frame.shape, queries_of[index]))

        for index, detections in found.items():
            detections.sort(key=lambda d: (d["keyframe"], -d["score"]))
            records[index].meta["detections"] = [{"id": f"d{n}", **d} for n, d in enumerate(detections)]
        return records

    def _prompt_tokens(self, queries: Sequence[Query]) -> int:
        return len(self.processor.tokenizer(build_prompt(queries))["input_ids"])

    def _detect(self, images: list[np.ndarray], prompts: list[str]) -> list[dict]:
        """Post-processed results for images of one size, one prompt each, in one forward pass."""
        import torch

        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        # transformers 5 names the box threshold `threshold` (4.x: `box_threshold`); `text_labels` holds the
        # phrases (`labels` is a deprecated alias that is to become integer ids).
        results = self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self.config.grounding.box_threshold,
            text_threshold=self.config.grounding.text_threshold,
            target_sizes=[image.shape[:2] for image in images],
        )
        return results

    @staticmethod
    def _to_detections(result: dict, keyframe: int, shape: tuple, queries: list[Query]) -> list[dict]:
        height, width = shape[:2]
        texts = [q.text for q in queries]
        detections = []
        for score, box, phrase in zip(result["scores"].tolist(), result["boxes"].tolist(), result["text_labels"]):
            match = match_phrase(phrase, texts)
            box = clip_box(box, width, height)
            # A box no phrase token passed the text threshold for cannot be tied to an entity, and a box clipped to
            # nothing (wholly outside the frame) has nothing to segment.
            if match is None or box[2] <= box[0] or box[3] <= box[1]:
                continue
            detections.append({
                "keyframe": keyframe,
                "entity": queries[match].entity,
                "label": queries[match].text,
                "part": queries[match].part,
                "phrase": " . ".join(phrase_segments(phrase)),
                "box": box,
                "score": float(score),
            })
        return detections


class PersonGrounder(Grounder):
    """Person boxes only, before entity extraction: the numbered visual prior the VLM binds subjects to (LumosX).
    The entity-word grounding after it replaces these detections; the VLM keeps the boxes it chose."""

    name = "person_grounding"

    def queries_for(self, record: Record) -> list[Query]:
        return [Query(PERSON, None)]
