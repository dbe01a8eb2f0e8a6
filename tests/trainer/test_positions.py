"""Position ids of every reference scheme and LumosX's masks, entry by entry against hand-computed layouts."""

import pytest
import torch

from trainer.positions import PositionConfig, lumosx_branches, lumosx_masks, position_ids

# Video grid T=2, H=2, W=2: t-major, then h, then w.
VIDEO = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]

# Two subjects, three references: subject 0 has views 0 and 1 (for LumosX: its face and an attribute crop, one
# group), subject 1 has one. Reference grids differ so that every offset shows: 1x2, 2x1, 1x1.
CASE = {
    "video_grid": (2, 2, 2),
    "ref_grids": [(1, 2), (2, 1), (1, 1)],
    "ref_subject": [0, 0, 1],
    "ref_view": [0, 1, 0],
    "ref_kind": [0, 0, 0],
    "ref_group": [0, 0, 1],
}

EXPECTED = {
    # ref i at t = T + i on the video's grid.
    "phantom": [(2, 0, 0), (2, 0, 1), (3, 0, 0), (3, 1, 0), (4, 0, 0)],
    # ref i at t = i, h/w shifted past the video (H = W = 2).
    "kaleido": [(0, 2, 2), (0, 2, 3), (1, 2, 2), (1, 3, 2), (2, 2, 2)],
    # delta 4: first view at (T-1)+4 = 5, the next view adjacent (6), subject 1 at 6+4 = 10.
    "ts-rope": [(5, 0, 0), (5, 0, 1), (6, 0, 0), (6, 1, 0), (10, 0, 0)],
    # group 0 shares t = T = 2, its second ref placed after the first's width (w0 = 2); group 1 at t = 3.
    "lumosx": [(2, 0, 0), (2, 0, 1), (2, 0, 2), (2, 1, 2), (3, 0, 0)],
}


@pytest.mark.parametrize("scheme", sorted(EXPECTED))
def test_position_ids_entry_by_entry(scheme):
    ids = position_ids(scheme, **CASE)
    assert ids.dtype == torch.long
    assert ids.tolist() == [list(p) for p in VIDEO + EXPECTED[scheme]]


def test_ts_rope_delta_is_configurable_and_delta_one_is_phantom():
    ids = position_ids("ts-rope", **CASE, cfg=PositionConfig(ts_delta=3))
    assert ids[8:].tolist() == [[4, 0, 0], [4, 0, 1], [5, 0, 0], [5, 1, 0], [8, 0, 0]]
    assert torch.equal(position_ids("ts-rope", **CASE, cfg=PositionConfig(ts_delta=1)), position_ids("phantom", **CASE))


def test_ts_rope_orders_subjects_by_first_appearance_and_views_by_view_id():
    # Subject 1 comes first; subject 0's view 1 is listed before its view 0.
    ids = position_ids("ts-rope", (2, 1, 1), [(1, 1)] * 3, ref_subject=[1, 0, 0], ref_view=[0, 1, 0],
                       ref_kind=[0, 0, 0], ref_group=[1, 0, 0], cfg=PositionConfig(ts_delta=2))
    # Subject 1 at (T-1)+2 = 3; subject 0: view 0 at 3+2 = 5, view 1 adjacent at 6.
    assert ids.tolist() == [[0, 0, 0], [1, 0, 0], [3, 0, 0], [6, 0, 0], [5, 0, 0]]


# LumosX with every kind: a face and its attribute (group 0, subject slot 0), an object (slot 1), a background plate
# (no subject slot). Video grid 1x1x2, every reference 1x1.
KINDS = {
    "video_grid": (1, 1, 2),
    "ref_grids": [(1, 1)] * 4,
    "ref_subject": [0, 0, 1, -1],
    "ref_view": [0, 0, 0, 0],
    "ref_kind": [0, 0, 1, 2],
    "ref_group": [0, 0, 2, 3],
}


def test_lumosx_objects_and_backgrounds_extend_along_t():
    ids = position_ids("lumosx", **KINDS)
    # Face and attribute share t = T = 1, side by side along w; the object and the background at t = 2 and 3.
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [2, 0, 0], [3, 0, 0]]


def test_lumosx_branches_follow_first_appearance():
    # An object listed before a subject group gets the first branch; the group's two refs share the next.
    assert lumosx_branches(ref_kind=[1, 0, 0, 2], ref_group=[5, 0, 0, 6]) == [0, 1, 1, 2]
    ids = position_ids("lumosx", (1, 1, 1), [(1, 1)] * 3, [1, 0, 0], [0, 0, 1], [1, 0, 0], [5, 0, 0])
    assert ids.tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0], [2, 0, 1]]


def rows(*strings):
    return torch.tensor([[c == "1" for c in s] for s in strings])


def test_lumosx_masks_entry_by_entry():
    # Caption tokens: subject 0 owns tokens 1 and 2, subject 1 owns tokens 2 and 4 (token 2 is shared).
    words = torch.zeros(2, 6, dtype=torch.bool)
    words[0, [1, 2]] = True
    words[1, [2, 4]] = True
    self_mask, bias = lumosx_masks(CASE["video_grid"], CASE["ref_grids"], CASE["ref_subject"], CASE["ref_kind"],
                                   CASE["ref_group"], words)
    # Tokens 0-7 video, 8-9 ref 0, 10-11 ref 1 (group 0: one branch), 12 ref 2 (group 1).
    expected = rows(*["1111111111111"] * 8, *["0000000011110"] * 4, "0000000000001")
    assert self_mask.dtype == torch.bool
    assert torch.equal(self_mask, expected)
    # Video rows 0; subject 0's tokens: +1 on its words (1, 2), -1 on subject 1's other word (4); the shared word
    # stays +1 for both subjects.
    expected_bias = torch.tensor([[0, 0, 0, 0, 0, 0]] * 8 + [[0, 1, 1, 0, -1, 0]] * 4 + [[0, -1, 1, 0, 1, 0]]).float()
    assert torch.equal(bias, expected_bias)


def test_lumosx_masks_objects_backgrounds_and_slotless_refs():
    words = torch.zeros(2, 5, dtype=torch.bool)
    words[0, 1] = True  # "man" (subject slot 0)
    words[1, 3] = True  # "dog" (the object, slot 1)
    self_mask, bias = lumosx_masks(KINDS["video_grid"], KINDS["ref_grids"], KINDS["ref_subject"], KINDS["ref_kind"],
                                   KINDS["ref_group"], words)
    assert torch.equal(self_mask, rows("111111", "111111", "001100", "001100", "000010", "000001"))
    assert torch.equal(bias, torch.tensor([[0, 0, 0, 0, 0]] * 2 + [[0, 1, 0, -1, 0]] * 2 + [[0, -1, 0, 1, 0]]
                                          + [[0, 0, 0, 0, 0]]).float())


def test_no_references_gives_the_plain_video_grid():
    for scheme in EXPECTED:
        assert position_ids(scheme, (2, 2, 2), [], [], [], [], []).tolist() == [list(p) for p in VIDEO]
    self_mask, bias = lumosx_masks((2, 2, 2), [], [], [], [], torch.zeros(0, 3, dtype=torch.bool))
    assert self_mask.all() and self_mask.shape == (8, 8) and bias.shape == (8, 3) and not bias.any()


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="phantom"):
        position_ids("rope-ish", **CASE)
    with pytest.raises(ValueError, match="ref_subject"):
        position_ids("phantom", (2, 2, 2), [(1, 1)], [0, 1], [0], [0], [0])
    with pytest.raises(ValueError, match="ts_delta"):
        PositionConfig(ts_delta=0)
