"""The demo corpus: real encoded videos whose ground truth, captions and planted quality defects hold up on decode."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.video import iter_frames, probe
from pipeline.sources.demo_data import build_demo_corpus

FPS, WIDTH, HEIGHT = 24, 640, 360
SUBJECT_NOUNS = ("woman", "cat", "cup", "rocket", "motorcycle", "man with a camera")
LUMA = np.array([0.299, 0.587, 0.114])


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = build_demo_corpus(root, videos=2, seed=0)
    truth = json.loads((root / "ground_truth.json").read_text())
    metadata = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    return root, summary, truth, metadata


@pytest.fixture(scope="module")
def decoded(corpus):
    """Per video: decoded frame count, mean abs difference to the previous frame, and each shot's middle frame.

    Streamed, so the test never holds a whole video in memory.
    """
    root, _, truth, _ = corpus
    out = {}
    for name, gt in truth.items():
        middles = {(a + b) // 2 for a, b in gt["shots"]}
        diffs, mids, previous, count = [0.0], {}, None, 0
        for i, frame in enumerate(iter_frames(str(root / "videos" / name))):
            if previous is not None:
                diffs.append(float(np.abs(frame.astype(np.int16) - previous).mean()))
            if i in middles:
                mids[i] = frame
            previous, count = frame, i + 1
        out[name] = {"count": count, "diffs": diffs, "mids": mids}
    return out


def test_ground_truth_tiles_each_video(corpus):
    _, summary, truth, _ = corpus
    assert sorted(truth) == ["demo_000.mp4", "demo_001.mp4"]
    for gt in truth.values():
        spans = gt["shots"]
        assert gt["fps"] == FPS
        assert spans[0][0] == 0 and spans[-1][1] == gt["num_frames"] - 1
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
        assert all(first <= last for first, last in spans)
        assert gt["cuts"] == [first for first, _ in spans[1:]]
        assert 3 <= len(spans) <= 5
        assert len(gt["kinds"]) == len(spans)
    assert summary["videos"] == 2
    assert summary["shots"] == sum(len(gt["shots"]) for gt in truth.values())
    assert summary["frames"] == sum(gt["num_frames"] for gt in truth.values())


def test_shot_lengths_and_planted_cases(corpus):
    _, _, truth, _ = corpus
    kinds = [k for gt in truth.values() for k in gt["kinds"]]
    # A 2-video corpus must still exercise the splitter and both quality filters.
    assert kinds.count("long") == 1 and kinds.count("dark") == 1 and kinds.count("blur") == 1
    for gt in truth.values():
        for (a, b), kind in zip(gt["shots"], gt["kinds"]):
            seconds = (b - a + 1) / FPS
            if kind == "long":
                assert 12.4 <= seconds <= 13.6
            else:
                assert 2.45 <= seconds <= 7.05


def test_videos_probe_and_decode_to_ground_truth(corpus, decoded):
    root, _, truth, _ = corpus
    for name, gt in truth.items():
        info = probe(str(root / "videos" / name))
        assert (info.width, info.height) == (WIDTH, HEIGHT)
        assert info.fps == pytest.approx(FPS)
        assert info.num_frames == gt["num_frames"]
        assert decoded[name]["count"] == gt["num_frames"]


def test_metadata_matches_ground_truth(corpus):
    _, _, truth, metadata = corpus
    assert [row["video"] for row in metadata] == [f"videos/{name}" for name in truth]
    for row in metadata:
        gt = truth[Path(row["video"]).name]
        assert len(row["shots"]) == len(gt["shots"])
        for shot, (first, last), kind in zip(row["shots"], gt["shots"], gt["kinds"]):
            assert abs(shot["start_s"] * FPS - first) <= 1
            assert abs(shot["end_s"] * FPS - (last + 1)) <= 1
            caption = shot["caption"]
            assert caption.endswith(".") and caption[0].isupper()
            assert any(noun in caption for noun in SUBJECT_NOUNS), caption
            if kind == "dark":
                assert "dark" in caption
            if kind == "blur":
                assert "blurred" in caption


def test_every_cut_is_a_real_content_change(corpus, decoded):
    _, _, truth, _ = corpus
    for name, gt in truth.items():
        diffs = decoded[name]["diffs"]
        spans = gt["shots"]
        for cut, before, after in zip(gt["cuts"], spans, spans[1:]):
            within = max(max(diffs[before[0] + 1 : before[1] + 1]), max(diffs[after[0] + 1 : after[1] + 1]))
            assert diffs[cut] > 20, (name, cut, diffs[cut])
            assert diffs[cut] > 3 * within, (name, cut, diffs[cut], within)


def test_dark_shot_is_dark_and_blurred_shot_is_blurred(corpus, decoded):
    _, _, truth, _ = corpus
    luma, sharpness = {}, {}
    for name, gt in truth.items():
        for (a, b), kind in zip(gt["shots"], gt["kinds"]):
            frame = decoded[name]["mids"][(a + b) // 2]
            gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            luma.setdefault(kind, []).append(float((frame @ LUMA).mean()))
            sharpness.setdefault(kind, []).append(cv2.Laplacian(gray, cv2.CV_64F).var())
    lit = luma["normal"] + luma["long"] + luma["blur"]
    sharp = sharpness["normal"] + sharpness["long"]
    assert 5 <= luma["dark"][0] <= 16
    assert sharpness["blur"][0] < 15
    assert sharpness["blur"][0] < 0.2 * float(np.median(sharp))
    # Only the planted shots may trip the quality stage (default floors: mean luma 25, Laplacian variance 20).
    assert min(lit) > 35
    assert min(sharp) > 30


def test_same_seed_is_byte_identical(corpus, tmp_path):
    root, _, _, _ = corpus
    build_demo_corpus(tmp_path, videos=2, seed=0)
    assert _digests(tmp_path) == _digests(root)


def test_different_seed_gives_different_corpus(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_demo_corpus(a, videos=1, seed=0, width=160, height=96)
    build_demo_corpus(b, videos=1, seed=1, width=160, height=96)
    da, db = _digests(a), _digests(b)
    assert da.keys() == db.keys()
    assert all(da[k] != db[k] for k in da)


def test_rebuild_with_fewer_videos_removes_stale_ones(tmp_path):
    build_demo_corpus(tmp_path, videos=2, seed=0, width=160, height=96)
    build_demo_corpus(tmp_path, videos=1, seed=0, width=160, height=96)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["demo_000.mp4"]
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("kwargs", [{"width": 641}, {"height": 32}, {"videos": 0}, {"fps": 0}])
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_demo_corpus(tmp_path, **kwargs)
