import io

import av
import numpy as np
import pytest

from pipeline.core.video import ClipEncoder, VideoError, encode_video, fit_size, iter_frames, probe, read_frames


def test_encode_probe_decode_roundtrip(tmp_path):
    frames = [np.full((64, 96, 3), 10 * i, np.uint8) for i in range(12)]
    path = tmp_path / "v.mp4"
    encode_video(str(path), iter(frames), fps=12)
    info = probe(str(path))
    assert (info.width, info.height, info.fps, info.num_frames, info.codec) == (96, 64, 12.0, 12, "h264")
    decoded = list(iter_frames(str(path)))
    assert len(decoded) == 12
    assert [int(f.mean()) for f in decoded] == pytest.approx([10 * i for i in range(12)], abs=3)
    small = next(iter_frames(str(path), size=(48, 32)))
    assert small.shape == (32, 48, 3)


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "rot.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=24)
    stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
    stream.set_display_rotation(90)
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :8] = 255  # bright strip on the left edge of the stored frame
    for _ in range(4):
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    info = probe(str(path))
    assert (info.rotation, info.width, info.height) == (90, 32, 64)
    upright = next(iter_frames(str(path)))
    assert upright.shape == (64, 32, 3)
    # 90 degrees counter-clockwise moves the stored left edge to the bottom.
    assert upright[-8:].mean() > 200 and upright[:8].mean() < 50
    assert next(iter_frames(str(path), size=(16, 32))).shape == (32, 16, 3)


def test_fit_size_keeps_aspect_and_never_upscales():
    assert fit_size(1920, 1080, 360) == (640, 360)
    assert fit_size(1080, 1920, 360) == (360, 640)
    assert fit_size(320, 180, 360) == (320, 180)
    assert fit_size(4000, 3000, None, 1000) == (1000, 750)


def test_encoder_output_is_deterministic():
    def encode():
        enc = ClipEncoder(64, 48, 24)
        for i in range(10):
            enc.add(np.full((48, 64, 3), i * 20, np.uint8))
        return enc.finish()

    assert encode() == encode()


def test_unopenable_file_raises_video_error(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\x00" * 1000)
    with pytest.raises(VideoError) as exc:
        probe(str(path))
    assert exc.value.reason == "not_a_video"


def test_probe_reads_a_clip_in_memory_and_names_it_in_errors():
    encoder = ClipEncoder(64, 48, 12)
    for i in range(6):
        encoder.add(np.full((48, 64, 3), 40 * i, np.uint8))
    info = probe(io.BytesIO(encoder.finish()), name="k1.mp4")
    assert (info.width, info.height, info.fps, info.num_frames, info.codec) == (64, 48, 12.0, 6, "h264")
    with pytest.raises(VideoError) as exc:
        probe(io.BytesIO(b"\x00" * 1000), name="k2.mp4")
    assert exc.value.reason == "not_a_video" and exc.value.message.startswith("k2.mp4: ")
    with pytest.raises(VideoError, match="empty"):
        probe(io.BytesIO(b""))


def _moving_clip(frames: int, fps: float = 12) -> bytes:
    encoder = ClipEncoder(64, 48, fps)
    for i in range(frames):
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, i % 64] = 255  # a bright column that moves one pixel per frame: every frame differs
        image[..., 1] = 4 * i
        encoder.add(image)
    return encoder.finish()


def test_clip_encoder_puts_a_keyframe_every_second():
    container = av.open(io.BytesIO(_moving_clip(40, fps=12)))
    stream = container.streams.video[0]
    keyframes = sorted(p.pts * stream.time_base * 12 for p in container.demux(stream) if p.is_keyframe)
    # x264 may add a keyframe at a scene cut, but never leaves more than a second without one.
    assert keyframes[0] == 0 and len(keyframes) >= 4
    assert max(b - a for a, b in zip(keyframes, keyframes[1:] + [40])) <= 12


def test_read_frames_seeks_and_returns_exactly_the_asked_frames():
    data = _moving_clip(40)
    every = list(iter_frames(io.BytesIO(data)))
    asked = [37, 29, 30, 31, 45]  # unordered, across keyframes, one past the end
    got = read_frames(io.BytesIO(data), asked)
    assert sorted(got) == [29, 30, 31, 37]
    for i, frame in got.items():
        assert np.array_equal(frame, every[i]), i
    small = read_frames(io.BytesIO(data), [0, 1], size=(32, 24))
    assert sorted(small) == [0, 1] and small[1].shape == (24, 32, 3)
    assert read_frames(io.BytesIO(data), []) == {}
