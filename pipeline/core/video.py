"""The one way this project probes, decodes and encodes video (PyAV; no ffmpeg binary needed).

Decoding is always streamed frame by frame: no function here holds a whole video in memory.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from pipeline.core.errors import UserFacingError

# Containers FFmpeg opens that hold still images, not videos.
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe", "mjpeg"}


class VideoError(UserFacingError):
    """A video that cannot be used. `reason` is a short stable code; the message says what and why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ProbeInfo:
    container: str
    codec: str
    width: int  # display size, after rotation
    height: int
    fps: float
    num_frames: int  # from the container header; a truncated file may decode fewer
    duration_s: float
    rotation: int  # degrees counter-clockwise that frames are turned to display upright
    has_audio: bool
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def open_video(path: str | BinaryIO, max_pixels: int | None = None, name: str | None = None):
    """`av.open(path)`; with `max_pixels` (a clip from a shard made elsewhere), the frame size is read from the
    headers without decoding a frame and a video over it is refused (VideoError "too_large"), and FFmpeg itself is
    told the limit, so a stream that changes size mid-way cannot decode a bigger frame either."""
    if max_pixels is None:
        return av.open(path)
    limit = {"max_pixels": str(max_pixels)}
    container = av.open(path, options=limit)  # the limit also stops the decode av.open does to find stream facts
    if container.streams.video:
        context = container.streams.video[0].codec_context
        if context.width * context.height > max_pixels:
            container.close()
            raise VideoError("too_large", f"{name or path}: {context.width}x{context.height} frames, over the "
                             f"limit of {max_pixels} pixels (S2V_LIMIT_MAX_PIXELS); not decoded")
        context.options = limit
    return container


def probe(path: str | BinaryIO, name: str | None = None, max_pixels: int | None = None) -> ProbeInfo:
    """Read container/stream facts and decode the first frame (proving the file is a decodable video). `path` may
    be an open binary file (a clip read from a shard); `name` says what it is in errors (an input in object storage
    is probed from a local copy: errors name the input, not the copy). `max_pixels`: see `open_video`."""
    source = path
    if isinstance(source, str):
        size = os.path.getsize(source)
        path = name or path
    else:
        size = source.seek(0, os.SEEK_END)
        source.seek(0)
        path = name or "<in-memory video>"
    if size == 0:
        raise VideoError("empty_file", f"{path}: the file is empty (0 bytes)")
    try:
        container = open_video(source, max_pixels, path)
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError("not_a_video", f"{path}: FFmpeg cannot open it as a media file ({exc})") from None
    with container:
        fmt = container.format.name
        if not container.streams.video:
            if not container.streams.audio:
                raise VideoError("not_a_video", f"{path}: FFmpeg found no audio or video streams in it")
            raise VideoError("no_video_stream", f"{path}: no video stream (audio-only file, container {fmt})")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if fmt.split(",")[0] in _IMAGE_FORMATS or codec in {"png", "bmp", "webp", "tiff"}:
            raise VideoError("not_a_video", f"{path}: a still image ({fmt}/{codec}), not a video")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise VideoError("no_frame_rate", f"{path}: the video stream has no frame rate")
        fps = float(rate)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        num_frames = int(stream.frames) if stream.frames else round(duration * fps)
        try:
            first = next(container.decode(stream))
        except (StopIteration, av.error.FFmpegError) as exc:
            raise VideoError("decode_error", f"{path}: no frame could be decoded ({exc or 'empty stream'})") from None
        rotation = int(first.rotation) % 360
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        if duration <= 0:
            duration = num_frames / fps
        return ProbeInfo(
            container=fmt,
            codec=codec,
            width=width,
            height=height,
            fps=fps,
            num_frames=num_frames,
            duration_s=duration,
            rotation=rotation,
            has_audio=bool(container.streams.audio),
            bytes=size,
        )


def fit_size(width: int, height: int, max_short_side: int | None, max_long_side: int | None = None) -> tuple[int, int]:
    """Largest even size with the same aspect that fits the limits; never upscales."""
    scale = 1.0
    short, long_ = min(width, height), max(width, height)
    if max_short_side and short > max_short_side:
        scale = min(scale, max_short_side / short)
    if max_long_side and long_ > max_long_side:
        scale = min(scale, max_long_side / long_)
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    return w, h


def iter_frames(
    path: str,
    size: tuple[int, int] | None = None,
    pix_fmt: str = "rgb24",
    threads: int = 1,
    max_pixels: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield frames in display orientation as HxWx3 uint8 arrays, one at a time.

    `size` is the (width, height) to scale to, in display orientation. A decode error after some frames ends the
    iteration with VideoError("truncated") so callers can keep what was decoded. `max_pixels`: see `open_video`.
    """
    try:
        container = open_video(path, max_pixels)
    except av.error.FFmpegError as exc:
        raise VideoError("not_a_video", f"{path}: FFmpeg cannot open it ({exc})") from None
    try:
        stream = container.streams.video[0]
        # One decode thread by default: Ray runs one task per core, and extra threads would only contend.
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        stream.codec_context.thread_count = threads
        count = 0
        try:
            for frame in container.decode(stream):
                rotation = int(frame.rotation) % 360
                if size is not None:
                    w, h = size if rotation in (0, 180) else (size[1], size[0])
                    frame = frame.reformat(width=w, height=h, format=pix_fmt)
                array = frame.to_ndarray(format=pix_fmt)
                if rotation:
                    array = np.ascontiguousarray(np.rot90(array, k=rotation // 90))
                count += 1
                yield array
        except av.error.FFmpegError as exc:
            raise VideoError("truncated", f"{path}: decoding stopped after {count} frames ({exc})") from None
    finally:
        container.close()


def read_frames(
    path, indices, size: tuple[int, int] | None = None, pix_fmt: str = "rgb24", max_pixels: int | None = None
) -> dict[int, np.ndarray]:
    """Only the frames at `indices` (0-based), as {index: HxWx3 uint8} in display orientation.

    Seeks to the keyframe at or before the first index and converts only the wanted frames, so a late window of a
    clip with short GOPs costs a few frames of decoding, not the whole clip. Indices past the end are missing from
    the result; a decode error ends it early with what was read (like a truncated file). `path` may be a file-like.
    `max_pixels`: see `open_video`.
    """
    wanted = sorted(set(indices))
    if not wanted:
        return {}
    kept = _read_selected(path, wanted, size, pix_fmt, seek=wanted[0] > 0, max_pixels=max_pixels)
    if kept is None:  # frames without timestamps cannot be placed after a seek: read from the start instead
        if hasattr(path, "seek"):
            path.seek(0)
        kept = _read_selected(path, wanted, size, pix_fmt, seek=False, max_pixels=max_pixels)
    return kept


def _read_selected(path, wanted: list[int], size, pix_fmt: str, seek: bool,
                   max_pixels: int | None = None) -> dict[int, np.ndarray] | None:
    container = open_video(path, max_pixels)
    kept: dict[int, np.ndarray] = {}
    targets = set(wanted)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        rate = stream.average_rate or stream.guessed_rate
        base, origin = stream.time_base, stream.start_time or 0
        if seek and rate and base:
            container.seek(origin + int(wanted[0] / float(rate) / float(base)), stream=stream, backward=True)
        else:
            seek = False
        try:
            for count, frame in enumerate(container.decode(stream)):
                if not seek:
                    index = count
                elif frame.pts is None:
                    return None
                else:
                    index = round(float((frame.pts - origin) * base * rate))
                if index > wanted[-1]:
                    break
                if index in kept or index not in targets:
                    continue
                rotation = int(frame.rotation) % 360
                if size is not None:
                    w, h = size if rotation in (0, 180) else (size[1], size[0])
                    frame = frame.reformat(width=w, height=h, format=pix_fmt)
                array = frame.to_ndarray(format=pix_fmt)
                kept[index] = np.ascontiguousarray(np.rot90(array, k=rotation // 90)) if rotation else array
                if len(kept) == len(wanted):
                    break
        except av.error.FFmpegError:
            pass
    finally:
        container.close()
    return kept


class ClipEncoder:
    """Encodes RGB frames into an in-memory H.264 mp4 (yuv420p, so width and height must be even)."""

    def __init__(self, width: int, height: int, fps: float, crf: int = 23, preset: str = "veryfast", threads: int = 1,
                 keyframe_s: float = 1.0):
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.thread_count = threads
        # A keyframe every `keyframe_s` (x264's default is every 250 frames, i.e. one GOP per clip): a trainer that
        # samples a window late in a clip then seeks to the keyframe before it instead of decoding from frame 0.
        keyint = str(max(1, round(fps * keyframe_s)))
        self._stream.options = {"crf": str(crf), "preset": preset, "g": keyint, "keyint_min": keyint}
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        frame.time_base = Fraction(1, 1) / self._stream.codec_context.framerate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()

    def close(self) -> None:
        """Release the encoder without producing output (for error paths)."""
        with contextlib.suppress(av.error.FFmpegError):
            self._container.close()


def encode_video(path: str, frames, fps: float, **kw) -> None:
    """Write frames (an iterable of equal-size RGB arrays) to an mp4 file."""
    encoder = None
    for rgb in frames:
        if encoder is None:
            encoder = ClipEncoder(rgb.shape[1], rgb.shape[0], fps, **kw)
        encoder.add(rgb)
    if encoder is None:
        raise ValueError("encode_video needs at least one frame")
    data = encoder.finish()
    with open(path, "wb") as f:
        f.write(data)
