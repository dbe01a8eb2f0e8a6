"""Consolidation across keyframes and reference cutting, on instances cut from real photos."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.core.config import build_config
from pipeline.core.record import clip_rng
from pipeline.core.stage import run_stage
from pipeline.testing.clips import CAT, CUP, clip, consolidate, keyframes
from stages.consolidation import choose_frames, max_clique
from stages.references import ReferenceCutter, draw_variant


def test_an_entity_links_its_consistent_instances_and_leaves_out_the_odd_one():
    record = consolidate(clip(frames=keyframes(third_cup_is_a_rocket=True)))
    cat, cup, lawn = record.meta["entities"]
    assert cat["instances"] == ["d0", "d2", "d4"]
    assert cup["instances"] == ["d1", "d3"]  # the rocket on the last keyframe does not look like the cup
    assert cup["reference"]["keyframe"] in (0, 1) and "reference" not in lawn
    assert (cat["subject_id"], cup["subject_id"]) == (0, 1) and cat["view_id"] == 0


def test_references_are_never_all_from_one_frame_when_others_are_valid():
    frames_used = Counter()
    for n in range(60):
        record = consolidate(clip(key=f"k{n}"))
        chosen = [e["reference"]["keyframe"] for e in record.meta["entities"] if "reference" in e]
        assert len(set(chosen)) == 2, chosen
        frames_used.update(chosen)
    assert set(frames_used) == {0, 1, 2}  # the draw is random, not a fixed frame


def test_a_single_valid_frame_is_used_even_when_shared():
    record = consolidate(clip(valid=lambda k, e: k == 1))
    assert [e["reference"]["keyframe"] for e in record.meta["entities"][:2]] == [1, 1]


def test_the_draw_is_seeded_per_clip():
    first = [consolidate(clip(key=f"k{n}")).meta["entities"][0]["reference"] for n in range(10)]
    again = [consolidate(clip(key=f"k{n}")).meta["entities"][0]["reference"] for n in range(10)]
    other = [consolidate(clip(key=f"k{n}"), ["consolidation.seed=7"]).meta["entities"][0]["reference"]
             for n in range(10)]
    assert first == again and first != other


def test_a_clip_without_a_valid_entity_is_dropped():
    record = consolidate(clip(valid=lambda k, e: False))
    assert record.drop == {"stage": "consolidation", "reason": "no_valid_entity"}


def test_different_faces_are_different_identities():
    record = clip()
    record.meta["entities"][0]["kind"] = "subject"
    unit = np.eye(128, dtype=np.float32)
    record.meta["faces"] = [{"detection": "d0", "score": 0.9}, {"detection": "d2", "score": 0.9},
                            {"detection": "d4", "score": 0.9}]
    record.blobs["face_embeddings"] = np.stack([unit[0], unit[0], unit[1]])  # the last face is someone else
    consolidate(record)
    assert record.meta["entities"][0]["instances"] == ["d0", "d2"]


def test_max_clique_prefers_size_then_weight():
    edges = {(0, 1), (1, 2), (0, 2), (2, 3)}

    def linked(a, b):
        return (min(a, b), max(a, b)) in edges

    assert max_clique([0, 1, 2, 3], linked, weight=lambda n: 1.0) == [0, 1, 2]
    assert max_clique([2, 3], linked, weight=lambda n: 1.0) == [2, 3]
    assert max_clique([0, 3], linked, weight=lambda n: float(n)) == [3]
    assert choose_frames({"a": [0], "b": [0]}, clip_rng(0, "k")) == {"a": 0, "b": 0}


def test_references_are_cut_from_the_chosen_frame():
    record = consolidate(clip())
    run_stage(ReferenceCutter(build_config({}, ["references.pad=0.0"])), [record])
    references = record.meta["references"]
    assert [r["entity"] for r in references] == ["e0", "e1"] and [r["k"] for r in references] == [0, 1]
    for ref in references:
        image, mask = record.blobs[f"ref{ref['k']}"], record.blobs[f"refmask{ref['k']}"]
        assert ref["box"] == (CAT if ref["entity"] == "e0" else CUP)
        x0, y0, x1, y1 = ref["box"]
        assert mask.shape == (y1 - y0, x1 - x0) and mask.sum() == (y1 - y0 - 20) * (x1 - x0 - 20)
        frame = record.blobs["keyframes"][ref["keyframe"]]
        assert ref["frame_index"] == (2, 24, 46)[ref["keyframe"]] and ref["source_clip"] == "clip-k"
        if ref["variant"] == "segment":
            assert image.shape[2] == 4 and np.array_equal(image[..., 3], mask * 255)
        np.testing.assert_array_equal(image[..., :3], frame[y0:y1, x0:x1])
        assert ref["pending"] == (ref["variant"] == "inpaint")


def test_the_variant_mix_follows_the_ratio_with_redux_unavailable():
    ratio = build_config().references.ratio  # crop:segment:inpaint:redux = 1:5:3:1
    draws = [draw_variant(ratio, clip_rng(0, f"k{n}", "e0")) for n in range(2000)]
    requested = Counter(r for r, _ in draws)
    realized = Counter(v for _, v in draws)
    assert requested["redux"] / 2000 == pytest.approx(0.1, abs=0.03)
    assert "redux" not in realized
    for variant, share in (("crop", 1 / 9), ("segment", 5 / 9), ("inpaint", 3 / 9)):
        assert realized[variant] / 2000 == pytest.approx(share, abs=0.05), (variant, realized)
    with pytest.raises(ValueError, match="only to unavailable"):
        draw_variant({"redux": 1.0}, clip_rng(0, "k"))


def test_on_a_200_sample_run_the_realized_mix_is_within_5_points_of_the_ratio():
    config = build_config()
    frames = keyframes()
    records = [consolidate(clip(f"{n:016x}-0000000-0000090", frames)) for n in range(200)]
    run_stage(ReferenceCutter(config), records)
    realized = Counter(r["variant"] for rec in records for r in rec.meta["references"])
    total = sum(realized.values())
    assert total == 400  # two consolidated objects per clip, one reference each
    # redux has no backend: its tenth of the draws goes to the others in proportion, so 1:5:3 of what is made.
    for variant, share in (("crop", 1 / 9), ("segment", 5 / 9), ("inpaint", 3 / 9)):
        assert realized[variant] / total == pytest.approx(share, abs=0.05), realized


def test_a_static_subject_gives_one_view():
    record = consolidate(clip())  # the same cat and cup pixels on all three keyframes
    for entity in record.meta["entities"][:2]:
        assert [v["view_id"] for v in entity["views"]] == [0]
        assert entity["views"][0]["detection"] == entity["reference"]["detection"]


def test_a_subject_seen_frontal_and_in_profile_gives_two_views_with_different_yaw():
    """Yaw 0 and 4 on two keyframes (one view: 4 degrees is no new view), 50 on the third (a profile)."""
    for n in range(12):  # whichever keyframe the reference is drawn on
        record = clip(key=f"k{n}")
        record.meta["entities"][0]["kind"] = "subject"
        record.meta["faces"] = [{"detection": d, "score": 0.9, "yaw": yaw, "pitch": 0.0}
                                for d, yaw in (("d0", 0.0), ("d2", 4.0), ("d4", 50.0))]
        consolidate(record)
        views = record.meta["entities"][0]["views"]
        yaws = [v["pose"][0] for v in views]
        assert len(views) == 2 and abs(yaws[0] - yaws[1]) >= 46, views
        assert "head pose changed" in views[1]["why"] and views[0]["view_id"] == 0 and views[1]["view_id"] == 1
        assert views[0]["detection"] == record.meta["entities"][0]["reference"]["detection"]


def test_views_stop_at_max_views_and_each_is_cut_with_its_view_id():
    record = clip()
    record.meta["entities"][0]["kind"] = "subject"
    record.meta["faces"] = [{"detection": d, "score": 0.9, "yaw": yaw, "pitch": 0.0}
                            for d, yaw in (("d0", -40.0), ("d2", 0.0), ("d4", 40.0))]
    consolidate(record, ["references.max_views=2"])
    assert len(record.meta["entities"][0]["views"]) == 2
    consolidate(record, ["references.max_views=3"])
    cat = record.meta["entities"][0]
    assert sorted(v["keyframe"] for v in cat["views"]) == [0, 1, 2]
    run_stage(ReferenceCutter(build_config({})), [record])
    refs = [r for r in record.meta["references"] if r["entity"] == "e0"]
    assert [(r["view_id"], r["keyframe"]) for r in refs] == [(v["view_id"], v["keyframe"]) for v in cat["views"]]
    assert all(r["why"] and r["attribute"] is None for r in refs)


def test_attribute_regions_become_references_in_the_subjects_group():
    record = clip()
    cat = record.meta["entities"][0]
    cat.update(kind="subject", group="g0", attributes={"top": ["scarf"]})
    # Two top regions (keyframes 0 and 2) and a hairstyle region on keyframe 1; an invalid bottom region.
    parts = [(0, "top", "scarf", True), (2, "top", "scarf", True), (1, "hairstyle", "hairstyle", True),
             (0, "bottom", "bottom", False)]
    x0, y0, x1, y1 = CAT
    for k, part, word, valid in parts:
        record.meta["detections"].append({"id": f"d{len(record.meta['detections'])}", "keyframe": k, "entity": "e0",
                                          "label": word, "part": part, "box": [x0, y0 + 40, x1, y1 - 40],
                                          "score": 0.8, "valid": valid, "phrase": "face-anchored attribute box"})
    record.blobs["masks"] = np.concatenate([record.blobs["masks"], np.ones((4, *record.blobs["masks"].shape[1:]),
                                                                            np.uint8)])
    consolidate(record)
    run_stage(ReferenceCutter(build_config({})), [record])
    refs = [r for r in record.meta["references"] if r["entity"] == "e0"]
    attributes = {r["attribute"]: r for r in refs if r["attribute"]}
    assert set(attributes) == {"top", "hairstyle"}  # the invalid bottom is not cut
    assert attributes["top"]["tag"] == "scarf" and attributes["hairstyle"]["tag"] == "hairstyle"
    assert all(r["group"] == "g0" and r["subject_id"] == cat["subject_id"] for r in refs)
    reference_frame = cat["reference"]["keyframe"]
    if reference_frame in (0, 2):  # a top region exists on the reference keyframe: that one is cut
        assert attributes["top"]["keyframe"] == reference_frame
    assert not any(r["attribute"] for r in record.meta["references"] if r["entity"] == "e1")  # an object
    # The part masks cover the whole frame; the cut mask is bounded by the cat's own mask on that keyframe.
    top = attributes["top"]
    x0, y0, x1, y1 = top["box"]
    person = record.blobs["masks"][2 * top["keyframe"]][y0:y1, x0:x1]
    mask = record.blobs[f"refmask{top['k']}"]
    assert mask.any() and not (mask & (1 - person)).any()
