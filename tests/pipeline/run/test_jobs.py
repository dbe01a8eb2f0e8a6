"""`s2v curate submit / status / stop / logs` through Ray Jobs, against a real two-node Ray cluster on loopback.

Every client runs in a subprocess with the cluster's client environment: token auth must be on before `import ray`,
and this pytest process may already have imported it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run.jobs import (
    DEFAULT_EXCLUDES,
    JobsError,
    build_runtime_env,
    config_for_job,
    curate_entrypoint,
    default_submission_id,
)
from pipeline.testing.loopback import LoopbackCluster, free_port

REPO = Path(__file__).resolve().parents[3]
# `s2v curate` alone (pipeline/cli/curate.py, with the Ray Jobs commands of pipeline/cli/jobs.py).
CLI = [sys.executable, "-c", "from pipeline.cli.curate import curate; curate(prog_name='s2v curate')"]


def curate(*args, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
                          check=False)


def status_of(cluster: LoopbackCluster, job_id: str) -> dict:
    proc = curate("status", job_id, "--json", "--address", cluster.dashboard_url, env=cluster.client_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def cluster():
    with LoopbackCluster(nodes=2, cpus_per_node=1) as running:
        yield running


@pytest.fixture(scope="module")
def job_args(demo_corpus, u2netp_dir) -> list[str]:
    """The quickstart recipe over the two demo videos, as a submitted job gets it (absolute paths)."""
    return ["--config", "configs/quickstart.yaml", "--input", demo_corpus / "videos",
            "--metadata", demo_corpus / "metadata.jsonl",
            "--set", f"grounding.model.path={u2netp_dir}", "--set", "ray.progress=false"]


@pytest.fixture(scope="module")
def submitted(cluster, job_args, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("job") / "out"
    proc = curate("submit", "--address", cluster.dashboard_url, *job_args, "--output", out, env=cluster.client_env())
    return out, proc


def job_id_in(stderr: str) -> str:
    return stderr.split("submitted job ", 1)[1].split()[0]


def text(stream: str) -> str:
    """Rich wraps the driver's lines at 80 columns when its output is a log file, not a terminal."""
    return " ".join(stream.split())


def test_a_submitted_curation_streams_its_log_and_succeeds(cluster, submitted):
    out, proc = submitted
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    job_id = job_id_in(proc.stderr)
    assert job_id.startswith("s2v-out-")
    # The driver's own output came back through the log stream: its stage list and its done line.
    assert "stages: probe -> " in text(proc.stdout) and "done: 2 sources" in text(proc.stdout)
    assert f"job {job_id} SUCCEEDED" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] > 0 and list((out / "shards").glob("*.tar"))
    job = status_of(cluster, job_id)
    assert job["status"] == "SUCCEEDED" and job["driver_exit_code"] == 0
    assert job["metadata"]["s2v_output"] == str(out) and job["end_time"] >= job["start_time"]
    assert shlex.split(job["entrypoint"])[:5] == ["s2v", "curate", "run", "--config", "configs/quickstart.yaml"]
    human = curate("status", job_id, "--address", cluster.dashboard_url, env=cluster.client_env())
    assert "SUCCEEDED" in human.stdout and f"s2v shards stats {out}" in human.stdout
    logs = curate("logs", job_id, "--address", cluster.dashboard_url, env=cluster.client_env())
    assert "done: 2 sources" in text(logs.stdout)


def test_resubmitting_into_the_same_output_resumes(cluster, submitted, job_args):
    out, first = submitted
    assert first.returncode == 0
    proc = curate("submit", "--address", cluster.dashboard_url, *job_args, "--output", out, env=cluster.client_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 already committed, 0 to process" in text(proc.stdout) and "nothing new to process" in text(proc.stdout)


def test_stop_ends_a_running_job_as_stopped(cluster, job_args, tmp_path):
    env = cluster.client_env()
    proc = curate("submit", "--address", cluster.dashboard_url, *job_args, "--output", tmp_path / "out", "--no-wait",
                  "--submission-id", "s2v-to-stop", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "s2v-to-stop"  # --no-wait prints just the id, for scripts
    deadline = time.monotonic() + 60
    while status_of(cluster, "s2v-to-stop")["status"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    stop = curate("stop", "s2v-to-stop", "--address", cluster.dashboard_url, env=env)
    assert stop.returncode == 0, stop.stderr
    assert "job s2v-to-stop STOPPED" in stop.stderr
    assert status_of(cluster, "s2v-to-stop")["status"] == "STOPPED"
    again = curate("stop", "s2v-to-stop", "--address", cluster.dashboard_url, env=env)
    assert again.returncode == 0 and "had already ended: STOPPED" in again.stderr


def test_a_failing_job_exits_1_with_its_reason(cluster, demo_corpus, tmp_path):
    proc = curate("submit", "--address", cluster.dashboard_url, "--config", "/nonexistent/recipe.yaml",
                  "--input", demo_corpus / "videos", "--output", tmp_path / "out", env=cluster.client_env())
    assert proc.returncode == 1, proc.stderr
    assert "config file not found: /nonexistent/recipe.yaml" in text(proc.stdout)  # s2v's own error, from the job log
    assert "FAILED: Job entrypoint command failed with exit code 2" in proc.stderr


def test_a_wrong_address_is_a_clear_error():
    wrong = f"http://127.0.0.1:{free_port()}"
    proc = curate("status", "any-job", "--address", wrong, env=LoopbackCluster.client_env(), timeout=60)
    assert proc.returncode == 2
    assert f"cannot reach the Ray Jobs API at {wrong}" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_client_without_token_auth_is_told_how_to_enable_it(cluster):
    env = {k: v for k, v in cluster.client_env().items() if k != "RAY_AUTH_MODE"}
    proc = curate("status", "any-job", "--address", cluster.dashboard_url, env=env, timeout=60)
    assert proc.returncode == 2
    assert f"the Ray Jobs API at {cluster.dashboard_url} refused this client" in proc.stderr
    assert "set RAY_AUTH_MODE=token" in proc.stderr


def test_an_unknown_job_is_named(cluster):
    proc = curate("status", "no-such-job", "--address", cluster.dashboard_url, env=cluster.client_env(), timeout=60)
    assert proc.returncode == 2 and "no job 'no-such-job' on this cluster" in proc.stderr


# ---- what submit checks before it contacts any cluster (the address here is never reached) ----

def test_relative_cluster_paths_and_config_errors_stop_before_submitting():
    never = ["--address", f"http://127.0.0.1:{free_port()}"]
    env = LoopbackCluster.client_env()
    relative = curate("submit", *never, "--input", "demo/videos", "--output", "/shared/out", env=env, timeout=60)
    assert relative.returncode == 2 and "--input demo/videos" in relative.stderr and "absolute" in relative.stderr
    bad = curate("submit", *never, "--config", "configs/quickstart.yaml", "--input", "/shared/videos",
                 "--output", "/shared/out", "--set", "shots.backend=magic", env=env, timeout=60)
    assert bad.returncode == 2 and "shots.backend" in bad.stderr and "cannot reach" not in bad.stderr


def test_the_entrypoint_is_curate_run_with_the_same_options():
    command = curate_entrypoint("configs/quickstart.yaml", ["/data/a b.mp4", "/data/*.mkv"], "/data/meta.jsonl",
                                "/shared/out", ["clips.keyframes=[0.1, 0.9]"])
    assert shlex.split(command) == ["s2v", "curate", "run", "--config", "configs/quickstart.yaml",
                                    "--input", "/data/a b.mp4", "--input", "/data/*.mkv",
                                    "--metadata", "/data/meta.jsonl", "--output", "/shared/out",
                                    "--set", "clips.keyframes=[0.1, 0.9]"]


def test_a_config_inside_the_working_dir_travels_with_the_job(tmp_path):
    assert config_for_job(str(REPO / "configs" / "quickstart.yaml"), REPO) == "configs/quickstart.yaml"
    assert config_for_job("/cluster/recipes/run.yaml", REPO) == "/cluster/recipes/run.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text("shots: {min_clip_s: 1}\n")
    assert config_for_job(str(outside), REPO) == str(outside)  # absolute: read on the cluster's shared storage
    with pytest.raises(JobsError, match="not a file inside the working directory"):
        config_for_job("elsewhere.yaml", REPO)


def test_the_upload_leaves_out_environments_outputs_and_big_files(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "code.py").write_text("x = 1\n")
    (tmp_path / "pipeline" / "weights.bin").write_bytes(b"\0" * (3 * 2**20))
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "big.so").write_bytes(b"\0" * (3 * 2**20))  # excluded anyway: not scanned
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {A: '1'}\npip: [rich]\n")
    env = build_runtime_env(tmp_path, ["*.log"], max_file_mb=2, env_file=str(env_file), pip=["tqdm"],
                            env_vars={"B": "2"})
    assert env["working_dir"] == str(tmp_path)
    assert env["excludes"] == DEFAULT_EXCLUDES + ["*.log", "/pipeline/weights.bin"]
    assert env["pip"] == ["rich", "tqdm"] and env["env_vars"] == {"COLUMNS": "160", "A": "1", "B": "2"}
    assert "working_dir" not in build_runtime_env(None, [], max_file_mb=2)


def test_the_default_submission_id_is_readable():
    assert default_submission_id("/shared/runs/My Run.v2/", now=0).startswith("s2v-My-Run-v2-19")
