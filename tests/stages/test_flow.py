"""The flow table: each row names its stage class, and the flow, preflight and the run's description all follow
the config through it."""

from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, build_config, load_config
from stages import FLOW, build_flow, describe_flow, preflight, stage_order

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_each_row_names_the_stage_class_it_loads():
    for row in FLOW:
        assert row.stage_class().name == row.name


def test_the_quickstart_runs_the_offline_flow_and_says_what_stands_in_for_what():
    config = load_config(CONFIGS / "quickstart.yaml")
    names = [cls.name for cls in build_flow(config)]
    assert names == ["probe", "shot_cut", "clip_extract", "quality_stats", "quality_filter", "entities", "grounding",
                     "segmentation", "faces", "instance_stats", "instance_filter", "consolidation", "tracking",
                     "track_filter", "references",
                     "inpainting", "metrics"]
    flow = describe_flow(config)
    assert flow["stages"] == names
    assert set(flow["substitutes"]) == {"caption", "entities", "grounding", "segmentation", "faces", "inpainting",
                                        "metrics"}
    assert flow["off"] == ["clip_score", "references.redux", "metrics.dino_i"]


def test_without_grounding_samples_are_captioned_clips_and_the_sample_stages_are_off():
    config = build_config({}, [])
    assert [cls.name for cls in build_flow(config)] == ["probe", "shot_cut", "clip_extract", "quality_stats",
                                                          "quality_filter", "entities", "faces"]
    assert {"grounding", "segmentation", "clip_score"} <= set(describe_flow(config)["off"])


def test_the_gpu_recipe_runs_every_stage_in_table_order():
    config = load_config(CONFIGS / "gpu-cluster.yaml")
    assert [cls.name for cls in build_flow(config)] == stage_order()
    assert describe_flow(config)["substitutes"] == {}


def test_preflight_names_every_missing_model_at_once(tmp_path):
    config = build_config({}, [f"caption.model.path={tmp_path / 'no-qwen'}",
                               f"clip_score.model.path={tmp_path / 'no-clip'}"])
    with pytest.raises(ConfigError) as err:
        preflight(config)
    assert "no-qwen" in str(err.value) and "no-clip" in str(err.value)
    assert len(str(err.value).splitlines()) >= 2
