"""Entity extraction with Qwen2.5-VL: structured JSON from the caption, bound to person boxes (LumosX).

Used instead of the taxonomy matcher (stages/entities.py) when `entities.model` is set, and writes the same entity
format. The VLM sees the middle keyframe (the one nearest 50% of the clip) with the person detections of that
keyframe drawn as numbered boxes, and the same boxes listed as "box N: [x0, y0, x1, y1]" in the prompt, so that a
caption that repeats a noun ("a man on the left ... a man on the right") gets one subject per person, each with
its own box and attributes.

The answer must be JSON of the form

    {"subjects": [{"word", "box", "attributes": {"top", "bottom", "accessories", "hairstyle", "footwear"}}],
     "objects": [{"word"}], "background": [{"word"}]}

where every word occurs in the caption. Cheap defects are repaired (code fences, text around the object,
trailing commas); otherwise the VLM is re-asked with what was wrong, up to `entities.max_retries` times, and then
the clip gets the error `entities_malformed`.

Person boxes are the `meta["detections"]` with `"label": "person"` on the middle keyframe, in the grounding
stage's format (`"keyframe"`: index into the keyframes blob, `"box"`: [x0, y0, x1, y1] keyframe pixels). A
subject's `box_prior` is the box the VLM chose for it, `{"index": n, "keyframe": k, "box": [x0, y0, x1, y1]}` with
n its number in the prompt (1 = leftmost), or None. It holds the box itself, not a position in
`meta["detections"]`, because the grounding stage rewrites that list after this stage.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.qwen_vl import QwenVL, load_prompt
from taxonomies.entities import TAXONOMY_PROVENANCE, extract_entities

ATTRIBUTE_KEYS = ("top", "bottom", "accessories", "hairstyle", "footwear")
PERSON_LABEL = "person"
# Distinct, saturated colours (RGB) for the numbered boxes; a number's label is drawn in black or white on it.
BOX_COLORS = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220), (255, 128, 0))


# ------------------------------------------------------------------------------------------ the answer schema
Word = Annotated[StrictStr, Field(min_length=1)]


class _Answer(BaseModel):
    # Extra keys ("category", "confidence") are ignored: a chatty model should not cost a re-ask for them.
    model_config = ConfigDict(extra="ignore")


class SubjectAttributes(_Answer):
    top: list[StrictStr] = Field(default_factory=list)
    bottom: list[StrictStr] = Field(default_factory=list)
    accessories: list[StrictStr] = Field(default_factory=list)
    hairstyle: list[StrictStr] = Field(default_factory=list)
    footwear: list[StrictStr] = Field(default_factory=list)


class SubjectAnswer(_Answer):
    word: Word
    box: StrictInt | None = None
    attributes: SubjectAttributes = Field(default_factory=SubjectAttributes)


class WordAnswer(_Answer):
    word: Word


class EntityAnswer(_Answer):
    """What the VLM must answer. Validate with `context={"caption": str, "num_boxes": int}`."""

    subjects: list[SubjectAnswer] = Field(default_factory=list)
    objects: list[WordAnswer] = Field(default_factory=list)
    background: list[WordAnswer] = Field(default_factory=list)

    @model_validator(mode="after")
    def _words_in_caption_and_boxes_listed(self, info: ValidationInfo):
        context = info.context or {}
        caption, num_boxes = context.get("caption"), context.get("num_boxes", 0)
        problems = []
        if caption is not None:
            for kind in ("subjects", "objects", "background"):
                for i, item in enumerate(getattr(self, kind)):
                    if find_word(caption, item.word) is None:
                        problems.append(f"{kind}[{i}].word {item.word!r} does not occur in the caption")
        for i, subject in enumerate(self.subjects):
            if subject.box is not None and not 1 <= subject.box <= num_boxes:
                listed = f"boxes 1..{num_boxes}" if num_boxes else "no boxes (use null)"
                problems.append(f"subjects[{i}].box {subject.box} is not a listed box ({listed})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class MalformedEntities(ValueError):
    """The VLM's answer is not valid entity JSON; the message says what is wrong, for the re-ask."""


def repair_json(text: str) -> str:
    """Cheap fixes for how chat models wrap JSON: code fences, prose around the object, trailing commas."""
    text = re.sub(r"```(?:json)?", "", text, flags=re.IGNORECASE)
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        text = text[start : end + 1]
    # A comma right before a closing bracket; a string holding ", }" would be changed too, which no entity word has.
    return re.sub(r",\s*([}\]])", r"\1", text)


def parse_entities(text: str, caption: str, num_boxes: int) -> EntityAnswer:
    """The validated answer in `text`, after `repair_json`; raises MalformedEntities saying what is wrong."""
    repaired = repair_json(text)
    try:
        data = json.loads(repaired)
    except json.JSONDecodeError as exc:
        raise MalformedEntities(f"not a JSON object ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise MalformedEntities(f"the answer is a JSON {type(data).__name__}, not an object")
    try:
        return EntityAnswer.model_validate(data, context={"caption": caption, "num_boxes": num_boxes})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}: {err['msg']}" if where else err["msg"].removeprefix("Value error, "))
        raise MalformedEntities("; ".join(problems)) from None


def _word_pattern(word: str) -> re.Pattern | None:
    words = word.strip().split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def find_word(caption: str, word: str) -> tuple[int, int] | None:
    """The span of the first mention of `word` in `caption`: case-insensitive, whole words, any run of spaces
    between its words."""
    mentions = find_all(caption, word)
    return mentions[0] if mentions else None


def find_all(caption: str, word: str) -> list[tuple[int, int]]:
    """The spans of every mention of `word` in `caption`, as `find_word` matches them."""
    pattern = _word_pattern(word)
    return [(m.start(), m.end()) for m in pattern.finditer(caption)] if pattern else []


# ------------------------------------------------------------------------------------ answer -> entity dicts
def _categorize(word: str, taxonomy) -> tuple[str, str | None]:
    category = taxonomy.category_of(word)
    if category is None:
        # "busy street", "black electric guitar": the head noun (last mention) names the category.
        matches = taxonomy.match(word)
        if matches:
            category = taxonomy.categories[matches[-1].category]
    if category is None:
        return word.strip().lower(), None
    return category.name, category.group


def to_entities(answer: EntityAnswer, caption: str, taxonomy, box_priors: list[dict]) -> list[dict]:
    """Entity dicts in the format of stages/entities.py, in caption order, subjects with a `box_prior`.

    `box_priors[n - 1]` is the box numbered n in the prompt (see `person_boxes`). Each subject is its own entity
    (two men are two subjects with their own groups); objects and backgrounds are one entity per word. When a word
    is mentioned more than once ("a man on the left ... a man on the right"), each subject
    takes the free mention whose part of the caption (up to the next mention of that word) holds most of its
    attributes, the earliest on a tie; objects take the first free mention."""
    taken: set[tuple[int, int]] = set()

    def span_of(word: str, attributes: list[str] = ()) -> list[int]:
        mentions = find_all(caption, word)
        free = [m for m in mentions if m not in taken] or mentions

        def support(mention: tuple[int, int]) -> int:
            later = [m[0] for m in mentions if m[0] > mention[0]]
            part = caption[mention[1] : later[0] if later else len(caption)].lower()
            return sum(1 for value in attributes if value.lower() in part)

        best = max(free, key=lambda m: (support(m), -m[0]))
        taken.add(best)
        return [best[0], best[1]]

    entities = []
    for subject in answer.subjects:
        dumped = subject.attributes.model_dump()
        attributes = {k: [v.strip() for v in dumped[k] if v.strip()] for k in ATTRIBUTE_KEYS}
        span = span_of(subject.word, [v for values in attributes.values() for v in values])
        category, group = _categorize(subject.word, taxonomy)
        entities.append({
            "kind": "subject",
            "word": caption[span[0] : span[1]],
            "category": category,
            "taxonomy_group": group,
            "span": span,
            "attributes": {k: v for k, v in attributes.items() if v},
            "box_prior": dict(box_priors[subject.box - 1]) if subject.box is not None else None,
        })
    for kind, items in (("object", answer.objects), ("background", answer.background)):
        seen: set[str] = set()
        for item in items:
            key = " ".join(item.word.lower().split())
            if key in seen:
                continue
            seen.add(key)
            span = span_of(item.word)
            category, group = _categorize(item.word, taxonomy)
            entities.append({
                "kind": kind, "word": caption[span[0] : span[1]], "category": category,
                "taxonomy_group": group, "span": span,
            })
    entities.sort(key=lambda e: e["span"][0])  # stable: subjects sharing a span keep the VLM's order
    subjects = 0
    for i, entity in enumerate(entities):
        entity["id"] = f"e{i}"
        if entity["kind"] == "subject":
            entity["group"] = f"g{subjects}"
            subjects += 1
    return [{"id": e.pop("id"), **e} for e in entities]


# ------------------------------------------------------------------------------------------ the box prior
def middle_keyframe(record: Record) -> int:
    """Index of the keyframe nearest 50% of the clip (LumosX's middle frame)."""
    positions = [k.get("at") for k in record.meta.get("keyframes") or []]
    count = len(record.blobs.get("keyframes", ()))
    if positions and all(p is not None for p in positions) and len(positions) == count:
        return int(np.argmin([abs(p - 0.5) for p in positions]))
    return count // 2


def person_boxes(record: Record, keyframe: int) -> list[dict]:
    """The person detections on `keyframe` as box priors `{"index", "keyframe", "box"}`, numbered from 1 left to
    right (then top to bottom), so "box 1" is the leftmost person in the prompt too."""
    boxes = sorted(
        [float(v) for v in d["box"]]
        for d in record.meta.get("detections") or []
        if d.get("label") == PERSON_LABEL and d.get("keyframe") == keyframe and len(d.get("box") or ()) == 4
    )
    return [{"index": n, "keyframe": keyframe, "box": box} for n, box in enumerate(boxes, start=1)]


def scale_boxes(boxes: list[list[float]], src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> list[list[int]]:
    """Boxes from `src_hw` pixels to integer `dst_hw` pixels, clipped to the image."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    out = []
    for x0, y0, x1, y1 in boxes:
        out.append([
            int(np.clip(round(x0 * sx), 0, dst_hw[1] - 1)), int(np.clip(round(y0 * sy), 0, dst_hw[0] - 1)),
            int(np.clip(round(x1 * sx), 0, dst_hw[1] - 1)), int(np.clip(round(y1 * sy), 0, dst_hw[0] - 1)),
        ])
    return out


def draw_numbered_boxes(rgb: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """A copy of `rgb` with each box outlined and its number (1-based, in list order) in its top-left corner."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    short = min(out.shape[:2])
    thickness = max(2, round(short / 150))
    font_scale = max(0.4, short / 500)
    for n, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        color = BOX_COLORS[(n - 1) % len(BOX_COLORS)]
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thickness)
        label = str(n)
        (tw, th), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        # Inside the box, so a box at the image's top edge keeps its label.
        cv2.rectangle(out, (x0, y0), (x0 + tw + 2 * thickness, y0 + th + baseline + thickness), color, -1)
        ink = (0, 0, 0) if sum(color) > 400 else (255, 255, 255)
        cv2.putText(out, label, (x0 + thickness, y0 + th + thickness // 2 + 1), cv2.FONT_HERSHEY_SIMPLEX,
                    font_scale, ink, max(1, thickness // 2), cv2.LINE_AA)
    return out


def boxes_prompt(boxes: list[list[int]]) -> str:
    """The prompt's box list: numbered as drawn, in pixels of the image the model sees."""
    if not boxes:
        return " No person boxes are given: every subject's \"box\" is null."
    lines = [f"box {n}: [{x0}, {y0}, {x1}, {y1}]" for n, (x0, y0, x1, y1) in enumerate(boxes, start=1)]
    return (
        " The people in it are outlined by numbered boxes, given as [x0, y0, x1, y1] pixels of the image"
        " (box 1 is the leftmost):\n" + "\n".join(lines)
    )


# ------------------------------------------------------------------------------------------ the stage
class VlmEntityExtractor(Stage):
    """Entities from the caption with Qwen2.5-VL and the person boxes as visual prior (see the module docstring)."""

    name = "entities"
    stateful = True

    section = "entities"  # resources come from config.entities.resources

    def setup(self) -> None:
        from taxonomies.matcher import Taxonomy

        cfg = self.config.entities
        self.taxonomy = Taxonomy.load(cfg.taxonomy)
        self.prompt = load_prompt(cfg.prompt_file, "entities.txt", required=("caption", "boxes"))
        # EntitiesConfig has no pixel budget of its own; the caption stage's keeps both VLM passes alike.
        max_pixels = self.config.caption.max_pixels
        self.vlm = QwenVL(cfg.model, role="entities", max_pixels=max_pixels) if cfg.model is not None else None
        self._answered: dict[str, str] = {}  # clip key -> its provenance line, until run_stage records it

    def process(self, records: list[Record]) -> list[Record]:
        if not hasattr(self, "vlm"):
            self.setup()
        cfg = self.config.entities
        jobs = []
        for record in records:
            caption = (record.meta.get("caption") or {}).get("text")
            if not caption:
                record.meta["entities"] = []
                record.warn(self.name, "no caption, so no entities (configure captioning or give captions in metadata)")
            elif self.vlm is None:
                record.meta["entities"] = extract_entities(caption, self.taxonomy)
            else:
                jobs.append(self._job(record, caption))
        # Every round asks all clips still without a valid answer in one generate call; a re-ask carries the
        # bad answer and what was wrong with it, since greedy decoding would repeat the same answer to the same chat.
        pending = jobs
        for _ in range(cfg.max_retries + 1):
            if not pending:
                break
            replies = self.vlm.generate([j["chat"] for j in pending], [j["images"] for j in pending],
                                        cfg.max_new_tokens)
            still = []
            for job, reply in zip(pending, replies):
                job["answers"] += 1
                try:
                    job["answer"] = parse_entities(reply, job["caption"], len(job["boxes"]))
                except MalformedEntities as exc:
                    job["problem"], job["last"] = str(exc), reply
                    job["chat"] = job["chat"] + [
                        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
                        {"role": "user", "content": [{"type": "text", "text":
                            f"That answer is not valid: {exc}. Reply with only the corrected JSON object."}]},
                    ]
                    still.append(job)
            pending = still
        for job in jobs:
            record = job["record"]
            if "answer" not in job:
                record.fail(self.name, "entities_malformed",
                            f"no valid entity JSON after {job['answers']} answers; last problem: {job['problem']}; "
                            f"last answer: {job['last'][:200]!r}")
                continue
            record.meta["entities"] = to_entities(job["answer"], job["caption"], self.taxonomy, job["priors"])
            self._answered[record.key] = (
                f"{self.vlm.describe()} max_new_tokens={cfg.max_new_tokens}; {len(job['boxes'])} person boxes; "
                f"valid JSON at answer {job['answers']}; categories from taxonomy {self.taxonomy.source}"
            )
        return records

    def provenance_of(self, record: Record) -> str | None:
        if not (record.meta.get("caption") or {}).get("text"):
            return None
        if self.vlm is None:
            return TAXONOMY_PROVENANCE
        # How this clip's answer came about (its person boxes, the answer that parsed), noted by `process`.
        return self._answered.pop(record.key, None)

    def _job(self, record: Record, caption: str) -> dict:
        keyframes = record.blobs.get("keyframes")
        images, boxes, priors = [], [], []
        if keyframes is not None and len(keyframes):
            k = middle_keyframe(record)
            frame = keyframes[k]
            image = self.vlm.fit(frame)
            priors = person_boxes(record, k)
            boxes = scale_boxes([p["box"] for p in priors], frame.shape[:2], image.shape[:2])
            images = [draw_numbered_boxes(image, boxes) if boxes else image]
        text = self.prompt.safe_substitute(caption=caption, boxes=boxes_prompt(boxes))
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return {
            "record": record, "caption": caption, "boxes": boxes, "priors": priors, "images": images,
            "chat": [{"role": "user", "content": content}], "answers": 0,
        }
