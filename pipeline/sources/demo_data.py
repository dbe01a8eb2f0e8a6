"""A small, deterministic offline corpus of multi-shot videos built from the real photos bundled in scikit-image.

Every shot is a background photo under a moving camera (pan, tilt or zoom) with one or two subjects cut out of
other photos and composited on it with a feathered elliptical mask. Cuts are hard and always change the background,
so a shot detector has a true answer to find. The corpus also plants the cases the quality filters exist for: one
~13 s shot (longer than a clip, so the splitter must cut it), one near-black shot and one heavily blurred shot.

Only files that ship inside the scikit-image wheel are read: nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import skimage.io

from pipeline.core.video import encode_video


@dataclass(frozen=True)
class _Background:
    file: str
    gain: tuple[float, float, float] | None  # RGB gains: colour a grayscale photo or lift a dark one
    where: str  # how the caption places subjects on it
    sharpen: float = 0.0  # unsharp-mask amount applied after upscaling a soft photo


@dataclass(frozen=True)
class _Subject:
    file: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the photo; the mask is the ellipse inscribed in it
    noun: str  # the phrase the caption uses; its head noun is what the subject taxonomy matches
    pose: str


_BACKGROUNDS = {
    # Upscaled 1.3-1.7x these two fall below the quality stage's sharpness floor (20); sharpening keeps them near 50.
    "brick": _Background("brick.png", (1.15, 0.68, 0.52), "in front of a red brick wall", sharpen=1.0),
    "lawn": _Background("grass.png", (0.62, 1.0, 0.42), "on a grassy lawn"),
    "gravel": _Background("gravel.png", (1.0, 0.9, 0.74), "on a gravel path"),
    "coins": _Background("coins.png", (1.0, 0.93, 0.78), "in front of rows of old coins on a table"),
    "moon": _Background("moon.png", None, "on the grey cratered surface of the moon", sharpen=1.5),
    # Lifted from a mean luma of ~19 to ~45: ordinary shots must clear the quality stage's darkness floor (25).
    "galaxies": _Background("hubble_deep_field.jpg", (2.3, 2.3, 2.3), "against a night sky with galaxies"),
    "page": _Background("page.png", (1.0, 0.97, 0.88), "in front of a page of printed text"),
}

_SUBJECTS = {
    "woman": _Subject("astronaut.png", (100, 5, 370, 395), "a smiling woman in an orange spacesuit", "stands"),
    "cat": _Subject("chelsea.png", (30, 0, 430, 300), "a tabby cat", "sits"),
    "cup": _Subject("coffee.png", (70, 10, 490, 395), "a cup of coffee on a red saucer", "rests"),
    "rocket": _Subject("rocket.jpg", (272, 110, 372, 425), "a white rocket", "stands upright"),
    "motorcycle": _Subject("motorcycle_left.png", (80, 80, 700, 460), "a red motorcycle", "is parked"),
    "cameraman": _Subject("camera.png", (0, 55, 350, 512), "a man with a camera on a tripod", "films"),
}

_MOTIONS = {
    "pan_right": "the camera pans right",
    "pan_left": "the camera pans left",
    "tilt_up": "the camera tilts up",
    "tilt_down": "the camera tilts down",
    "zoom_in": "the camera slowly zooms in",
    "zoom_out": "the camera slowly zooms out",
}

_SHOT_S = (2.5, 7.0)
_LONG_SHOT_S = (12.5, 13.5)
_ZOOM = 1.3  # end/start scale of a zoom shot
_DARK_LUMA = 10.0  # mean luma the dark shot is exposed to
_BLUR_SIGMA = 8.0
_FEATHER = 0.3  # fraction of the ellipse radius over which a cutout fades out


@dataclass(frozen=True)
class _Placed:
    key: str
    center: tuple[float, float]  # frame pixels at the middle of the shot
    height: float  # frame pixels at the middle of the shot
    drift: tuple[float, float]  # frame pixels moved over the whole shot
    grow: float  # relative scale change over the whole shot


@dataclass(frozen=True)
class _Shot:
    frames: int
    background: str
    motion: str
    speed: float  # pan/tilt speed in frame pixels per second
    subjects: tuple[_Placed, ...]
    kind: str  # "normal", "long", "dark" or "blur"


def build_demo_corpus(
    out_dir, videos: int = 6, seed: int = 0, width: int = 640, height: int = 360, fps: int = 24
) -> dict:
    """Write `videos` demo mp4s, their captions and their true shot boundaries under `out_dir`.

    Layout: `videos/demo_NNN.mp4`, `metadata.jsonl` (one line per video: its shots' start_s, end_s and caption)
    and `ground_truth.json` (per video file name: fps, num_frames, cuts, inclusive [first, last] frame spans per
    shot and each shot's kind). The same arguments give byte-identical files. With `videos >= 1` the corpus holds
    one ~13 s shot and one near-black and one heavily blurred shot (spread over the first three videos). Returns
    counts: videos, shots, frames, duration_s and out_dir.
    """
    if videos < 1:
        raise ValueError(f"videos must be >= 1, got {videos}")
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 64 (H.264 yuv420p), got {width}x{height}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    out = Path(out_dir)
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    # A smaller rebuild into the same folder must not leave videos behind that the metadata no longer lists.
    for stale in video_dir.glob("demo_*.mp4"):
        if re.fullmatch(r"demo_\d{3}\.mp4", stale.name) and int(stale.stem[5:]) >= videos:
            stale.unlink()

    rng = np.random.default_rng(seed)
    plans = _plan(rng, videos, width, height, fps)
    metadata, truth = [], {}
    total_frames = total_shots = 0
    for index, shots in enumerate(plans):
        name = f"demo_{index:03d}.mp4"
        encode_video(
            str(video_dir / name), _render(shots, width, height, fps), fps, crf=20, preset="veryfast", threads=1
        )
        spans, first = [], 0
        for shot in shots:
            spans.append([first, first + shot.frames - 1])
            first += shot.frames
        metadata.append(
            {
                "video": f"videos/{name}",
                "shots": [
                    {"start_s": round(a / fps, 6), "end_s": round((b + 1) / fps, 6), "caption": _caption(shot)}
                    for (a, b), shot in zip(spans, shots)
                ],
            }
        )
        truth[name] = {
            "fps": fps,
            "num_frames": first,
            "cuts": [a for a, _ in spans[1:]],
            "shots": spans,
            "kinds": [shot.kind for shot in shots],
        }
        total_frames += first
        total_shots += len(shots)

    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in metadata)
    with open(out / "ground_truth.json", "w", encoding="utf-8") as f:
        # One video per line: readable, and still one JSON object.
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in truth.items()) + "\n}\n")
    return {
        "videos": videos,
        "shots": total_shots,
        "frames": total_frames,
        "duration_s": round(total_frames / fps, 3),
        "out_dir": str(out),
    }


def _plan(rng: np.random.Generator, videos: int, width: int, height: int, fps: int) -> list[list[_Shot]]:
    # The special shots go to videos 0, 1 and 2, wrapping around, so a 2-video corpus still holds all three.
    specials: list[list[str]] = [[] for _ in range(videos)]
    for kind, v in (("long", 0), ("dark", 1), ("blur", 2)):
        specials[v % videos].append(kind)
    subject_keys = list(_SUBJECTS)
    deck: list[str] = []
    main_order = rng.permutation(len(subject_keys))
    plans = []
    for v in range(videos):
        # The long shot opens its video; dark and blurred shots sit at odd positions so they are never adjacent.
        flagged = [k for k in specials[v] if k != "long"]
        n_shots = max(int(rng.integers(3, 6)), 2 * len(flagged))
        kinds = ["normal"] * n_shots
        if "long" in specials[v]:
            kinds[0] = "long"
        for i, kind in enumerate(flagged):
            kinds[2 * i + 1] = kind
        # Each video follows one main subject across its shots, as a subject-to-video sample would.
        main = subject_keys[main_order[v % len(subject_keys)]]
        shots, background = [], None
        for kind in kinds:
            background = _next_background(rng, deck, background)
            seconds = rng.uniform(*(_LONG_SHOT_S if kind == "long" else _SHOT_S))
            keys = [main]
            if rng.random() < 0.5:
                keys.append(str(rng.choice([s for s in subject_keys if s != main])))
                rng.shuffle(keys)
            shots.append(
                _Shot(
                    frames=round(seconds * fps),
                    background=background,
                    motion=str(rng.choice(list(_MOTIONS))),
                    speed=float(rng.uniform(12.0, 28.0)) * width / 640,
                    subjects=tuple(_place(rng, keys, width, height)),
                    kind=kind,
                )
            )
        plans.append(shots)
    return plans


def _next_background(rng: np.random.Generator, deck: list[str], previous: str | None) -> str:
    """Deal backgrounds from shuffled decks so all are used evenly, never the same one twice in a row."""
    while True:
        for i, key in enumerate(deck):
            if key != previous:
                return deck.pop(i)
        deck.extend(str(k) for k in rng.permutation(list(_BACKGROUNDS)))


def _place(rng: np.random.Generator, keys: list[str], width: int, height: int) -> Iterator[_Placed]:
    slots = [0.5] if len(keys) == 1 else [0.28, 0.72]
    fraction = (0.6, 0.8) if len(keys) == 1 else (0.45, 0.62)
    for key, slot in zip(keys, slots):
        yield _Placed(
            key=key,
            center=(
                (slot + rng.uniform(-0.06, 0.06)) * width,
                (0.55 + rng.uniform(-0.04, 0.04)) * height,
            ),
            height=rng.uniform(*fraction) * height,
            drift=(rng.uniform(-0.08, 0.08) * width, rng.uniform(-0.04, 0.04) * height),
            grow=rng.uniform(-0.08, 0.08),
        )


def _caption(shot: _Shot) -> str:
    nouns = [_SUBJECTS[p.key].noun for p in shot.subjects]
    where = _BACKGROUNDS[shot.background].where
    who = " and ".join(nouns)
    if shot.kind == "dark":
        verb = "is" if len(nouns) == 1 else "are"
        return f"A very dark, underexposed shot in which {who} {verb} barely visible {where}."
    if shot.kind == "blur":
        return f"A heavily blurred, out-of-focus shot of {who} {where}."
    if len(nouns) == 1:
        subject = f"{nouns[0]} {_SUBJECTS[shot.subjects[0].key].pose}"
    else:
        subject = f"{nouns[0]} and {nouns[1]} appear side by side"
    return f"{subject[0].upper()}{subject[1:]} {where} while {_MOTIONS[shot.motion]}."


def _render(shots: list[_Shot], width: int, height: int, fps: int) -> Iterator[np.ndarray]:
    for shot in shots:
        yield from _render_shot(shot, width, height, fps)


def _render_shot(shot: _Shot, width: int, height: int, fps: int) -> Iterator[np.ndarray]:
    n = shot.frames
    photo = _background_photo(shot.background)
    ph, pw = photo.shape[:2]
    # Scale the photo once per shot to the largest size the shot needs, so each frame's warp stays inside it and
    # only shrinks. Capping the travel caps that scale: a long pan over a 512 px photo would otherwise upscale it
    # 2x and read as blurry.
    travel = min(shot.speed * n / fps, 0.3 * width)
    if shot.motion.startswith("pan"):
        need_w, need_h, zoom = width + travel, height, (1.0, 1.0)
    elif shot.motion.startswith("tilt"):
        need_w, need_h, zoom = width, height + travel, (1.0, 1.0)
    else:
        need_w, need_h = width * _ZOOM, height * _ZOOM
        zoom = (1 / _ZOOM, 1.0) if shot.motion == "zoom_in" else (1.0, 1 / _ZOOM)
    scale = 1.02 * max(need_w / pw, need_h / ph)
    source = cv2.resize(
        photo,
        (int(np.ceil(pw * scale)), int(np.ceil(ph * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
    )
    amount = _BACKGROUNDS[shot.background].sharpen
    if amount and scale > 1:
        source = cv2.addWeighted(source, 1 + amount, cv2.GaussianBlur(source, (0, 0), scale), -amount, 0)
    sh, sw = source.shape[:2]
    half = travel / 2
    start = np.array([sw / 2, sh / 2])
    direction = {"pan_right": (1, 0), "pan_left": (-1, 0), "tilt_up": (0, -1), "tilt_down": (0, 1)}
    step = np.array(direction.get(shot.motion, (0, 0)), dtype=float) * half
    cutouts = [(p, _cutout(p.key, p.height)) for p in shot.subjects]

    gain = None
    for i in range(n):
        t = i / max(n - 1, 1)
        z = zoom[0] + (zoom[1] - zoom[0]) * t
        cx, cy = start + step * (2 * t - 1)
        # Maps photo pixels to frame pixels: the view of size (width/z, height/z) centred on (cx, cy).
        m = np.array([[z, 0, width / 2 - z * cx], [0, z, height / 2 - z * cy]])
        frame = cv2.warpAffine(source, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        for placed, patch in cutouts:
            _composite(frame, patch, placed, t)
        if shot.kind == "dark":
            if gain is None:
                # One exposure for the whole shot, set from its first frame, so the shot does not flicker.
                luma = frame.reshape(-1, 3).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                gain = _DARK_LUMA / max(float(luma.mean()), 1.0)
            frame = cv2.convertScaleAbs(frame, alpha=gain)
        elif shot.kind == "blur":
            frame = cv2.GaussianBlur(frame, (0, 0), _BLUR_SIGMA)
        yield frame


def _composite(frame: np.ndarray, patch: np.ndarray, placed: _Placed, t: float) -> None:
    """Blend an RGBA cutout into `frame` in place, at its position and scale at shot time t in [0, 1]."""
    height, width = frame.shape[:2]
    ph, pw = patch.shape[:2]
    k = 1 + placed.grow * (t - 0.5)
    cx = placed.center[0] + placed.drift[0] * (t - 0.5)
    cy = placed.center[1] + placed.drift[1] * (t - 0.5)
    left, top = cx - k * pw / 2, cy - k * ph / 2
    x0, y0 = max(int(np.floor(left)), 0), max(int(np.floor(top)), 0)
    x1, y1 = min(int(np.ceil(left + k * pw)), width), min(int(np.ceil(top + k * ph)), height)
    if x1 <= x0 or y1 <= y0:
        return
    # Warp and blend only the region the cutout covers, not the whole frame: this loop runs per subject per frame.
    m = np.array([[k, 0, left - x0], [0, k, top - y0]])
    warped = cv2.warpAffine(patch, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = warped[..., 3:].astype(np.uint16)
    region = frame[y0:y1, x0:x1]
    region[:] = ((warped[..., :3] * alpha + region * (255 - alpha) + 127) // 255).astype(np.uint8)


@cache
def _photo(file: str) -> np.ndarray:
    """A bundled photo as HxWx3 uint8 RGB (grayscale replicated, alpha dropped); read-only and cached."""
    path = resources.files("skimage") / "data" / file
    image = skimage.io.imread(str(path))
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3])
    image.flags.writeable = False
    return image


@cache
def _background_photo(key: str) -> np.ndarray:
    spec = _BACKGROUNDS[key]
    image = _photo(spec.file)
    if spec.gain is not None:
        image = np.clip(image * np.array(spec.gain, np.float32), 0, 255).astype(np.uint8)
        image.flags.writeable = False
    return image


@lru_cache(maxsize=64)
def _cutout(key: str, height: float) -> np.ndarray:
    """The subject's box scaled to `height` frame pixels, as RGBA with a feathered elliptical alpha."""
    spec = _SUBJECTS[key]
    x0, y0, x1, y1 = spec.box
    crop = _photo(spec.file)[y0:y1, x0:x1]
    scale = height / crop.shape[0]
    size = (max(round(crop.shape[1] * scale), 2), max(round(height), 2))
    rgb = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx + 0.5) / (w / 2) - 1) ** 2 + ((yy + 0.5) / (h / 2) - 1) ** 2)
    # Smoothstep from the ellipse edge inwards: a hard edge would read as a sticker, not a subject in the scene.
    s = np.clip((1 - r) / _FEATHER, 0, 1)
    alpha = np.round(255 * s * s * (3 - 2 * s)).astype(np.uint8)
    patch = np.dstack([rgb, alpha])
    patch.flags.writeable = False
    return patch
