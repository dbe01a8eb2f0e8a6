"""Training batches straight from the pipeline's WebDataset shards: no conversion step.

Each worker slot's stream is a pure function of (seed, epoch, rank, world_size, slot, num_workers):

1. shards: all of them, shuffled per epoch with (seed, epoch), cut by rank and by worker slot (the semantics of
   `wds.split_by_node` / `wds.split_by_worker`, with explicit ids: the trainer passes its rank, and a resumed loader
   rotates DataLoader workers onto slots, below). Where there are fewer shards than ranks (or than a rank's
   workers), that level splits samples instead (sample i of the stream goes to i mod n), so the quickstart's one
   shard still feeds every rank and worker. With `resampled`, shards are drawn with replacement by
   `wds.ResampledShards` per (seed, epoch, rank, slot);
2. samples: the one hardened shard reader (`pipeline.store.shards.iter_samples`; only KEY.json, KEY.mp4,
   KEY.ref{k}.png and KEY.bg.png are read), a shuffle buffer seeded per (seed, epoch, rank, slot);
3. plans: the bucket, frame indices, crop and references of each sample, decided from KEY.json alone;
4. batches: plans grouped per bucket until `batch_size` (a batch never mixes buckets), then decoded and collated.

Batches are formed before anything is decoded, so resuming skips consumed batches by reading tars only. The shuffle
buffer and the bucket groups start empty each epoch (an epoch ends with its partial bucket batches, or drops them
with `drop_last`), so a resume replays at most one epoch of tar reads per worker.

Resume exactness (`ShardLoader.state_dict`): with the same shard files, config, rank, world_size and num_workers the
batches after `load_state_dict` are exactly those the uninterrupted run would have yielded next, in the same order,
including batches that were prefetched but not consumed when the state was taken: the state holds each slot's
(epoch, batch) and the slot due next, and DataLoader worker 0 of the resumed run takes that slot (its round robin
then visits slots in the original order). If any of those inputs differ, the loader warns and restarts at the epoch
the slowest slot was in (not exact).

Shards may come from elsewhere. A sample that cannot be used (KEY.json over the read limits or against its schema,
an undecodable mp4, an image or video over the pixel limit, an unreadable reference) is skipped with a warning that
names its key and shard; a shard that is unreadable, compressed, a link or holds a member that is not one of ours
is skipped from the failing member on, with a warning naming it. No sample ends a training run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pydantic import BaseModel, ConfigDict, field_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.errors import UserFacingError
from pipeline.core.names import UnsafeName, check_key, check_shard
from pipeline.core.storage import check_uri, is_remote, open_storage, parent
from pipeline.core.untrusted import MB, HostileData, check_image, load_json, printable, read_limits
from pipeline.core.video import VideoError, probe, read_frames
from pipeline.store.sample_meta import REFERENCE_FILE, parse_sample_meta
from pipeline.store.shards import iter_samples

log = logging.getLogger(__name__)

Bucket = tuple[int, int, int]  # (frames, height, width)
KINDS = {"subject": 0, "object": 1, "background": 2}
PAD = -1
# subject_words[b][s] joins the phrases of subject slot s (word tag, then attribute words) with this separator;
# TextEncoder.encode splits on it. Taxonomy words hold no commas.
WORD_SEP = ", "
_REF_MEMBER = REFERENCE_FILE["file"]
_STATE_VERSION = 1


class DataConfig(BaseModel):
    """Where the shards are and how clips become batches. Defaults run on a laptop."""

    model_config = ConfigDict(extra="forbid")

    shards: str | list[str] = ""  # OUT dir (its index.json), a shards dir (every *.tar, cross-* too), or tars
    buckets: list[Bucket] = [(9, 64, 112), (9, 64, 64), (9, 112, 64)]  # (frames, height, width)
    num_frames: int | None = None  # set: every bucket takes this many frames
    frame_stride: int = 2  # source frames between sampled frames; lowered for clips too short for it
    clip_offset: Literal["random", "start", "center"] = "random"  # where the sampled window starts
    ref_size: tuple[int, int] | None = None  # (height, width) refs are letterboxed into; None: the bucket's
    # K: references kept per sample: each entity's first view, then further views, then attribute crops (kept in
    # entity order), then the background plate when there is room
    max_refs: int = 4
    pad_to_max_refs: bool = False  # False: K is the batch's largest reference count (0 when none has one)
    background_ref: bool = True  # KEY.bg.png as a kind-2 reference after the entity references
    batch_size: int = 2
    drop_last: bool = False  # drop each epoch's partial bucket batches
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False
    shuffle_buffer: int = 64  # samples; 0 or 1: no sample shuffle and shards in order
    resampled: bool = False
    epochs: int | None = None  # epochs per pass over the loader; None: endless
    seed: int = 0

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: list[Bucket]) -> list[Bucket]:
        if not value:
            raise ValueError("buckets: give at least one (frames, height, width)")
        for f, h, w in value:
            if f < 1 or h < 8 or w < 8 or h % 2 or w % 2:
                raise ValueError(f"buckets: {(f, h, w)} needs frames >= 1 and even height, width >= 8")
        return value

    @field_validator("frame_stride", "batch_size", "prefetch_factor")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name}: must be >= 1, got {value}")
        return value

    @field_validator("max_refs", "num_workers", "shuffle_buffer")
    @classmethod
    def _non_negative(cls, value: int, info) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name}: must be >= 0, got {value}")
        return value

    def frame_buckets(self) -> list[Bucket]:
        return [(self.num_frames or f, h, w) for f, h, w in self.buckets]


def resolve_shards(spec: str | Path | list) -> list[str]:
    """The shard tars `spec` names, in a stable order: an OUT dir's index.json (own and cross shards), a directory's
    `*.tar` (or its `shards/`), a tar, or a list of any of these. index.json is data from elsewhere: it is read with
    the JSON limits, and an entry whose url is not `shards/NAME.tar`, or whose file is a link or no regular file, is
    left out with a warning (an output directory is read strict: pipeline/core/storage.py)."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in resolve_shards(item)]
    if not str(spec):
        raise ValueError("shards: not set (give the pipeline's OUT dir, its shards/ dir or tar files)")
    if is_remote(str(spec)):
        return _resolve_remote(str(spec))
    path = Path(spec)
    if path.is_dir() and (path / "index.json").exists():
        path = path / "index.json"
    if path.is_file() and path.name == "index.json":
        return _indexed(open_storage(path.parent, "shards", strict=True))
    if path.is_dir():
        tars = sorted(path.glob("*.tar")) or sorted((path / "shards").glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"shards: no *.tar in {path} or {path / 'shards'}")
        regular = [t for t in tars if t.is_file() and not t.is_symlink()]
        for skipped in sorted(set(tars) - set(regular)):
            log.warning("shards: %s is a link or not a regular file; left out", skipped)
        return [str(t) for t in regular]
    if path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"shards: {spec} is not a shard, a directory of shards or an index.json")


def _resolve_remote(uri: str) -> list[str]:
    """`resolve_shards` for an s3:// or gs:// output (its index.json), index.json itself, or one tar."""
    uri = check_uri(uri, "shards")
    if uri.endswith(".tar"):
        return [uri]
    out = open_storage(parent(uri) if uri.endswith("/index.json") else uri)
    if out.info("index.json") is None:
        raise FileNotFoundError(f"shards: no index.json at {out.uri} (give the pipeline's output URI)")
    return _indexed(out)


def _indexed(out) -> list[str]:
    """The shards index.json of output `out` lists that are safe to open, as paths or URIs."""
    cap = int(read_limits().max_index_mb * MB)
    index = load_json(out.read_bytes("index.json", cap), out.join("index.json"), cap)
    entries = index.get("shardlist") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise HostileData(f"{out.join('index.json')}: no shardlist (is it the index of an `s2v curate run`?)")
    urls: dict[str, str] = {}  # url -> path or URI, in index order
    for entry in entries:
        url = entry.get("url") if isinstance(entry, dict) else None
        if isinstance(url, str) and url in urls:  # listed twice: its samples would train twice an epoch (or 1000x)
            log.warning("shards: %s is listed more than once in index.json; reading it once", printable(url))
            continue
        try:
            check_shard(url, out.uri)
            if out.info(url) is None:
                raise FileNotFoundError(f"{out.join(url)}: listed in index.json but missing")
        except (UserFacingError, OSError) as exc:  # UnsafeName, UnsafeFile (a link, a FIFO), missing
            log.warning("shards: leaving out an index.json entry: %s", exc)
            continue
        urls[url] = out.join(url)
    return list(urls.values())


def _seed(*parts) -> int:
    """A stable seed from ints and strings (Python's hash() of a str changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def choose_bucket(buckets: list[Bucket], width: int, height: int, frames: int, stride: int) -> Bucket:
    """The bucket nearest in aspect (log ratio); among those, the most frames that fit the clip at `stride`, else at
    stride 1, else the fewest frames (the last frame then repeats)."""
    aspect = math.log(width / height)
    best = min(abs(math.log(w / h) - aspect) for _, h, w in buckets)
    near = [b for b in buckets if abs(math.log(b[2] / b[1]) - aspect) <= best + 1e-9]
    for step in (stride, 1):
        fits = [b for b in near if (b[0] - 1) * step + 1 <= frames]
        if fits:
            return max(fits, key=lambda b: b[0])
    return min(near, key=lambda b: b[0])


def frame_indices(clip_frames: int, frames: int, stride: int, offset: str, rng: random.Random) -> list[int]:
    """Indices of `frames` frames at `stride` (lowered when the clip is short; the last frame repeats when the clip
    has fewer frames than asked)."""
    if frames > 1:
        stride = max(1, min(stride, (clip_frames - 1) // (frames - 1)))
    span = (frames - 1) * stride + 1
    room = max(0, clip_frames - span)
    start = rng.randint(0, room) if offset == "random" else {"start": 0, "center": room // 2}[offset]
    return [min(start + i * stride, clip_frames - 1) for i in range(frames)]


@dataclass
class RefPlan:
    member: str  # "ref0.png" or "bg.png"
    subject: int
    view: int
    group: int
    kind: int


@dataclass
class SamplePlan:
    """What to decode for one sample, decided from its KEY.json alone."""

    key: str
    url: str
    bucket: Bucket
    frames: list[int]
    clip_size: tuple[int, int]  # (width, height) of the mp4
    caption: str
    subject_words: list[str]
    refs: list[RefPlan]
    data: dict = field(repr=False)  # the sample's raw members


class SampleError(Exception):
    """A sample that cannot be used; the message says why."""


def _clip_facts(meta: dict, mp4: bytes) -> tuple[int, int, int]:
    clip = meta.get("clip") or {}
    if all(clip.get(k) for k in ("width", "height", "num_frames")):
        return int(clip["width"]), int(clip["height"]), int(clip["num_frames"])
    try:  # KEY.json without clip facts (not from this pipeline): read them from the video itself
        info = probe(io.BytesIO(mp4), name="the sample's mp4", max_pixels=read_limits().max_pixels)
    except VideoError as exc:
        raise SampleError(exc.message) from None
    return info.width, info.height, info.num_frames


def plan_references(meta: dict, members: set[str], cfg: DataConfig) -> tuple[list[RefPlan], list[str]]:
    """References in entity order (then the background plate) with their ids, and the words of each subject slot.

    Slots are the entities' subject_id values; the plate, when kept, takes the next slot, with the background
    entities' words. Groups: subjects keep the N of "gN"; objects (one group per entity) and the plate get fresh
    indices past the subjects' groups.
    """
    entities = meta.get("entities") or []
    with_slot = [e for e in entities if e.get("subject_id") is not None]
    n_slots = max((int(e["subject_id"]) for e in with_slot), default=-1) + 1
    words = [""] * n_slots
    for e in with_slot:
        phrases = [e.get("word", "")]
        if e.get("kind") == "subject":
            phrases += [w for values in (e.get("attributes") or {}).values() for w in values]
        words[int(e["subject_id"])] = WORD_SEP.join(dict.fromkeys(p for p in phrases if p))
    n_groups = max((int(str(e["group"])[1:]) + 1 for e in entities if e.get("group")), default=0)
    object_groups: dict[str, int] = {}
    refs, ranks = [], []
    for e in entities:
        for ref in e.get("references") or []:
            if not isinstance(ref["file"], str) or not _REF_MEMBER.fullmatch(ref["file"]):
                raise SampleError(f"KEY.json names reference {ref['file']!r}, not ref<N>.png; refusing the sample")
            if ref["file"] not in members:
                raise SampleError(f"KEY.json names {ref['file']}, which the shard does not hold")
            kind = KINDS[e.get("kind", "object")]
            if kind == KINDS["subject"] and (ref.get("group") or e.get("group")):
                group = int(str(ref.get("group") or e["group"])[1:])
            else:
                group = object_groups.setdefault(e["id"], n_groups + len(object_groups))
            refs.append(RefPlan(ref["file"], int(ref["subject_id"]), int(ref.get("view_id") or 0), group, kind))
            # What max_refs keeps first: every entity's first view, then further views, then attribute crops.
            ranks.append((2 if ref.get("attribute") else int(bool(ref.get("view_id"))), len(ranks)))
    keep = {i for _, i in sorted(ranks)[: cfg.max_refs]}
    refs = [r for i, r in enumerate(refs) if i in keep]  # in entity order, as the position schemes expect
    if cfg.background_ref and "bg.png" in members and len(refs) < cfg.max_refs:
        background = [e.get("word", "") for e in entities if e.get("kind") == "background"]
        words.append(WORD_SEP.join(w for w in background if w))
        group = n_groups + len(object_groups)
        refs.append(RefPlan("bg.png", n_slots, 0, group, KINDS["background"]))
    return refs, words


def plan_sample(sample: dict, cfg: DataConfig, rng: random.Random) -> SamplePlan:
    try:  # the key becomes the embedding-cache file name (cache_key): a key from a tar path ("../x") stops here
        check_key(sample.get("__key__"))
    except UnsafeName as exc:
        raise SampleError(str(exc)) from None
    if "json" not in sample or "mp4" not in sample:
        raise SampleError(f"missing {'KEY.json' if 'json' not in sample else 'KEY.mp4'}")
    try:  # limits and the schema: ids bounded, sizes positive whole numbers (a bad number is a bad sample)
        meta = parse_sample_meta(sample["json"], "KEY.json")
    except HostileData as exc:
        raise SampleError(str(exc)) from None
    width, height, n = _clip_facts(meta, sample["mp4"])
    bucket = choose_bucket(cfg.frame_buckets(), width, height, n, cfg.frame_stride)
    frames = frame_indices(n, bucket[0], cfg.frame_stride, cfg.clip_offset, rng)
    refs, words = plan_references(meta, set(sample), cfg)
    caption = (meta.get("caption") or {}).get("text") or ""
    return SamplePlan(sample["__key__"], sample.get("__url__", "?"), bucket, frames, (width, height), caption, words,
                      refs, sample)


def _to_unit(array: np.ndarray) -> np.ndarray:
    """uint8 HWC (or THWC) -> float32 channel-first in [-1, 1]. numpy, not torch: torch's intra-op thread pool
    makes these small conversions slower, and a loader should leave the cores to decoding and training."""
    unit = array.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    return np.ascontiguousarray(np.moveaxis(unit, -1, 0))


def decode_clip(mp4: bytes, plan: SamplePlan) -> np.ndarray:
    """The planned frames, scaled to cover the bucket and centre-cropped: float32 [3, F, H, W] in [-1, 1]."""
    _, height, width = plan.bucket
    clip_w, clip_h = plan.clip_size
    scale = max(width / clip_w, height / clip_h)
    scaled_w, scaled_h = max(width, round(clip_w * scale)), max(height, round(clip_h * scale))
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    # Seeks to the keyframe before the window (pipeline clips have a keyframe every second) and scales only the
    # sampled frames.
    decoded = read_frames(io.BytesIO(mp4), plan.frames, size=(scaled_w, scaled_h),
                          max_pixels=read_limits().max_pixels)
    kept = {i: rgb[top : top + height, left : left + width] for i, rgb in decoded.items()}
    if not kept:
        raise SampleError("the mp4 decoded to no frames")
    # A container header can promise more frames than decode: the last decoded frame stands in for the rest.
    last_kept = kept[max(kept)]
    return _to_unit(np.stack([kept.get(i, last_kept) for i in plan.frames]))


def letterbox(image: Image.Image, height: int, width: int) -> np.ndarray:
    """The image scaled to fit (height, width), centred on neutral grey (0 in [-1, 1]): float32 [3, height, width].
    RGBA (`segment` references) is composited onto the same grey, so transparent and padded pixels look alike."""
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    pixels = np.asarray(image.convert("RGBA" if alpha else "RGB"))
    h, w = pixels.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # Resize the uint8 image first: compositing and float conversion then touch only the output's pixels.
    pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rgb = pixels[..., :3].astype(np.float32)
    if alpha:
        a = pixels[..., 3:].astype(np.float32) / 255.0
        rgb = rgb * a + 127.5 * (1.0 - a)
    canvas = np.full((height, width, 3), 127.5, dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = rgb
    return np.ascontiguousarray(np.moveaxis(canvas * np.float32(1 / 127.5) - np.float32(1.0), -1, 0))


def load_sample(plan: SamplePlan, cfg: DataConfig) -> dict:
    try:
        video = decode_clip(plan.data["mp4"], plan)
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for a bad stream: any means an unusable clip
        raise SampleError(f"cannot decode KEY.mp4 ({exc})") from None
    ref_h, ref_w = cfg.ref_size or plan.bucket[1:]
    refs = []
    for ref in plan.refs:
        try:
            check_image(plan.data[ref.member], f"KEY.{ref.member}")  # pixel count from the header, before decoding
            refs.append(letterbox(Image.open(io.BytesIO(plan.data[ref.member])), ref_h, ref_w))
        except Exception as exc:  # noqa: BLE001 - PIL raises several types for a truncated or foreign image
            raise SampleError(f"cannot decode KEY.{ref.member} ({exc})") from None
    return {"video": video, "refs": refs, "plan": plan}


def cache_key(plan: SamplePlan, ref_size: tuple[int, int]) -> str:
    """The sample key plus a digest of exactly what was decoded (frames, crop, references, sizes): latents cached
    under it are valid for this batch entry and no other."""
    what = [plan.frames, plan.bucket, plan.clip_size, [r.member for r in plan.refs], ref_size]
    return f"{plan.key}-{hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]}"


def collate(items: list[dict], cfg: DataConfig) -> dict:
    """Stack one bucket's samples; references padded to K with ref_valid False and ids -1."""
    plans = [item["plan"] for item in items]
    ref_h, ref_w = cfg.ref_size or plans[0].bucket[1:]
    k = cfg.max_refs if cfg.pad_to_max_refs else max(len(p.refs) for p in plans)
    b = len(items)
    refs = np.zeros((b, k, 3, ref_h, ref_w), dtype=np.float32)
    ids = {name: np.full((b, k), PAD, dtype=np.int64) for name in ("subject", "view", "group", "kind")}
    for i, (item, plan) in enumerate(zip(items, plans)):
        for j, (image, ref) in enumerate(zip(item["refs"], plan.refs)):
            refs[i, j] = image
            for name, array in ids.items():
                array[i, j] = getattr(ref, name)
    return {
        "video": torch.from_numpy(np.stack([item["video"] for item in items])),
        "refs": torch.from_numpy(refs),
        "ref_valid": torch.from_numpy(ids["subject"] != PAD),
        **{f"ref_{name}": torch.from_numpy(array) for name, array in ids.items()},
        "caption": [p.caption for p in plans],
        "subject_words": [p.subject_words for p in plans],
        "key": [p.key for p in plans],
        "cache_key": [cache_key(p, (ref_h, ref_w)) for p in plans],
    }


def _wanted(part: str) -> bool:
    return part in ("json", "mp4", "bg.png") or bool(_REF_MEMBER.fullmatch(part))


def _read_shards(shards: Iterator[dict]) -> Iterator[dict]:
    """The samples of each shard through the one hardened reader (pipeline/store/shards.py), only the parts the
    loader uses; a shard that is unreadable, compressed, a link, or holds a member that is not one of ours is left
    from the failing member on, with a warning naming it."""
    for shard in shards:
        url = shard["url"]
        try:
            yield from iter_samples(url, url, select=_wanted)
        except (UserFacingError, OSError, ValueError) as exc:
            log.warning("skipping the rest of shard %s: %s", url, exc)


class ShardDataset(IterableDataset):
    """Yields collated batches (see module doc). `positions[slot] = (epoch, batch)` is where a slot starts;
    DataLoader worker i runs slot (i + worker_offset) % num_workers."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.urls = resolve_shards(cfg.shards)
        self.rank, self.world_size = rank, world_size
        self.first_epoch = 0
        self.positions: list[tuple[int, int]] | None = None
        self.worker_offset = 0
        self.shuffle = cfg.shuffle_buffer > 1

    def _part(self, epoch: int, slot: int, num_workers: int) -> tuple[Iterator[dict], int, int]:
        """This slot's shards, and which of their samples it keeps: those whose index i has i % modulus == residue."""
        if self.cfg.resampled:
            per_worker = max(1, math.ceil(len(self.urls) / (self.world_size * num_workers)))
            shards = wds.ResampledShards(self.urls, nshards=per_worker, seed=_seed(self.cfg.seed, epoch) % 2**31,
                                         worker_seed=lambda: self.rank * 1000 + slot, deterministic=True)
            return iter(shards), 1, 0
        order = list(self.urls)
        if self.shuffle:
            random.Random(_seed(self.cfg.seed, epoch)).shuffle(order)
        modulus, residue = 1, 0
        if len(order) >= self.world_size:
            order = order[self.rank :: self.world_size]
        else:
            modulus, residue = self.world_size, self.rank
        if len(order) >= num_workers:
            order = order[slot::num_workers]
        else:
            modulus, residue = modulus * num_workers, residue * num_workers + slot
        return ({"url": url} for url in order), modulus, residue

    def _batches(self, epoch: int, slot: int, num_slots: int) -> Iterator[list[SamplePlan]]:
        """One epoch of this worker slot's batches, planned (not decoded)."""
        cfg = self.cfg
        shards, modulus, residue = self._part(epoch, slot, num_slots)
        samples = _read_shards(shards)
        if modulus > 1:
            samples = islice(samples, residue, None, modulus)
        if self.shuffle:
            rng = random.Random(_seed(cfg.seed, epoch, self.rank, slot, "shuffle"))
            samples = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(samples)
        rng = random.Random(_seed(cfg.seed, epoch, self.rank, slot, "frames"))
        pending: dict[Bucket, list[SamplePlan]] = {}
        for sample in samples:
            try:
                plan = plan_sample(sample, cfg, rng)
            except Exception as exc:  # noqa: BLE001 - one bad sample from elsewhere never ends a training run
                log.warning("skipping sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
                continue
            group = pending.setdefault(plan.bucket, [])
            group.append(plan)
            if len(group) == cfg.batch_size:
                yield pending.pop(plan.bucket)
        if not cfg.drop_last:
            yield from pending.values()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, num_slots = ((info.id + self.worker_offset) % info.num_workers, info.num_workers) if info else (0, 1)
        epoch, skip = self.positions[slot] if self.positions else (self.first_epoch, 0)
        last = math.inf if self.cfg.epochs is None else self.first_epoch + self.cfg.epochs
        while epoch < last:
            planned = 0
            for index, plans in enumerate(self._batches(epoch, slot, num_slots)):
                planned += 1
                if index < skip:
                    continue
                items = []
                for plan in plans:
                    try:
                        items.append(load_sample(plan, self.cfg))
                    except Exception as exc:  # noqa: BLE001 - skipped, as in planning
                        log.warning("skipping sample %s in %s: %s", plan.key, plan.url, exc)
                if items:
                    batch = collate(items, self.cfg)
                    batch["_position"] = (slot, epoch, index + 1)
                    yield batch
            if planned == 0:
                log.warning("rank %d worker slot %d read no usable sample in epoch %d: it stops", self.rank, slot,
                            epoch)
                return
            epoch, skip = epoch + 1, 0


class ShardLoader(DataLoader):
    """A DataLoader over a ShardDataset that knows how far each worker's stream was consumed.

    Iterating again continues where the last iteration stopped; after a finite pass (`epochs` set) ends, the next
    iteration starts the following epochs.
    """

    def __init__(self, dataset: ShardDataset):
        cfg = dataset.cfg
        extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers else {}
        super().__init__(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, **extra)
        self._workers = max(1, cfg.num_workers)
        self._positions: list[tuple[int, int]] | None = None
        self._next_slot = 0
        self.samples_seen = 0

    def __iter__(self) -> Iterator[dict]:
        dataset: ShardDataset = self.dataset
        start = dataset.first_epoch
        self._positions = self._positions or [(start, 0)] * self._workers
        # Workers receive a copy of the dataset when the iterator starts: set where each one resumes first.
        dataset.positions, dataset.worker_offset = list(self._positions), self._next_slot
        for batch in super().__iter__():
            slot, epoch, next_batch = batch.pop("_position")
            self._positions[slot] = (epoch, next_batch)
            self._next_slot = (slot + 1) % self._workers
            self.samples_seen += len(batch["key"])
            yield batch
        if dataset.cfg.epochs is not None:
            dataset.first_epoch = start + dataset.cfg.epochs
            self._positions, self._next_slot = None, 0

    def _fingerprint(self) -> dict:
        dataset: ShardDataset = self.dataset
        cfg = dataset.cfg.model_dump(mode="json", exclude={"shards", "pin_memory", "prefetch_factor"})
        fingerprint = {**cfg, "shards": [Path(u).name for u in dataset.urls], "rank": dataset.rank,
                       "world_size": dataset.world_size}
        return json.loads(json.dumps(fingerprint))  # tuples as lists: compares equal to a state read from JSON

    def state_dict(self) -> dict:
        """This rank's position in its stream (JSON-able). Each rank saves and restores its own."""
        dataset: ShardDataset = self.dataset
        positions = self._positions or [(dataset.first_epoch, 0)] * self._workers
        return {
            "version": _STATE_VERSION,
            "first_epoch": dataset.first_epoch,
            "positions": [list(p) for p in positions],
            "next_slot": self._next_slot,
            "epoch": min(p[0] for p in positions),
            "samples_seen": self.samples_seen,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; exact when shards, config, rank, world_size and num_workers are unchanged."""
        dataset: ShardDataset = self.dataset
        self.samples_seen = int(state["samples_seen"])
        dataset.first_epoch = int(state["first_epoch"])
        changed = sorted(k for k, v in self._fingerprint().items() if state["fingerprint"].get(k) != v)
        if state.get("version") != _STATE_VERSION or changed:
            log.warning("data loader state cannot resume exactly (changed: %s); restarting at epoch %d",
                        ", ".join(changed) or "state version", state["epoch"])
            self._positions, self._next_slot = [(int(state["epoch"]), 0)] * self._workers, 0
            return
        self._positions = [(int(e), int(b)) for e, b in state["positions"]]
        self._next_slot = int(state["next_slot"])


def make_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """The one entry: a DataLoader yielding the batches of the trainer contract for this rank."""
    return ShardLoader(ShardDataset(cfg, rank, world_size))

