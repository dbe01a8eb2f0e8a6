"""The one shard writer: webdataset's ShardWriter, committing whole sources through the ledger.

A source's samples are written together. A shard is written under a `.tmp` name, renamed when complete, and
committed by one ledger line that also carries the entries of the sources whose last sample it holds. A source starts in a
fresh shard when it does not fit the current one, so a shard can hold part of an uncommitted source only when
that source alone fills it (and `Ledger.recover` removes such shards).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.core.config import OutputConfig
from pipeline.core.files import file_sha256
from pipeline.core.names import split_member
from pipeline.store.ledger import SHARD_DIR, Ledger, LedgerState

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


class ShardSink:
    def __init__(self, out_dir: str | Path, cfg: OutputConfig, ledger: Ledger, state: LedgerState):
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.ledger = ledger
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._start = max((shard_number(n) + 1 for n in state.shards), default=0)
        self._writer: wds.ShardWriter | None = None
        self._open_keys: list[str] = []
        self._pending_sources: list[dict] = []
        self.shards_written = 0
        self.samples_written = 0

    def _relname(self, tmp_path: str) -> str:
        return f"{SHARD_DIR}/{Path(tmp_path).name[: -len(TMP_SUFFIX)]}"

    def _open(self) -> wds.ShardWriter:
        if self._writer is None:
            pattern = str(self.out_dir / SHARD_DIR / f"{self.cfg.split}-%06d.tar{TMP_SUFFIX}")
            self._writer = wds.ShardWriter(
                pattern,
                maxcount=self.cfg.shard_max_samples,
                maxsize=self.cfg.shard_max_mb * 1e6,
                post=self._commit_shard,
                start_shard=self._start,
                verbose=0,
                encoder=False,
                mtime=0.0,  # reproducible tar headers
            )
        return self._writer

    def add_source(self, entry: dict, samples: Iterable[dict]) -> None:
        """Write a source's samples ({"__key__", ext: bytes}); its ledger entry follows its last shard's. `samples`
        may be any sized iterable (the runner's are read back from disk one at a time); one with an `nbytes`
        attribute saves reading them twice."""
        if not len(samples):
            self.ledger.append(entry)
            return
        writer = self._open()
        nbytes = getattr(samples, "nbytes", None)
        if nbytes is None:
            nbytes = sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
        if writer.count and (
            writer.count + len(samples) > self.cfg.shard_max_samples or writer.size + nbytes > self.cfg.shard_max_mb * 1e6
        ):
            writer.next_stream()
        rows = {row["key"]: row for row in entry["samples"]}
        for sample in samples:
            writer.write(sample)
            self._open_keys.append(sample["__key__"])
            rows[sample["__key__"]]["shard"] = self._relname(writer.fname)
        self.samples_written += len(samples)
        self._pending_sources.append(entry)

    def _commit_shard(self, tmp_path: str) -> None:
        keys, self._open_keys = self._open_keys, []
        if not keys:
            os.unlink(tmp_path)
            return
        final = publish_shard(tmp_path)
        self.ledger.append(
            {
                "type": "shard",
                "shard": self._relname(tmp_path),
                "nsamples": len(keys),
                "bytes": os.path.getsize(final),
                "sha256": file_sha256(final),
                "keys": keys,
                "sources": self._pending_sources,
            }
        )
        self._pending_sources = []
        self.shards_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_shard_samples(path: str | Path, keys: set[str] | None = None) -> dict[str, dict]:
    """key -> {"__key__", ext: bytes} of the samples in one of our tars (all, or only `keys`), in tar order. Members
    of other samples are skipped by their headers, so picking one sample out of a big shard reads only its bytes.
    A member whose name is not a plain KEY.PART (a path, "..") raises UnsafeName: such a tar is not one of ours."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name, str(path))
            if keys is None or key in keys:
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
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
