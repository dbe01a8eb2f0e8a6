"""Probe: content id, container/codec/fps/size/duration/rotation, and the resolution/duration limits."""

from __future__ import annotations

import hashlib

from pipeline.core.names import path_id
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.core.video import VideoError, probe


def content_id(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of the file's bytes: the same video gets the same id wherever it lives (resume, dedup)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Prober(Stage):
    name = "probe"

    def process(self, records: list[Record]) -> list[Record]:
        limits = self.config.limits
        for record in records:
            try:
                record.source_id = content_id(record.local_path)
            except OSError as exc:
                record.source_id = path_id(record.source_path)
                record.fail(self.name, "unreadable", f"{record.source_path}: cannot read ({exc.strerror})")
                continue
            if record.meta["source"]["size"] == 0:
                record.source_id = path_id(record.source_path)
            record.key = record.source_id[:16]
            try:
                info = probe(record.local_path, name=record.source_path)
            except VideoError as exc:
                record.fail(self.name, exc.reason, exc.message)
                continue
            record.meta["source"].update(id=record.source_id, probe=info.to_dict())
            if info.num_frames and info.num_frames < limits.min_frames:
                record.fail(
                    self.name,
                    "too_few_frames",
                    f"{record.source_path}: {info.num_frames} frames, fewer than limits.min_frames={limits.min_frames}",
                )
            elif info.duration_s > limits.max_duration_s:
                record.fail(
                    self.name,
                    "too_long",
                    f"{record.source_path}: {info.duration_s:.0f} s is over "
                    f"limits.max_duration_s={limits.max_duration_s:.0f}",
                )
            elif info.width > limits.max_width or info.height > limits.max_height:
                message = (
                    f"{record.source_path}: {info.width}x{info.height} is over limits.max_width x max_height="
                    f"{limits.max_width}x{limits.max_height}"
                )
                if limits.on_exceed == "reject":
                    record.fail(self.name, "too_large", message + " (set limits.on_exceed=downscale to keep it)")
                else:
                    # Every decode scales frames to the (smaller) detection or clip size one frame at a time,
                    # so a large source costs decode time, not memory.
                    record.warn(self.name, message + "; kept and downscaled (limits.on_exceed=downscale)")
        return records
