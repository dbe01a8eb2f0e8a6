"""`contact_sheet`: a PNG of a real sample and of cross-paired samples, checked by its pixels: the frames, the
references (their own pixels, framed in their entity's colour), the plate and the caption highlights are there.
And `s2v shards show` on an output directory from elsewhere (issue 20): decoded-size bombs, KEY.json sizes that are
no sizes, hostile shards, index.json and manifest.parquet, terminal escapes and counts in KEY.json are a clear
error or a sheet of ordinary size, never a traceback, a hang or gigabytes."""

import functools
import io
import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from pipeline.cli.main import main
from pipeline.core.config import OutputConfig
from pipeline.core.untrusted import read_limits
from pipeline.core.video import ClipEncoder
from pipeline.inspection.contact_sheet import (
    MAX_KEYFRAMES,
    MAX_REFERENCES,
    PALETTE,
    ContactSheetError,
    contact_sheet,
    find_sample,
    render_contact_sheet,
)
from pipeline.postpass.cross_pairs import build_cross_pairs, decode_png
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import write_outputs
from pipeline.store.shards import ShardSink
from pipeline.testing import synthetic_runs

UNDECODABLE_SOURCE = 3  # its samples keep pipeline.testing.synthetic_runs' placeholder mp4 bytes


def real_clip() -> bytes:
    """12 frames (160x96) of a pan over a photo, H.264."""
    picture = data.astronaut()
    encoder = ClipEncoder(160, 96, 24)
    for i in range(12):
        encoder.add(np.ascontiguousarray(cv2.resize(picture[i * 10:i * 10 + 300, i * 12:i * 12 + 500], (160, 96))))
    return encoder.finish()


@pytest.fixture(scope="module")
def cross_sheet_run(tmp_path_factory) -> Path:
    """pipeline.testing.synthetic_runs' committed run (4 sources, 20 own samples), with a real clip in each sample
    but those of one source, its cross-pair pass and the derived files."""
    out = tmp_path_factory.mktemp("cross_sheet") / "out"
    ledger = Ledger(out)
    sink = ShardSink(out, OutputConfig(shard_max_samples=64), ledger, ledger.recover())
    clip = real_clip()
    for source in range(4):
        entry, samples = synthetic_runs.source_entry_and_samples(source)
        for sample in samples:
            if source != UNDECODABLE_SOURCE:
                sample["mp4"] = clip
        sink.add_source(entry, samples)
    sink.close()
    build_cross_pairs(out, synthetic_runs.config(), ledger, ledger.recover())
    write_outputs(out, Ledger(out).read())
    return out


def region(image: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


def gray(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64).mean(axis=2)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def shown_like(sheet: np.ndarray, box, picture: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Correlation of a panel with `picture` scaled to it, inside `mask` (the tint over the mask is affine), away
    from the mask's outline drawn on the panel."""
    shown = gray(region(sheet, box))
    size = (shown.shape[1], shown.shape[0])
    expected = gray(cv2.resize(picture, size, interpolation=cv2.INTER_AREA))
    if mask is None:
        return correlation(shown, expected)
    inside = cv2.erode((cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8),
                       np.ones((9, 9), np.uint8)) > 0
    return correlation(shown[inside], expected[inside])


def entity_colors(meta: dict) -> dict[str, tuple]:
    return {e["id"]: PALETTE[i % len(PALETTE)] for i, e in enumerate(meta["entities"])}


def test_a_real_sample_shows_frames_references_plate_and_caption(curated_out, tmp_path):
    keys = pq.read_table(curated_out / "manifest.parquet", columns=["key"]).column("key").to_pylist()
    for key in keys:
        png = contact_sheet(curated_out, key, tmp_path / f"{key}.png")
        sample = find_sample(curated_out, key)
        sheet = render_contact_sheet(sample)
        pixels = np.array(Image.open(png))
        assert pixels.shape == (sheet.image.height, 1600, 3) and np.array_equal(pixels, np.array(sheet.image))
        assert pixels.shape[0] > 700 and pixels.std() > 30
        meta = json.loads(sample.parts["json"])
        names = {p.name for p in sheet.panels}
        assert {f"frame{i}" for i in range(6)} | {f"keyframe{k}" for k in range(len(meta["keyframes"]))} <= names
        first, last = region(pixels, sheet.panel("frame0").box), region(pixels, sheet.panel("frame5").box)
        assert first.std() > 20 and np.abs(first.astype(int) - last.astype(int)).mean() > 2  # decoded, and moving

        colors = entity_colors(meta)
        references = [(e, r) for e in meta["entities"] for r in e.get("references", [])]
        assert references
        for entity, ref in references:
            panel = sheet.panel(Path(ref["file"]).stem)
            picture, mask = decode_png(sample.parts[ref["file"]]), decode_png(sample.parts[ref["mask"]])
            assert shown_like(pixels, panel.box, picture, mask) > 0.9
            x0, y0, _, _ = panel.box
            assert tuple(pixels[y0 - 2, x0 - 2]) == tuple(pixels[y0 + 5, x0 - 3]) == colors[entity["id"]]
            assert ref["variant"] in panel.lines[0] and entity["word"] in panel.lines[1]
        if meta["background"]:
            assert shown_like(pixels, sheet.panel("bg").box, decode_png(sample.parts["bg.png"])) > 0.95

        caption = region(pixels, sheet.panel("caption").box).reshape(-1, 3)
        for entity in meta["entities"]:
            if entity.get("span"):
                tint = np.array([int(c + (255 - c) * 0.6) for c in colors[entity["id"]]])
                assert (caption == tint).all(axis=1).sum() > 100, entity["word"]


def test_cross_paired_samples_show_the_swapped_references_and_where_they_come_from(cross_sheet_run, tmp_path):
    rows = Ledger(cross_sheet_run).read().cross["samples"]
    decodable = [r for r in rows if int(r["base"].split("-")[0], 16) != UNDECODABLE_SOURCE]
    seen = set()
    for row in decodable:
        sample = find_sample(cross_sheet_run, row["key"])
        meta = json.loads(sample.parts["json"])
        sheet = render_contact_sheet(sample, frames=4)
        pixels = np.array(sheet.image)
        assert {"frame0", "frame3"} <= {p.name for p in sheet.panels}  # no clip metadata: the frames are counted
        for entity in meta["entities"]:
            for ref in entity.get("references", []):
                kind = (ref.get("cross") or {}).get("kind")
                if kind is None:
                    continue
                seen.add(kind)
                panel = sheet.panel(Path(ref["file"]).stem)
                picture = decode_png(sample.parts[ref["file"]])
                x0, y0, x1, y1 = panel.box
                # The cross pixels are shown, not the base's: a composite is plate-sized (landscape), a base
                # reference is a portrait crop.
                assert abs((x1 - x0) / (y1 - y0) - picture.shape[1] / picture.shape[0]) < 0.05
                assert shown_like(pixels, panel.box, picture, decode_png(sample.parts[ref["mask"]])) > 0.9
                text = "\n".join(panel.lines)
                if kind == "same_identity":
                    assert ref["cross"]["from_key"] in text
                else:
                    assert ref["cross"]["background_from"] in text
    assert seen == {"same_identity", "composite"}
    png = contact_sheet(cross_sheet_run, decodable[0]["key"], tmp_path / "sheets" / "cross.png")
    assert png.is_file() and Image.open(png).size[0] == 1600


def test_a_sample_whose_clip_cannot_be_decoded_still_gets_a_sheet(cross_sheet_run):
    key = next(k for k in pq.read_table(cross_sheet_run / "manifest.parquet", columns=["key"]).column("key")
               .to_pylist() if int(k.split("-")[0], 16) == UNDECODABLE_SOURCE and not k.endswith("-x"))
    sheet = render_contact_sheet(find_sample(cross_sheet_run, key))
    names = {p.name for p in sheet.panels}
    assert not any(n.startswith("frame") for n in names) and "ref0" in names and "bg" in names


def test_an_unknown_key_names_the_close_matches_and_a_unique_prefix_is_enough(curated_out, tmp_path):
    keys = sorted(pq.read_table(curated_out / "manifest.parquet", columns=["key"]).column("key").to_pylist())
    typo = keys[0][:-1] + ("0" if keys[0][-1] != "0" else "1")
    with pytest.raises(ContactSheetError, match=typo) as caught:
        contact_sheet(curated_out, typo, tmp_path / "x.png")
    assert keys[0] in str(caught.value) and not (tmp_path / "x.png").exists()
    assert find_sample(curated_out, keys[0][:-1]).key == keys[0]
    source = keys[0].split("-")[0]  # the fixture's samples come from one source
    # Examples of its dropped clips (rejects/) can be drawn too, so they count among the keys a prefix names.
    rejected = [k for k in Ledger(curated_out).read().reject_shards() if k.startswith(source)]
    with pytest.raises(ContactSheetError, match=f"is the start of {len(keys) + len(rejected)} keys"):
        find_sample(curated_out, source)
    with pytest.raises(ContactSheetError, match="no index.json"):
        find_sample(tmp_path, keys[0])


# ---------------------------------------------------------------------------------------------------------------
# Output directories from elsewhere (issue 20)

KEY = "k1"
SHARD = "shards/train-000000.tar"


@functools.cache
def small_clip() -> bytes:
    return real_clip()


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 128 if mode in ("L", "1", "P", "I;16") else None).save(buf, "PNG")
    return buf.getvalue()


def noise_png(width: int, height: int) -> bytes:
    return cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8))[1].tobytes()


def sample_meta(**changes) -> dict:
    """A KEY.json as the pipeline writes it (the fields the sheet draws), with `changes` on top."""
    meta = {"key": KEY, "clip": {"width": 160, "height": 96, "fps": 24.0, "num_frames": 12},
            "source": {"id": "s0", "path": "/v/s0.mp4"},
            "entities": [{"id": "e0", "kind": "subject", "word": "woman", "group": "g0", "span": [2, 7],
                          "references": [{"file": "ref0.png", "mask": "mask0.png", "variant": "crop",
                                          "subject_id": 0, "view_id": 0, "keyframe": 0, "frame_index": 6}]},
                         {"id": "e9", "kind": "background", "word": "wall"}],
            "keyframes": [{"frame": 6}],
            "detections": [{"id": "d0", "entity": "e0", "label": "woman", "keyframe": 0, "box": [20, 10, 90, 80],
                            "valid": True}],
            "background": {"file": "bg.png", "keyframe": 0, "backend": "lama", "mask_area": 0.2},
            "caption": {"text": "a woman by a wall"}}
    meta.update(changes)
    return meta


def sample_members(key: str = KEY, meta: dict | None = None, **parts: bytes) -> dict[str, bytes]:
    """KEY.* members of one drawable sample: KEY.json, a real clip, a reference with its mask, a plate and a
    detection mask (all well inside any limit a test sets); `parts` replace or add members by part name."""
    mask = np.zeros((64, 48), np.uint8)
    cv2.ellipse(mask, (24, 32), (20, 28), 0, 0, 360, 255, -1)
    members = {"json": json.dumps(meta or sample_meta()).encode(), "mp4": small_clip(), "ref0.png": noise_png(48, 64),
               "mask0.png": cv2.imencode(".png", mask)[1].tobytes(), "bg.png": noise_png(64, 48),
               "dmask0.png": cv2.imencode(".png", cv2.resize(mask, (160, 96)))[1].tobytes()}
    members.update(parts)
    return {f"{key}.{part}": data for part, data in members.items() if data is not None}


def write_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None, mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def foreign_run(tmp_path: Path, shards: dict[str, dict[str, bytes] | bytes] | None = None, index=None) -> Path:
    """An output directory made elsewhere: index.json listing `shards` (rel path -> members, or the file's bytes),
    no ledger."""
    out = tmp_path / "out"
    shards = {SHARD: sample_members()} if shards is None else shards
    for rel, members in shards.items():
        if isinstance(members, bytes):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(members)
        else:
            write_tar(out / rel, members)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if index is None:
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                 "shardlist": [{"url": rel, "nsamples": 1} for rel in shards]}
    (out / "index.json").write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    return out


@pytest.fixture
def limits(monkeypatch):
    """`limits(name, value)` sets S2V_LIMIT_<NAME> for this test; read_limits() is cached, so it is cleared when a
    limit is set and again once the variables are back as they were."""
    def set_limit(name: str, value) -> None:
        monkeypatch.setenv(f"S2V_LIMIT_{name.upper()}", str(value))
        read_limits.cache_clear()

    yield set_limit
    monkeypatch.undo()
    read_limits.cache_clear()


def show(out: Path, key: str, tmp_path: Path):
    """`s2v shards show` as a user runs it."""
    return CliRunner().invoke(main, ["shards", "show", str(out), key, "--out", str(tmp_path / "sheet.png")])


def assert_refused(result, *said: str) -> None:
    """Exit code 2, the message naming `said`, no traceback and nothing written."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for text in said:
        assert text in result.output, (text, result.output)


def test_a_foreign_sample_is_drawn_like_one_of_ours(tmp_path):
    out = foreign_run(tmp_path)
    sheet = render_contact_sheet(find_sample(out, KEY))
    names = {p.name for p in sheet.panels}
    assert {"frame0", "frame5", "keyframe0", "ref0", "bg", "caption"} <= names
    assert show(out, KEY, tmp_path).exit_code == 0


@pytest.mark.parametrize("part", ["ref0.png", "mask0.png", "bg.png", "dmask0.png"])
def test_a_png_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, limits, monkeypatch, part):
    limits("max_pixels", 20_000)  # the clip (160x96) and the other PNGs are below it
    out = foreign_run(tmp_path, {SHARD: sample_members(**{part: png(200, 200)})})
    decoded = []
    imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(imdecode(*a)) or decoded[-1])
    with pytest.raises(ContactSheetError) as caught:
        render_contact_sheet(find_sample(out, KEY))
    assert all(f"{text}" in str(caught.value) for text in (f"sample {KEY}", SHARD, f"{KEY}.{part}", "200x200",
                                                          "20000", "S2V_LIMIT_MAX_PIXELS"))
    assert max(image.shape[0] * image.shape[1] for image in decoded) <= 20_000 if decoded else True
    assert_refused(show(out, KEY, tmp_path), f"{KEY}.{part}", "200x200")
    assert not (tmp_path / "sheet.png").exists()


def test_a_member_that_is_not_a_png_is_refused(tmp_path):
    jpeg = cv2.imencode(".jpg", np.zeros((64, 48, 3), np.uint8))[1].tobytes()
    out = foreign_run(tmp_path, {SHARD: sample_members(**{"ref0.png": jpeg})})
    with pytest.raises(ContactSheetError, match=f"{KEY}.ref0.png: not a PNG"):
        render_contact_sheet(find_sample(out, KEY))


@pytest.mark.parametrize("side", [13_000, 30_000])
def test_a_few_kilobyte_png_of_gigapixels_is_refused_in_little_memory(tmp_path, side):
    """At the default limits, in a process allowed 1.5 GiB of address space beyond what its imports map: the
    13000x13000 PNG (20 KB) decodes to 169 MB of pixels and several GB as drawn, the 30000x30000 one to 900 MB."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 200_000
    out = foreign_run(tmp_path, {SHARD: sample_members(**{"ref0.png": buf.getvalue()})})
    script = ("import resource, sys\n"
              "from pipeline.cli.main import main\n"
              "import pipeline.inspection.contact_sheet  # with torch (through webdataset): mapped before the limit\n"
              "vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**29, vm + 3 * 2**29))\n"
              "main(sys.argv[1:], prog_name='s2v')\n")
    done = subprocess.run([sys.executable, "-c", script, "shards", "show", str(out), KEY, "--out",
                           str(tmp_path / "sheet.png")], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and f"{KEY}.ref0.png" in done.stderr
    assert f"{side}x{side}" in done.stderr or f"{side * side} pixels" in done.stderr
    assert not (tmp_path / "sheet.png").exists()


@pytest.mark.parametrize("num_frames", [12, None])
def test_a_clip_over_the_pixel_limit_is_refused_before_a_frame_is_decoded(tmp_path, limits, num_frames):
    limits("max_pixels", 10_000)  # the clip is 160x96 = 15360 pixels; the PNGs are below
    # KEY.json keeps quiet about the size (the schema would refuse 160x96 itself): only the mp4 headers tell.
    meta = sample_meta(clip={"fps": 24.0, "num_frames": num_frames})
    out = foreign_run(tmp_path, {SHARD: sample_members(meta=meta)})
    with pytest.raises(ContactSheetError) as caught:
        render_contact_sheet(find_sample(out, KEY))
    assert all(text in str(caught.value) for text in (f"sample {KEY}", f"{KEY}.mp4", "160x96", "10000"))
    assert_refused(show(out, KEY, tmp_path), f"{KEY}.mp4", "10000")


@pytest.mark.parametrize("clip", [{"height": 0}, {"width": -5}, {"width": 1e30}, {"height": math.nan},
                                  {"width": "160"}, {"width": 40_000, "height": 40_000}],
                         ids=["zero", "negative", "1e30", "nan", "text", "over-max-pixels"])
def test_clip_sizes_that_are_no_sizes_are_refused(tmp_path, clip):
    meta = sample_meta(clip={"width": 160, "height": 96, "fps": 24.0, "num_frames": 12, **clip})
    out = foreign_run(tmp_path, {SHARD: sample_members(meta=meta)})  # json.dumps writes NaN as NaN
    with pytest.raises(ContactSheetError, match=f"sample {KEY}: {SHARD}: {KEY}.json: ") as caught:
        render_contact_sheet(find_sample(out, KEY))
    assert "clip" in str(caught.value) or "NaN" in str(caught.value)
    assert_refused(show(out, KEY, tmp_path), f"{KEY}.json")


def test_a_valid_but_extreme_clip_size_gives_a_sheet_of_ordinary_size(tmp_path):
    meta = sample_meta(clip={"width": 1, "height": 1_000_000, "fps": 24.0})  # 1 MP: a valid size
    out = foreign_run(tmp_path, {SHARD: sample_members(meta=meta, mp4=None)})  # no clip: the tiles take its aspect
    sheet = render_contact_sheet(find_sample(out, KEY))
    assert sheet.image.height < 6000


def test_terminal_escapes_in_the_data_reach_the_terminal_as_text(tmp_path):
    meta = sample_meta()
    meta["entities"][0]["attributes"] = {"\x1b]0;owned\x07\x1b[2J": 5}  # a title, a screen clear; not a list
    out = foreign_run(tmp_path, {SHARD: sample_members(meta=meta)})
    result = show(out, KEY, tmp_path)
    assert_refused(result, f"{KEY}.json", "\\x1b]0;owned\\x07\\x1b[2J")
    assert "\x1b" not in result.output and "\x07" not in result.output

    # A shard cut short inside a member named with an escape: the tar reader's message quotes the name.
    path = write_tar(tmp_path / "cut.tar", {**sample_members(), f"{KEY}.x\x1b[2J.png": b"\x00" * 4096})
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    cut = foreign_run(tmp_path / "cut", {SHARD: path.read_bytes()[:last.offset_data + 100]})
    result = show(cut, KEY, tmp_path)
    assert_refused(result, f"sample {KEY} cannot be read", SHARD, "\\x1b[2J")
    assert "\x1b" not in result.output


def test_a_shard_that_cannot_be_read_is_named_and_the_others_still_serve(tmp_path):
    gz = write_tar(tmp_path / "a.tar.gz", sample_members("k0"), mode="w:gz")
    out = foreign_run(tmp_path, {"shards/a.tar": gz.read_bytes(), "shards/b.tar": sample_members()})
    assert find_sample(out, KEY).shard == "shards/b.tar"
    with pytest.raises(ContactSheetError, match="no sample with key 'k0'") as caught:
        find_sample(out, "k0")
    assert "shards/a.tar" in str(caught.value) and "gzip" in str(caught.value)
    assert_refused(show(out, "k0", tmp_path), "shards/a.tar", "gzip")


@pytest.mark.parametrize("problem", ["symlink", "oversize"])
def test_a_hostile_member_of_the_sample_names_the_shard_the_key_and_the_member(tmp_path, limits, problem):
    members = sample_members()
    links = {}
    if problem == "symlink":
        links[f"{KEY}.mp4"] = "/etc/passwd"
        del members[f"{KEY}.mp4"]
    else:
        limits("max_video_mb", 0.001)  # 1048 bytes; the clip is a few KB
    write_tar(tmp_path / "out" / SHARD, members, links)
    (tmp_path / "out" / "index.json").write_text(json.dumps({"shardlist": [{"url": SHARD}]}))
    with pytest.raises(ContactSheetError) as caught:
        find_sample(tmp_path / "out", KEY)
    said = "a symbolic link" if problem == "symlink" else "over the 1048 byte cap"
    assert all(text in str(caught.value) for text in (f"sample {KEY}", SHARD, f"{KEY}.mp4", said))
    assert_refused(show(tmp_path / "out", KEY, tmp_path), SHARD, f"{KEY}.mp4")


def test_a_problem_after_the_sample_in_its_shard_does_not_matter(tmp_path):
    write_tar(tmp_path / "out" / SHARD, {**sample_members(), **sample_members("k2")}, links={"k3.json": "/etc/passwd"})
    (tmp_path / "out" / "index.json").write_text(json.dumps({"shardlist": [{"url": SHARD}]}))
    sample = find_sample(tmp_path / "out", KEY)
    assert sample.parts["json"] and "ref0.png" in sample.parts


def test_index_json_entries_without_a_shard_url_are_passed_over(tmp_path):
    index = {"shardlist": [5, "shards/x.tar", None, {"nourl": 1}, {"url": 7}, {"url": None}, {"url": SHARD}]}
    out = foreign_run(tmp_path, index=index)
    assert find_sample(out, KEY).shard == SHARD


@pytest.mark.parametrize("index", [b"[]", b'{"shardlist": 5}', b'{"shardlist": NaN}', b"[" * 100_000 + b"]" * 100_000,
                                   b"\xff\xfe", "oversize"],
                         ids=["list", "shardlist-number", "nan", "deep", "not-utf8", "oversize"])
def test_an_index_json_that_is_no_index_is_refused(tmp_path, limits, index):
    if index == "oversize":
        limits("max_index_mb", 0.0001)  # 104 bytes
        index = json.dumps({"shardlist": [{"url": SHARD, "padding": "x" * 200}]}).encode()
    out = foreign_run(tmp_path, index=index)
    with pytest.raises(ContactSheetError, match="index.json"):
        find_sample(out, KEY)
    assert_refused(show(out, KEY, tmp_path), "index.json")


def write_manifest(path: Path, keys: list, shards: list, row_group_size: int | None = None) -> None:
    pq.write_table(pa.table({"key": keys, "shard": shards}), path, row_group_size=row_group_size)


@pytest.mark.parametrize("manifest", ["garbage", "no-shard-column", "int-keys", "over-the-cap"])
def test_a_manifest_that_is_not_ours_is_only_a_hint_passed_over(tmp_path, limits, manifest):
    """The key is in both shards; a manifest that is read sends the sheet to the second one first."""
    out = foreign_run(tmp_path, {"shards/a.tar": sample_members(), "shards/b.tar": sample_members()})
    target = out / "manifest.parquet"
    write_manifest(target, [KEY], ["shards/b.tar"])
    assert find_sample(out, KEY).shard == "shards/b.tar"
    if manifest == "garbage":
        target.write_bytes(b"PAR1" + b"\xff" * 64 + b"PAR1")
    elif manifest == "no-shard-column":
        pq.write_table(pa.table({"key": [KEY], "where": ["shards/b.tar"]}), target)
    elif manifest == "int-keys":
        write_manifest(target, [1], ["shards/b.tar"])
    else:  # a few KB as stored, 20000 rows that declare they decode to more than the 10 KB allowed
        limits("max_index_mb", 0.01)
        keys = ["k0"] * 20_000 + [KEY]
        pq.write_table(pa.table({"key": keys, "shard": ["shards/b.tar"] * len(keys)}), target,
                       use_dictionary=False, compression="zstd")
        assert target.stat().st_size < 10_000
    assert find_sample(out, KEY).shard == "shards/a.tar"


def test_values_outside_key_json_schema_are_drawn_or_left_out(tmp_path):
    """KEY.json's schema checks what is computed with; the rest of what the sheet reads can be any JSON."""
    meta = sample_meta(
        clip={"width": 160, "height": 96, "fps": None, "num_frames": 5, "duration_s": "long"},  # 5: it has 12
        span="frames", source=["not", "a", "dict"],
        keyframes=[{"frame": 6}, {"frame": None}, {"frame": 11}],
        detections=[{"id": "d0", "entity": ["e0"], "keyframe": 0, "box": None},
                    {"id": "d1", "entity": "e0", "keyframe": 0, "box": [1e300, -1e300, 5, 5], "valid": False,
                     "rejected": 5},
                    {"id": "d2", "entity": {"e": 0}, "keyframe": 2, "box": [90, 80, 10, 5], "label": 7}],
        cross_pair={"base": "k0", "kinds": ["composite"], "background_from": 3},
        background={"file": "bg.png", "mask_area": "most"},
    )
    meta["entities"][0]["span"] = ["2", "7"]
    meta["entities"][1]["span"] = [2, 7]
    meta["entities"].append({"id": 3, "kind": "object", "span": [2, 7]})  # an int id beside str ids
    meta["entities"][0]["references"][0]["cross"] = "composite"
    out = foreign_run(tmp_path, {SHARD: sample_members(meta=meta)})
    sheet = render_contact_sheet(find_sample(out, KEY))
    names = {p.name for p in sheet.panels}
    assert {"frame0", "keyframe0", "keyframe2", "ref0", "bg", "caption"} <= names and "keyframe1" not in names
    assert show(out, KEY, tmp_path).exit_code == 0


def test_what_key_json_lists_is_drawn_within_bounds(tmp_path):
    """A thousand keyframes and detections, 200 references, megabytes of caption and labels: the sheet draws the
    first few of each and stays an ordinary size, in seconds."""
    long = "v" * 200_000
    reference = {"file": "ref0.png", "mask": "mask0.png", "variant": "crop"}
    meta = sample_meta(
        keyframes=[{"frame": 6}] * 1000,
        detections=[{"id": f"d{i}", "entity": "e0", "keyframe": 0, "box": [1, 1, 50, 50], "label": "woman"}
                    for i in range(2000)],
        caption={"text": "woman " * 200_000, "source": long},
    )
    meta["detections"][0]["label"] = long
    meta["entities"][0]["references"] = [{**reference, "variant": long}] + [reference] * 199
    meta["entities"][0]["word"] = long
    out = foreign_run(tmp_path, {SHARD: sample_members(meta=meta)})
    started = time.monotonic()
    sheet = render_contact_sheet(find_sample(out, KEY))
    assert time.monotonic() - started < 60
    names = [p.name for p in sheet.panels]
    assert names.count("ref0") == MAX_REFERENCES and len([n for n in names if n.startswith("keyframe")]) == \
        MAX_KEYFRAMES
    assert sheet.image.height < 8000


@pytest.mark.parametrize("kind", ["1", "L", "LA", "P", "RGBA", "I;16", "rgb16", "rgba16"])
def test_pngs_of_every_kind_are_drawn(tmp_path, kind):
    if kind in ("rgb16", "rgba16"):
        pixels = np.full((64, 48, 3 if kind == "rgb16" else 4), 40_000, np.uint16)
        data_ = cv2.imencode(".png", pixels)[1].tobytes()
    else:
        data_ = png(48, 64, kind)
    out = foreign_run(tmp_path, {SHARD: sample_members(**{"ref0.png": data_, "mask0.png": data_})})
    sheet = render_contact_sheet(find_sample(out, KEY))
    assert "MISSING" not in sheet.panel("ref0").lines[0]
