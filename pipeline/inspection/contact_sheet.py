"""`s2v shards show`: one PNG that shows a sample the way a trainer will see it.

From top to bottom: the key and where the clip comes from (and, for a cross-paired sample, its base and how its
references were swapped); frames of the clip, evenly spaced; the keyframes with every detection's box and SAM mask
(KEY.dmask{i}.png) coloured by its entity; each reference image with its mask overlaid, framed in its entity's
colour and labelled with its variant, word tag, group and where its pixels come from; the background plate; the
caption with each entity word highlighted in the same colour. The sample is found through index.json (own and
cross-pair shards); only its tar members are read.
"""

from __future__ import annotations

import difflib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.errors import UserFacingError
from pipeline.core.names import UnsafeName, check_key, check_shard
from pipeline.core.storage import Storage
from pipeline.core.video import VideoError, iter_frames
from pipeline.store.ledger import Ledger, as_storage
from pipeline.store.shards import iter_members, read_shard_samples

WIDTH = 1600
MARGIN = 20
GAP = 12
REF_HEIGHT = 200  # reference and plate panels: image height
REF_MAX_WIDTH = 320
LABEL_MAX_WIDTH = 420
KEYFRAME_MAX_WIDTH = 520
MASK_ALPHA = 0.35
# One colour per entity, in entity order (tab10): reference borders, detection overlays and caption highlights.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207)]
UNBOUND = (127, 127, 127)  # detections of no entity, or rejected by the instance filters
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (95, 95, 95)


class ContactSheetError(UserFacingError, ValueError):
    """The sample cannot be shown (no index, key not found); the message says why and what to try."""


@dataclass
class Sample:
    key: str
    shard: str  # relative to the output directory
    parts: dict[str, bytes]  # extension ("mp4", "json", "ref0.png", ...) -> bytes


@dataclass
class Panel:
    """One picture on the sheet: `box` is (x0, y0, x1, y1) of its image area in sheet pixels."""

    name: str  # frame{i}, keyframe{k}, ref{k}, bg, caption
    box: tuple[int, int, int, int]
    lines: list[str] = field(default_factory=list)
    color: tuple[int, int, int] | None = None


@dataclass
class ContactSheet:
    image: Image.Image
    panels: list[Panel]

    def panel(self, name: str) -> Panel:
        return next(p for p in self.panels if p.name == name)


def contact_sheet(out_dir: str | Path, key: str, out_png: str | Path, frames: int = 6, width: int = WIDTH) -> Path:
    """Render sample `key` of `out_dir` (own or cross-paired) to `out_png`; returns its path."""
    sheet = render_contact_sheet(find_sample(out_dir, key), frames=frames, width=width)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.image.save(out, format="PNG")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Finding the sample


def find_sample(out_dir: str | Path, key: str) -> Sample:
    """The sample `key` (or the one key that starts with it) from the shards index.json lists. Reads tar headers,
    then only that sample's members; manifest.parquet, when present, says which shard to open first."""
    out = as_storage(out_dir)
    try:
        check_key(key, "s2v shards show")
    except UnsafeName as exc:
        raise ContactSheetError(str(exc)) from None
    if out.info("index.json") is None:
        raise ContactSheetError(f"{out}: no index.json (not a finished `s2v curate run` output; a run still going "
                                "writes it when it ends)")
    shards = [e["url"] for e in json.loads(out.read_text("index.json")).get("shardlist", [])]
    shards += sorted(Ledger(out).read().rejects)  # examples of dropped clips: not training data, not in index.json
    hint = _manifest_shard(out, key)
    order = ([hint] if hint in shards else []) + [s for s in shards if s != hint]
    seen: dict[str, str] = {}
    for shard in order:
        members = _shard_members(out, shard)
        for name in members:
            seen.setdefault(name.partition(".")[0], shard)
        if key in seen:
            return _read_sample(out, seen[key], key)
    prefixed = sorted(k for k in seen if k.startswith(key))
    if len(prefixed) == 1:
        return _read_sample(out, seen[prefixed[0]], prefixed[0])
    if prefixed:
        raise ContactSheetError(f"key {key!r} is the start of {len(prefixed)} keys in {out}: "
                                f"{', '.join(prefixed[:8])}{' ...' if len(prefixed) > 8 else ''}")
    close = difflib.get_close_matches(key, list(seen), n=5, cutoff=0.5)
    said = f"; close matches: {', '.join(close)}" if close else f"; it holds {len(seen)} samples"
    raise ContactSheetError(f"no sample with key {key!r} in the {len(shards)} shards of {out}{said}")


def _manifest_shard(out: Storage, key: str) -> str | None:
    if out.info("manifest.parquet") is None:
        return None
    with out.open_read("manifest.parquet") as f:
        table = pq.read_table(f, columns=["key", "shard"], filters=[("key", "=", key)])
    return table.column("shard")[0].as_py() if table.num_rows else None


def _shard_members(out: Storage, shard: str) -> list[str]:
    try:
        check_shard(shard, out)
    except UnsafeName as exc:
        raise ContactSheetError(f"index.json: {exc}") from None
    if out.info(shard) is None:
        return []
    try:
        return [f"{key}.{part}" for key, part, _member, _read in iter_members((out, shard), shard)]
    except (tarfile.TarError, OSError, UnsafeName):
        return []  # a damaged shard holds nothing showable; `s2v shards verify` says what is wrong with it


def _read_sample(out: Storage, shard: str, key: str) -> Sample:
    try:
        parts = read_shard_samples((out, check_shard(shard, out)), {key}).get(key, {})
    except UnsafeName as exc:
        raise ContactSheetError(str(exc)) from None
    parts.pop("__key__", None)
    if "json" not in parts:
        raise ContactSheetError(f"{shard}: sample {key} has no KEY.json")
    return Sample(key, shard, parts)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def render_contact_sheet(sample: Sample, frames: int = 6, width: int = WIDTH) -> ContactSheet:
    """The sheet of one sample as an RGB image, with where each panel is (see the module docstring)."""
    meta = json.loads(sample.parts["json"])
    colors = _entity_colors(meta)
    wanted_keyframes = [k.get("frame") for k in meta.get("keyframes") or [] if isinstance(k.get("frame"), int)]
    decoded, frame_count, decode_error = _decode(sample.parts.get("mp4"), frames, wanted_keyframes, meta)

    sections = [_header(sample, meta, width)]
    sections.append(_frames_section(decoded, frame_count, frames, meta, decode_error, width))
    if meta.get("detections") and wanted_keyframes:
        sections.append(_keyframes_section(sample, meta, decoded, wanted_keyframes, colors, width))
    sections.append(_references_section(sample, meta, colors, width))
    sections.append(_caption_section(meta, colors, width))

    height = sum(s.image.height for s in sections) + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    panels: list[Panel] = []
    y = 0
    for section in sections:
        canvas.paste(section.image, (0, y))
        for p in section.panels:
            x0, y0, x1, y1 = p.box
            panels.append(Panel(p.name, (x0, y0 + y, x1, y1 + y), p.lines, p.color))
        y += section.image.height
    return ContactSheet(canvas, panels)


@dataclass
class _Section:
    image: Image.Image
    panels: list[Panel]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(text: str, font) -> int:
    return int(font.getlength(text))


def _fit(text: str, font, max_width: int) -> str:
    """`text`, cut with an ellipsis to fit `max_width` pixels."""
    if _text_width(text, font) <= max_width:
        return text
    while text and _text_width(text + "…", font) > max_width:
        text = text[:-1]
    return text + "…"


def _entity_colors(meta: dict) -> dict[str, tuple[int, int, int]]:
    return {e.get("id", f"#{i}"): PALETTE[i % len(PALETTE)] for i, e in enumerate(meta.get("entities") or [])}


def _decode(mp4: bytes | None, frames: int, keyframes: list[int], meta: dict
            ) -> tuple[dict[int, np.ndarray], int, str | None]:
    """The evenly spaced frames and the keyframes (frame index -> RGB), the frame count and a decode error."""
    if not mp4:
        return {}, 0, "no KEY.mp4"
    total = (meta.get("clip") or {}).get("num_frames")
    try:
        if not isinstance(total, int) or total <= 0:
            total = sum(1 for _ in iter_frames(io.BytesIO(mp4)))
        wanted = set(_spaced(total, frames)) | set(keyframes)
        kept: dict[int, np.ndarray] = {}
        count = 0
        for i, frame in enumerate(iter_frames(io.BytesIO(mp4))):
            count = i + 1
            if i in wanted:
                kept[i] = frame
        return kept, count, None
    except (VideoError, OSError, ValueError) as exc:  # PyAV's errors derive from OSError / ValueError
        return {}, 0, f"cannot decode KEY.mp4 ({getattr(exc, 'message', exc)})"


def _spaced(total: int, n: int) -> list[int]:
    if total <= 0 or n <= 0:
        return []
    return sorted({round(x) for x in np.linspace(0, total - 1, min(n, total))})


def _title(draw: ImageDraw.ImageDraw, y: int, text: str) -> int:
    font = _font(17)
    draw.text((MARGIN, y), text, fill=INK, font=font)
    return y + 26


def _header(sample: Sample, meta: dict, width: int) -> _Section:
    big, small = _font(24), _font(15)
    clip = meta.get("clip") or {}
    span = meta.get("span") or {}
    source = meta.get("source") or {}
    lines = []
    if clip:
        lines.append(f"clip {clip.get('width')}x{clip.get('height')} · {clip.get('fps', 0):.2f} fps · "
                     f"{clip.get('num_frames')} frames · {clip.get('duration_s', 0):.2f} s · {clip.get('codec', '')}")
    if source or span:
        where = f"source {source.get('path') or source.get('id', '?')}"
        if span:
            where += (f" · frames {span.get('first_frame')}-{span.get('last_frame')} "
                      f"({span.get('start_s', 0):.2f}-{span.get('end_s', 0):.2f} s)")
        lines.append(where)
    lines.append(f"shard {sample.shard}")
    cross = meta.get("cross_pair")
    if cross:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted((cross.get("kinds") or {}).items())) or "none"
        plate = f" · composites on the plate of {cross['background_from']}" if cross.get("background_from") else ""
        lines.append(f"cross-paired from {cross.get('base')}: references replaced: {kinds}{plate}")
    image = Image.new("RGB", (width, MARGIN + 34 + 22 * len(lines) + 6), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), sample.key, fill=INK, font=big)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + 34 + 22 * i), _fit(line, small, width - 2 * MARGIN), fill=MUTED, font=small)
    return _Section(image, [])


def _frames_section(decoded: dict[int, np.ndarray], count: int, frames: int, meta: dict, error: str | None,
                    width: int) -> _Section:
    indices = _spaced(count, frames)
    fps = (meta.get("clip") or {}).get("fps") or 0
    clip = meta.get("clip") or {}
    aspect = (clip.get("height") or 9) / (clip.get("width") or 16)
    if decoded:
        first = decoded[min(decoded)]
        aspect = first.shape[0] / first.shape[1]
    n = max(1, len(indices) or frames)
    tile_w = (width - 2 * MARGIN - (n - 1) * GAP) // n
    tile_h = round(tile_w * aspect)
    label_font = _font(13)
    image = Image.new("RGB", (width, 26 + MARGIN // 2 + tile_h + 22 + GAP), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = _title(draw, MARGIN // 2, f"Frames ({len(indices)} of {count})" if indices else "Frames")
    panels = []
    if error or not indices:
        draw.rectangle((MARGIN, y, width - MARGIN, y + tile_h), outline=UNBOUND, width=2)
        draw.text((MARGIN + 12, y + 12), error or "the clip has no frames", fill=INK, font=_font(16))
        return _Section(image, panels)
    for j, i in enumerate(indices):
        x = MARGIN + j * (tile_w + GAP)
        tile = cv2.resize(decoded[i], (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        image.paste(Image.fromarray(tile), (x, y))
        label = f"frame {i}" + (f" · {i / fps:.2f} s" if fps else "")
        draw.text((x, y + tile_h + 4), label, fill=MUTED, font=label_font)
        panels.append(Panel(f"frame{j}", (x, y, x + tile_w, y + tile_h), [label]))
    return _Section(image, panels)


def _decode_png(data: bytes | None) -> np.ndarray | None:
    """PNG bytes -> RGB / RGBA / gray array as stored, or None."""
    if not data:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return image


def _overlay(rgb: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int], alpha: float = MASK_ALPHA
             ) -> np.ndarray:
    """`rgb` with `mask` filled in `color` at `alpha` and outlined (mask resized to the image if needed)."""
    if mask is None:
        return rgb
    if mask.ndim == 3:
        mask = mask[..., -1]
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    inside = mask > 0
    out = rgb.astype(np.float32)
    out[inside] = (1 - alpha) * out[inside] + alpha * np.array(color, np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, 2)
    return out


def _on_checkerboard(image: np.ndarray, cell: int = 8) -> np.ndarray:
    """RGBA -> RGB over a grey checkerboard, so transparency (the `segment` variant) shows; RGB and gray pass."""
    if image.ndim == 2:
        return np.dstack([image] * 3)
    if image.shape[2] == 3:
        return image
    ys, xs = np.indices(image.shape[:2])
    board = np.where(((ys // cell + xs // cell) % 2 == 0)[..., None], 205, 245).astype(np.float32)
    alpha = image[..., 3:4].astype(np.float32) / 255
    return np.clip(alpha * image[..., :3] + (1 - alpha) * board + 0.5, 0, 255).astype(np.uint8)


def _keyframes_section(sample: Sample, meta: dict, decoded: dict[int, np.ndarray], keyframes: list[int],
                       colors: dict, width: int) -> _Section:
    detections = meta["detections"]
    n = len(keyframes)
    tile_w = min(KEYFRAME_MAX_WIDTH, (width - 2 * MARGIN - (n - 1) * GAP) // n)
    clip = meta.get("clip") or {}
    aspect = (clip.get("height") or 9) / (clip.get("width") or 16)
    tile_h = round(tile_w * aspect)
    font = _font(13)
    image = Image.new("RGB", (width, 26 + MARGIN // 2 + tile_h + 22 + GAP), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = _title(draw, MARGIN // 2, "Keyframes: detections and their masks, coloured by entity (grey: no entity or "
                                  "rejected)")
    panels = []
    for k, frame_index in enumerate(keyframes):
        x = MARGIN + k * (tile_w + GAP)
        frame = decoded.get(frame_index)
        if frame is None:
            draw.rectangle((x, y, x + tile_w, y + tile_h), outline=UNBOUND, width=2)
            draw.text((x + 8, y + 8), f"frame {frame_index} not decoded", fill=INK, font=font)
            continue
        scale = tile_w / frame.shape[1]
        tile = cv2.resize(frame, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        boxes = []
        for i, det in enumerate(detections):
            if det.get("keyframe") != k:
                continue
            color = colors.get(det.get("entity"), UNBOUND) if det.get("valid", True) else UNBOUND
            tile = _overlay(tile, _decode_png(sample.parts.get(f"dmask{i}.png")), color)
            boxes.append((det, color))
        tile_image = Image.fromarray(tile)
        tile_draw = ImageDraw.Draw(tile_image)
        for det, color in boxes:
            x0, y0, x1, y1 = (round(v * scale) for v in det.get("box", [0, 0, 0, 0]))
            tile_draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
            tag = f"{det.get('id', '')} {det.get('label') or ''}".strip()
            if not det.get("valid", True):
                tag += " (rejected: " + ", ".join(det.get("rejected") or []) + ")"
            tw = _text_width(tag, font)
            tile_draw.rectangle((x0, max(0, y0 - 17), x0 + tw + 6, max(17, y0)), fill=color)
            tile_draw.text((x0 + 3, max(0, y0 - 17) + 1), tag, fill=(255, 255, 255), font=font)
        image.paste(tile_image, (x, y))
        label = f"keyframe {k} · frame {frame_index} · {len(boxes)} detections"
        draw.text((x, y + tile_h + 4), label, fill=MUTED, font=font)
        panels.append(Panel(f"keyframe{k}", (x, y, x + tile_w, y + tile_h), [label]))
    return _Section(image, panels)


def _reference_lines(ref: dict, entity: dict, base_key: str) -> list[str]:
    variant = ref.get("variant", "?")
    asked = f" (drawn: {ref['requested']})" if ref.get("requested") and ref["requested"] != variant else ""
    word = entity.get("word") or entity.get("category")
    group = entity.get("group") or ref.get("group")
    who = f"“{word}”" if word else ""
    if ref.get("attribute"):  # an attribute reference (LumosX): its own word, in its subject's group
        who = f"“{ref.get('tag') or ref['attribute']}” ({ref['attribute']} of {who or 'the subject'})"
    lines = [f"{ref.get('file', '?')} · {variant}{asked}",
             (f"{who} · " if who else "") + f"{entity.get('id', '?')} {entity.get('kind', '')}"
             + (f" · group {group}" if group else ""),
             (f"subject {ref.get('subject_id')} view {ref.get('view_id')} · keyframe {ref.get('keyframe')} "
             f"(frame {ref.get('frame_index')})")]
    cross = ref.get("cross")
    if cross and cross.get("kind") == "same_identity":
        lines.append(f"same identity, from {cross.get('from_key')}")
        lines.append(f"  {cross.get('from_file')} · face cosine {cross.get('similarity')}")
    elif cross and cross.get("kind") == "composite":
        lines.append("composite: own subject pasted on")
        lines.append(f"  the plate of {cross.get('background_from')}")
    elif ref.get("source_key") and ref["source_key"] != base_key:
        lines.append(f"from {ref['source_key']}")
    else:
        lines.append("from this clip")
    return lines


def _references_section(sample: Sample, meta: dict, colors: dict, width: int) -> _Section:
    """Reference panels, then the background plate, flowing left to right and wrapping."""
    font = _font(13)
    base_key = (meta.get("cross_pair") or {}).get("base") or meta.get("key")
    items = []  # (name, picture RGB, border colour, label lines)
    for entity in meta.get("entities") or []:
        for ref in entity.get("references") or []:
            picture = _decode_png(sample.parts.get(ref.get("file", "")))
            mask = _decode_png(sample.parts.get(ref.get("mask", "")))
            color = colors.get(entity.get("id"), UNBOUND)
            lines = _reference_lines(ref, entity, base_key)
            if picture is None:
                picture = np.full((REF_HEIGHT, REF_HEIGHT, 3), 230, np.uint8)
                lines.insert(0, f"MISSING {ref.get('file')}")
            else:
                picture = _overlay(_on_checkerboard(picture), mask, color)
            items.append((Path(ref.get("file") or f"ref{len(items)}").stem, picture, color, lines))
    background = meta.get("background") or {}
    plate = _decode_png(sample.parts.get(background.get("file") or "bg.png"))
    if plate is not None:
        filled = background.get("mask_area")
        lines = [f"background plate · keyframe {background.get('keyframe')}",
                 f"{background.get('backend', '')}" + (f" · {filled:.0%} filled" if filled is not None else "")]
        items.append(("bg", _on_checkerboard(plate), INK, lines))

    placed = []  # (x, y, name, picture, color, lines, w, h)
    x, y, row_h = MARGIN, 26 + MARGIN // 2, 0
    for name, picture, color, lines in items:
        scale = min(REF_HEIGHT / picture.shape[0], (REF_MAX_WIDTH if name != "bg" else 2 * REF_MAX_WIDTH)
                    / picture.shape[1])
        w, h = max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale))
        text_w = min(LABEL_MAX_WIDTH, max(_text_width(line, font) for line in lines))
        panel_w = max(w + 8, text_w)
        panel_h = REF_HEIGHT + 8 + 6 + 17 * len(lines)
        if x > MARGIN and x + panel_w > width - MARGIN:
            x, y, row_h = MARGIN, y + row_h + GAP, 0
        placed.append((x, y, name, picture, color, lines, w, h, panel_w))
        x += panel_w + 2 * GAP
        row_h = max(row_h, panel_h)
    height = y + row_h + GAP if items else 26 + MARGIN // 2 + 30
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    n_refs = sum(1 for item in items if item[0] != "bg")
    _title(draw, MARGIN // 2, f"References ({n_refs}; masks overlaid, framed in their entity's colour)"
           + (" and the background plate" if plate is not None else ""))
    if not items:
        draw.text((MARGIN, 26 + MARGIN // 2), "no references and no background plate (grounding off?)",
                  fill=MUTED, font=font)
    panels = []
    for x, y, name, picture, color, lines, w, h, panel_w in placed:
        draw.rectangle((x, y, x + w + 7, y + h + 7), fill=color)
        tile = cv2.resize(picture, (w, h), interpolation=cv2.INTER_AREA if h < picture.shape[0] else cv2.INTER_LINEAR)
        image.paste(Image.fromarray(tile), (x + 4, y + 4))
        for i, line in enumerate(lines):
            draw.text((x, y + REF_HEIGHT + 14 + 17 * i), _fit(line, font, panel_w), fill=INK if i < 2 else MUTED,
                      font=font)
        panels.append(Panel(name, (x + 4, y + 4, x + 4 + w, y + 4 + h), lines, color))
    return _Section(image, panels)


def _caption_pieces(text: str, entities: list[dict]) -> list[tuple[str, str | None]]:
    """`text` cut into (piece, entity id or None) along the entities' spans (overlapping spans: the first wins)."""
    spans = []
    for entity in entities:
        span = entity.get("span")
        if isinstance(span, list) and len(span) == 2 and 0 <= span[0] < span[1] <= len(text):
            spans.append((span[0], span[1], entity.get("id")))
    pieces, at = [], 0
    for start, end, eid in sorted(spans):
        if start < at:
            continue
        if start > at:
            pieces.append((text[at:start], None))
        pieces.append((text[start:end], eid))
        at = end
    if at < len(text):
        pieces.append((text[at:], None))
    return pieces


def _caption_section(meta: dict, colors: dict, width: int) -> _Section:
    font, small = _font(19), _font(14)
    caption = meta.get("caption") or {}
    text = caption.get("text") or ""
    entities = meta.get("entities") or []
    words = []  # (word, trailing space, entity id)
    for piece, eid in _caption_pieces(text, entities):
        if words and piece[:1].isspace():  # a span ended right before this space
            words[-1] = (words[-1][0], " ", words[-1][2])
        words.extend((m.group(1), m.group(2), eid) for m in re.finditer(r"(\S+)(\s*)", piece))
    line_h = 30
    layout, x, y = [], MARGIN, 26 + MARGIN // 2
    for i, (word, space, eid) in enumerate(words):
        w = _text_width(word, font)
        if x > MARGIN and x + w > width - MARGIN:
            x, y = MARGIN, y + line_h
        joined = eid is not None and i + 1 < len(words) and words[i + 1][2] == eid and space
        layout.append((x, y, word, eid, w + (_text_width(" ", font) if joined else 0)))
        x += w + _text_width(" " if space else "", font)
    legend_y = (y + line_h + 8) if words else y + line_h  # below "no caption" when there is none
    legend = [e for e in entities if e.get("id") in colors]
    height = legend_y + 22 * ((len(legend) + 2) // 3) + GAP + 4
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    source = f" ({caption.get('source')})" if caption.get("source") else ""
    _title(draw, MARGIN // 2, f"Caption{source}: entity words in their entity's colour")
    if not words:
        draw.text((MARGIN, y), "no caption", fill=MUTED, font=small)
    for x, y_, word, eid, box_w in layout:
        if eid is not None:
            color = colors.get(eid, UNBOUND)
            tint = tuple(int(c + (255 - c) * 0.6) for c in color)
            draw.rectangle((x - 2, y_ - 2, x + box_w + 2, y_ + 24), fill=tint)
            draw.rectangle((x - 2, y_ + 23, x + box_w + 2, y_ + 26), fill=color)
        draw.text((x, y_), word, fill=INK, font=font)
    column = (width - 2 * MARGIN) // 3
    for i, entity in enumerate(legend):
        lx, ly = MARGIN + column * (i % 3), legend_y + 22 * (i // 3)
        draw.rectangle((lx, ly + 3, lx + 14, ly + 17), fill=colors[entity["id"]])
        refs = len(entity.get("references") or [])
        word = entity.get("word") or entity.get("category")
        desc = (f"{entity['id']}" + (f" “{word}”" if word else "") + f" · {entity.get('kind', '')}"
                + (f" · {entity['group']}" if entity.get("group") else "")
                + (f" · {refs} reference{'s' if refs != 1 else ''}" if refs else ""))
        draw.text((lx + 20, ly + 1), _fit(desc, small, column - 28), fill=INK, font=small)
    return _Section(image, [Panel("caption", (MARGIN, 26 + MARGIN // 2, width - MARGIN, legend_y), [text])])
