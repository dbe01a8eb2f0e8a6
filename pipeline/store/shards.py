"""The one shard writer and the one shard reader, on any storage (pipeline/core/storage.py), and how finished
samples become committed shards without passing through the driver.

Writing. A shard is published whole (storage.open_write: fsync + rename on POSIX, one put on an object store) and
only then committed by a ledger line (pipeline/store/ledger.py). Tar headers carry mtime 0, so the same samples
give the same bytes.

Where samples are written. The worker that finishes a clip writes its sample as a small tar under
`.staging/RUN/KEY.tar` and sends the driver only its digest (pipeline/store/assemble.py). When every clip of a source
has arrived, the driver groups whole sources into shards (`ShardAssembler`) and has each shard assembled from the
staged samples by a task on a worker node (`assemble_shard`), which publishes it. The driver then commits the
group (its shard lines, the last carrying the entries of the sources they complete) and deletes its staged files.
So a shard only ever holds whole sources, a crash leaves only uncommitted debris (`Ledger.recover` removes it), and
the sample bytes go worker -> storage -> worker -> storage, never through the driver.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.core.config import OutputConfig
from pipeline.core.errors import UserFacingError
from pipeline.core.names import split_member
from pipeline.core.storage import TMP_SUFFIX, open_storage, parent
from pipeline.core.storage import name as name_of
from pipeline.core.untrusted import ReadLimits, read_limits
from pipeline.store.ledger import REJECTS_DIR, SHARD_DIR, STAGING_DIR, Ledger, LedgerState, as_storage

__all__ = ["TMP_SUFFIX", "ShardError", "ShardWriter", "ShardSink", "ShardAssembler", "iter_members", "iter_samples",
           "read_shard_samples"]


def shard_number(name: str) -> int:
    return int(Path(name).name.split(".")[0].rsplit("-", 1)[1])


class _Counting:
    """A write-only file that hashes and counts what passes through to `target`."""

    def __init__(self, target: BinaryIO):
        self.target, self.size, self.sha = target, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.target.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.target.flush()


class ShardWriter:
    """The one shard writer: samples ({"__key__", ext: bytes}) into `directory/{prefix}-NNNNNN.tar` of an output
    (a path, a URI or a Storage), a new shard when the open one is full (`cfg.shard_max_samples` or
    `cfg.shard_max_mb`), each published whole and then handed to `on_shard` as {"shard", "nsamples", "bytes",
    "sha256"} with the keys it holds."""

    def __init__(self, out, prefix: str, cfg: OutputConfig | None, start: int,
                 on_shard: Callable[[dict, list[str]], None], directory: str = SHARD_DIR, name: str | None = None):
        self.storage = as_storage(out)
        self.name = name  # one shard of this exact path (`write_shard`), instead of numbered ones
        self.prefix, self.directory, self.on_shard = prefix, directory, on_shard
        self.max_count = cfg.shard_max_samples if cfg else None
        self.max_bytes = cfg.shard_max_mb * 1e6 if cfg else None
        self.next = start
        self._rel: str | None = None
        self._context = self._file = self._tar = None
        self._keys: list[str] = []

    @property
    def count(self) -> int:
        return len(self._keys)

    def _full(self, nsamples: int = 1, nbytes: int = 0) -> bool:
        if self._tar is None or not self._keys:
            return False
        return ((self.max_count is not None and self.count + nsamples > self.max_count)
                or (self.max_bytes is not None and self._file.size + nbytes > self.max_bytes))

    def keep_together(self, nsamples: int, nbytes: int) -> None:
        """Start a new shard unless these samples fit in the open one (a source's samples stay in one shard)."""
        if self._full(nsamples, nbytes):
            self._finish()

    def write(self, sample: dict) -> str:
        """Write one sample; returns the shard it goes into, relative to the output."""
        if self._full():
            self._finish()
        if self._tar is None:
            self._begin(self.name or f"{self.directory}/{self.prefix}-{self.next:06d}.tar")
            self.next += 1
        self._tar.write(sample)
        self._keys.append(sample["__key__"])
        return self._rel

    def _begin(self, rel: str) -> None:
        self._rel = rel
        self._context = self.storage.open_write(rel)
        self._file = _Counting(self._context.__enter__())
        # Imported here: webdataset imports torch (1.4 s), which no read-only command (stats, show) needs.
        import webdataset as wds

        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)  # reproducible tar headers

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        context, self._context, self._tar = self._context, None, None
        context.__exit__(None, None, None)  # published: renamed into place, or uploaded
        keys, self._keys = self._keys, []
        self.on_shard({"shard": self._rel, "nsamples": len(keys), "bytes": self._file.size,
                       "sha256": self._file.sha.hexdigest()}, keys)

    def abort(self) -> None:
        """Drop the open shard unpublished (an error while filling it)."""
        if self._context is not None:
            context, self._context, self._tar = self._context, None, None
            context.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._keys = []

    def close(self) -> None:
        self._finish()


def write_shard(out, rel: str, samples: Iterable[dict]) -> dict:
    """One whole shard at `rel` from `samples` (at least one): {"shard", "nsamples", "bytes", "sha256", "keys"}."""
    made: list[dict] = []
    writer = ShardWriter(out, "", None, 0, lambda shard, keys: made.append({**shard, "keys": keys}), name=rel)
    try:
        for sample in samples:
            writer.write(sample)
    except BaseException:
        writer.abort()  # nothing half-written is published
        raise
    writer.close()
    if not made:
        raise ValueError(f"{rel}: no samples to write")
    return made[0]


def staged_name(run_id: str, key: str) -> str:
    return f"{STAGING_DIR}/{run_id}/{key}.tar"


def stage_sample(out, run_id: str, sample: dict) -> dict:
    """Write one finished sample where it was made, for `assemble_shard` to pick up: {"rel", "bytes"} (bytes: its
    parts' payload, which the driver adds up to fill shards)."""
    rel = staged_name(run_id, sample["__key__"])
    write_shard(out, rel, [sample])
    return {"rel": rel, "bytes": sum(len(v) for k, v in sample.items() if k != "__key__")}


def assemble_shard(out_uri: str, rel: str, staged: list[str]) -> dict:
    """Runs on a worker node: the staged samples, in order, into the shard `rel`, published whole. Returns the
    shard's ledger fields with `keys` and `written_by` (host and process, for the record). The staged files stay
    until the driver has committed the shard (`ShardAssembler.poll`), so a retry of this task after its worker died
    finds them all and writes the same shard again."""
    storage = as_storage(out_uri)

    def samples() -> Iterator[dict]:
        for part in staged:
            yield from read_shard_samples((storage, part)).values()

    shard = write_shard(storage, rel, samples())
    return {**shard, "written_by": {"host": socket.gethostname(), "pid": os.getpid()}, "staged": staged}


class InlineTasks:
    """Runs shard assembly here and now (sequential runs, tests): the same interface the runner gives Ray tasks."""

    def submit(self, fn, *args):
        try:
            return ("ok", fn(*args))
        except Exception as exc:  # reported by result(), as a Ray task's error would be
            return ("error", exc)

    def ready(self, handles: list, wait: bool = False) -> list:
        return list(handles)

    def result(self, handle):
        status, value = handle
        if status == "error":
            raise value
        return value


@dataclass
class _Group:
    """Whole sources bound for the same shards, committed together once all of them are published."""

    sources: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # rejects: key -> stage/reason
    handles: list = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)


class ShardAssembler:
    """On the driver: whole sources' staged samples grouped into shards of `cfg`'s size, each assembled by a task
    where the work happens (`tasks.submit(assemble_shard, ...)`), and each group committed by `commit(group)` once
    its shards are published. The driver only ever handles names and sizes.

    `kind` "shard": own samples; a group's lines are one "shard" line per shard, the last carrying the entries of
    the sources in the group. `kind` "rejects": examples of dropped clips, committed by "rejects" lines."""

    def __init__(self, out, cfg: OutputConfig, ledger: Ledger, start: int, tasks, kind: str = "shard",
                 on_failure: Callable[[list[dict], Exception], None] | None = None):
        self.storage = as_storage(out)
        self.cfg, self.ledger, self.tasks, self.kind = cfg, ledger, tasks, kind
        self.prefix, self.directory = (cfg.split, SHARD_DIR) if kind == "shard" else ("rejects", REJECTS_DIR)
        self.next = start
        self.on_failure = on_failure
        self._pending = _Group()
        self._parts: list[tuple[str, dict]] = []  # (key, staged) of the pending group
        self._bytes = 0
        self._running: list[_Group] = []

    def add_source(self, entry: dict | None, staged: list[tuple[str, dict]], extra: dict | None = None) -> None:
        """A whole source: its ledger `entry` (None for rejects) and its staged samples [(key, {"rel", "bytes"})]
        in key order. Sources stay whole: one that does not fit the open group starts the next."""
        nbytes = sum(s["bytes"] for _, s in staged)
        if self._parts and (len(self._parts) + len(staged) > self.cfg.shard_max_samples
                            or self._bytes + nbytes > self.cfg.shard_max_mb * 1e6):
            self.dispatch()
        if entry is not None:
            self._pending.sources.append(entry)
        self._pending.extra.update(extra or {})
        self._parts += staged
        self._bytes += nbytes

    def dispatch(self) -> None:
        """Send the pending group to be written: one shard, or several for a source larger than one shard."""
        if not self._parts:
            return
        group, parts = self._pending, self._parts
        self._pending, self._parts, self._bytes = _Group(), [], 0
        rows = {row["key"]: row for entry in group.sources for row in entry["samples"]}
        chunk: list[tuple[str, dict]] = []
        chunks = []
        size = 0
        for key, staged in parts:
            full = len(chunk) >= self.cfg.shard_max_samples or size + staged["bytes"] > self.cfg.shard_max_mb * 1e6
            if chunk and full:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append((key, staged))
            size += staged["bytes"]
        chunks.append(chunk)
        for chunk in chunks:
            rel = f"{self.directory}/{self.prefix}-{self.next:06d}.tar"
            self.next += 1
            for key, _ in chunk:
                if key in rows:
                    rows[key]["shard"] = rel
            group.handles.append(self.tasks.submit(assemble_shard, self.storage.uri, rel, [s["rel"] for _, s in chunk]))
        self._running.append(group)

    def poll(self, wait: bool = False) -> list[_Group]:
        """Commit every group whose shards are all published; with `wait`, wait for all of them. Returns the
        groups committed."""
        done = []
        for group in list(self._running):
            ready = self.tasks.ready(group.handles, wait=wait)
            if len(ready) < len(group.handles):
                continue
            self._running.remove(group)
            try:
                group.shards = [self.tasks.result(h) for h in group.handles]
            except Exception as exc:  # the group's sources stay uncommitted; the next run redoes them
                if self.on_failure:
                    self.on_failure(group.sources, exc)
                continue
            staged = [part for shard in group.shards for part in shard.pop("staged", [])]
            self.ledger.append_many(self._lines(group))
            # Committed: the staged samples are no longer needed (a crash before this leaves them to `recover`).
            self.storage.delete_many(staged)
            done.append(group)
        return done

    def _lines(self, group: _Group) -> list[dict]:
        if self.kind == "rejects":
            return [{"type": "rejects", **shard, "reasons": {k: group.extra[k] for k in shard["keys"]}}
                    for shard in group.shards]
        lines = [{"type": "shard", **shard, "sources": []} for shard in group.shards]
        lines[-1]["sources"] = group.sources
        return lines

    def close(self) -> list[_Group]:
        """Write what is pending and commit everything still running."""
        self.dispatch()
        return self.poll(wait=True)


class ShardSink:
    """Whole sources written from this process (postpasses, test fixtures): each finished shard is committed by a
    ledger line that carries the source entries whose last sample it holds."""

    def __init__(self, out_dir, cfg: OutputConfig, ledger: Ledger, state: LedgerState):
        self.storage = as_storage(out_dir)
        self.cfg = cfg
        self.ledger = ledger
        self._start = max((shard_number(n) + 1 for n in state.shards), default=0)
        self._writer: ShardWriter | None = None
        self._pending_sources: list[dict] = []
        self.shards_written = 0
        self.samples_written = 0

    def add_source(self, entry: dict, samples: Iterable[dict]) -> None:
        """Write a source's samples ({"__key__", ext: bytes}); its ledger entry follows its last shard's. `samples`
        may be any sized iterable; one with an `nbytes` attribute saves reading them twice."""
        if not len(samples):
            self.ledger.append(entry)
            return
        if self._writer is None:
            self._writer = ShardWriter(self.storage, self.cfg.split, self.cfg, self._start, self._commit_shard)
        nbytes = getattr(samples, "nbytes", None)
        if nbytes is None:
            nbytes = sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
        self._writer.keep_together(len(samples), nbytes)
        rows = {row["key"]: row for row in entry["samples"]}
        for sample in samples:
            rows[sample["__key__"]]["shard"] = self._writer.write(sample)
        self.samples_written += len(samples)
        self._pending_sources.append(entry)

    def _commit_shard(self, shard: dict, keys: list[str]) -> None:
        self.ledger.append({"type": "shard", **shard, "keys": keys, "sources": self._pending_sources})
        self._pending_sources = []
        self.shards_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ShardError(UserFacingError, ValueError):
    """A shard that is not one of ours and is not read further: compressed, not a tar, cut short, or holding a
    member that is not a plain regular file within its size cap. `reason` is a short stable code (verify reports
    it); the message names the shard and the member."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Compressed streams tarfile (and webdataset's "r|*") would inflate transparently: a 9 MB file can hold gigabytes.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
               b"\x04\x22\x4d\x18": "lz4"}
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a folder",
                 tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device",
                 tarfile.GNUTYPE_SPARSE: "a sparse file", tarfile.CONTTYPE: "a contiguous file"}


def open_shard(shard) -> BinaryIO:
    """A shard given as a local path or URI, or as (storage, path relative to it), opened for reading: a regular
    file, never through a link (the file's own folder is opened strict, pipeline/core/storage.py)."""
    if isinstance(shard, tuple):
        storage, rel = shard
        return storage.open_read(rel)
    text = str(shard)
    return open_storage(parent(text), "shard", strict=True).open_read(name_of(text))


class _Bounded:
    """A shard file as tarfile sees it: no read past the file's end is even requested (a header declaring
    gigabytes in a small file allocates nothing), and no single read may exceed `cap` (the largest part cap:
    tarfile reads pax and long-name headers whole, and would read a member whole)."""

    def __init__(self, f: BinaryIO, size: int, cap: int, where: str):
        self._f, self.size, self.cap, self.where = f, size, cap, where

    def read(self, n: int = -1) -> bytes:
        remaining = max(0, self.size - self._f.tell())
        n = remaining if n is None or n < 0 else min(n, remaining)
        if n > self.cap:
            raise ShardError("member_too_large", f"{self.where}: a {n}-byte header or member, over the read limit")
        return self._f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def iter_members(shard, label: str | None = None, limits: ReadLimits | None = None,
                 ) -> Iterator[tuple[str, str, tarfile.TarInfo, Callable[[], bytes]]]:
    """The one shard reader: (key, part, tar member, read) for each member of one of our tars (a local path or
    URI, or (storage, rel) for any storage), in tar order. `read()` returns the member's bytes; members nobody
    reads are skipped by their headers, so picking a few parts out of a big shard reads only their bytes.

    A shard from elsewhere is checked as it is read, before anything is allocated: a compressed file, a member that
    is not a regular file (link, folder, FIFO, device, sparse), a member past the file's end or over its part's
    size cap (`ReadLimits.part_bytes`), or a name that is not KEY.PART (`split_member`) raises ShardError naming
    `label` (else the shard) and the member. Members before it have been yielded; nothing after it is."""
    where = label or (shard[0].join(shard[1]) if isinstance(shard, tuple) else str(shard))
    limits = limits or read_limits()
    with open_shard(shard) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(6)
        f.seek(0)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                raise ShardError("compressed_shard", f"{where}: a {kind}-compressed file; shards are plain tars "
                                 "and are never inflated (decompress it yourself if you trust it)")
        bounded = _Bounded(f, size, limits.largest_part_bytes(), where)
        try:
            tar = tarfile.open(fileobj=bounded, mode="r:")  # noqa: SIM115 - closed by the with below
        except tarfile.TarError as exc:
            raise ShardError("not_a_tar", f"{where}: not a readable tar ({exc})") from None
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as exc:
                    raise ShardError("truncated_tar", f"{where}: the tar stops being readable ({exc})") from None
                if member is None:
                    return
                tar.members.clear()  # tarfile keeps every header it read: memory would grow with the member count
                _check_member(member, where, size, limits)
                key, part = split_member(member.name, where)
                if member.size > limits.part_bytes(part):
                    raise ShardError("member_too_large", f"{where}: member {member.name!r} declares {member.size} "
                                     f"bytes, over the {limits.part_bytes(part)} byte cap for KEY.{part} "
                                     f"(docs/security.md)")
                yield key, part, member, lambda member=member: tar.extractfile(member).read()


def _check_member(member: tarfile.TarInfo, where: str, size: int, limits: ReadLimits) -> None:
    if member.type not in _REGULAR or member.sparse is not None:
        what = "a sparse file" if member.sparse is not None else _MEMBER_KINDS.get(member.type, "not a regular file")
        raise ShardError("irregular_member", f"{where}: member {member.name!r} is {what}; shards hold regular "
                         "files only")
    if member.offset_data + member.size > size:
        raise ShardError("truncated_tar", f"{where}: member {member.name!r} needs {member.offset_data + member.size} "
                         f"bytes, the file has {size} (cut short)")


def iter_samples(shard, label: str | None = None, select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """{"__key__", "__url__", part: bytes} per sample of one shard, in tar order, its members grouped as webdataset
    groups them (consecutive members with one key); `select(part)` picks the parts read (all by default). Raises
    ShardError as `iter_members` does, after the samples before the problem."""
    where = label or (shard[0].join(shard[1]) if isinstance(shard, tuple) else str(shard))
    sample: dict | None = None
    for key, part, _member, read in iter_members(shard, where):
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": where}
        if select is None or select(part):
            sample[part] = read()
    if sample is not None:
        yield sample


def read_shard_samples(shard, keys: set[str] | None = None) -> dict[str, dict]:
    """key -> {"__key__", part: bytes} of the samples in one of our tars (all, or only `keys`), in tar order."""
    samples: dict[str, dict] = {}
    for key, part, _member, read in iter_members(shard):
        if keys is None or key in keys:
            samples.setdefault(key, {"__key__": key})[part] = read()
    return samples


def sample_json(meta: dict) -> bytes:
    return json.dumps(meta, indent=None, sort_keys=True).encode()


def npy_bytes(array) -> bytes:
    """An array as .npy bytes (webdataset decodes the `.npy` extension back to an array)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """A 0/1 mask as a 1-bit-looking 8-bit PNG (0/255): small, and any image viewer shows it."""
    import cv2

    ok, png = cv2.imencode(".png", (mask > 0).astype(np.uint8) * 255)
    if not ok:
        raise ValueError("cannot encode mask as PNG")
    return png.tobytes()


def image_png(image: np.ndarray) -> bytes:
    """An RGB (H, W, 3) or RGBA (H, W, 4) uint8 image as PNG (lossless: references are training inputs)."""
    import cv2

    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB or RGBA, got {image.dtype} {image.shape}")
    code = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, code))
    if not ok:
        raise ValueError("cannot encode image as PNG")
    return png.tobytes()
