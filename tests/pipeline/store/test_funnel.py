"""The one funnel: hand-made ledger entries give hand-computed rows; funnels of several directories add up to the
funnel of all their entries; recorded flows give the stage order."""

from pipeline.store.funnel import Funnel, recorded_order

ORDER = ["probe", "shot_cut", "clip_extract", "quality_filter", "instance_filter"]


def source(status="curated", stage=None, reason=None, clips=(), samples=0):
    return {"status": status, "stage": stage, "reason": reason,
            "clips": [{"status": s, "stage": st, "reason": r} for s, st, r in clips],
            "samples": [{"key": f"k{i}"} for i in range(samples)]}


ENTRIES = [
    source("failed", "probe", "unreadable"),
    source("dropped", "shot_cut", "no_usable_shots"),
    source(clips=[("kept", None, None), ("dropped", "quality_filter", "too_dark"),
                  ("dropped", "instance_filter", "no_valid_instance")], samples=1),
    source(clips=[("kept", None, None), ("kept", None, None), ("failed", "clip_extract", "decode")], samples=2),
]


def funnel_of(entries, duplicates=0):
    funnel = Funnel()
    for entry in entries:
        funnel.add(entry)
    funnel.input_removed.update(["duplicate"] * duplicates)
    return funnel


def test_rows_chain_sources_then_clips_in_flow_order():
    rows = funnel_of(ENTRIES, duplicates=1).rows(ORDER)
    assert [(r["stage"], r["unit"], r["in"], r["out"]) for r in rows] == [
        ("input", "sources", 5, 4),
        ("probe", "sources", 4, 3),
        ("shot_cut", "sources", 3, 2),
        ("clip_plan", "clips", 2, 6),
        ("clip_extract", "clips", 6, 5),
        ("quality_filter", "clips", 5, 4),
        ("instance_filter", "clips", 4, 3),
        ("write", "samples", 3, 3),
    ]
    assert rows[0]["removed"] == {"duplicate": 1} and rows[4]["removed"] == {"decode": 1}


def test_every_stage_shows_stages_that_removed_nothing_on_the_side_of_the_fan_out_they_belong_to():
    rows = funnel_of(ENTRIES[2:]).rows(ORDER, every_stage=True)
    assert [(r["stage"], r["unit"]) for r in rows] == [
        ("input", "sources"), ("probe", "sources"), ("shot_cut", "sources"), ("clip_plan", "clips"),
        ("clip_extract", "clips"), ("quality_filter", "clips"), ("instance_filter", "clips"), ("write", "samples")]
    assert rows[1]["removed"] == {} and rows[1]["in"] == rows[1]["out"] == 2


def test_a_stage_no_recorded_flow_names_goes_after_the_known_ones():
    entries = [source(clips=[("dropped", "zeta", "x"), ("dropped", "alpha", "y"), ("dropped", "quality_filter", "z")])]
    stages = [r["stage"] for r in funnel_of(entries).rows(ORDER)]
    assert stages == ["input", "clip_plan", "quality_filter", "alpha", "zeta", "write"]


def test_funnels_of_several_directories_add_up_to_the_funnel_of_all_entries():
    merged = Funnel()
    merged.add_rows(funnel_of(ENTRIES[:2], duplicates=1).rows(ORDER))
    merged.add_rows(funnel_of(ENTRIES[2:]).rows(ORDER))
    assert merged.rows(ORDER) == funnel_of(ENTRIES, duplicates=1).rows(ORDER)


def test_recorded_flows_merge_into_one_order():
    runs = [{"flow": {"stages": ["probe", "clip_extract", "metrics"]}},
            {"flow": {"stages": ["probe", "shot_cut", "clip_extract", "faces"]}},
            {"flow": {}}, {"type": "run"}, {"flow": {"stages": "not a list"}}]
    assert recorded_order(runs) == ["probe", "shot_cut", "clip_extract", "faces", "metrics"]
