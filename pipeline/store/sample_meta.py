"""KEY.json as read back from a shard: parsed with the JSON limits and checked against the schema of what the
pipeline writes, before any reader (stats, show, refilter, cross-pairs, the trainer) uses a number from it.

The schema checks what readers compute with: sizes are positive whole numbers, frame and keyframe indices and
subject, view and group ids are non-negative and bounded (`ReadLimits.max_entities`, `max_frames`, `max_pixels`),
boxes are four finite numbers, text is text. Everything else a sample carries (stats, provenance, scores) is
allowed through as it is; the readers that plot it skip what is not a number. A sample that fails is one sample
skipped with its reason, never a crash: `parse_sample_meta` raises `HostileData` naming the key and the field.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.core.untrusted import HostileData, load_json, printable, read_limits

__all__ = ["REFERENCE_FILE", "parse_sample_meta"]

# The members a reference names (`file`, `mask`): what the pipeline writes, and all a reader may open for one.
REFERENCE_FILE = {"file": re.compile(r"ref\d{1,4}\.png"), "mask": re.compile(r"mask\d{1,4}\.png")}

Box = list[float]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # 1e30 or "5" is no id


def _bounded(value: int | None, name: str, limit: int) -> int | None:
    if value is not None and not 0 <= value < limit:
        raise ValueError(f"{name} {value} is outside 0..{limit - 1}")
    return value


def _group(value: str | None) -> str | None:
    if value is None:
        return None
    if not (isinstance(value, str) and value[:1] == "g" and value[1:].isdigit() and len(value) <= 8):
        raise ValueError(f"group {value!r} is not gN")
    _bounded(int(value[1:]), "group", read_limits().max_entities)
    return value


def _finite_box(value: Box | None) -> Box | None:
    if value is not None and (len(value) != 4 or not all(math.isfinite(v) for v in value)):
        raise ValueError("box is not four finite numbers")
    return value


class ClipFacts(_Open):
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: float | None = None

    @model_validator(mode="after")
    def _sizes(self):
        limits = read_limits()
        for name in ("width", "height", "num_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"clip.{name} {value} is not a positive whole number")
        if self.width and self.height and self.width * self.height > limits.max_pixels:
            raise ValueError(f"clip is {self.width}x{self.height}, over {limits.max_pixels} pixels")
        if self.num_frames and self.num_frames > limits.max_frames:
            raise ValueError(f"clip.num_frames {self.num_frames} is over {limits.max_frames}")
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= 1000):
            raise ValueError(f"clip.fps {self.fps} is not a frame rate")
        return self


class Reference(_Open):
    file: str
    mask: str | None = None
    subject_id: int = 0
    view_id: int | None = None
    group: str | None = None
    box: Box | None = None

    _group = field_validator("group")(classmethod(lambda cls, v: _group(v)))
    _box = field_validator("box")(classmethod(lambda cls, v: _finite_box(v)))

    @model_validator(mode="after")
    def _ids(self):
        limit = read_limits().max_entities
        _bounded(self.subject_id, "reference subject_id", limit)
        _bounded(self.view_id, "reference view_id", limit)
        return self


class Entity(_Open):
    id: str | int | None = None
    kind: Literal["subject", "object", "background"] | None = None
    word: str | None = None
    subject_id: int | None = None
    view_id: int | None = None
    group: str | None = None
    attributes: dict[str, list[str]] | None = None
    references: list[Reference] | None = None

    _group = field_validator("group")(classmethod(lambda cls, v: _group(v)))

    @model_validator(mode="after")
    def _ids(self):
        limit = read_limits().max_entities
        _bounded(self.subject_id, "entity subject_id", limit)
        _bounded(self.view_id, "entity view_id", limit)
        if self.references and len(self.references) > limit:
            raise ValueError(f"{len(self.references)} references, over {limit}")
        return self


class Located(_Open):
    """A detection or a face: a box on a keyframe."""

    box: Box | None = None
    keyframe: int | None = None

    _box = field_validator("box")(classmethod(lambda cls, v: _finite_box(v)))

    @model_validator(mode="after")
    def _keyframe(self):
        _bounded(self.keyframe, "keyframe", read_limits().max_frames)
        return self


class Keyframe(_Open):
    frame: int | None = None

    @model_validator(mode="after")
    def _frame(self):
        _bounded(self.frame, "keyframe frame", read_limits().max_frames)
        return self


class Caption(_Open):
    text: str | None = None


class Background(_Open):
    file: str | None = None


class SampleMeta(_Open):
    key: str | None = None
    clip: ClipFacts | None = None
    caption: Caption | None = None
    entities: list[Entity] | None = None
    detections: list[Located] | None = None
    faces: list[Located] | None = None
    keyframes: list[Keyframe] | None = None
    background: Background | None = None
    cross_pair: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _counts(self):
        limit = read_limits().max_entities
        for name in ("entities", "faces"):
            items = getattr(self, name) or []
            if len(items) > limit:
                raise ValueError(f"{len(items)} {name}, over {limit}")
        if len(self.detections or []) > 16 * limit:
            raise ValueError(f"{len(self.detections)} detections, over {16 * limit}")
        return self


def parse_sample_meta(data: bytes | str, where: str = "KEY.json") -> dict:
    """KEY.json bytes -> its object, checked (module doc); HostileData naming `where` and the first bad field."""
    meta = load_json(data, where)
    if not isinstance(meta, dict):
        raise HostileData(f"{where}: a JSON {type(meta).__name__}, not an object")
    try:
        SampleMeta.model_validate(meta)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = printable(".".join(str(p) for p in first["loc"]) or "(top)")  # keys come from the data
        raise HostileData(f"{where}: {field}: {printable(first['msg'])}") from None
    return meta
