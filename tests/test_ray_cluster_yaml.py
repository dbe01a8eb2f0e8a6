"""ray_cluster.yaml must pass the Ray cluster launcher's own schema validation."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_config_is_valid_for_the_launcher():
    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert config["head_node_type"] == "head"
    assert any("pip install" in c for c in config["setup_commands"])
