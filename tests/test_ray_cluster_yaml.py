"""ray_cluster.yaml must pass the Ray cluster launcher's own schema validation and set the cluster up as
docs/cluster.md describes: stage work on the workers, GPUs declared, token auth, the dashboard on 127.0.0.1 only."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(config)
    return config


def all_commands(config: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [command for key in keys for command in config.get(key, [])]


def test_cluster_config_is_valid_for_the_launcher(config):
    types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert config["head_node_type"] == "head"
    assert sum(types[t]["max_workers"] for t in ("cpu_worker", "gpu_worker")) <= config["max_workers"]
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]


def test_stage_work_runs_on_the_workers_and_gpus_are_declared(config):
    types = config["available_node_types"]
    assert types["head"]["resources"]["CPU"] == 0
    assert types["cpu_worker"]["resources"]["CPU"] > 0 and not types["cpu_worker"]["resources"].get("GPU")
    gpu = types["gpu_worker"]["resources"]
    assert gpu["GPU"] >= 1 and gpu["CPU"] > 0


def test_every_node_installs_this_package_and_puts_s2v_on_path(config):
    assert config["file_mounts"]["~/s2v-curate"] == "."
    assert any("pip install" in c and "~/s2v-curate" in c for c in config["setup_commands"])
    assert any("s2v-venv/bin:$PATH" in c and ".bashrc" in c for c in config["setup_commands"])
    assert ".venv" in " ".join(config["rsync_exclude"])  # the upload of "." leaves the local environment behind


def test_the_dashboard_listens_on_loopback_and_token_auth_is_on(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in " ".join(all_commands(config))
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"])
