"""The quickstart from an s3:// input prefix to an s3:// output on a real S3-compatible HTTP server (moto, 127.0.0.1):
a worker killed while it writes samples and a driver killed mid-run, then a rerun, end with the clean run's samples;
shards are written by worker processes (not the driver), the credentials appear nowhere, and stats, verify, why,
show, refilter and train read the s3:// output.

(The two-node cluster whose nodes share no output directory is in test_multinode.py, on the same server.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.core.storage import open_storage
from pipeline.store.ledger import Ledger
from pipeline.testing.loopback import TASK_WORKER, kill_busy_worker
from pipeline.testing.synthetic_runs import sample_set

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def s3(s3_server, demo_corpus):
    """The server, with the demo corpus uploaded under s3://videos/demo/ (videos/ and metadata.jsonl)."""
    s3_server.create_bucket("videos")
    s3_server.create_bucket("curated")
    s3_server.upload_tree(demo_corpus, "s3://videos/demo")
    return s3_server


def curate_command(out: str, u2netp_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.main", "curate", "run", "--config", "configs/quickstart.yaml",
            "--set", f"grounding.model.path={u2netp_dir}", "--input", "s3://videos/demo/videos",
            "--metadata", "s3://videos/demo/metadata.jsonl", "--output", out,
            "--set", "ray.progress=false", "--set", "ray.num_cpus=2", *extra]


def committed_shards(out: str) -> int:
    try:
        return len(Ledger(out).read().shards)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def s3_out(s3, u2netp_dir) -> tuple[str, str, int]:
    """s3://curated/run: a first run in which the Ray worker running the flow's last group (the one that finishes
    clips and writes their samples to the output's staging area) is SIGKILLed in the middle of a batch, and whose
    driver is SIGKILLed once it has committed a shard; then the same command again. Returns (output URI, both runs'
    console output, the second driver's pid)."""
    out = "s3://curated/run"
    first = subprocess.Popen(curate_command(out, u2netp_dir), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker: list[str | None] = []
    killer = threading.Thread(target=lambda: worker.append(
        kill_busy_worker([first.pid], kinds=(f"{TASK_WORKER}(faces+",))))
    killer.start()
    deadline = time.monotonic() + 600
    while first.poll() is None and (not worker or committed_shards(out) == 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its embedded Ray
    log = first.communicate()[0]
    killer.join()
    assert worker and worker[0], f"the last group's worker was not caught in a batch:\n{log[-2000:]}"
    assert killed, f"the first run ended before its driver could be killed:\n{log[-2000:]}"
    second = subprocess.Popen(curate_command(out, u2netp_dir), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log += second.communicate(timeout=900)[0]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert second.returncode == 0, log[-3000:]
    return out, log, second.pid


def test_a_killed_worker_and_driver_then_a_rerun_give_the_clean_runs_samples_written_by_the_workers(s3_out,
                                                                                                   curated_out):
    out, log, driver_pid = s3_out
    assert sample_set(out) == sample_set(curated_out)  # the sequential local fixture run: same settings
    assert "1 already committed" in log  # the rerun resumed from what the killed driver had committed
    state = Ledger(out).read()
    assert state.shards and all(e["written_by"]["pid"] != driver_pid for e in state.shards.values())
    store = open_storage(out)
    names = {e.rel.split("/")[0] for e in store.list()}
    assert {"ledger", "shards", "index.json", "manifest.parquet", "summary.json", "config.yaml"} <= names
    assert ".staging" not in names  # staged samples are gone once assembled


def test_the_credentials_appear_in_no_output_object_and_no_log(s3, s3_out):
    out, log, _ = s3_out
    secret = s3.secret.encode()
    store = open_storage(out)
    for entry in store.list():
        assert secret not in store.read_bytes(entry.rel), entry.rel
    assert s3.secret not in log
    session = Path("/tmp/ray/session_latest/logs")
    for path in session.rglob("*") if session.is_dir() else []:
        if path.is_file() and path.stat().st_size < 50 << 20:
            assert secret not in path.read_bytes(), path


def test_stats_verify_why_and_show_read_the_s3_output(s3_out, tmp_path):
    from pipeline.cli.main import main

    out, _, _ = s3_out
    runner = CliRunner()
    verified = runner.invoke(main, ["shards", "verify", out])
    assert verified.exit_code == 0, verified.output
    stats = json.loads(runner.invoke(main, ["shards", "stats", "--json", out]).output)
    assert stats["samples"] == len(sample_set(out)) > 0
    key = sorted(sample_set(out))[0]
    why = runner.invoke(main, ["shards", "why", out, key])
    assert why.exit_code == 0 and key in why.output and "kept" in why.output
    shown = runner.invoke(main, ["shards", "show", out, key, "--out", str(tmp_path / "sheet.png")])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "sheet.png").stat().st_size > 10_000


def test_refilter_and_train_take_s3_uris(s3_out, tmp_path):
    from pipeline.cli.main import main
    from trainer.cli import train

    out, _, _ = s3_out
    result = CliRunner().invoke(main, ["curate", "refilter", out, "--output", "s3://curated/strict",
                                       "--set", "filters.quality.min_sharpness=1e9"])
    assert result.exit_code == 0, result.output
    strict = Ledger("s3://curated/strict").read()
    assert sum(len(e["samples"]) for e in strict.sources.values()) == 0  # every sample blurry under that threshold
    config = str(REPO / "configs" / "train-tiny.yaml")
    trained = CliRunner().invoke(train, ["--config", config, "--shards", out, "--out", str(tmp_path / "run"),
                                         "--set", "steps=2", "--set", "ckpt_every=2", "--set", "log_every=1",
                                         "--set", "data.num_workers=0", "--set", "data.clip_offset=start"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()


def test_an_unsupported_or_unreachable_output_is_refused_without_creating_a_local_folder(tmp_path):
    from pipeline.cli.main import main

    result = CliRunner().invoke(main, ["curate", "run", "--input", str(tmp_path), "--output", "ftp://host/out"])
    assert result.exit_code == 2 and "ftp:// scheme is not supported" in result.output
    assert not any(tmp_path.iterdir()) and not Path("ftp:").exists() and not Path("s3:").exists()


def test_an_output_that_cannot_be_written_is_refused_before_anything_else(s3, tmp_path):
    from pipeline.cli.main import main

    result = CliRunner().invoke(main, ["curate", "run", "--input", str(tmp_path), "--output",
                                       "s3://no-such-bucket/out"])
    assert result.exit_code == 2 and "s3://no-such-bucket/out" in result.output and "cannot write" in result.output
    assert s3.secret not in result.output
