"""`s2v shards show`: one PNG that shows a sample the way a trainer will see it.

From top to bottom: the key and where the clip comes from (and, for a cross-paired sample, its base and how its
references were swapped); frames of the clip, evenly spaced; the keyframes with every detection's box and SAM mask
(KEY.dmask{i}.png) coloured by its entity; each reference image with its mask overlaid, framed in its entity's
colour and labelled with its variant, word tag, group and where its pixels come from; the background plate; the
caption with each entity word highlighted in the same colour. The sample is found through index.json (own and
cross-pair shards); only its tar members are read.

The output directory may come from elsewhere (docs/security.md): index.json is read within its size limit, the
shards through the hardened tar reader, KEY.json through its schema, and every PNG and the clip are refused when
their headers say they hold more than `max_pixels` pixels, before a pixel is decoded. What the sheet draws of
KEY.json is bounded (keyframes, boxes, references, caption length), so no count or size in it can make the sheet
huge. A problem is a ContactSheetError naming the sample, the member and the limit, with any text from the data
made printable: never a traceback.
"""

from __future__ import annotations

import difflib
import io
import itertools
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.errors import UserFacingError
from pipeline.core.names import UnsafeName, check_key, check_shard
from pipeline.core.storage import Storage, StorageError
from pipeline.core.untrusted import MB, HostileData, check_image, load_json, printable, read_limits
from pipeline.core.video import VideoError, iter_frames, probe
from pipeline.store.ledger import Ledger, as_storage
from pipeline.store.sample_meta import parse_sample_meta
from pipeline.store.shards import ShardError, iter_members

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
# The most the sheet draws of what KEY.json lists. The pipeline writes 3 keyframes, a few boxes on each and a
# reference or two per entity; a KEY.json from elsewhere may list thousands, each a decode and a panel.
MAX_KEYFRAMES = 8
MAX_BOXES = 32  # per keyframe
MAX_REFERENCES = 48
MAX_CAPTION_CHARS = 4000
MAX_ASPECT = 4.0  # a frame tile is at most this many times taller than wide, or wider than tall
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ContactSheetError(UserFacingError, ValueError):
    """The sample cannot be shown (no index, key not found, a shard or member refused as hostile); the message says
    why and what to try, and holds no control character from the data."""


def _refuse(message: str) -> ContactSheetError:
    """A ContactSheetError whose message is safe to print: the messages it carries (ShardError, HostileData,
    VideoError) quote names and fields from the data, which may hold terminal escapes."""
    return ContactSheetError(printable(message))


@dataclass
class Sample:
    key: str
    shard: str  # relative to the output directory
    parts: dict[str, bytes]  # the members drawn: "json", "mp4" and every PNG ("ref0.png", "bg.png", ...) -> bytes


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
    then only that sample's members; manifest.parquet, when present, says which shard to open first. A shard that
    cannot be read (compressed, a link, a member that is not a regular file or over its cap, cut short) hides only
    its keys after the problem: the others are still searched, and a key not found names the shards refused."""
    out = as_storage(out_dir)
    try:
        check_key(key, "s2v shards show")
    except UnsafeName as exc:
        raise _refuse(str(exc)) from None
    if out.info("index.json") is None:
        raise ContactSheetError(f"{out}: no index.json (not a finished `s2v curate run` output; a run still going "
                                "writes it when it ends)")
    shards = _index_shards(out)
    try:
        shards += sorted(Ledger(out).read().rejects)  # examples of dropped clips: not training data, not in index
    except HostileData as exc:
        raise _refuse(str(exc)) from None
    hint = _manifest_shard(out, key)
    order = ([hint] if hint in shards else []) + [s for s in shards if s != hint]
    seen: dict[str, str] = {}
    refused: list[str] = []
    for shard in order:
        problem = _scan_shard(out, shard, seen)
        if problem:
            refused.append(problem)
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
    if refused:
        said += (f"; {len(refused)} shard{'s' if len(refused) != 1 else ''} could not be read to the end "
                 f"(`s2v shards verify` lists them): {'; '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}")
    raise _refuse(f"no sample with key {key!r} in the {len(shards)} shards of {out}{said}")


def _index_shards(out: Storage) -> list[str]:
    """The shard paths index.json lists, read within max_index_mb. An entry without a text "url" is passed over
    (it names no shard to search); a url that is not a shard path is refused, never opened (check_shard)."""
    cap = int(read_limits().max_index_mb * MB)
    where = out.join("index.json")
    try:
        index = load_json(out.read_bytes("index.json", cap), where, cap)
    except (HostileData, StorageError) as exc:
        raise _refuse(str(exc)) from None
    entries = index.get("shardlist", []) if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise _refuse(f"{where}: not an index this project writes (no \"shardlist\" list)")
    urls = [e["url"] for e in entries if isinstance(e, dict) and isinstance(e.get("url"), str)]
    for url in urls:
        try:
            check_shard(url, out)
        except UnsafeName as exc:
            raise _refuse(f"index.json: {exc}") from None
    return urls


def _manifest_shard(out: Storage, key: str) -> str | None:
    """The shard manifest.parquet names for `key`, or None. The manifest only says which shard to open first, so
    one that is not ours (not parquet, other columns, over max_index_mb as stored or as its row groups declare
    they decode) is passed over and the shards are searched. Row groups are read one at a time, two columns."""
    entry = out.info("manifest.parquet")
    cap = int(read_limits().max_index_mb * MB)
    if entry is None or entry.size > cap:
        return None
    try:
        with out.open_read("manifest.parquet") as f:
            manifest = pq.ParquetFile(f)
            if not {"key", "shard"} <= set(manifest.schema_arrow.names):
                return None
            for i in range(manifest.metadata.num_row_groups):
                group = manifest.metadata.row_group(i)
                declared = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                               if group.column(c).path_in_schema in ("key", "shard"))
                if declared > cap:
                    return None
                rows = manifest.read_row_group(i, columns=["key", "shard"])
                hits = rows.filter(pc.equal(rows.column("key"), pa.scalar(key)))
                if hits.num_rows:
                    shard = hits.column("shard")[0].as_py()
                    return shard if isinstance(shard, str) else None
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    return None


def _scan_shard(out: Storage, shard: str, seen: dict[str, str]) -> str | None:
    """Adds the keys of `shard` (its tar headers) to `seen`, each with the first shard holding it. A shard that
    cannot be read to its end adds the keys before the problem and returns the problem."""
    try:
        check_shard(shard, out)
    except UnsafeName as exc:
        raise _refuse(str(exc)) from None
    if out.info(shard) is None:
        return None  # listed but gone: `s2v shards verify` reports it; the other shards may hold the key
    try:
        for key, _part, _member, _read in iter_members((out, shard), shard):
            seen.setdefault(key, shard)
    except (ShardError, UnsafeName, tarfile.TarError, OSError) as exc:
        return str(exc)
    return None


def _read_sample(out: Storage, shard: str, key: str) -> Sample:
    """The members of `key` that the sheet draws (KEY.json, KEY.mp4, the PNGs), read in one pass over `shard` that
    stops at the first member of the next sample (a sample's members are consecutive, as webdataset groups them):
    a problem further on in the shard does not matter; one before that, in a member of the sample or in the header
    right after it, is a ContactSheetError naming the shard, the key and the member. Other members
    (KEY.faces.npy, ...) are skipped by their headers, never read."""
    parts: dict[str, bytes] = {}
    found = False
    try:
        for member_key, part, _member, read in iter_members((out, check_shard(shard, out)), shard):
            if member_key != key:
                if found:
                    break
                continue
            found = True
            if part in ("json", "mp4") or part.endswith(".png"):
                parts[part] = read()
    except (ShardError, UnsafeName, tarfile.TarError, OSError) as exc:
        raise _refuse(f"sample {key} cannot be read: {exc}") from None
    if "json" not in parts:
        raise ContactSheetError(f"{shard}: sample {key} has no KEY.json")
    return Sample(key, shard, parts)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def render_contact_sheet(sample: Sample, frames: int = 6, width: int = WIDTH) -> ContactSheet:
    """The sheet of one sample as an RGB image, with where each panel is (see the module docstring). KEY.json
    that breaks its schema, and a PNG or clip over the pixel limit, are a ContactSheetError; a clip FFmpeg cannot
    decode, or a PNG whose pixels cannot be, is drawn as such."""
    meta = _meta(sample)
    colors = _entity_colors(meta)
    # Positions matter: a detection's "keyframe" is an index into this list.
    keyframes = [k.get("frame") for k in meta.get("keyframes") or []][:MAX_KEYFRAMES]
    clip = _decode(sample, frames, keyframes, meta, width)

    sections = [_header(sample, meta, width)]
    sections.append(_frames_section(clip, frames, meta, width))
    if meta.get("detections") and keyframes:
        sections.append(_keyframes_section(sample, meta, clip, keyframes, colors, width))
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


def _meta(sample: Sample) -> dict:
    """KEY.json checked against the schema of what the pipeline writes (pipeline/store/sample_meta.py): sizes,
    indices, ids and boxes the sheet computes with are numbers in range. Fields outside the schema can still be
    anything, and are read through `_dict` / `_number`."""
    try:
        return parse_sample_meta(sample.parts["json"], f"{sample.shard}: {sample.key}.json")
    except HostileData as exc:
        raise _refuse(f"sample {sample.key}: {exc}") from None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value, spec: str) -> str:
    """`value` formatted with `spec` when it is a finite number, else "?" (a field KEY.json's schema leaves open)."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return format(value, spec)
    except (OverflowError, ValueError):  # an int too large for a float
        pass
    return "?"


@dataclass
class _Section:
    image: Image.Image
    panels: list[Panel]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(text: str, font) -> int:
    return int(font.getlength(text))


def _fit(text: str, font, max_width: int) -> str:
    """`text`, cut with an ellipsis to fit `max_width` pixels. Text from data can be megabytes: only its first
    `max_width` characters can fit (a glyph that shows is a pixel wide at least), and the cut is found by bisection,
    a few measurements, not one per character."""
    head = text[:max(0, max_width)]
    if head == text and _text_width(text, font) <= max_width:
        return text
    lo, hi = 0, len(head)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_width(head[:mid] + "…", font) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return head[:lo] + "…"


def _entity_colors(meta: dict) -> dict[str, tuple[int, int, int]]:
    return {e.get("id", f"#{i}"): PALETTE[i % len(PALETTE)] for i, e in enumerate(meta.get("entities") or [])}


def _color(colors: dict, entity) -> tuple[int, int, int]:
    """The colour of the entity a detection names; UNBOUND for none, or for a name that is no id (a list)."""
    return colors.get(entity, UNBOUND) if isinstance(entity, (str, int)) else UNBOUND


@dataclass
class _Clip:
    frames: dict[int, np.ndarray]  # frame index -> RGB, shrunk to fit the sheet
    spaced: list[int]  # the evenly spaced frames decoded, in order
    count: int  # frames decoded
    size: tuple[int, int] = (0, 0)  # (width, height) of the frames as decoded: detection boxes are in these pixels
    error: str | None = None


def _decode(sample: Sample, frames: int, keyframes: list, meta: dict, width: int) -> _Clip:
    """The evenly spaced frames and the keyframes of KEY.mp4. A clip whose headers say its frames hold more than
    max_pixels is refused (ContactSheetError) before a frame is decoded, and FFmpeg is held to that limit; a clip
    FFmpeg cannot read comes back as its error, drawn on the sheet. At most max_frames frames are decoded, and only
    the frames drawn are kept, shrunk to the sheet's width."""
    mp4 = sample.parts.get("mp4")
    if not mp4:
        return _Clip({}, [], 0, error="no KEY.mp4")
    limits = read_limits()
    name = f"{sample.shard}: {sample.key}.mp4"
    total = (meta.get("clip") or {}).get("num_frames")

    def decoded():
        return enumerate(itertools.islice(iter_frames(io.BytesIO(mp4), max_pixels=limits.max_pixels),
                                          limits.max_frames))

    try:
        probe(io.BytesIO(mp4), name, limits.max_pixels)  # the size from the headers; refuses what is no video
        if not isinstance(total, int) or total <= 0:
            total = sum(1 for _ in decoded())
        spaced = _spaced(total, frames)
        wanted = set(spaced) | {k for k in keyframes if isinstance(k, int)}
        kept: dict[int, np.ndarray] = {}
        count, size = 0, (0, 0)
        for i, frame in decoded():
            count = i + 1
            if i in wanted:
                size = (frame.shape[1], frame.shape[0])
                kept[i] = _shrink(frame, width)
        # KEY.json's frame count may be wrong: only the spaced frames that were there are drawn.
        return _Clip(kept, [i for i in spaced if i in kept], count, size)
    except VideoError as exc:
        if exc.reason == "too_large":
            raise _refuse(f"sample {sample.key}: {exc.message}") from None
        return _Clip({}, [], 0, error=f"cannot decode KEY.mp4 ({exc.message})")
    except (OSError, ValueError, IndexError) as exc:  # PyAV's errors derive from OSError / ValueError
        return _Clip({}, [], 0, error=f"cannot decode KEY.mp4 ({exc})")


def _shrink(image: np.ndarray, side: int) -> np.ndarray:
    """`image` scaled down (never up) to fit a `side` x `side` square: what the sheet needs of a frame."""
    scale = min(1.0, side / image.shape[0], side / image.shape[1])
    if scale >= 1.0:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _spaced(total: int, n: int) -> list[int]:
    if total <= 0 or n <= 0:
        return []
    return sorted({round(x) for x in np.linspace(0, total - 1, min(n, total))})


def _aspect(clip: _Clip, meta: dict) -> float:
    """Height / width of a frame tile: the decoded frames', else KEY.json's clip size, else 16:9. Within
    1/MAX_ASPECT..MAX_ASPECT: a 1x1000000 clip is a valid size, but must not make a tile a million pixels tall."""
    facts = meta.get("clip") or {}
    aspect = 9 / 16
    if clip.frames:
        first = clip.frames[min(clip.frames)]
        aspect = first.shape[0] / first.shape[1]
    elif facts.get("width") and facts.get("height"):
        aspect = facts["height"] / facts["width"]
    return min(MAX_ASPECT, max(1 / MAX_ASPECT, aspect))


def _title(draw: ImageDraw.ImageDraw, y: int, text: str, width: int) -> int:
    font = _font(17)
    draw.text((MARGIN, y), _fit(text, font, width - 2 * MARGIN), fill=INK, font=font)
    return y + 26


def _header(sample: Sample, meta: dict, width: int) -> _Section:
    big, small = _font(24), _font(15)
    clip = meta.get("clip") or {}
    span = _dict(meta.get("span"))
    source = _dict(meta.get("source"))
    lines = []
    if clip:
        lines.append(f"clip {clip.get('width')}x{clip.get('height')} · {_number(clip.get('fps', 0), '.2f')} fps · "
                     f"{clip.get('num_frames')} frames · {_number(clip.get('duration_s', 0), '.2f')} s · "
                     f"{clip.get('codec', '')}")
    if source or span:
        where = f"source {source.get('path') or source.get('id', '?')}"
        if span:
            where += (f" · frames {span.get('first_frame')}-{span.get('last_frame')} "
                      f"({_number(span.get('start_s', 0), '.2f')}-{_number(span.get('end_s', 0), '.2f')} s)")
        lines.append(where)
    lines.append(f"shard {sample.shard}")
    cross = meta.get("cross_pair")
    if cross:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(_dict(cross.get("kinds")).items())) or "none"
        plate = f" · composites on the plate of {cross['background_from']}" if cross.get("background_from") else ""
        lines.append(f"cross-paired from {cross.get('base')}: references replaced: {kinds}{plate}")
    image = Image.new("RGB", (width, MARGIN + 34 + 22 * len(lines) + 6), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), sample.key, fill=INK, font=big)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + 34 + 22 * i), _fit(line, small, width - 2 * MARGIN), fill=MUTED, font=small)
    return _Section(image, [])


def _frames_section(clip: _Clip, frames: int, meta: dict, width: int) -> _Section:
    indices = clip.spaced
    fps = (meta.get("clip") or {}).get("fps") or 0
    n = max(1, len(indices) or frames)
    tile_w = max(8, (width - 2 * MARGIN - (n - 1) * GAP) // n)
    tile_h = max(1, round(tile_w * _aspect(clip, meta)))
    label_font = _font(13)
    image = Image.new("RGB", (width, 26 + MARGIN // 2 + tile_h + 22 + GAP), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = _title(draw, MARGIN // 2, f"Frames ({len(indices)} of {clip.count})" if indices else "Frames", width)
    panels = []
    if clip.error or not indices:
        draw.rectangle((MARGIN, y, width - MARGIN, y + tile_h), outline=UNBOUND, width=2)
        draw.text((MARGIN + 12, y + 12), _fit(clip.error or "the clip has no frames", _font(16),
                                              width - 2 * MARGIN - 24), fill=INK, font=_font(16))
        return _Section(image, panels)
    for j, i in enumerate(indices):
        x = MARGIN + j * (tile_w + GAP)
        tile = cv2.resize(clip.frames[i], (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        image.paste(Image.fromarray(tile), (x, y))
        label = f"frame {i}" + (f" · {i / fps:.2f} s" if fps else "")
        draw.text((x, y + tile_h + 4), label, fill=MUTED, font=label_font)
        panels.append(Panel(f"frame{j}", (x, y, x + tile_w, y + tile_h), [label]))
    return _Section(image, panels)


def _decode_png(sample: Sample, part) -> np.ndarray | None:
    """KEY.<part> as an 8-bit gray, RGB or RGBA array, or None when the sample has no such member or its pixels
    cannot be decoded. The size is read from the PNG header first: a member over max_pixels (a 100 KB PNG can
    decode to gigabytes), or one that is no PNG, is refused with ContactSheetError and never decoded."""
    data = sample.parts.get(part) if isinstance(part, str) else None
    if not data:
        return None
    what = f"{sample.shard}: {sample.key}.{part}"
    # PNG only: the format Pillow reads the size of is then the one OpenCV decodes, whatever else the bytes are.
    if not data.startswith(PNG_SIGNATURE):
        raise _refuse(f"sample {sample.key}: {what}: not a PNG; not decoded")
    try:
        check_image(data, what)
    except HostileData as exc:
        raise _refuse(f"sample {sample.key}: {exc}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or (image.ndim == 3 and image.shape[2] not in (3, 4)):
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


def _box(det: dict, sx: float, sy: float, w: int, h: int) -> tuple[int, int, int, int]:
    """A detection's box in tile pixels, corners in order and clamped just outside the tile (KEY.json's schema
    makes a box four finite numbers, but 1e300 is one); (0, 0, 0, 0) without a box."""
    box = det.get("box")
    if not (isinstance(box, list) and len(box) == 4):
        box = [0, 0, 0, 0]
    x0, x1 = sorted(round(min(max(v * sx, -2.0), w + 2.0)) for v in (box[0], box[2]))
    y0, y1 = sorted(round(min(max(v * sy, -2.0), h + 2.0)) for v in (box[1], box[3]))
    return x0, y0, x1, y1


def _keyframes_section(sample: Sample, meta: dict, clip: _Clip, keyframes: list, colors: dict,
                       width: int) -> _Section:
    detections = meta["detections"]
    listed = len(meta.get("keyframes") or [])
    n = len(keyframes)
    tile_w = max(8, min(KEYFRAME_MAX_WIDTH, (width - 2 * MARGIN - (n - 1) * GAP) // n))
    tile_h = max(1, round(tile_w * _aspect(clip, meta)))
    font = _font(13)
    image = Image.new("RGB", (width, 26 + MARGIN // 2 + tile_h + 22 + GAP), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = _title(draw, MARGIN // 2, (f"Keyframes (the first {n} of {listed})" if listed > n else "Keyframes")
               + ": detections and their masks, coloured by entity (grey: no entity or rejected)", width)
    panels = []
    for k, frame_index in enumerate(keyframes):
        x = MARGIN + k * (tile_w + GAP)
        frame = clip.frames.get(frame_index) if isinstance(frame_index, int) else None
        if frame is None:
            draw.rectangle((x, y, x + tile_w, y + tile_h), outline=UNBOUND, width=2)
            draw.text((x + 8, y + 8), _fit(f"frame {frame_index} not decoded", font, tile_w - 16), fill=INK,
                      font=font)
            continue
        sx, sy = tile_w / clip.size[0], tile_h / clip.size[1]
        tile = cv2.resize(frame, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        boxes = []
        for i, det in enumerate(detections):
            if det.get("keyframe") != k or len(boxes) == MAX_BOXES:
                continue
            color = _color(colors, det.get("entity")) if det.get("valid", True) else UNBOUND
            tile = _overlay(tile, _decode_png(sample, f"dmask{i}.png"), color)
            boxes.append((det, color))
        tile_image = Image.fromarray(tile)
        tile_draw = ImageDraw.Draw(tile_image)
        for det, color in boxes:
            x0, y0, x1, y1 = _box(det, sx, sy, tile_w, tile_h)
            tile_draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
            tag = f"{det.get('id', '')} {det.get('label') or ''}".strip()
            if not det.get("valid", True):
                rejected = det.get("rejected") or []
                reasons = rejected if isinstance(rejected, list) else [rejected]
                tag += " (rejected: " + ", ".join(str(r) for r in reasons) + ")"
            tag = _fit(tag, font, tile_w)
            tw = _text_width(tag, font)
            tile_draw.rectangle((x0, max(0, y0 - 17), x0 + tw + 6, max(17, y0)), fill=color)
            tile_draw.text((x0 + 3, max(0, y0 - 17) + 1), tag, fill=(255, 255, 255), font=font)
        image.paste(tile_image, (x, y))
        label = f"keyframe {k} · frame {frame_index} · {len(boxes)} detections"
        draw.text((x, y + tile_h + 4), _fit(label, font, tile_w), fill=MUTED, font=font)
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
    cross = _dict(ref.get("cross"))
    if cross.get("kind") == "same_identity":
        lines.append(f"same identity, from {cross.get('from_key')}")
        lines.append(f"  {cross.get('from_file')} · face cosine {cross.get('similarity')}")
    elif cross.get("kind") == "composite":
        lines.append("composite: own subject pasted on")
        lines.append(f"  the plate of {cross.get('background_from')}")
    elif ref.get("source_key") and ref["source_key"] != base_key:
        lines.append(f"from {ref['source_key']}")
    else:
        lines.append("from this clip")
    return lines


def _panel_picture(picture: np.ndarray, max_width: int) -> np.ndarray:
    """`picture` scaled (up or down) to REF_HEIGHT tall or `max_width` wide, whichever it reaches first: its size on
    the sheet, so that the checkerboard and mask drawn over it next cost panel pixels, not the PNG's."""
    scale = min(REF_HEIGHT / picture.shape[0], max_width / picture.shape[1])
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    if size == (picture.shape[1], picture.shape[0]):
        return picture
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _references_section(sample: Sample, meta: dict, colors: dict, width: int) -> _Section:
    """Reference panels (the first MAX_REFERENCES), then the background plate, flowing left to right and
    wrapping."""
    font = _font(13)
    base_key = _dict(meta.get("cross_pair")).get("base") or meta.get("key")
    references = [(entity, ref) for entity in meta.get("entities") or [] for ref in entity.get("references") or []]
    items = []  # (name, picture RGB at its panel size, border colour, label lines)
    for entity, ref in references[:MAX_REFERENCES]:
        picture = _decode_png(sample, ref.get("file"))
        mask = _decode_png(sample, ref.get("mask"))
        color = colors.get(entity.get("id"), UNBOUND)
        lines = _reference_lines(ref, entity, base_key)
        if picture is None:
            picture = np.full((REF_HEIGHT, REF_HEIGHT, 3), 230, np.uint8)
            lines.insert(0, f"MISSING {ref.get('file')}")
        else:
            picture = _overlay(_on_checkerboard(_panel_picture(picture, REF_MAX_WIDTH)), mask, color)
        items.append((Path(ref.get("file") or f"ref{len(items)}").stem, picture, color, lines))
    background = meta.get("background") or {}
    plate = _decode_png(sample, background.get("file") or "bg.png")
    if plate is not None:
        filled = background.get("mask_area")
        lines = [f"background plate · keyframe {background.get('keyframe')}",
                 f"{background.get('backend', '')}" + (f" · {_number(filled, '.0%')} filled"
                                                      if filled is not None else "")]
        items.append(("bg", _on_checkerboard(_panel_picture(plate, 2 * REF_MAX_WIDTH)), INK, lines))

    placed = []  # (x, y, name, picture, color, lines, w, h)
    x, y, row_h = MARGIN, 26 + MARGIN // 2, 0
    for name, picture, color, lines in items:
        scale = min(REF_HEIGHT / picture.shape[0], (REF_MAX_WIDTH if name != "bg" else 2 * REF_MAX_WIDTH)
                    / picture.shape[1])
        w, h = max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale))
        # Measured on what can show: a label from data can be megabytes.
        text_w = min(LABEL_MAX_WIDTH, max(_text_width(line[:LABEL_MAX_WIDTH], font) for line in lines))
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
    shown = f"the first {n_refs} of {len(references)}" if len(references) > n_refs else f"{n_refs}"
    _title(draw, MARGIN // 2, f"References ({shown}; masks overlaid, framed in their entity's colour)"
           + (" and the background plate" if plate is not None else ""), width)
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
        if (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
                and 0 <= span[0] < span[1] <= len(text)):
            spans.append((span[0], span[1], entity.get("id")))
    pieces, at = [], 0
    for start, end, eid in sorted(spans, key=lambda s: s[:2]):  # ids need not compare (str and int)
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
    if len(text) > MAX_CAPTION_CHARS:  # a caption is a few sentences; megabytes of it would make the sheet huge
        text = text[:MAX_CAPTION_CHARS] + "…"
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
    _title(draw, MARGIN // 2, f"Caption{source}: entity words in their entity's colour", width)
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
        draw.rectangle((lx, ly + 3, lx + 14, ly + 17), fill=colors[entity.get("id")])
        refs = len(entity.get("references") or [])
        word = entity.get("word") or entity.get("category")
        desc = (f"{entity.get('id')}" + (f" “{word}”" if word else "") + f" · {entity.get('kind', '')}"
                + (f" · {entity['group']}" if entity.get("group") else "")
                + (f" · {refs} reference{'s' if refs != 1 else ''}" if refs else ""))
        draw.text((lx + 20, ly + 1), _fit(desc, small, column - 28), fill=INK, font=small)
    return _Section(image, [Panel("caption", (MARGIN, 26 + MARGIN // 2, width - MARGIN, legend_y), [text])])
