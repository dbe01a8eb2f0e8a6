"""From the records of one source, as they arrive, to its ledger entry and its WebDataset samples."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline import __version__
from pipeline.core.names import path_id
from pipeline.core.record import Record
from pipeline.store.shards import image_png, mask_png, npy_bytes, sample_json


def _status(record: Record) -> tuple[str, str | None, str | None]:
    if record.errors:
        return "failed", record.errors[0]["stage"], record.errors[0]["reason"]
    if record.drop:
        return "dropped", record.drop["stage"], record.drop["reason"]
    return "kept", None, None


def manifest_row(record: Record) -> dict:
    meta = record.meta
    quality = meta.get("stats", {}).get("quality", {})
    caption = meta.get("caption") or {}
    return {
        "key": record.key,
        "shard": None,  # filled in by the shard writer
        "source": record.source_path,
        "source_id": record.source_id,
        "clip_id": meta["clip_id"],
        "start_s": meta["span"]["start_s"],
        "end_s": meta["span"]["end_s"],
        "fps": meta["clip"]["fps"],
        "width": meta["clip"]["width"],
        "height": meta["clip"]["height"],
        "num_frames": meta["clip"]["num_frames"],
        "duration_s": meta["clip"]["duration_s"],
        "caption": caption.get("text"),
        "brightness": quality.get("brightness_mean"),
        "sharpness": quality.get("sharpness_median"),
        "entities": len(meta.get("entities", [])),
        "subjects": sum(1 for e in meta.get("entities", []) if e["kind"] == "subject"),
        "faces": len(meta.get("faces", [])),
        "frontal_faces": sum(1 for f in meta.get("faces", []) if f["frontal"]),
        "clip_alignment": meta.get("stats", {}).get("clip", {}).get("caption_alignment"),
    }


def sample_metadata(record: Record, config_hash: str) -> dict:
    """KEY.json: everything known about the clip, plus provenance (backends, versions, config hash). A dropped
    clip kept as an example (rejects/) also says where and why it was dropped (`drop`)."""
    meta = record.meta
    return {
        **({"drop": record.drop} if record.drop else {}),
        "key": record.key,
        "clip_id": meta["clip_id"],
        # mtime is a fact about a file on one machine, not about the clip: keep it out of the sample.
        "source": {k: v for k, v in meta["source"].items() if k != "mtime_ns"},
        "span": meta["span"],
        "clip": meta["clip"],
        "keyframes": meta.get("keyframes", []),
        "caption": meta.get("caption"),
        "entities": _entities_with_references(meta),
        "background": {**meta["background"], "file": "bg.png"} if "background" in meta else None,
        "detections": meta.get("detections", []),
        "faces": meta.get("faces", []),
        "stats": meta.get("stats", {}),
        "warnings": meta.get("warnings", []),
        "provenance": {
            "pipeline_version": __version__,
            "config_hash": config_hash,
            "stages": meta.get("provenance", {}),
        },
    }


def _entities_with_references(meta: dict) -> list[dict]:
    """Entities as KEY.json carries them: each with the references cut from it (the trainer reads them there)."""
    references = [{k: v for k, v in r.items() if k not in ("k", "pending")} for r in meta.get("references", [])]
    return [{**e, "references": [r for r in references if r["entity"] == e["id"]]} if "reference" in e else e
            for e in meta.get("entities", [])]


def reference_counts(meta: dict) -> dict:
    """What the summary adds up per clip: realized and requested reference variants, and instance validity."""
    references = meta.get("references", [])
    return {
        "variants": dict(Counter(r["variant"] for r in references)),
        "requested": dict(Counter(r["requested"] for r in references)),
        "instances": meta.get("stats", {}).get("instances"),
    }


class SpooledSamples:
    """A source's encoded samples, kept in a tar on disk until the source commits: the driver holds one sample
    at a time however many clips a source has. Iterates in key order, whatever order the clips arrived in."""

    def __init__(self, path: Path):
        self.path = path
        self._members: dict[str, list[tuple[str, int, int]]] = {}  # key -> (ext, data offset, size)
        self._tar: tarfile.TarFile | None = None
        self.nbytes = 0

    def add(self, sample: dict) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self.path, "w")  # noqa: SIM115 - open while the source arrives; closed by __iter__ or discard
        members = self._members.setdefault(sample["__key__"], [])
        for ext, data in sample.items():
            if ext == "__key__":
                continue
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
            # addfile wrote the header and the data, padded to whole blocks: the data ends at the padded offset.
            members.append((ext, self._tar.offset - _padded(len(data)), len(data)))
            self.nbytes += len(data)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[dict]:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if not self._members:
            return
        with open(self.path, "rb") as f:
            for key in sorted(self._members):
                sample = {"__key__": key}
                for ext, offset, size in self._members[key]:
                    f.seek(offset)
                    sample[ext] = f.read(size)
                yield sample

    def discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self.path.unlink(missing_ok=True)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class RejectSampler:
    """Which dropped clips to keep as examples: the first `per_reason` to arrive of each stage/reason, counting those
    already committed (so a resumed run tops up, never repeats a key). Arrival order decides, so which examples are
    kept may differ between two runs of the same inputs; the counts do not."""

    def __init__(self, per_reason: int, committed: dict[str, dict] | None = None):
        self.per_reason = per_reason
        self.counts: Counter = Counter()
        self.keys: set[str] = set()
        for entry in (committed or {}).values():
            self.counts.update(entry.get("reasons", {}).values())
            self.keys.update(entry.get("keys", []))

    def take(self, record: Record) -> str | None:
        """The "stage/reason" to file a dropped clip under, when it is kept as an example; else None."""
        if not record.drop or "mp4" not in record.blobs or record.key in self.keys:
            return None
        reason = f"{record.drop['stage']}/{record.drop['reason']}"
        if self.counts[reason] >= self.per_reason:
            return None
        self.counts[reason] += 1
        self.keys.add(record.key)
        return reason


class SourceAssembly:
    """One source taking shape on the driver as its records arrive in any order: each record is reduced at once to
    its small ledger parts and, when kept, its encoded sample (spooled to disk); the record itself is let go. A
    dropped clip the sampler picks is spooled too, apart, for the rejects shards."""

    def __init__(self, spool: Path, config_hash: str, rejects: RejectSampler | None = None):
        self.config_hash = config_hash
        self.samples = SpooledSamples(spool)
        self.rejected = SpooledSamples(spool.with_name(spool.stem + "-rejects.tar"))
        self.reject_reasons: dict[str, str] = {}
        self._sampler = rejects
        self._parts: dict[str, dict] = {}  # key -> what the record adds to the ledger entry
        self._source: dict | None = None
        self.planned = -1

    def add(self, record: Record) -> None:
        if record.key in self._parts:
            return  # delivered twice (never expected from Ray Data): the first copy counts
        self.planned = record.clips_planned
        if self._source is None or record.kind == "source":
            src = record.meta.get("source", {})
            self._source = {"path": record.source_path, "source_id": record.source_id, "size": src.get("size"),
                            "mtime_ns": src.get("mtime_ns"),
                            "duration_s": (src.get("probe") or {}).get("duration_s", 0.0)}
        status, stage, reason = _status(record)
        part = {
            "kind": record.kind,
            "errors": [{"source": record.source_path, "key": record.key, **e} for e in record.errors],
            "warnings": record.meta.get("warnings", []),
            "timings": record.meta.get("timings", {}),
            "status": (status, stage, reason),
        }
        if record.kind == "clip":
            span = record.meta.get("span") or {}
            part["clip"] = {"key": record.key, "status": status, "stage": stage, "reason": reason,
                            "start_s": span.get("start_s"), "end_s": span.get("end_s"),
                            **reference_counts(record.meta)}
            if status == "kept":
                part["row"] = manifest_row(record)
                self.samples.add(sample_files(record, self.config_hash))
            elif status == "dropped" and self._sampler is not None and (reason := self._sampler.take(record)):
                self.rejected.add(sample_files(record, self.config_hash))
                self.reject_reasons[record.key] = reason
        self._parts[record.key] = part

    @property
    def arrived(self) -> int:
        return len(self._parts)

    @property
    def complete(self) -> bool:
        return self.arrived >= self.planned

    def entry(self, run_id: str) -> dict:
        """The ledger entry, built in key order (the order a source's clips were planned in)."""
        src = self._source
        entry: dict = {
            "type": "source",
            "path": src["path"],
            # A record that failed before probing finished has no content id: fall back to one from its path.
            "source_id": src["source_id"] or path_id(src["path"]),
            "size": src["size"],
            "mtime_ns": src["mtime_ns"],
            "duration_s": src["duration_s"],
            "run": run_id,
            "samples": [],
            "clips": [],
            "errors": [],
            "timings": {},
            "warnings": [],
        }
        for key in sorted(self._parts):
            part = self._parts[key]
            entry["errors"] += part["errors"]
            for warning in part["warnings"]:
                if warning not in entry["warnings"]:
                    entry["warnings"].append(warning)
            for name, seconds in part["timings"].items():
                entry["timings"][name] = entry["timings"].get(name, 0.0) + seconds
            status, stage, reason = part["status"]
            if part["kind"] == "source":
                entry["status"] = "rejected" if status == "failed" else "no_clips"
                entry["stage"], entry["reason"] = stage, reason
                continue
            entry["status"] = "curated"
            entry["clips"].append(part["clip"])
            if "row" in part:
                entry["samples"].append(part["row"])
        return entry


class SourceCollector:
    """Groups records arriving in any order by source, and hands back a source's assembly once all of it has
    arrived. Kept clips are spooled under `spool_dir` as they come, so memory does not grow with a source."""

    def __init__(self, spool_dir: Path, config_hash: str, rejects: RejectSampler | None = None):
        self.spool_dir = Path(spool_dir)
        self.config_hash = config_hash
        self.rejects = rejects
        self._open: dict[str, SourceAssembly] = {}
        self._made = 0

    def add(self, record: Record) -> SourceAssembly | None:
        assembly = self._open.get(record.source_path)
        if assembly is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._made += 1
            assembly = SourceAssembly(self.spool_dir / f"{self._made:08d}.tar", self.config_hash, self.rejects)
            self._open[record.source_path] = assembly
        assembly.add(record)
        # A source record was never expanded into clips (rejected, dropped or without clips): it is whole.
        if record.kind == "source" or assembly.complete:
            return self._open.pop(record.source_path)
        return None

    def incomplete(self) -> dict[str, SourceAssembly]:
        return self._open


def sample_files(record: Record, config_hash: str) -> dict:
    """The WebDataset sample of a kept clip: {"__key__", extension: encoded bytes}."""
    sample = {
        "__key__": record.key,
        "mp4": record.get_bytes("mp4"),
        "json": sample_json(sample_metadata(record, config_hash)),
    }
    if len(record.blobs.get("face_embeddings", ())):
        sample["faces.npy"] = npy_bytes(record.blobs["face_embeddings"])  # rows follow KEY.json "faces"
    if "detection_clip" in record.blobs:
        sample["dclip.npy"] = npy_bytes(record.blobs["detection_clip"])  # rows follow KEY.json "detections"
    for index, mask in enumerate(record.blobs.get("masks", ())):
        sample[f"dmask{index}.png"] = mask_png(mask)  # mask of KEY.json "detections"[index]
    for reference in record.meta.get("references", []):
        k = reference["k"]
        sample[f"ref{k}.png"] = image_png(record.blobs[f"ref{k}"])
        sample[f"mask{k}.png"] = mask_png(record.blobs[f"refmask{k}"])
    if "background" in record.blobs:
        sample["bg.png"] = image_png(record.blobs["background"])
    return sample
