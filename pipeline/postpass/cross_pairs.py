"""Cross-paired samples (Kaleido): a committed sample whose subject references come from elsewhere, so a model
trained on it cannot copy the reference's background, pose or lighting from its own clip.

A post-pass over the committed own samples, run after every streaming pass (and so after every resume):

1. Index: every own sample's KEY.json and KEY.faces.npy are read from its shard (tar member offsets; the mp4 and
   images are read only for the samples that are used). The shards may have come from elsewhere: a shard that
   cannot be read (`iter_members` refuses it, or it is a link) or a sample that is not one this pipeline writes
   (KEY.json failing `parse_sample_meta`, a pickled, misshapen or non-float embedding table, a reference naming a
   file the sample lacks) is left out with a warning and counted in the entry's `info.unreadable`; a base whose
   pixels turn out unusable while its cross sample is built is skipped the same way (`info.skipped`).
2. Identities: a subject reference's face embedding is the faces.npy row of the face with the reference's
   `detection`. References of different clips whose cosine is >= `cross_pairs.min_face_similarity` are linked;
   union-find over the links gives identity clusters. Objects, when the run had a CLIP model, are linked the same
   way by the CLIP embedding of their reference detection's crop (KEY.dclip.npy), within one category and at
   `cross_pairs.min_object_similarity`; without it they have no identity and are always composited.
3. Bases: own samples in a seeded order (sha256 of seed and key: adding samples does not reshuffle the others),
   taken until C = round(share / (1 - share) * N_own) cross samples exist, so cross / (own + cross) ~= share.
   A base is used once; one without references, or none of whose references can be replaced, is skipped.
4. Per reference of a base: `same_identity` when another clip holds the same face (the partner is drawn among the
   references it matches directly, preferring other sources: a chain A~B~C never pairs A with a C it does not
   match itself; the views of one entity draw different partners while there are any, so a subject's views in a
   cross sample are several references of that identity from other clips (MV-S2V)); else `composite`: the base's
   own subject pasted onto the clean background plate (bg.png) of a sample of another source, one plate per cross
   sample.
5. Commit: `shards/cross-NNNNNN.tar` written under `.tmp` names and renamed, then ONE ledger line
   `{"type": "cross", ...}`. The last cross line is the current set; the shards of the one it supersedes are deleted
   after it commits, and `Ledger.recover` deletes cross shards that no current line names. The line carries a digest
   of the own keys and of this config: an unchanged own set is never rewritten.

A cross sample is its base with references replaced: key `BASE-x`; KEY.mp4, KEY.bg.png, KEY.faces.npy and
KEY.dmask*.png copied; KEY.ref{k}.png / KEY.mask{k}.png keep the base's names k; KEY.json is the base's with the
new reference entries (each with `cross`) and a top-level `cross_pair` {"base", "kinds", "background_from"}; its
`stats.metrics` (stages/metrics.py) drops what was measured on a replaced reference, keeps the face identity where
faces.npy allows recomputing it, and names the replaced files in `replaced`.
A reference that can be neither swapped nor composited (no plate of another source) stays the base's, without
`cross`; `kinds` counts only replaced ones. A rebuilt set numbers its shards on from the set it replaces, so old and
new names never collide while both are on disk.

Reference fields keep one meaning everywhere: `detection`, `keyframe`, `frame_index` and `box` locate the
reference's pixels in the clip `source_key` / `source_clip` (the partner's clip for same_identity, the base's for a
composite), while `entity`, `subject_id`, `view_id` and `group` tie it to this sample's entities.
A same_identity reference keeps the partner's `variant` (its pixels are the partner's: RGBA iff segment). A
composite keeps the base reference's `variant` (the variant mix the ratio asked for is unchanged; `cross.kind`
says how the pixels were made): it is RGB, or RGBA for `segment` with alpha = the pasted mask, so a loader that
applies alpha still gets the cut-out subject and one that drops it sees the subject on the foreign plate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.text import Text

from pipeline.core.config import ConfigError, CrossPairsConfig, RunConfig, config_face_thresholds, face_thresholds
from pipeline.core.errors import UserFacingError
from pipeline.core.names import CROSS_PREFIX, KEY_SUFFIX, check_shard
from pipeline.core.storage import Storage
from pipeline.core.untrusted import HostileData, check_image, load_npy, printable
from pipeline.store.ledger import Ledger, LedgerState, as_storage, own_sample_shards
from pipeline.store.sample_meta import REFERENCE_FILE, parse_sample_meta
from pipeline.store.shards import ShardWriter, image_png, iter_members, mask_png, sample_json, shard_number
from stages.metrics import entity_face_cosine, face_cosine, face_flags, face_row, with_references

# Bump when the construction changes: the digest then differs and the next run rebuilds the cross set.
ALGORITHM_VERSION = 2
# Composite placement on the plate: subject (its mask's bounding box) 60 % of the plate height, at most 90 % of its
# width, centred horizontally, feet at 90 % of the height -- a person standing in the scene, not floating in it.
SUBJECT_HEIGHT = 0.6
SUBJECT_MAX_WIDTH = 0.9
SUBJECT_BOTTOM = 0.9
# Direct same-identity partners kept per reference (the most similar): bounds memory for identities seen in
# thousands of clips; the draw among them still varies.
MAX_PARTNERS = 32
SIMILARITY_BLOCK = 2048  # rows of the blocked cosine matrix: memory ~ block x references x 4 bytes
# What the free-form parts of a KEY.json from elsewhere (stats.metrics, reference fields the schema lets through)
# raise when they are not what this pipeline writes; HostileData, ShardError and UnsafeName are ValueErrors. One
# sample is skipped with a warning for it, never the pass.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)
WARNINGS_SHOWN = 20  # per pass: a directory of thousands of bad samples says how many, not each one

log = logging.getLogger(__name__)


@dataclass
class OwnSample:
    """What the planner needs of one committed own sample: where its files are and its reference entries."""

    key: str
    shard: str  # relative to OUT
    clip_id: str
    source_id: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size) in the shard
    references: list[dict] = field(default_factory=list)  # KEY.json reference entries, in entity order
    faces: list[dict] = field(default_factory=list)  # KEY.json "faces": row i is faces.npy row i
    detection_rows: dict[str, int] = field(default_factory=dict)  # detection id -> row in dclip.npy
    object_categories: dict[str, str] = field(default_factory=dict)  # object entity id -> its category

    @property
    def has_background(self) -> bool:
        return "bg.png" in self.members


@dataclass
class Replacement:
    """One reference of a cross sample: where its pixels come from."""

    base_ref: dict
    kind: str  # same_identity | composite
    partner: tuple[int, int] | None = None  # (sample index, reference index) for same_identity
    similarity: float | None = None
    identity: int | None = None


@dataclass
class CrossPlan:
    base: int  # sample index
    replacements: list[Replacement]
    background_from: int | None  # donor sample index of the composites' plate

    def kinds(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.replacements))


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# ---------------------------------------------------------------------------------------------------------------
# Reading the committed own samples


def own_digest(keys, cfg: CrossPairsConfig) -> str:
    """What a cross set is a function of: the own keys, the cross-pair settings and the algorithm version."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode() + b"\n")
    digest.update(json.dumps({"config": cfg.model_dump(mode="json"), "version": ALGORITHM_VERSION},
                             sort_keys=True).encode())
    return digest.hexdigest()


def read_member(out: Storage, sample: OwnSample, ext: str) -> bytes:
    offset, size = sample.members[ext]
    with out.open_read(check_shard(sample.shard, out)) as f:
        f.seek(offset)
        return f.read(size)


def index_own_samples(out: Storage, state: LedgerState, problems: list[str] | None = None
                      ) -> tuple[list[OwnSample], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The committed own samples in key order, each one's face embeddings (faces.npy) and detection crop
    embeddings (dclip.npy), from the shards' tar headers plus their json/npy members; nothing else is read.
    A shard that cannot be read, or a sample that is not one this pipeline writes, is left out; why is appended
    to `problems` (one line per shard or sample, naming it)."""
    problems = [] if problems is None else problems
    own = own_sample_shards(state)
    per_shard = Counter(own.values())
    samples: dict[str, OwnSample] = {}
    embeddings: dict[str, np.ndarray] = {}
    crops: dict[str, np.ndarray] = {}
    for shard in sorted(per_shard):
        try:
            found, tables, bad = _index_shard(out, shard, own)
        except (OSError, UserFacingError) as exc:  # ShardError, UnsafeName, UnsafeFile (a linked shard), StorageError
            problems.append(f"{shard}: cannot be read, its {per_shard[shard]} samples are left out ({exc})")
            continue
        for key, sample in found.items():
            reason = bad.get(key) or _unusable(sample, tables.get((key, "faces.npy")))
            if reason:
                problems.append(f"{shard}: sample {key} left out: {reason}")
                continue
            samples[key] = sample
            for ext, into in (("faces.npy", embeddings), ("dclip.npy", crops)):
                if (key, ext) in tables:
                    into[key] = tables[(key, ext)]
    ordered = [samples[k] for k in sorted(samples)]
    return ordered, embeddings, crops


def _index_shard(out: Storage, shard: str, own: dict[str, str]
                 ) -> tuple[dict[str, OwnSample], dict[tuple[str, str], np.ndarray], dict[str, str]]:
    """One shard's own samples, their embedding tables by (key, ext), and the samples whose KEY.json or tables
    are not ours, with why. Raises what `iter_members` raises for a shard that is not read further."""
    found: dict[str, OwnSample] = {}
    tables: dict[tuple[str, str], np.ndarray] = {}
    bad: dict[str, str] = {}
    for key, ext, member, read in iter_members((out, check_shard(shard, out)), shard):
        if own.get(key) != shard or key in bad or ext.startswith("_"):  # "_" parts: webdataset's fields, not files
            continue
        sample = found.get(key)
        if sample is None:
            sample = found[key] = OwnSample(key, shard, "", "", {})
        sample.members[ext] = (member.offset_data, member.size)
        try:
            if ext == "json":
                _read_meta(sample, parse_sample_meta(read(), "KEY.json"))
            elif ext in ("faces.npy", "dclip.npy"):
                tables[(key, ext)] = load_table(read(), f"KEY.{ext}")
        except HostileData as exc:
            bad[key] = str(exc)
    return found, tables, bad


def _read_meta(sample: OwnSample, meta: dict) -> None:
    """The planner's fields of `sample` from its checked KEY.json; HostileData for a reference the planner cannot
    use (its file names, entity and detection are what it reads beyond the schema)."""
    entities = meta.get("entities") or []
    sample.clip_id = meta["clip_id"] if isinstance(meta.get("clip_id"), str) else sample.key
    source = meta.get("source")
    source_id = source.get("id") if isinstance(source, dict) else None
    sample.source_id = source_id if isinstance(source_id, str) and source_id else sample.key.split("-")[0]
    sample.references = [r for e in entities for r in e.get("references") or []]
    for ref in sample.references:
        for name, pattern in REFERENCE_FILE.items():
            if not (isinstance(ref.get(name), str) and pattern.fullmatch(ref[name])):
                raise HostileData(f"KEY.json: reference {name} {printable(repr(ref.get(name)))[:80]} is not "
                                  f"a {pattern.pattern} name")
        if not isinstance(ref.get("entity"), str) or not isinstance(ref.get("detection"), (str, type(None))):
            raise HostileData("KEY.json: a reference without a text entity and detection")
    sample.faces = meta.get("faces") or []
    sample.detection_rows = {d["id"]: i for i, d in enumerate(meta.get("detections") or [])
                             if isinstance(d.get("id"), str)}
    sample.object_categories = {e["id"]: _text(e.get("category")) or _text(e.get("word"))
                                for e in entities if e.get("kind") == "object"}


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _unusable(sample: OwnSample, faces: np.ndarray | None) -> str | None:
    """Why an indexed sample cannot be planned with (its members are known only once the shard is read), or None."""
    if "json" not in sample.members:
        return "no KEY.json"
    missing = sorted({r[name] for r in sample.references for name in REFERENCE_FILE} - set(sample.members))
    if missing:
        return f"KEY.json names {', '.join(missing[:3])}, which the sample does not hold"
    if faces is not None and len(faces) != len(sample.faces):
        return f"KEY.faces.npy has {len(faces)} rows, KEY.json lists {len(sample.faces)} faces"
    return None


def load_table(data: bytes, what: str) -> np.ndarray:
    """An embedding table (KEY.faces.npy, KEY.dclip.npy): a 2-D array of finite floats, one row per face or
    detection, read without pickles (`load_npy`); HostileData for anything else (an object array, another shape
    or dtype), so one bad sample is skipped, not the pass."""
    table = load_npy(data, what)
    if table.ndim != 2 or table.dtype.kind != "f":
        raise HostileData(f"{what}: a {table.dtype} array of shape {table.shape}, not a 2-D table of floats")
    if not np.isfinite(table).all():
        raise HostileData(f"{what}: holds NaN or infinite values")
    return table


def warn_all(console, problems: list[str], what: str) -> None:
    """Each of `problems` as a warning (the first WARNINGS_SHOWN, then how many more): on `console` when given,
    with control characters shown and no markup read from them, else to the log."""
    lines = [f"{what}: {p}" for p in problems[:WARNINGS_SHOWN]]
    if len(problems) > WARNINGS_SHOWN:
        lines.append(f"{what}: ... and {len(problems) - WARNINGS_SHOWN} more")
    for line in lines:
        text = printable(line)[:1000]  # a member name in a message can be megabytes long
        if console is not None:
            console.print(Text(f"warning: {text}", style="yellow"))
        else:
            log.warning("%s", text)


# ---------------------------------------------------------------------------------------------------------------
# Planning (pure: no file access)


def reference_embeddings(samples: list[OwnSample], embeddings: dict[str, np.ndarray]
                         ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(sample index, reference index) of every reference that has a face, and the unit embeddings (rows)."""
    where, rows = [], []
    for si, sample in enumerate(samples):
        table = embeddings.get(sample.key)
        faces = sample.faces
        for ri, ref in enumerate(sample.references):
            row = next((i for i, f in enumerate(faces)
                        if ref.get("detection") and f.get("detection") == ref["detection"]), None)
            if row is None or table is None or row >= len(table):
                continue
            where.append((si, ri))
            rows.append(np.asarray(table[row], np.float32).ravel())
    return _unit_rows(where, rows)


def object_reference_embeddings(samples: list[OwnSample], crops: dict[str, np.ndarray]
                                ) -> tuple[list[tuple[int, int]], np.ndarray, list[str]]:
    """(sample index, reference index) of every object reference with a CLIP crop embedding, the unit embeddings,
    and each one's category (objects are only the same identity within one category)."""
    where, rows = [], []
    for si, sample in enumerate(samples):
        table = crops.get(sample.key)
        for ri, ref in enumerate(sample.references):
            row = sample.detection_rows.get(ref.get("detection"))
            if table is None or row is None or row >= len(table) or ref.get("entity") not in sample.object_categories:
                continue
            where.append((si, ri))
            rows.append(np.asarray(table[row], np.float32).ravel())
    where, matrix = _unit_rows(where, rows)
    return where, matrix, [samples[si].object_categories[samples[si].references[ri]["entity"]] for si, ri in where]


def _unit_rows(where: list[tuple[int, int]], rows: list[np.ndarray]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The rows of the most common width that are not zero (an empty crop), normalised; and their positions."""
    if not rows:
        return [], np.zeros((0, 0), np.float32)
    dims = Counter(len(r) for r in rows).most_common(1)[0][0]  # one backend per output dir; guard anyway
    keep = [i for i, r in enumerate(rows) if len(r) == dims and np.linalg.norm(r) > 0]
    if not keep:
        return [], np.zeros((0, 0), np.float32)
    matrix = np.stack([rows[i] for i in keep])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return [where[i] for i in keep], matrix


def identity_links(where: list[tuple[int, int]], matrix: np.ndarray, clips: list[str], min_similarity: float,
                   groups: list[str] | None = None) -> tuple[list[list[tuple[int, float]]], list[int]]:
    """Per reference: its direct partners (row, cosine) in other clips (and the same group, when given), most
    similar first (at most MAX_PARTNERS); and its identity cluster (union-find over those links), numbered from 0."""
    n = len(where)
    clip_of = np.array([clips[si] for si, _ in where])
    group_of = np.array(groups if groups is not None else [""] * n)
    partners: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    uf = _UnionFind(n)
    for start in range(0, n, SIMILARITY_BLOCK):
        sims = matrix[start:start + SIMILARITY_BLOCK] @ matrix.T
        linked = ((sims >= min_similarity) & (clip_of[start:start + SIMILARITY_BLOCK, None] != clip_of[None, :])
                  & (group_of[start:start + SIMILARITY_BLOCK, None] == group_of[None, :]))
        for offset, row in enumerate(linked):
            js = np.flatnonzero(row)
            if len(js) > MAX_PARTNERS:
                js = js[np.argpartition(-sims[offset, js], MAX_PARTNERS)[:MAX_PARTNERS]]
            ranked = sorted(((int(j), float(sims[offset, j])) for j in js), key=lambda p: (-p[1], p[0]))
            partners[start + offset] = ranked
            for j, _ in ranked:
                uf.union(start + offset, j)
    roots = [uf.find(i) for i in range(n)]
    numbers = {root: k for k, root in enumerate(sorted(set(roots)))}
    return partners, [numbers[r] for r in roots]


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def target_count(share: float, n_own: int) -> int:
    """Cross samples C so that C / (n_own + C) ~= share."""
    return round(share / (1.0 - share) * n_own)


def plan_cross_pairs(samples: list[OwnSample], embeddings: dict[str, np.ndarray], cfg: CrossPairsConfig,
                     crops: dict[str, np.ndarray] | None = None) -> tuple[list[CrossPlan], dict]:
    """Which own samples become bases and where each replaced reference comes from; plus what happened (target,
    cap, skipped bases and why, identity clusters)."""
    n_own = len(samples)
    sources = {s.source_id for s in samples}
    info: dict = {"own": n_own, "target": target_count(cfg.share, n_own), "capped": False, "skipped": {},
                  "identity_clusters": 0, "face_references": 0, "object_references": 0}
    if cfg.share == 0 or n_own < 2 or len(sources) < 2:
        info["target"] = 0 if cfg.share == 0 else info["target"]
        info["reason"] = "share is 0" if cfg.share == 0 else f"{n_own} own samples from {len(sources)} sources"
        return [], info
    target = info["target"]
    if target > n_own:
        info["capped"] = True
        info["note"] = f"share {cfg.share} asks for {target} cross samples but each of the {n_own} own samples " \
                       f"can be a base once: capped at {n_own}"
        target = n_own

    clips = [s.clip_id for s in samples]
    where, matrix = reference_embeddings(samples, embeddings)
    partners, identity = identity_links(where, matrix, clips, cfg.min_face_similarity) if where else ([], [])
    info["face_references"] = len(where)
    owhere, omatrix, categories = object_reference_embeddings(samples, crops or {})
    if owhere:  # objects number their rows and clusters on from the faces'
        opartners, oidentity = identity_links(owhere, omatrix, clips, cfg.min_object_similarity, categories)
        offset, first = len(where), max(identity, default=-1) + 1
        where = where + owhere
        partners = partners + [[(j + offset, sim) for j, sim in p] for p in opartners]
        identity = identity + [i + first for i in oidentity]
    info["object_references"] = len(owhere)
    row_of = {pos: i for i, pos in enumerate(where)}
    clusters = Counter(identity)
    info["identity_clusters"] = sum(1 for c, n in clusters.items() if n > 1)

    donors = [i for i, s in enumerate(samples) if s.has_background]
    donors_per_source = Counter(samples[i].source_id for i in donors)

    def draw_donor(base: OwnSample, rng: random.Random) -> int | None:
        if len(donors) - donors_per_source.get(base.source_id, 0) <= 0:
            return None
        for _ in range(32):  # rejection: cheap unless the base's own source holds nearly every plate
            pick = donors[rng.randrange(len(donors))]
            if samples[pick].source_id != base.source_id:
                return pick
        return rng.choice([i for i in donors if samples[i].source_id != base.source_id])

    plans: list[CrossPlan] = []
    skipped: Counter = Counter()
    for si in sorted(range(n_own), key=lambda i: _rank(cfg.seed, samples[i].key)):
        if len(plans) >= target:
            break
        base = samples[si]
        if not base.references:
            skipped["no_references"] += 1
            continue
        rng = random.Random(_rank(cfg.seed, base.key))
        replacements: list[Replacement] = []
        donor: int | None = None
        donor_drawn = False
        used: dict[str, set[int]] = {}  # entity -> partner rows its views took: each view a different reference
        for ri, ref in enumerate(base.references):
            row = row_of.get((si, ri))
            if row is not None and partners[row]:
                taken = used.setdefault(ref.get("entity"), set())
                fresh = [p for p in partners[row] if p[0] not in taken] or partners[row]
                other_source = [p for p in fresh if samples[where[p[0]][0]].source_id != base.source_id]
                j, similarity = rng.choice(other_source or fresh)
                taken.add(j)
                replacements.append(Replacement(ref, "same_identity", partner=where[j], similarity=similarity,
                                                identity=identity[row]))
                continue
            if not donor_drawn:
                donor, donor_drawn = draw_donor(base, rng), True
            if donor is not None:
                replacements.append(Replacement(ref, "composite"))
        if not replacements:
            skipped["no_partner_or_plate"] += 1
            continue
        plans.append(CrossPlan(si, replacements, donor if any(r.kind == "composite" for r in replacements) else None))
    info["skipped"] = dict(skipped)
    if len(plans) < target:
        info["shortfall"] = target - len(plans)
    return plans, info


# ---------------------------------------------------------------------------------------------------------------
# Pixels


def decode_png(data: bytes, what: str = "PNG") -> np.ndarray:
    """PNG bytes -> RGB / RGBA / gray uint8 array (as stored). HostileData when its header declares more than the
    pixel limit (checked before a pixel is decoded: a few KB of PNG can inflate to gigabytes) or it does not
    decode."""
    import cv2

    check_image(data, what)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise HostileData(f"{what}: cannot decode PNG")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return image


def _image(data: bytes, what: str, channels: tuple[int, ...]) -> np.ndarray:
    """A decoded 8-bit PNG with one of `channels` (0: a one-channel mask); HostileData for any other, which the
    compositing arithmetic would otherwise trip over."""
    image = decode_png(data, what)
    found = image.shape[2] if image.ndim == 3 else 0
    if found not in channels or image.dtype != np.uint8:
        raise HostileData(f"{what}: a {image.dtype} image of shape {image.shape}; expected 8-bit with "
                          f"{' or '.join(str(c or 1) for c in channels)} channels")
    return image


def composite_on_plate(reference: np.ndarray, mask: np.ndarray, plate: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Paste the masked subject of `reference` (RGB or RGBA; its alpha is ignored, `mask` decides) onto `plate`
    (RGB): scaled so its mask's bounding box is SUBJECT_HEIGHT of the plate height (at most SUBJECT_MAX_WIDTH of
    the width), centred, bottom at SUBJECT_BOTTOM. Returns the RGB composite, its 0/1 mask and the pasted box."""
    import cv2

    rgb = reference[..., :3]
    mask = (mask > 0).astype(np.uint8)
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    if not mask.any():  # an empty mask: the whole reference is the subject
        mask = np.ones_like(mask)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    subject, alpha = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.float32)
    height, width = plate.shape[:2]
    scale = min(SUBJECT_HEIGHT * height / subject.shape[0], SUBJECT_MAX_WIDTH * width / subject.shape[1])
    w, h = max(1, round(subject.shape[1] * scale)), max(1, round(subject.shape[0] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    subject = cv2.resize(np.ascontiguousarray(subject), (w, h), interpolation=interpolation)
    alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)
    left = (width - w) // 2
    top = max(0, min(round(SUBJECT_BOTTOM * height) - h, height - h))
    out = plate[..., :3].copy()
    region = out[top:top + h, left:left + w].astype(np.float32)
    a = alpha[..., None]
    out[top:top + h, left:left + w] = np.clip(a * subject + (1 - a) * region + 0.5, 0, 255).astype(np.uint8)
    placed = np.zeros((height, width), np.uint8)
    placed[top:top + h, left:left + w] = alpha >= 0.5
    return out, placed, [int(left), int(top), int(left + w), int(top + h)]


# ---------------------------------------------------------------------------------------------------------------
# Writing


def cross_key(base_key: str) -> str:
    return base_key + KEY_SUFFIX


def cross_metrics(metrics: dict, plan: CrossPlan, samples: list[OwnSample], new_refs: dict[tuple[str, str], dict],
                  embeddings: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict:
    """The base's KEY.json `stats.metrics` for its cross sample: a replaced reference is not the one measured, so its
    entry is dropped, except the face identity, which faces.npy lets us recompute (the partner's face against the
    base clip's faces of the entity for same_identity; for a composite the pasted subject is the base reference's
    own, so its own face); summaries and flags follow from what remains, and `replaced` lists the files."""
    base = samples[plan.base]
    table = embeddings.get(base.key)
    old = {r.get("file"): r for r in metrics.get("references") or []}
    replaced = {}
    for rep in plan.replacements:
        ref = rep.base_ref
        entry = new_refs[(ref["entity"], ref["file"])]
        new = {"file": ref["file"], "entity": ref["entity"], "variant": entry.get("variant"), "cross": rep.kind}
        if "face_cosine" in old.get(ref["file"], {}):  # a subject whose face identity was measured
            if rep.kind == "same_identity":
                partner = samples[rep.partner[0]]
                ptable = embeddings.get(partner.key)
                row = face_row(partner.faces, entry.get("detection"), ptable)
                # The partner's face comes from another clip: every keyframe of the base is another view.
                cosine = None if row is None else entity_face_cosine(ptable[row], ref["entity"], base.faces, table,
                                                                     None)
            else:
                cosine = face_cosine(ref, base.faces, table)
            new["face_cosine"] = cosine
            new.update(face_flags(cosine, thresholds))
        replaced[ref["file"]] = new
    references = [replaced.get(r.get("file"), r) for r in metrics.get("references") or []]
    return {**with_references(metrics, references), "replaced": sorted(replaced)}


def _build_sample(out: Storage, samples: list[OwnSample], plan: CrossPlan,
                  embeddings: dict[str, np.ndarray] | None = None, thresholds: dict[str, float] | None = None) -> dict:
    base = samples[plan.base]
    meta = parse_sample_meta(read_member(out, base, "json"), "KEY.json")
    sample: dict = {"__key__": cross_key(base.key)}
    for ext in base.members:
        if ext != "json":
            sample[ext] = read_member(out, base, ext)
    plate = None
    if plan.background_from is not None:
        donor = samples[plan.background_from]
        plate = _image(read_member(out, donor, "bg.png"), f"the plate {donor.key}.bg.png", (3, 4))
    new_refs: dict[tuple[str, str], dict] = {}
    for rep in plan.replacements:
        ref = rep.base_ref
        if rep.kind == "same_identity":
            psample = samples[rep.partner[0]]
            pref = psample.references[rep.partner[1]]
            sample[ref["file"]] = read_member(out, psample, pref["file"])
            sample[ref["mask"]] = read_member(out, psample, pref["mask"])
            entry = {**pref, "file": ref["file"], "mask": ref["mask"]}
            for name in ("entity", "subject_id", "view_id", "group", "attribute", "tag"):
                entry[name] = ref.get(name)
            entry["why"] = (f"view {ref.get('view_id')} of the same identity from {psample.key} "
                            f"(face cosine {rep.similarity:.2f})")
            entry["cross"] = {"kind": "same_identity", "from_key": psample.key, "from_file": pref["file"],
                              "identity": rep.identity, "similarity": round(rep.similarity, 4)}
        else:
            donor = samples[plan.background_from]
            image = _image(read_member(out, base, ref["file"]), f"KEY.{ref['file']}", (3, 4))
            mask = _image(read_member(out, base, ref["mask"]), f"KEY.{ref['mask']}", (0,))
            composite, placed, box = composite_on_plate(image, mask, plate)
            if ref.get("variant") == "segment":  # keep the format rule: RGBA iff segment
                composite = np.dstack([composite, placed * 255])
            sample[ref["file"]] = image_png(composite)
            sample[ref["mask"]] = mask_png(placed)
            entry = {**ref, "cross": {"kind": "composite", "background_from": donor.key,
                                      "background_clip": donor.clip_id, "background_source": donor.source_id,
                                      "placed_box": box}}
        new_refs[(ref["entity"], ref["file"])] = entry
    for entity in meta.get("entities", []):
        if entity.get("references"):
            entity["references"] = [new_refs.get((r["entity"], r["file"]), r) for r in entity["references"]]
    metrics = (meta.get("stats") or {}).get("metrics")
    if isinstance(metrics, dict) and "references" in metrics:
        meta["stats"]["metrics"] = cross_metrics(metrics, plan, samples, new_refs, embeddings or {},
                                                 thresholds or face_thresholds(None, None, "dlib"))
    meta["key"] = sample["__key__"]
    meta["cross_pair"] = {
        "base": base.key,
        "kinds": plan.kinds(),
        "background_from": samples[plan.background_from].key if plan.background_from is not None else None,
    }
    sample["json"] = sample_json(meta)
    return sample


def _try_build(out: Storage, samples: list[OwnSample], plan: CrossPlan, embeddings: dict[str, np.ndarray],
               thresholds: dict[str, float], failed: list[str]) -> dict | None:
    """`_build_sample`, or None with why appended to `failed` when the files it reads turn out not to be ours (a
    member that does not decode, a KEY.json whose metrics are not what this pipeline writes, a shard replaced
    since it was indexed): that base is skipped, the pass goes on."""
    base = samples[plan.base]
    try:
        return _build_sample(out, samples, plan, embeddings, thresholds)
    except (*MALFORMED, OSError) as exc:  # OSError: StorageError, UnsafeFile
        failed.append(f"{base.shard}: base {base.key} skipped ({type(exc).__name__}: {str(exc)[:300]})")
        return None


def build_cross_pairs(out_dir: str | Path, config: RunConfig, ledger: Ledger, state: LedgerState,
                      console=None) -> dict | None:
    """Bring the cross-pair set of `out_dir` up to date with its committed own samples.

    Returns None when the current set already matches the own keys and `config.cross_pairs` (nothing written);
    otherwise the new ledger entry without its per-sample rows (see `cross_summary`). `state` must be the
    committed state after `ledger.recover()`; its `cross` is updated in place."""
    cfg = config.cross_pairs
    out = as_storage(out_dir)
    if config.output.split == CROSS_PREFIX:
        raise ConfigError(f"output.split '{CROSS_PREFIX}' clashes with the cross-pair shards "
                          f"({CROSS_PREFIX}-NNNNNN.tar); choose another split name")
    started = time.time()
    own = own_sample_shards(state)
    digest = own_digest(own, cfg)
    current = state.cross
    if (current and current.get("own_digest") == digest
            and all(out.info(check_shard(s["shard"], out)) is not None for s in current["shards"])):
        return None

    if cfg.share > 0:
        problems: list[str] = []
        samples, embeddings, crops = index_own_samples(out, state, problems)
        warn_all(console, problems, "cross-pairs")
        plans, info = plan_cross_pairs(samples, embeddings, cfg, crops)
        if len(samples) < len(own):
            info["unreadable"] = len(own) - len(samples)  # own samples left out: their shard or sample is not ours
    else:  # nothing to read: the entry only records that the set is empty
        samples, plans, info = [], [], {"own": len(own), "target": 0, "capped": False, "reason": "share is 0"}

    shards: list[dict] = []
    rows: list[dict] = []
    if plans:
        start = max((shard_number(s["shard"]) + 1 for s in (current or {}).get("shards", [])), default=0)
        # Nothing reaches the ledger per shard: the caller commits all of them in one line.
        writer = ShardWriter(out, CROSS_PREFIX, config.output, start, lambda shard, _keys: shards.append(shard))
        failed: list[str] = []
        try:
            for plan in sorted(plans, key=lambda p: samples[p.base].key):
                sample = _try_build(out, samples, plan, embeddings, config_face_thresholds(config), failed)
                if sample is None:
                    continue
                shard = writer.write(sample)
                rows.append({"key": sample["__key__"], "shard": shard, "base": samples[plan.base].key,
                             "kinds": plan.kinds()})
        finally:
            writer.close()
        if failed:
            warn_all(console, failed, "cross-pairs")
            info["skipped"]["unreadable"] = len(failed)

    kinds = Counter()
    for row in rows:
        kinds.update(row["kinds"])
    n_own = info["own"]
    entry = {
        "type": "cross",
        "own_digest": digest,
        "config": cfg.model_dump(mode="json"),
        "own": n_own,
        "target": info["target"],
        "share": round(len(rows) / (n_own + len(rows)), 4) if rows else 0.0,
        "kinds": dict(kinds),
        "info": {k: v for k, v in info.items() if k not in ("own", "target")},
        "shards": shards,
        "samples": rows,
        "wall_s": round(time.time() - started, 3),
        "created": time.time(),
    }
    ledger.append(entry)
    superseded = (current or {}).get("shards", [])
    state.cross = entry
    names = {s["shard"] for s in shards}
    for old in superseded:
        if old["shard"] not in names:
            out.delete(check_shard(old["shard"], out))
    result = {k: v for k, v in entry.items() if k != "samples"}
    if console is not None:
        note = f" ({info['note']})" if info.get("note") else f" ({info['reason']})" if info.get("reason") else ""
        mix = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
        console.print(f"cross-pairs: {len(rows)} samples in {len(shards)} shards, share {entry['share']:.3f} "
                      f"(target {info['target']}); references replaced: {mix}{note}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# For the derived outputs (index.json, manifest.parquet, summary.json)


