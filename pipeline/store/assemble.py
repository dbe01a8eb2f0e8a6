"""From the records of one source, as they arrive, to its ledger entry and its WebDataset samples."""

from __future__ import annotations

import json
from collections import Counter

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


# What the driver may receive per record (the digest below): its ledger parts, never sample bytes. A digest over
# this is cut down (`bound_digest`) before it leaves the worker.
DIGEST_MAX_BYTES = 64 * 1024


def record_digest(record: Record) -> dict:
    """What a finished record adds to its source's ledger entry: status, errors, warnings, timings and, for a kept
    clip, its manifest row. Small by construction (no media, no embeddings); `bound_digest` enforces it."""
    status, stage, reason = _status(record)
    src = record.meta.get("source", {})
    digest = {
        "kind": record.kind,
        "key": record.key,
        "clips_planned": record.clips_planned,
        "source": {"path": record.source_path, "source_id": record.source_id, "size": src.get("size"),
                   "mtime_ns": src.get("mtime_ns"), "duration_s": (src.get("probe") or {}).get("duration_s", 0.0)},
        "errors": [{"source": record.source_path, "key": record.key, **e} for e in record.errors],
        "warnings": record.meta.get("warnings", []),
        "timings": _rounded(record.meta.get("timings", {})),
        "status": [status, stage, reason],
        "staged": None,  # {"rel", "bytes"} of a kept clip's sample, written by the worker
        "reject": None,  # {"reason": "stage/reason", "staged": {...}} of a dropped clip kept as an example
    }
    if record.kind == "clip":
        span = record.meta.get("span") or {}
        digest["clip"] = {"key": record.key, "status": status, "stage": stage, "reason": reason,
                          "start_s": span.get("start_s"), "end_s": span.get("end_s"), **reference_counts(record.meta)}
        if status == "kept":
            digest["row"] = manifest_row(record)
    return bound_digest(digest)


def _rounded(seconds: dict) -> dict:
    """Per-stage figures to 0.1 ms (or 0.1 MB): a float's 17 digits are bytes on the wire and nothing to a reader."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in seconds.items()}


def bound_digest(digest: dict) -> dict:
    """The digest within DIGEST_MAX_BYTES: an over-long one keeps its first warnings and errors, with messages cut
    to 1000 characters (a stage that warns ten thousand times says so in the first few)."""
    if len(json.dumps(digest)) <= DIGEST_MAX_BYTES:
        return digest
    cut = dict(digest)
    cut["warnings"] = [{**w, "message": str(w.get("message", ""))[:1000]} for w in digest["warnings"][:20]]
    cut["errors"] = [{**e, "message": str(e.get("message", ""))[:1000]} for e in digest["errors"][:20]]
    if len(digest["warnings"]) > 20:
        cut["warnings"].append({"stage": "runner", "message": f"{len(digest['warnings']) - 20} more warnings cut"})
    if len(json.dumps(cut)) > DIGEST_MAX_BYTES and "row" in cut:
        cut["row"] = {**cut["row"], "caption": (cut["row"].get("caption") or "")[:4000]}
    if len(json.dumps(cut)) > DIGEST_MAX_BYTES:  # nothing user-made is left to cut: say what overflowed
        raise ValueError(f"{digest['key'] or digest['source']['path']}: record digest over {DIGEST_MAX_BYTES} bytes")
    return cut


class SampleStager:
    """Runs where the last stage ran: writes each kept clip's sample (and a few dropped clips as examples) to the
    output's staging area, and turns every record into a light one that carries only its digest to the driver."""

    def __init__(self, out_uri: str, run_id: str, config_hash: str, rejects_per_reason: int):
        self.out_uri, self.run_id, self.config_hash = out_uri, run_id, config_hash
        self.rejects_per_reason = rejects_per_reason
        # Examples this process staged per stage/reason: never more than the driver can keep, whatever arrives.
        self.rejects_staged: Counter = Counter()

    def finish(self, record: Record) -> Record:
        from pipeline.store.shards import stage_sample

        digest = record_digest(record)
        if digest.get("row") is not None:
            digest["staged"] = stage_sample(self.out_uri, self.run_id, sample_files(record, self.config_hash))
        elif record.kind == "clip" and record.drop and "mp4" in record.blobs and self.rejects_per_reason:
            reason = f"{record.drop['stage']}/{record.drop['reason']}"
            if self.rejects_staged[reason] < self.rejects_per_reason:
                self.rejects_staged[reason] += 1
                staged = stage_sample(self.out_uri, self.run_id, sample_files(record, self.config_hash))
                digest["reject"] = {"reason": reason, "staged": staged}
        light = Record(kind=record.kind, source_path=record.source_path, key=record.key, source_id=record.source_id,
                       clips_planned=record.clips_planned, errors=record.errors, drop=record.drop)
        # The cost meter's inputs (pipeline/run/pools.py CostMeter.observe); the wall timings travel in the digest.
        light.meta = {k: _rounded(record.meta[k]) for k in ("cpu_s", "peak_rss_mb") if k in record.meta}
        light.meta["digest"] = digest
        return light


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

    def take(self, digest: dict) -> str | None:
        """The "stage/reason" to file a staged example under, when it is kept; else None."""
        reject = digest.get("reject")
        if not reject or digest["key"] in self.keys:
            return None
        reason = reject["reason"]
        if self.counts[reason] >= self.per_reason:
            return None
        self.counts[reason] += 1
        self.keys.add(digest["key"])
        return reason


class SourceAssembly:
    """One source taking shape on the driver as the digests of its records arrive in any order. Its samples are
    already written (staged) by the workers: the assembly keeps their names and sizes, never their bytes."""

    def __init__(self, rejects: RejectSampler | None = None):
        self.staged: dict[str, dict] = {}  # key -> {"rel", "bytes"} of each kept sample
        self.rejected: dict[str, dict] = {}  # key -> staged example of a dropped clip
        self.reject_reasons: dict[str, str] = {}
        self._sampler = rejects
        self._parts: dict[str, dict] = {}  # key -> digest
        self._source: dict | None = None
        self.planned = -1

    def add(self, record: Record) -> None:
        digest = record.meta["digest"]
        if record.key in self._parts:
            return  # delivered twice (never expected from Ray Data): the first copy counts
        self.planned = digest["clips_planned"]
        if self._source is None or digest["kind"] == "source":
            self._source = digest["source"]
        if digest["staged"]:
            self.staged[record.key] = digest["staged"]
        if self._sampler is not None and (reason := self._sampler.take(digest)):
            self.rejected[record.key] = digest["reject"]["staged"]
            self.reject_reasons[record.key] = reason
        self._parts[record.key] = digest

    @property
    def arrived(self) -> int:
        return len(self._parts)

    @property
    def complete(self) -> bool:
        return self.arrived >= self.planned

    def staged_samples(self) -> list[tuple[str, dict]]:
        """(key, staged) of the kept samples, in key order."""
        return sorted(self.staged.items())

    def staged_rejects(self) -> list[tuple[str, dict]]:
        return sorted(self.rejected.items())

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
                entry["samples"].append(dict(part["row"]))
        return entry


class SourceCollector:
    """Groups records arriving in any order by source, and hands back a source's assembly once all of it has
    arrived. Only digests arrive: memory grows with the sources in flight, not with their samples."""

    def __init__(self, rejects: RejectSampler | None = None):
        self.rejects = rejects
        self._open: dict[str, SourceAssembly] = {}

    def add(self, record: Record) -> SourceAssembly | None:
        assembly = self._open.get(record.source_path)
        if assembly is None:
            assembly = self._open[record.source_path] = SourceAssembly(self.rejects)
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
