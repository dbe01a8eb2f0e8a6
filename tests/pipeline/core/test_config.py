import pytest
import yaml

from pipeline.core.config import ConfigError, RunConfig, build_config, load_config


def test_defaults_validate_and_recipes_load_and_round_trip():
    assert build_config().shots.backend == "pyscenedetect"
    quickstart, gpu = load_config("configs/quickstart.yaml"), load_config("configs/gpu-cluster.yaml")
    # What the recipes are for: the offline substitutes on a laptop, the design's models on a GPU cluster.
    assert quickstart.grounding.backend == "saliency" and quickstart.caption.model is None
    assert gpu.grounding.backend == "grounding-dino" and gpu.caption.model is not None
    assert gpu.hash() != quickstart.hash()
    for config in (quickstart, gpu):
        # What a run writes to config.yaml reads back as the same config (the same hash, so a resume matches).
        again = RunConfig.model_validate(config.model_dump(mode="json"))
        assert again == config and again.hash() == config.hash()


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as exc:
        build_config({"shots": {"treshold": 3}})
    assert "shots.treshold" in str(exc.value)
    assert "threshold" in str(exc.value) and "min_clip_s" in str(exc.value)


def test_bad_choice_names_the_allowed_values():
    with pytest.raises(ConfigError) as exc:
        build_config({}, ["shots.backend=ffprobe"])
    message = str(exc.value)
    assert "shots.backend" in message and "'pyscenedetect'" in message and "'transnetv2'" in message
    assert "ffprobe" in message


def test_range_and_cross_field_checks():
    with pytest.raises(ConfigError, match="clips.crf"):
        build_config({}, ["clips.crf=99"])
    with pytest.raises(ConfigError, match="max_clip_s"):
        build_config({}, ["shots.min_clip_s=5", "shots.max_clip_s=3"])
    with pytest.raises(ConfigError, match="clips.keyframes"):
        build_config({}, ["clips.keyframes=[]"])
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        build_config({}, ["clips.keyframes=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="min_brightness"):
        build_config({}, ["filters.quality.min_brightness=200", "filters.quality.max_brightness=100"])


def test_overrides_parse_yaml_values_and_win_over_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"shots": {"min_clip_s": 1.0}}))
    config = load_config(recipe, ["shots.min_clip_s=3", "clips.keyframes=[0.1, 0.9]", "ray.num_cpus=2"])
    assert config.shots.min_clip_s == 3.0
    assert config.clips.keyframes == [0.1, 0.9]
    assert config.ray.num_cpus == 2
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(recipe, ["shots.min_clip_s"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_hash_ignores_inputs_and_ray_but_not_sample_settings():
    base = build_config()
    assert build_config({}, ["input.paths=[a.mp4]", "ray.num_cpus=1"]).hash() == base.hash()
    # Packing and worker sizing do not change samples: a resume may move to another cluster.
    same = ["output.shard_max_samples=7", "shots.resources.num_cpus=4", "clips.resources.workers=3"]
    assert build_config({}, same).hash() == base.hash()
    assert build_config({}, ["clips.fps=12"]).hash() != base.hash()


def test_one_reference_share_changes_without_zeroing_the_others():
    config = build_config({}, ["references.ratio.inpaint=6"])
    assert config.references.ratio == {"crop": 1.0, "segment": 5.0, "inpaint": 6.0, "redux": 1.0}
    off = build_config({"references": {"ratio": {"crop": 0}}})
    assert off.references.ratio["crop"] == 0 and off.references.ratio["segment"] == 5.0
