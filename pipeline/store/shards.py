"""The one shard writer: webdataset's ShardWriter, committing whole sources through the ledger.

A source's samples are written together. A shard is written under a `.tmp` name, renamed when complete, and
committed by one ledger line that also carries the entries of the sources whose last sample it holds. A source
starts in a fresh shard when it does not fit the current one, so a shard can hold part of an uncommitted source only
when that source alone fills it (and `Ledger.recover` removes such shards).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.core.config import OutputConfig
from pipeline.core.files import file_sha256
from pipeline.core.names import split_member
from pipeline.store.ledger import REJECTS_DIR, SHARD_DIR, Ledger, LedgerState

TMP_SUFFIX = ".tmp"


def publish_shard(tmp_path: str) -> str:
    """Make a finished `.tar.tmp` durable and give it its real name; returns that name. The rename is atomic, so a
    reader or a crash sees the whole shard or none of it; the ledger line that commits it comes after."""
    with open(tmp_path, "rb") as f:
        os.fsync(f.fileno())
    final = tmp_path[: -len(TMP_SUFFIX)]
    os.replace(tmp_path, final)
    return final


def shard_number(name: str) -> int:
    return int(Path(name).name.split(".")[0].rsplit("-", 1)[1])


class ShardWriter:
    """The one shard writer: webdataset.ShardWriter into `SHARD_DIR/{prefix}-NNNNNN.tar.tmp`, each shard fsynced and
    renamed to its real name when complete (`publish_shard`), then handed to `on_shard` as {"shard", "nsamples",
    "bytes", "sha256"} with the keys it holds. Tar headers carry mtime 0, so the same samples give the same bytes."""

    def __init__(self, out_dir: str | Path, prefix: str, cfg: OutputConfig, start: int,
                 on_shard: Callable[[dict, list[str]], None], directory: str = SHARD_DIR):
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.on_shard = on_shard
        self.directory = directory
        (self.out_dir / directory).mkdir(parents=True, exist_ok=True)
        self._keys: list[str] = []
        self._writer = wds.ShardWriter(
            str(self.out_dir / directory / f"{prefix}-%06d.tar{TMP_SUFFIX}"),
            maxcount=cfg.shard_max_samples,
            maxsize=cfg.shard_max_mb * 1e6,
            post=self._finish,
            start_shard=start,
            verbose=0,
            encoder=False,
            mtime=0.0,  # reproducible tar headers
        )

    def keep_together(self, nsamples: int, nbytes: int) -> None:
        """Start a new shard unless these samples fit in the open one (a source's samples stay in one shard)."""
        writer = self._writer
        if writer.count and (writer.count + nsamples > self.cfg.shard_max_samples
                             or writer.size + nbytes > self.cfg.shard_max_mb * 1e6):
            writer.next_stream()

    def write(self, sample: dict) -> str:
        """Write one sample ({"__key__", ext: bytes}); returns the shard it goes into, relative to the output."""
        self._writer.write(sample)
        self._keys.append(sample["__key__"])
        return _relname(self._writer.fname, self.directory)

    def _finish(self, tmp_path: str) -> None:
        keys, self._keys = self._keys, []
        if not keys:
            os.unlink(tmp_path)
            return
        final = publish_shard(tmp_path)
        self.on_shard({"shard": _relname(tmp_path, self.directory), "nsamples": len(keys),
                       "bytes": os.path.getsize(final), "sha256": file_sha256(final)}, keys)

    def close(self) -> None:
        self._writer.close()


def _relname(tmp_path: str, directory: str = SHARD_DIR) -> str:
    return f"{directory}/{Path(tmp_path).name[: -len(TMP_SUFFIX)]}"


class ShardSink:
    """Own samples, a whole source at a time: each finished shard is committed by a ledger line that carries the
    source entries whose last sample it holds."""

    def __init__(self, out_dir: str | Path, cfg: OutputConfig, ledger: Ledger, state: LedgerState):
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.ledger = ledger
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._start = max((shard_number(n) + 1 for n in state.shards), default=0)
        self._writer: ShardWriter | None = None
        self._pending_sources: list[dict] = []
        self.shards_written = 0
        self.samples_written = 0

    def add_source(self, entry: dict, samples: Iterable[dict]) -> None:
        """Write a source's samples ({"__key__", ext: bytes}); its ledger entry follows its last shard's. `samples`
        may be any sized iterable (the runner's are read back from disk one at a time); one with an `nbytes`
        attribute saves reading them twice."""
        if not len(samples):
            self.ledger.append(entry)
            return
        if self._writer is None:
            self._writer = ShardWriter(self.out_dir, self.cfg.split, self.cfg, self._start, self._commit_shard)
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


class RejectsSink:
    """Examples of dropped clips into `rejects/rejects-NNNNNN.tar`, each shard committed by a "rejects" ledger line
    naming its keys and their stage/reason. Not training data: index.json never lists them."""

    def __init__(self, out_dir: str | Path, cfg: OutputConfig, ledger: Ledger, state: LedgerState):
        self.out_dir, self.cfg, self.ledger = Path(out_dir), cfg, ledger
        self._start = max((shard_number(n) + 1 for n in state.rejects), default=0)
        self._writer: ShardWriter | None = None
        self._reasons: dict[str, str] = {}

    def add(self, samples: Iterable[dict], reasons: dict[str, str]) -> None:
        for sample in samples:
            if self._writer is None:
                self._writer = ShardWriter(self.out_dir, "rejects", self.cfg, self._start, self._commit,
                                           directory=REJECTS_DIR)
            self._reasons[sample["__key__"]] = reasons[sample["__key__"]]
            self._writer.write(sample)

    def _commit(self, shard: dict, keys: list[str]) -> None:
        self.ledger.append({"type": "rejects", **shard, "keys": keys,
                            "reasons": {k: self._reasons.pop(k) for k in keys}})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def iter_members(
    path: str | Path, label: str | None = None
) -> Iterator[tuple[str, str, tarfile.TarInfo, Callable[[], bytes]]]:
    """The one shard reader: (key, part, tar member, read) for each file member of one of our tars, in tar order.
    Names are checked as they come (`split_member`: a path, "..", or anything but KEY.PART raises UnsafeName,
    naming `label`, else the path): such a tar is not one of ours. `read()` returns the member's bytes; members
    nobody reads are skipped by their headers, so picking a few parts out of a big shard reads only their bytes."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                key, part = split_member(member.name, label or str(path))
                yield key, part, member, lambda member=member: tar.extractfile(member).read()


def read_shard_samples(path: str | Path, keys: set[str] | None = None) -> dict[str, dict]:
    """key -> {"__key__", part: bytes} of the samples in one of our tars (all, or only `keys`), in tar order."""
    samples: dict[str, dict] = {}
    for key, part, _member, read in iter_members(path):
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
