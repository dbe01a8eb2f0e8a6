"""Hostile output directories for the readers of data made elsewhere (issue 20, docs/security.md): builders of
shards, tar members, KEY.json, images, index.json, ledger lines, config.yaml, manifests and whole directories
that whoever made a directory could hand over, and the hypothesis strategies that vary them.
tests/test_hostile_data.py runs every reader over them in a subprocess with a memory limit and a timeout.

Everything starts from a real, valid output directory (`build_valid_run`), copied per case (`HostileCase`), and
is then changed the way the maker of a directory can change it: any byte of any file, and what each path is (a
link, a FIFO, a device, a folder). A changed shard is resealed by default (`reseal`): index.json and the ledger
get its new size and sha256, as an attacker would write them, so a reader's hash check does not stop it before
the hostile bytes. Next to the directory each case has `outside/` (victim files that links point at and that
nothing may change) and `cwd/` (the readers' working directory, which must stay empty): `snapshot` of both before
and after a reader says whether it touched anything outside the directory.

Only the base is trusted: helpers that read shards here (`shard_spans`, `sample_metas`) read the base's own tars.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import stat
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st
from skimage import data as photos

from pipeline.core.config import OutputConfig
from pipeline.core.video import ClipEncoder
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import MANIFEST_SCHEMA, write_outputs
from pipeline.store.shards import ShardSink, sample_json
from pipeline.testing import synthetic_runs

BLOCK = 512
GIB = 1 << 30
SOURCES = 10  # one shard each (5 samples): a case spoils up to nine shards and leaves a good one
CLIP_SIZE = (64, 48)  # (width, height) of every base clip
CLIP_FRAMES = 6
# A key of the form the pipeline writes, used by no base sample: a member inserted under it passes name checks, so
# what is tested is its size or type.
HOSTILE_KEY = "00000000bad0bad0-0000000-0000090"

# Terminal control from data: OSC 52 (writes the clipboard), a title set, a screen clear, 8-bit CSI, and rich markup
# that would style or link the text if it reached a console as markup.
ESCAPES = ["\x1b]52;c;cHduZWQ=\x07", "\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "\x9b31m", "\x1b[31m",
           "[link=http://x]click[/link]", "[/x]", "[bold red]"]
ESCAPE_TEXT = "x" + "".join(ESCAPES) + "y"

# ---------------------------------------------------------------------------------------------------------------
# The valid base directory


def tiny_clip(width: int = CLIP_SIZE[0], height: int = CLIP_SIZE[1], frames: int = CLIP_FRAMES) -> bytes:
    """A real H.264 mp4: a pan over a photo, `frames` frames of `width` x `height`."""
    picture = photos.astronaut()
    encoder = ClipEncoder(width, height, 24, preset="ultrafast")
    for i in range(frames):
        crop = picture[i * 10:i * 10 + 300, i * 12:i * 12 + 400]
        encoder.add(np.ascontiguousarray(cv2.resize(crop, (width, height))))
    return encoder.finish()


def _enrich(sample: dict, row: dict, clip: dict, n: int, mp4: bytes) -> None:
    """What synthetic_runs' samples lack for every reader to accept them: a decodable clip with its facts, and
    what the refilter re-decides from (a face size for the human detection, each entity's instances)."""
    meta = synthetic_runs.enrich(json.loads(sample["json"]), n, metrics=True)
    meta["clip"] = {"width": CLIP_SIZE[0], "height": CLIP_SIZE[1], "num_frames": CLIP_FRAMES, "fps": 24.0,
                    "codec": "h264"}
    meta["keyframes"] = [{"at": 0.5, "frame": 2}]
    meta["detections"][0]["stats"]["face"]["size_px"] = 40
    for entity in meta["entities"]:
        if "reference" in entity:
            entity["instances"] = [entity["reference"]["detection"]]
    sample["json"], sample["mp4"] = sample_json(meta), mp4
    made = Counter(r["variant"] for e in meta["entities"] for r in e.get("references") or [])
    clip.update(variants=dict(made), requested=dict(made),
                instances={"total": 2, "valid": 1, "rejected": {"too_small": 1}})
    row.update(fps=24.0, width=CLIP_SIZE[0], height=CLIP_SIZE[1], num_frames=CLIP_FRAMES, brightness=100.0 + n,
               sharpness=300.0, faces=2, frontal_faces=2, entities=len(meta["entities"]))


def build_valid_run(out: Path, sources: int = SOURCES) -> Path:
    """A finished run that every reader accepts: `sources` sources of synthetic_runs.CLIPS_PER_SOURCE samples, one
    shard each, with real clips, references, masks, plates and face embeddings, the ledger, config.yaml and every
    derived file (index.json, manifest.parquet, summary.json, ...)."""
    out.mkdir(parents=True)
    synthetic_runs.write_config(out)
    ledger = Ledger(out)
    per_shard = synthetic_runs.CLIPS_PER_SOURCE
    sink = ShardSink(out, OutputConfig(shard_max_samples=per_shard), ledger, ledger.recover())
    mp4 = tiny_clip()
    for source in range(sources):
        entry, samples = synthetic_runs.source_entry_and_samples(source)
        for i, (sample, row, clip) in enumerate(zip(samples, entry["samples"], entry["clips"])):
            _enrich(sample, row, clip, source * per_shard + i, mp4)
        sink.add_source(entry, samples)
    sink.close()
    n = sources * per_shard
    ledger.append({"type": "run", "run": "000000000000", "started": 0.0, "wall_s": 10.0, "cpus": 2.0,
                   "sources": sources, "clips": n, "samples": n, "video_s": 20.0 * sources, "clips_per_s": n / 10,
                   "video_hours_per_day_per_core": 1.0, "mode": "sequential", "flow": {}, "version": "test"})
    write_outputs(out, Ledger(out).read())
    return out


def sample_metas(out: Path) -> dict[str, tuple[str, dict]]:
    """key -> (shard, KEY.json) of every sample of a trusted directory (the base), in shard order."""
    metas = {}
    for rel in shard_rels(out):
        with tarfile.open(out / rel) as tar:
            for member in tar:
                key, _, part = member.name.partition(".")
                if part == "json":
                    metas[key] = (rel, json.loads(tar.extractfile(member).read()))
    return metas


def shard_rels(out: Path) -> list[str]:
    """The shard urls of a trusted index.json (the base's)."""
    return [e["url"] for e in json.loads((out / "index.json").read_text())["shardlist"]]


# ---------------------------------------------------------------------------------------------------------------
# A case: a copy of the base with a victim area beside it


@dataclass
class HostileCase:
    """`root/out`: the directory under test (a copy of the base); `root/outside`: files links point at, which no
    reader may change; `root/cwd`: the readers' working directory; `root/results`: what readers are asked to
    write (a contact sheet, a refiltered run). `shards` and `keys` are the base's, as they were before any change.
    `env`: variables the readers run with (e.g. a lowered `S2V_LIMIT_MAX_PIXELS`)."""

    root: Path
    shards: list[str]
    keys: dict[str, str]  # key -> shard
    env: dict[str, str] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def keys_in(self, rel: str) -> list[str]:
        return [k for k, shard in self.keys.items() if shard == rel]

    def snapshot(self) -> dict[str, tuple]:
        """What is outside the directory: `outside/` and `cwd/`, by path (kind, size, content hash or link)."""
        return {**snapshot(self.outside, "outside"), **snapshot(self.cwd, "cwd")}


def new_case(base: Path, root: Path) -> HostileCase:
    """A fresh copy of `base` at `root/out` with its victim area: outside/victim.tar (a real shard, so a reader
    that follows a link to it reads good data and says nothing) and outside/victim.txt."""
    root.mkdir(parents=True)
    shutil.copytree(base, root / "out", symlinks=True)
    for folder in ("outside", "cwd", "results"):
        (root / folder).mkdir()
    shards = shard_rels(base)
    shutil.copyfile(base / shards[0], root / "outside" / "victim.tar")
    (root / "outside" / "victim.txt").write_text("a file outside the directory: nothing may change or delete it\n")
    keys = {key: rel for key, (rel, _) in sample_metas(base).items()}
    return HostileCase(root, shards, keys)


def snapshot(top: Path, label: str) -> dict[str, tuple]:
    """Every path below `top` (links not followed): kind and size, a sha256 for files, the target for links."""
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(folder) / name
            info = os.lstat(path)
            rel = f"{label}/{path.relative_to(top)}"
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[rel] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[rel] = (stat.S_IFMT(info.st_mode),)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Resealing: index.json and the ledger agree with a changed shard


def reseal(out: Path, rel: str) -> None:
    """Write the shard's current size and sha256 into index.json and its ledger line, as a forger would."""
    data = (out / rel).read_bytes()
    size, digest = len(data), hashlib.sha256(data).hexdigest()
    index = json.loads((out / "index.json").read_text())
    for entry in index["shardlist"]:
        if entry["url"] == rel:
            entry.update(filesize=size, sha256=digest)
    (out / "index.json").write_text(json.dumps(index, indent=2))
    lines = []
    for line in (out / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") in ("shard", "rejects") and entry.get("shard") == rel:
            entry.update(bytes=size, sha256=digest)
        lines.append(json.dumps(entry, separators=(",", ":")) + "\n")
    (out / "ledger.jsonl").write_text("".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Tar members as raw bytes


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE, linkname: str = "", fmt: int = tarfile.GNU_FORMAT,
           pax: dict | None = None, devmajor: int = 0, devminor: int = 0) -> bytes:
    """The header block(s) of one member declaring `size` bytes, whatever follows: GNU format writes sizes past
    8 GiB in base-256 and long names as a GNU long-name member, PAX as an extended header."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime, info.mode = size, kind, linkname, 0, 0o644
    info.devmajor, info.devminor = devmajor, devminor
    if pax:
        info.pax_headers = pax
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def member(name: str, data: bytes, **kw) -> bytes:
    """A whole member: header and data, padded to the block size."""
    return header(name, len(data), **kw) + padded(data)


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def sparse_gnu(name: str, realsize: int, stored: bytes = b"\x01" * BLOCK) -> bytes:
    """An old-GNU sparse member ('S'): `stored` bytes on disk that expand to `realsize` bytes (holes of zeros)
    when read; realsize past 8 GiB is written in base-256, as GNU tar does."""
    block = bytearray(header(name, len(stored), kind=tarfile.GNUTYPE_SPARSE))
    block[386:398] = tarfile.itn(realsize - len(stored), 12, tarfile.GNU_FORMAT)  # one region: the stored bytes,
    block[398:410] = tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT)  # at the end of the expanded file
    block[482] = 0  # no extension blocks
    block[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    return _with_checksum(block) + padded(stored)


def sparse_pax(name: str, realsize: int, stored: bytes = b"\x01" * BLOCK) -> bytes:
    """A PAX (GNU 1.0) sparse member: its data starts with a text sparse map, and expands to `realsize` bytes."""
    sparse_map = padded(f"1\n{realsize - len(stored)}\n{len(stored)}\n".encode())
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
           "GNU.sparse.realsize": str(realsize)}
    return header("GNUSparseFile.0/" + name, len(sparse_map) + len(stored), fmt=tarfile.PAX_FORMAT, pax=pax) \
        + sparse_map + padded(stored)


def pax_records(records: dict[str, str]) -> bytes:
    """The body of a PAX extended header: "LEN key=value\\n" records."""
    out = []
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        n = len(body) + len(str(len(body)))
        n = len(body) + len(str(n))  # the length counts its own digits
        out.append(str(n).encode() + body)
    return b"".join(out)


def pax_member(records: bytes, name: str, data: bytes) -> bytes:
    """A PAX extended header holding `records`, then the member it applies to."""
    return member("././@PaxHeader", records, kind=tarfile.XHDTYPE, fmt=tarfile.USTAR_FORMAT) + member(name, data)


def gnu_longname(long_name: bytes, declared: int | None = None) -> bytes:
    """A GNU long-name member ('L') holding `long_name` (or declaring `declared` bytes, past the file's end)."""
    size = len(long_name) + 1 if declared is None else declared
    body = b"" if declared is not None else padded(long_name + b"\x00")
    return header("././@LongLink", size, kind=tarfile.GNUTYPE_LONGNAME) + body


def gzip_bomb(inflated: int, name: str = f"{HOSTILE_KEY}.mp4") -> bytes:
    """A gzip file (concatenated gzip members, as `cat a.gz b.gz` makes) that inflates to a tar holding one member
    of `inflated` zero bytes: a few KB per GiB... times a thousand."""
    chunk = gzip.compress(bytes(1 << 20), 9, mtime=0)
    return (gzip.compress(header(name, inflated), mtime=0) + chunk * (inflated >> 20)
            + gzip.compress(bytes(2 * BLOCK), mtime=0))


@dataclass(frozen=True)
class MemberCase:
    """One kind of hostile tar member. `build(name, data)` gives its raw bytes from the name and data of the member
    it is placed at: in `replace` mode it stands in for that member, in `insert` mode it goes before it.
    `ends_file`: it declares more than is left, so the file ends with it. `verify_reports`: it is the only thing
    wrong with its shard, and a correct `s2v shards verify` must report it (the others are valid tars a reader may
    take, with headers of megabytes)."""

    build: Callable[[str, bytes], bytes]
    mode: str = "replace"
    ends_file: bool = False
    verify_reports: bool = True


MEMBER_CASES: dict[str, MemberCase] = {
    "sparse_gnu_2g": MemberCase(lambda n, d: sparse_gnu(n, 2 * GIB)),
    "sparse_gnu_40g": MemberCase(lambda n, d: sparse_gnu(n, 40 * GIB)),
    "sparse_pax_2g": MemberCase(lambda n, d: sparse_pax(n, 2 * GIB)),
    "size_past_end": MemberCase(lambda n, d: header(n, GIB) + d[:100], ends_file=True),
    "size_40g_past_end": MemberCase(lambda n, d: header(n, 40 * GIB) + d[:100], ends_file=True),
    "over_part_cap": MemberCase(lambda n, d: member(f"{HOSTILE_KEY}.json", b" " * (9 << 20) + b"{}"), mode="insert"),
    "pax_header_declared_1g": MemberCase(
        lambda n, d: header("././@PaxHeader", GIB, kind=tarfile.XHDTYPE, fmt=tarfile.USTAR_FORMAT) + b"30 x=1\n",
        ends_file=True),
    "pax_header_4mb": MemberCase(lambda n, d: pax_member(pax_records({"comment": "c" * (4 << 20)}), n, d),
                                 verify_reports=False),
    "pax_many_records": MemberCase(
        lambda n, d: pax_member(pax_records({f"S2V.{i}": "v" for i in range(100_000)}), n, d), verify_reports=False),
    "pax_path_200k": MemberCase(lambda n, d: pax_member(pax_records({"path": n + "/" + "a" * 200_000}), n, d)),
    "gnu_longname_1mb": MemberCase(lambda n, d: gnu_longname(b"k" * (1 << 20) + b".json") + member(n, d)),
    "gnu_longname_declared_1g": MemberCase(lambda n, d: gnu_longname(b"", declared=GIB) + b"k" * 100,
                                           ends_file=True),
    "symlink_member": MemberCase(lambda n, d: header(n, 0, kind=tarfile.SYMTYPE, linkname="/etc/passwd")),
    "symlink_outside": MemberCase(
        lambda n, d: header(n, 0, kind=tarfile.SYMTYPE, linkname="../../outside/victim.txt")),
    "hardlink_member": MemberCase(lambda n, d: header(n, 0, kind=tarfile.LNKTYPE, linkname="/etc/passwd")),
    "char_device": MemberCase(lambda n, d: header(n, 0, kind=tarfile.CHRTYPE, devmajor=1, devminor=5)),
    "block_device": MemberCase(lambda n, d: header(n, 0, kind=tarfile.BLKTYPE, devmajor=8, devminor=0)),
    "fifo_member": MemberCase(lambda n, d: header(n, 0, kind=tarfile.FIFOTYPE)),
    "directory_member": MemberCase(lambda n, d: header(n + "/", 0, kind=tarfile.DIRTYPE)),
    "contiguous_member": MemberCase(lambda n, d: member(n, d, kind=tarfile.CONTTYPE)),
    "unknown_type": MemberCase(lambda n, d: member(n, d, kind=b"Z")),
    "bad_checksum": MemberCase(lambda n, d: bytes(1) + member(n, d)[1:]),
    "garbage_header": MemberCase(lambda n, d: bytes(range(256)) * 2 + padded(d)),
    "readme": MemberCase(lambda n, d: member("README", b"not a sample\n"), mode="insert"),
    "nested_name": MemberCase(lambda n, d: member("x.y/z", b"not a sample\n"), mode="insert"),
    "traversal_name": MemberCase(lambda n, d: member("../../outside/victim.txt", b"overwritten\n"), mode="insert"),
    "absolute_name": MemberCase(lambda n, d: member("/tmp/s2v-hostile-absolute.json", b"{}"), mode="insert"),
    "dot_key": MemberCase(lambda n, d: member(".json", d), mode="insert"),
    "escape_name": MemberCase(lambda n, d: member(ESCAPES[0] + ".json", d), mode="insert"),
}

# Whole-shard replacements: fn(the shard's bytes) -> the new bytes.
SHARD_CASES: dict[str, Callable[[bytes], bytes]] = {
    "gzip_bomb_2g": lambda data: gzip_bomb(2 * GIB),
    "gzip_shard": lambda data: gzip.compress(data, mtime=0),
    "bzip2_magic": lambda data: b"BZh9" + data,
    "garbage": lambda data: bytes(range(256)) * 64,
    "empty": lambda data: b"",
    "cut_mid_member": lambda data: data[: len(data) // 2 + 7],
    "eof_blocks_only": lambda data: bytes(2 * BLOCK),
}


def shard_spans(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, name) of each member of a trusted tar: header start to padded data end."""
    spans = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            spans.append((info.offset, info.offset_data + -(-info.size // BLOCK) * BLOCK, info.name))
    return spans


def spoil_shard(case: HostileCase, rel: str, name: str, position: int, seal: bool = True) -> str:
    """Apply MEMBER_CASES[name] (or SHARD_CASES[name]) to shard `rel` of the case, at member `position` (taken
    modulo the member count); returns the member name it stood in for or was put before."""
    path = case.out / rel
    data = path.read_bytes()
    if name in SHARD_CASES:
        path.write_bytes(SHARD_CASES[name](data))
        spanned = ""
    else:
        spans = shard_spans(data)
        start, end, spanned = spans[position % len(spans)]
        spec = MEMBER_CASES[name]
        original = _member_data(data, start, end)
        hostile = spec.build(spanned, original)
        tail = b"" if spec.ends_file else (data[start:] if spec.mode == "insert" else data[end:])
        path.write_bytes(data[:start] + hostile + tail)
    if seal:
        reseal(case.out, rel)
    return spanned


def insert_raw(case: HostileCase, rel: str, raw: bytes, position: int, seal: bool = True) -> None:
    """Put the raw member bytes `raw` (e.g. from `random_member`) before member `position` (modulo the member
    count) of shard `rel`."""
    path = case.out / rel
    data = path.read_bytes()
    spans = shard_spans(data)
    start = spans[position % len(spans)][0]
    path.write_bytes(data[:start] + raw + data[start:])
    if seal:
        reseal(case.out, rel)


def _member_data(data: bytes, start: int, end: int) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data[start:end] + bytes(2 * BLOCK))) as tar:
        info = tar.next()
        return tar.extractfile(info).read()


def replace_member(case: HostileCase, key: str, part: str, payload: bytes, seal: bool = True) -> None:
    """Give `KEY.part` of the base sample `key` the bytes `payload` (added at the sample's end if it had none)."""
    rel = case.keys[key]
    path = case.out / rel
    data = path.read_bytes()
    spans = shard_spans(data)
    name = f"{key}.{part}"
    new = member(name, payload, fmt=tarfile.PAX_FORMAT)
    own = [s for s in spans if s[2] == name]
    if own:
        start, end, _ = own[0]
    else:
        start = end = max(e for s, e, n in spans if n.startswith(key + "."))
    path.write_bytes(data[:start] + new + data[end:])
    if seal:
        reseal(case.out, rel)


# ---------------------------------------------------------------------------------------------------------------
# KEY.json


def _first_referenced(meta: dict) -> dict | None:
    return next((e for e in meta.get("entities", []) if e.get("references")), None)


def _set_ids(field_name: str, value):
    def change(meta: dict) -> dict:
        entity = _first_referenced(meta) or meta["entities"][0]
        entity[field_name] = value
        for ref in entity.get("references") or []:
            ref[field_name] = value
        return meta
    return change


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _raw(meta: dict, placeholder_path: tuple, raw: str) -> bytes:
    """`meta` as JSON with the raw JSON text `raw` at `placeholder_path` (for values json.dumps cannot write)."""
    marker = "\u2063S2V-RAW\u2063"
    target = meta
    for step in placeholder_path[:-1]:
        target = target.setdefault(step, {})
    target[placeholder_path[-1]] = marker
    return json.dumps(meta).replace(json.dumps(marker), raw).encode()


@dataclass(frozen=True)
class MetaCase:
    """A hostile KEY.json made from a real one: `build(meta)` returns the new bytes. `skip`: it is not a KEY.json
    this project writes (docs/output-format.md; pipeline/store/sample_meta.py), so the trainer must skip the
    sample; otherwise the sample may be used or skipped, but nothing may crash."""

    build: Callable[[dict], bytes]
    skip: bool = True
    ends_shard: bool = False  # over a read limit of the tar member itself: readers leave the rest of its shard


def _change(fn: Callable[[dict], object]) -> Callable[[dict], bytes]:
    """A MetaCase builder from a function that edits the meta in place (or returns a replacement)."""
    def build(meta: dict) -> bytes:
        result = fn(meta)
        return json.dumps(meta if result is None else result, allow_nan=True).encode()
    return build


def _put(path: tuple, value) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        target = meta
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return change


META_CASES: dict[str, MetaCase] = {
    "subject_id_-1": MetaCase(_change(_set_ids("subject_id", -1))),
    "subject_id_1e30": MetaCase(_change(_set_ids("subject_id", 1e30))),
    "subject_id_300000000": MetaCase(_change(_set_ids("subject_id", 300_000_000))),
    "view_id_1e30": MetaCase(_change(_set_ids("view_id", 1e30))),
    "group_huge": MetaCase(_change(_set_ids("group", "g" + "9" * 5000))),
    "clip_height_0.5": MetaCase(_change(_put(("clip", "height"), 0.5))),
    "clip_num_frames_0": MetaCase(_change(_put(("clip", "num_frames"), 0))),
    "clip_num_frames_1e12": MetaCase(_change(_put(("clip", "num_frames"), 10**12))),
    # Within the pixel limit, but a reader that sizes its frames from KEY.json instead of the video scales a
    # 64-pixel-wide bucket to 32 million rows.
    "clip_2x1000000": MetaCase(_change(lambda m: m["clip"].update(width=2, height=1_000_000)), skip=False),
    "clip_width_string": MetaCase(_change(_put(("clip", "width"), "64"))),
    "fps_nan": MetaCase(_change(_put(("clip", "fps"), math.nan))),
    "box_infinity": MetaCase(_change(lambda m: _first_referenced(m)["references"][0].update(
        box=[0, 0, math.inf, 10]))),
    "box_1e308": MetaCase(_change(lambda m: _first_referenced(m)["references"][0].update(
        box=[0, 0, 1e308, 1e308])), skip=False),
    "keyframe_1e12": MetaCase(_change(_put(("keyframes", 0, "frame"), 10**12))),
    "deep_nesting_100k": MetaCase(lambda m: _raw(m, ("stats", "deep"), _deep(100_000))),
    "huge_caption_6mb": MetaCase(_change(_put(("caption", "text"), "a" * (6 << 20))), skip=False),
    "huge_word_1mb": MetaCase(_change(lambda m: m["entities"][0].update(word="w" * (1 << 20))), skip=False),
    "over_json_limit_9mb": MetaCase(_change(_put(("stats", "pad"), "p" * (9 << 20))), ends_shard=True),
    "entities_object": MetaCase(_change(_put(("entities",), {"e0": {"kind": "subject"}}))),
    "references_number": MetaCase(_change(lambda m: _first_referenced(m).update(references=5))),
    "reference_file_traversal": MetaCase(_change(lambda m: _first_referenced(m)["references"][0].update(
        file="../../outside/victim.txt"))),
    "caption_list": MetaCase(_change(_put(("caption",), ["a", "b"]))),
    "clip_string": MetaCase(_change(_put(("clip",), "64x48"))),
    "many_references": MetaCase(_change(lambda m: _first_referenced(m).update(
        references=_first_referenced(m)["references"] * 300))),
    "top_level_list": MetaCase(lambda m: b"[]"),
    "not_utf8": MetaCase(lambda m: b"\xff\xfe{\x00"),
    "truncated": MetaCase(lambda m: json.dumps(m).encode()[:40]),
}


def place_meta_cases(metas: dict[str, tuple[str, dict]], names) -> dict[str, str]:
    """case name -> the key of the sample that gets it: samples with references (every case has one to spoil),
    in shard order; a case that ends its shard on the last sample of a shard, so no other case is cut off."""
    referenced = [k for k, (_, meta) in metas.items() if any(e.get("references") for e in meta["entities"])]
    last = {shard: key for key, (shard, _) in metas.items()}  # each shard's last sample (dicts keep tar order)
    enders = [n for n in names if META_CASES[n].ends_shard]
    tails = [k for k in list(last.values())[::-1] if k in referenced][:len(enders)]
    chosen = dict(zip(enders, tails))
    chosen.update(zip([n for n in names if n not in chosen], [k for k in referenced if k not in tails]))
    return chosen


def write_metas(case: HostileCase, metas: dict[str, bytes]) -> None:
    """Replace the KEY.json of each base sample `key` with `metas[key]`, each shard rewritten and resealed once."""
    by_shard: dict[str, list[str]] = {}
    for key in metas:
        by_shard.setdefault(case.keys[key], []).append(key)
    for rel, keys in by_shard.items():
        for key in keys:
            replace_member(case, key, "json", metas[key], seal=False)
        reseal(case.out, rel)


# Strings worth trying anywhere a KEY.json holds text: names that address files, names of members, escapes.
SPECIAL_STRINGS = ["", "ref0.png", "../../outside/victim.txt", "/etc/passwd", "g0", "g-1", "g99999999",
                   "subject", "background", "bg.png", "\x00", "e0", *ESCAPES]


def json_values() -> st.SearchStrategy:
    """Any JSON value, and a few a strict parser refuses (NaN, infinities, integers past 64 bits)."""
    leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([-1, 0, 1, 300_000_000])
              | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e30, 0.5, -0.0, 1e308])
              | st.text(max_size=40) | st.sampled_from(SPECIAL_STRINGS))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8) | st.sampled_from(["file", "subject_id", "kind"]),
                                          inner, max_size=4), max_leaves=12)


@st.composite
def json_path(draw, value) -> tuple:
    """A path into `value` (keys and indices), ending anywhere from its first level down."""
    path: list = []
    while isinstance(value, (dict, list)) and value:
        step = draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        path.append(step)
        value = value[step]
        if not draw(st.integers(0, 3)):  # stop here one time in four
            break
    return tuple(path)


@st.composite
def substituted_meta(draw, meta: dict) -> bytes:
    """A real KEY.json with random JSON values put at 1-3 random paths (or keys deleted there), as bytes."""
    meta = copy.deepcopy(meta)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(json_path(meta))
        if not path:
            meta = draw(json_values()) if draw(st.booleans()) else meta
            continue
        target = meta
        for step in path[:-1]:
            target = target[step]
        if draw(st.integers(0, 4)) == 0 and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = draw(json_values())
        if not isinstance(meta, dict):
            break
    return json.dumps(meta, allow_nan=True).encode()


@st.composite
def random_member(draw) -> bytes:
    """A tar member with arbitrary header fields (type, declared size, name, link, format) and some data."""
    kind = bytes([draw(st.sampled_from(list(b"0123456789AgxKLSVDMNZ\x00")))])
    name = draw(st.sampled_from([f"{HOSTILE_KEY}.json", f"{HOSTILE_KEY}.mp4", f"{HOSTILE_KEY}.ref0.png"])
                | st.text(min_size=1, max_size=120))
    size = draw(st.sampled_from([0, 1, BLOCK, GIB, 2 * GIB, 40 * GIB, 2**40]) | st.integers(0, 1 << 24))
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    linkname = draw(st.sampled_from(["", "/etc/passwd", "../../outside/victim.txt"]))
    body = draw(st.binary(max_size=2 * BLOCK))
    try:
        head = header(name, size, kind=kind, linkname=linkname, fmt=fmt)
    except (ValueError, UnicodeError):
        head = header(HOSTILE_KEY + ".json", size, kind=kind, linkname=linkname, fmt=tarfile.GNU_FORMAT)
    return head + padded(body)


# ---------------------------------------------------------------------------------------------------------------
# Decoded-size bombs


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 13_000, height: int = 13_000) -> bytes:
    """A valid 1-bit PNG of `width` x `height` black pixels: about 20 KB that decode to 169 Mpx (a reader that
    converts it to RGB holds half a gigabyte)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header declares `width` x `height` RGBA (14 GB decoded) and whose data is one short row: a
    decoder that allocates from the header before it reads the data blows its memory."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 4 * 16))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def npy_header_bomb(rows: int = 100_000, cols: int = 100_000) -> bytes:
    """A .npy whose header declares a float32 (rows, cols) array (40 GB) over 16 bytes of data."""
    head = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}".encode()
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + bytes(16)


def npy_object() -> bytes:
    """A .npy of dtype object: loading it means unpickling (refused with allow_pickle=False)."""
    head = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + b"\x80\x04N."


# ---------------------------------------------------------------------------------------------------------------
# Special files and links in the directory


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    """A character device reading endless zeros at `path` (mknod where permitted, else a link to /dev/zero)."""
    path.unlink(missing_ok=True)
    try:
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    except OSError:
        os.symlink("/dev/zero", path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _link(path: Path, target: str | Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    os.symlink(target, path)


def _linked_folder(case: HostileCase, rel: str, extra: list[str]) -> None:
    """`out/rel` becomes a link to outside/linked-REL, which holds what `rel` held plus `extra` files that no
    ledger line names (recovery deletes such files from a real folder: never through the link)."""
    target = case.outside / f"linked-{rel.strip('.')}"
    source = case.out / rel
    if source.is_dir() and not source.is_symlink():
        shutil.move(source, target)
    else:
        target.mkdir()
    for name in extra:
        (target / name).write_text("outside the directory: recovery must not delete this\n")
    os.symlink(target, source)


def _shard_path(case: HostileCase, i: int) -> Path:
    return case.out / case.shards[i % len(case.shards)]


DIR_CASES: dict[str, Callable[[HostileCase], None]] = {
    "shard_symlink_outside": lambda c: _link(_shard_path(c, 0), c.outside / "victim.tar"),
    "shard_fifo": lambda c: _fifo(_shard_path(c, 1)),
    "shard_folder": lambda c: _folder(_shard_path(c, 2)),
    "shard_char_device": lambda c: _dev_zero(_shard_path(c, 3)),
    "unlisted_fifo_shard": lambda c: _fifo(c.out / "shards" / "train-000777.tar"),
    "shards_dir_link": lambda c: _linked_folder(c, "shards", ["train-000099.tar", "victim.txt"]),
    "rejects_dir_link": lambda c: _linked_folder(c, "rejects", ["rejects-000099.tar"]),
    "staging_dir_link": lambda c: _linked_folder(c, ".staging", ["run0-sample.tar"]),
    "ledger_dev_zero": lambda c: _link(c.out / "ledger.jsonl", "/dev/zero"),
    "ledger_fifo": lambda c: _fifo(c.out / "ledger.jsonl"),
    "ledger_link_outside": lambda c: _link(c.out / "ledger.jsonl", c.outside / "victim.txt"),
    "index_fifo": lambda c: _fifo(c.out / "index.json"),
    "index_dev_zero": lambda c: _link(c.out / "index.json", "/dev/zero"),
    "manifest_urandom": lambda c: _link(c.out / "manifest.parquet", "/dev/urandom"),
    "manifest_fifo": lambda c: _fifo(c.out / "manifest.parquet"),
    "config_link_outside": lambda c: _link(c.out / "config.yaml", c.outside / "victim.txt"),
    "config_dev_zero": lambda c: _link(c.out / "config.yaml", "/dev/zero"),
    "summary_dev_zero": lambda c: _link(c.out / "summary.json", "/dev/zero"),
}
# Applied last: they move folders that the cases above change in place.
DIR_CASES_LAST = ("shards_dir_link", "rejects_dir_link", "staging_dir_link")


def apply_dir_cases(case: HostileCase, names) -> None:
    for name in sorted(names, key=lambda n: (n in DIR_CASES_LAST, n)):
        DIR_CASES[name](case)


# ---------------------------------------------------------------------------------------------------------------
# config.yaml


def billion_laughs(indent: str = "") -> str:
    """The classic: nine levels of nine aliases, 9**9 strings once expanded, in about 430 bytes (`indent`: to nest
    the anchors under a key)."""
    lines = [f'{indent}a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{indent}a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def _laughs_at(section: str, key: str) -> Callable[[str], str]:
    """A valid config.yaml, the laughs' anchors under a key of their own, and `section`: {`key`: *a8} at the end
    (a repeated top-level key: YAML loaders keep the last one)."""
    def build(config: str) -> str:
        return "laughs:\n" + billion_laughs("  ") + config + f"{section}:\n  {key}: *a8\n"
    return build


YAML_CASES: dict[str, Callable[[str], str]] = {
    "laughs_document": lambda config: billion_laughs(),
    "laughs_extra_key": _laughs_at("s2v_extra", "lol"),
    "laughs_in_ratio": _laughs_at("references", "ratio"),
    "recursive_alias": lambda config: "a: &a [*a]\n" + config,
    "deep_flow_100k": lambda config: _deep(100_000) + "\n",
    "python_tag": lambda config: "!!python/object/apply:os.system ['touch outside/pwned']\n",
    "not_utf8": lambda config: "\udcff\udcfe" + config,
}


def write_config_case(case: HostileCase, name: str) -> None:
    path = case.out / "config.yaml"
    path.write_bytes(YAML_CASES[name](path.read_text()).encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------------------------------------------
# manifest.parquet


def write_huge_manifest(path: Path, rows: int = 12_000_000, key: str = "k", shard: str = "shards/x.tar",
                        chunk: int = 1_000_000) -> None:
    """manifest.parquet with `rows` rows of one repeated value (about 1 MB: dictionary and run-length encoding),
    in row groups of `chunk` rows; the columns are the real manifest's."""
    columns = []
    for column in MANIFEST_SCHEMA:
        if pa.types.is_string(column.type):
            value = {"key": key, "shard": shard}.get(column.name, "x")
            dictionary = pa.DictionaryArray.from_arrays(pa.array(np.zeros(chunk, np.int32)), pa.array([value]))
            columns.append(dictionary.dictionary_decode())
        else:
            columns.append(pa.array(np.zeros(chunk)).cast(column.type))
    table = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)
    with pq.ParquetWriter(path, MANIFEST_SCHEMA, compression="zstd") as writer:
        for _ in range(rows // chunk):
            writer.write_table(table, row_group_size=chunk)


MANIFEST_CASES: dict[str, Callable[[HostileCase, bytes], bytes]] = {
    "rows_12m": lambda case, huge: huge,
    "garbage": lambda case, huge: b"PAR1" + bytes(range(256)) * 8 + b"PAR1",
    "wrong_types": lambda case, huge: _parquet_bytes(pa.table({"key": [1, 2], "shard": [[1], [2]]})),
    "truncated": lambda case, huge: (case.out / "manifest.parquet").read_bytes()[:-9],
}


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# index.json


def outside_urls(case: HostileCase) -> list[str]:
    """Shard urls that address something outside `shards/` of the directory."""
    return ["../outside/victim.tar", str(case.outside / "victim.tar"), "shards/../../outside/victim.tar",
            "shards/../index.json", f"file://{case.outside / 'victim.tar'}", "/dev/zero", "shards/",
            "shards/" + "a" * 300 + ".tar"]


def _index_entries(case: HostileCase, change: Callable[[list[dict]], list]) -> Callable[[dict], dict]:
    def build(index: dict) -> dict:
        index["shardlist"] = change(index["shardlist"])
        return index
    return build


def _pairs(entries: list[dict], field_name: str, values: list) -> list[dict]:
    for entry, value in zip(entries, values):
        entry[field_name] = value
    return entries


INDEX_CASES: dict[str, Callable[[HostileCase], Callable[[dict], object]]] = {
    "url_not_string": lambda c: _index_entries(c, lambda s: _pairs(s, "url", [5, None, [s[2]["url"]], {"a": 1}])),
    "url_outside": lambda c: _index_entries(c, lambda s: [dict(s[0], url=u) for u in outside_urls(c)] + s),
    "url_escape": lambda c: _index_entries(c, lambda s: s[:-1] + [dict(s[-1], url=f"shards/{ESCAPE_TEXT}.tar")]),
    "duplicate_urls": lambda c: _index_entries(c, lambda s: s + s + [s[0]] * 20),
    "nsamples_strings": lambda c: _index_entries(
        c, lambda s: _pairs(s, "nsamples", ["5", "1e30", -1, 1e30, None, True])),
    "sizes_wrong": lambda c: _index_entries(c, lambda s: _pairs(s, "filesize", ["x", -1, 1e300])),
    "sha_wrong": lambda c: _index_entries(c, lambda s: _pairs(s, "sha256", [5, None, "0" * 64])),
    "shardlist_object": lambda c: lambda index: dict(index, shardlist={"url": "shards/train-000000.tar"}),
    "entries_not_objects": lambda c: _index_entries(c, lambda s: [5, "shards/train-000000.tar", None, []] + s),
    "total_string": lambda c: lambda index: dict(index, total_samples="many"),
    "top_level_list": lambda c: lambda index: [index],
    "deep_100k": lambda c: lambda index: _deep(100_000).encode(),
    "nan": lambda c: lambda index: b'{"shardlist": [{"url": "shards/train-000000.tar", "nsamples": NaN}]}',
    "not_utf8": lambda c: lambda index: b"\xff\xfe\x00{",
    "empty_file": lambda c: lambda index: b"",
}


def write_index_case(case: HostileCase, names) -> None:
    """Apply INDEX_CASES in order to index.json (a case that writes bytes ends the chain)."""
    index: object = json.loads((case.out / "index.json").read_text())
    for name in names:
        if isinstance(index, dict):
            index = INDEX_CASES[name](case)(index)
    body = index if isinstance(index, bytes) else json.dumps(index, indent=2, allow_nan=True).encode()
    (case.out / "index.json").write_bytes(body)


@st.composite
def index_entries(draw, case: HostileCase) -> list:
    """A shardlist of 1-8 entries mixing real entries, entries with hostile fields, and non-entries."""
    real = json.loads((case.out / "index.json").read_text())["shardlist"]
    urls = st.sampled_from([e["url"] for e in real] + outside_urls(case)) | json_values()
    entry = st.fixed_dictionaries({"url": urls}, optional={"nsamples": json_values() | st.integers(-5, 10**12),
                                                          "filesize": json_values(), "sha256": json_values()})
    return draw(st.lists(st.sampled_from(real) | entry | json_values(), min_size=1, max_size=8))


# ---------------------------------------------------------------------------------------------------------------
# ledger.jsonl


def orphan_lines(case: HostileCase) -> list[str]:
    """Shard lines whose samples no source commits: recovery deletes an orphaned shard, so each names a file
    outside `shards/` (it must stay)."""
    names = outside_urls(case)[:5] + ["rejects/../../outside/victim.txt", "shards/../ledger.jsonl"]
    return [json.dumps({"type": "shard", "shard": name, "nsamples": 1, "bytes": 1, "sha256": "0" * 64,
                        "keys": [HOSTILE_KEY], "sources": []}) for name in names]


def junk_lines(case: HostileCase) -> list[str]:
    """Lines that are not entries this project writes: over the line limit, nested deep, wrong types, NaN, bytes
    that are not UTF-8, and a source whose path and reasons carry escapes."""
    source = {"type": "source", "path": f"/v/{ESCAPE_TEXT}.mp4", "source_id": "e" * 16, "size": 1, "mtime_ns": 1,
              "duration_s": 1.0, "status": "curated", "samples": [],
              "clips": [{"key": HOSTILE_KEY, "status": "dropped", "stage": ESCAPE_TEXT, "reason": ESCAPE_TEXT}],
              "errors": [{"source": ESCAPE_TEXT, "stage": "probe", "reason": ESCAPE_TEXT, "message": ESCAPE_TEXT}],
              "warnings": [{"stage": "probe", "message": ESCAPE_TEXT}]}
    return ['{"type": "source", "pad": "' + "p" * (9 << 20) + '"}', _deep(100_000),
            '{"type": "shard", "shard": 5, "keys": "abc", "nsamples": "5", "sources": {"a": 1}}',
            '{"type": "source", "source_id": 5, "samples": "x", "path": null}',
            '{"type": "run", "wall_s": "fast", "cpus": NaN, "samples": 1e400}',
            '{"type": "cross", "shards": 5}', '{"type": "rejects", "shard": [], "reasons": 5}',
            "\udcff\udcfe garbage", json.dumps(source), json.dumps([1, 2, 3]), "null", "1e999999"]


def append_ledger(case: HostileCase, lines: list[str]) -> None:
    with open(case.out / "ledger.jsonl", "ab") as f:
        f.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------------------------------------------
# Terminal injection


def inject_escapes(case: HostileCase) -> list[str]:
    """Escapes and markup everywhere a reader might print text from the directory: KEY.json words, categories,
    captions, labels and the key field of every sample of the first shard, a tar member named with escapes, ledger
    paths, stages and reasons. (An index.json url with escapes is INDEX_CASES["url_escape"]: it makes `show`
    refuse the directory before it renders a sample.) Returns the keys whose KEY.json changed."""
    metas = sample_metas(case.out)
    changed = {}
    for key in case.keys_in(case.shards[0]):
        meta = metas[key][1]
        meta["caption"]["text"] = ESCAPE_TEXT
        meta["key"] = ESCAPE_TEXT
        for entity in meta["entities"]:
            entity.update(word=ESCAPE_TEXT, category=ESCAPE_TEXT)
            for ref in entity.get("references") or []:
                ref.update(variant=ESCAPE_TEXT, source_key=ESCAPE_TEXT)
        for detection in meta["detections"]:
            detection.update(label=ESCAPE_TEXT, rejected=[ESCAPE_TEXT])
        meta["warnings"] = [ESCAPE_TEXT]
        meta["provenance"] = {"stages": {ESCAPE_TEXT: ESCAPE_TEXT}}
        changed[key] = json.dumps(meta).encode()
    write_metas(case, changed)
    spoil_shard(case, case.shards[1], "escape_name", 0)
    append_ledger(case, junk_lines(case)[8:9])
    return list(changed)
