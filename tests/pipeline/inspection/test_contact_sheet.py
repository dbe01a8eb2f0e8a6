"""`contact_sheet`: a PNG of a real sample and of cross-paired samples, checked by its pixels: the frames, the
references (their own pixels, framed in their entity's colour), the plate and the caption highlights are there."""

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data

from pipeline.core.config import OutputConfig
from pipeline.core.video import ClipEncoder
from pipeline.inspection.contact_sheet import (
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
