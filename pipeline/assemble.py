"""From the records of one finished source to its ledger entry and its WebDataset samples."""

from __future__ import annotations

from collections import Counter

from pipeline import __version__
from pipeline.inputs import path_id
from pipeline.record import Record
from pipeline.shard_writer import image_png, mask_png, npy_bytes, sample_json


class SourceCollector:
    """Groups records arriving in any order by source, and hands back a source once all of it has arrived."""

    def __init__(self):
        self._groups: dict[str, list[Record]] = {}

    def add(self, record: Record) -> list[Record] | None:
        if record.kind == "source":  # never expanded into clips: rejected, dropped or without clips
            return [record]
        group = self._groups.setdefault(record.source_path, [])
        group.append(record)
        if len(group) == record.clips_planned:
            return self._groups.pop(record.source_path)
        return None

    def incomplete(self) -> dict[str, list[Record]]:
        return self._groups


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
    """KEY.json: everything known about the clip, plus provenance (backends, versions, config hash)."""
    meta = record.meta
    return {
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


def assemble_source(records: list[Record], config_hash: str, run_id: str) -> tuple[dict, list[dict]]:
    """The ledger entry and the samples of one source whose records have all arrived."""
    first = records[0]
    src = first.meta.get("source", {})
    probe = src.get("probe") or {}
    entry: dict = {
        "type": "source",
        "path": first.source_path,
        # A record that failed before probing finished has no content id: fall back to one from its path.
        "source_id": first.source_id or path_id(first.source_path),
        "size": src.get("size"),
        "mtime_ns": src.get("mtime_ns"),
        "duration_s": probe.get("duration_s", 0.0),
        "run": run_id,
        "samples": [],
        "clips": [],
        "errors": [],
        "timings": {},
        "warnings": [],
    }
    samples = []
    for record in sorted(records, key=lambda r: r.key):
        status, stage, reason = _status(record)
        for error in record.errors:
            entry["errors"].append({"source": record.source_path, "key": record.key, **error})
        for warning in record.meta.get("warnings", []):
            if warning not in entry["warnings"]:
                entry["warnings"].append(warning)
        for name, seconds in record.meta.get("timings", {}).items():
            entry["timings"][name] = entry["timings"].get(name, 0.0) + seconds
        if record.kind == "source":
            entry["status"] = "rejected" if status == "failed" else "no_clips"
            entry["stage"], entry["reason"] = stage, reason
            continue
        entry["status"] = "curated"
        entry["clips"].append({"key": record.key, "status": status, "stage": stage, "reason": reason,
                               **reference_counts(record.meta)})
        if status == "kept":
            entry["samples"].append(manifest_row(record))
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
            samples.append(sample)
    return entry, samples
