"""Clip extraction: one streaming decode of the source cuts every planned clip, transcodes it to the target
spec (size, fps, H.264) and keeps its keyframes (by default at 5%, 50% and 95% of the clip, as in LumosX).

A fan-out stage: each clip is handed on the moment its last frame is encoded, so a worker holds the clips being
cut at that frame (one, as shots do not overlap), not every clip of the source."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator

import numpy as np

from pipeline.core.record import Record
from pipeline.core.stage import FanOutStage
from pipeline.core.video import ClipEncoder, VideoError, fit_size, iter_frames
from pipeline.sources.inputs import caption_for_span

# Fixed namespace so clip ids are the same on every machine and every run.
CLIP_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-4b6f-9a57-2f0c1e4d9b13")


def clip_key(source_id: str, first_frame: int, last_frame: int) -> str:
    """Sample key: source content id + span. No dots (WebDataset splits keys at the first dot)."""
    return f"{source_id[:16]}-{first_frame:07d}-{last_frame:07d}"


def output_frame_sources(first: int, last: int, fps_in: float, fps_out: float) -> list[int]:
    """Source frame index for each output frame when resampling [first, last] from fps_in to fps_out."""
    if fps_out >= fps_in:
        return list(range(first, last + 1))
    count = max(1, math.floor((last - first + 1) * fps_out / fps_in + 1e-6))
    return [first + math.floor(j * fps_in / fps_out + 1e-6) for j in range(count)]


class _OpenClip:
    def __init__(self, record: Record, sources: list[int], size, fps_out: float, cfg):
        self.record = record
        self.sources = sources  # output frame -> source frame, non-decreasing
        self.cursor = 0
        self.encoder = ClipEncoder(size[0], size[1], fps_out, crf=cfg.crf, preset=cfg.preset)
        n = len(sources)
        self.keyframe_at = {round(p * (n - 1)): p for p in cfg.keyframes}
        self.keyframes: dict[int, np.ndarray] = {}

    def feed(self, index: int, frame: np.ndarray) -> None:
        while self.cursor < len(self.sources) and self.sources[self.cursor] == index:
            if self.cursor in self.keyframe_at:
                self.keyframes[self.cursor] = frame
            self.encoder.add(frame)
            self.cursor += 1

    @property
    def complete(self) -> bool:
        return self.cursor == len(self.sources)


class ClipExtractor(FanOutStage):
    """Source record in, one clip record per planned clip out. Every planned clip yields a record: the ones the
    decode could not reach carry an error, so the writer can account for the whole source."""

    name = "clip_extract"

    section = "clips"  # resources come from config.clips.resources

    @property
    def description(self) -> str:  # the provenance line of each finished clip (pipeline.core.stage)
        return f"pyav libx264 crf={self.config.clips.crf} preset={self.config.clips.preset}"

    def split(self, source: Record) -> list[Record]:
        fps_in = source.meta["source"]["probe"]["fps"]
        return [self._new_clip(source, span, fps_in) for span in source.meta["clip_plan"]]

    def _new_clip(self, source: Record, span: dict, fps_in: float) -> Record:
        first, last = span["first_frame"], span["last_frame"]
        key = clip_key(source.source_id, first, last)
        start_s, end_s = first / fps_in, (last + 1) / fps_in
        meta = {
            "clip_id": str(uuid.uuid5(CLIP_NAMESPACE, f"{source.source_id}:{first}:{last}")),
            "source": dict(source.meta["source"]),
            "span": {**span, "start_s": start_s, "end_s": end_s},
            "caption": caption_for_span(source.meta.get("input_metadata"), start_s, end_s),
            "provenance": dict(source.meta.get("provenance", {})),
            "warnings": list(source.meta.get("warnings", [])),
            # Each clip carries its share of the source-level work, so sums over clips stay true.
            "timings": {k: v / source.clips_planned for k, v in source.meta.get("timings", {}).items()},
            "cpu_s": {k: v / source.clips_planned for k, v in source.meta.get("cpu_s", {}).items()},
        }
        return Record(
            kind="clip",
            source_path=source.source_path,
            key=key,
            source_id=source.source_id,
            clips_planned=source.clips_planned,
            meta=meta,
        )

    def stream(self, source: Record, clips: list[Record]) -> Iterator[Record]:
        cfg = self.config.clips
        info = source.meta["source"]["probe"]
        fps_in = info["fps"]
        fps_out = min(cfg.fps, fps_in) if cfg.fps else fps_in
        size = fit_size(info["width"], info["height"], cfg.max_short_side)
        limits = self.config.limits
        if size[0] > limits.max_width or size[1] > limits.max_height:
            size = fit_size(size[0], size[1], None, max(limits.max_width, limits.max_height))
        plans = [
            output_frame_sources(c.meta["span"]["first_frame"], c.meta["span"]["last_frame"], fps_in, fps_out)
            for c in clips
        ]
        waiting = list(range(len(clips)))  # clip indices in start order (plans are sorted and disjoint)
        # Each clip is let go once handed on: holding the finished ones (mp4, keyframes, and whatever the stages
        # after this one add in the same worker) would grow the worker with the source's length.
        unfinished = dict(enumerate(clips))
        del clips
        opened: dict[int, _OpenClip] = {}
        index = -1
        try:
            for index, frame in enumerate(iter_frames(source.local_path, size=size)):
                while waiting and plans[waiting[0]][0] <= index:
                    i = waiting.pop(0)
                    opened[i] = _OpenClip(unfinished[i], plans[i], size, fps_out, cfg)
                for i in list(opened):
                    opened[i].feed(index, frame)
                    if opened[i].complete:
                        self._finish(opened.pop(i), size, fps_out)
                        yield unfinished.pop(i)
                if not waiting and not opened:
                    break  # nothing left to cut: stop decoding early
        except VideoError as exc:
            for i in list(opened):
                opened.pop(i).encoder.close()
                unfinished[i].fail(self.name, exc.reason, exc.message)
                yield unfinished.pop(i)
        finally:
            for clip in opened.values():  # clips the video ended inside (or the consumer stopped early)
                clip.encoder.close()
        for i in list(opened):
            unfinished[i].fail(self.name, "truncated",
                               f"{source.source_path}: the video ended at frame {index} inside this clip")
            yield unfinished.pop(i)
        for i in waiting:
            unfinished[i].fail(self.name, "truncated",
                               f"{source.source_path}: the video ended at frame {index} before this clip")
            yield unfinished.pop(i)

    def _finish(self, clip: _OpenClip, size, fps_out: float) -> None:
        record = clip.record
        record.put_bytes("mp4", clip.encoder.finish())
        record.blobs["keyframes"] = np.stack([clip.keyframes[i] for i in sorted(clip.keyframes)])
        record.meta["clip"] = {
            "width": size[0],
            "height": size[1],
            "fps": fps_out,
            "num_frames": clip.encoder.frames,
            "duration_s": clip.encoder.frames / fps_out,
            "codec": "h264",
        }
        record.meta["keyframes"] = [
            {"at": clip.keyframe_at[i], "frame": i} for i in sorted(clip.keyframes)
        ]
