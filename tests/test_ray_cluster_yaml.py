"""ray_cluster.yaml must pass the Ray cluster launcher's own schema validation and set the cluster up as
docs/cluster.md describes: stage work on the workers, GPUs declared, token auth, the dashboard on 127.0.0.1 only.
`ray start` lines are read with Ray's own argument parser; the shell set-up lines are run, in a scratch HOME."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import start

REPO = Path(__file__).resolve().parents[1]
# Importing Ray's command line imports Ray Serve, whose pydantic models use deprecated Field arguments.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")


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


def ray_start_params(command: str) -> dict:
    """The options `ray start` gets from one start command line, parsed by Ray's own command-line parser."""
    for part in command.replace("&&", ";").split(";"):
        argv = shlex.split(part)
        if len(argv) > 1 and argv[0].endswith("ray") and argv[1] == "start":
            return start.make_context("ray start", argv[2:]).params
    raise AssertionError(f"no `ray start` in {command!r}")


def run_in_scratch_home(commands: list[str], home: Path, then: str) -> str:
    """Run set-up lines the way the launcher does (bash, one per line, in order) in a fresh HOME; then `then`
    in a login-like shell that reads ~/.bashrc. Returns what `then` printed."""
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for command in commands:
        subprocess.run(["bash", "-c", command], env=env, check=True, capture_output=True)
    return subprocess.run(["bash", "-c", f"source ~/.bashrc; {then}"], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_every_node_installs_this_package_and_puts_s2v_on_path(config, tmp_path):
    assert config["file_mounts"]["~/s2v-curate"] == "."
    installs = [shlex.split(c) for c in config["setup_commands"] if "pip install" in c]
    assert any(argv[0].endswith("s2v-venv/bin/pip") and argv[1] == "install" and "~/s2v-curate" in argv
               and argv[argv.index("~/s2v-curate") - 1] == "-e" for argv in installs)
    path_lines = [c for c in config["setup_commands"] if ".bashrc" in c]
    # Run twice, as a restarted node does: s2v's venv goes first on PATH, and ~/.bashrc gets the line once.
    path = run_in_scratch_home(path_lines * 2, tmp_path, "echo $PATH")
    assert path.split(":")[0] == f"{tmp_path}/s2v-venv/bin"
    assert (tmp_path / ".bashrc").read_text().count("s2v-venv") == 1
    assert ".venv" in " ".join(config["rsync_exclude"])  # the upload of "." leaves the local environment behind


def test_the_dashboard_listens_on_loopback_and_token_auth_is_on(config, tmp_path):
    head = [ray_start_params(c) for c in config["head_start_ray_commands"] if " start " in c]
    workers = [ray_start_params(c) for c in config["worker_start_ray_commands"] if " start " in c]
    assert len(head) == 1 and head[0]["head"] and head[0]["dashboard_host"] == "127.0.0.1"
    assert head[0]["port"] == 6379 and head[0]["dashboard_port"] == 8265
    assert len(workers) == 1 and not workers[0]["head"] and workers[0]["address"] == "$RAY_HEAD_IP:6379"
    assert "0.0.0.0" not in " ".join(all_commands(config))
    # Every node's shell exports the token mode, once however often the initialization runs.
    assert run_in_scratch_home(config["initialization_commands"] * 2, tmp_path, "echo $RAY_AUTH_MODE") == "token"
    assert (tmp_path / ".bashrc").read_text().count("RAY_AUTH_MODE") == 1
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"])
