"""The quickstart on a real two-node Ray cluster (pipeline.testing.loopback) whose nodes share no output directory:
inputs and output in an S3-compatible store (moto's server on 127.0.0.1). The same samples as on one machine, both
nodes doing stage work (seen in each node's Prometheus metrics), shards written by worker processes (never the
driver), and summary.json moving while the job runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.core.storage import open_storage
from pipeline.store.ledger import Ledger
from pipeline.testing.loopback import NODE_IP, LoopbackCluster
from pipeline.testing.synthetic_runs import sample_set

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def s3(s3_server, demo_corpus):  # before the cluster: its nodes get the AWS_* settings of this environment
    s3_server.create_bucket("cluster")
    s3_server.upload_tree(demo_corpus, "s3://cluster/demo")
    return s3_server


@pytest.fixture(scope="module")
def cluster(s3):
    with LoopbackCluster(nodes=2, cpus_per_node=1) as running:
        yield running


def scrape(cluster: LoopbackCluster) -> list[dict[tuple[str, str], float]]:
    """Per node: {(metric, stage): value} of our counters from the node's metrics agent."""
    per_node = []
    for node in cluster.members:
        text = urllib.request.urlopen(f"http://{NODE_IP}:{node.metrics_port}/metrics", timeout=10).read().decode()
        values: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            match = re.match(r'^ray_(s2v_records_\w+?)(?:_total)?\{(.*)\} ([0-9.e+]+)$', line)
            if match:
                stage = re.search(r'stage="([^"]+)"', match.group(2)).group(1)
                key = (match.group(1), stage)
                values[key] = values.get(key, 0.0) + float(match.group(3))
        per_node.append(values)
    return per_node


def test_two_nodes_give_the_one_machine_sample_set(cluster, curated_out, u2netp_dir):
    out = "s3://cluster/out"
    store = open_storage(out)
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "curate", "run", "--config", "configs/quickstart.yaml",
         "--set", f"grounding.model.path={u2netp_dir}", "--input", "s3://cluster/demo/videos",
         "--metadata", "s3://cluster/demo/metadata.jsonl", "--output", out, "--address", cluster.address,
         "--set", "ray.progress=false", "--set", "ray.summary_every_s=1"],
        cwd=REPO, env=cluster.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    while driver.poll() is None:  # summary.json while the job runs: status and progress of this run
        try:
            summary = json.loads(store.read_text("summary.json"))
            if summary["status"] == "running" and summary["progress"] not in seen:
                seen.append(summary["progress"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    log = driver.stdout.read()
    assert driver.returncode == 0, log[-3000:]
    assert sample_set(out) == sample_set(curated_out)
    assert seen and seen[0]["sources_total"] == 2 and seen[0]["run"]
    assert json.loads(store.read_text("summary.json"))["status"] == "finished"
    writers = {e["written_by"]["pid"] for e in Ledger(out).read().shards.values()}
    assert writers and driver.pid not in writers  # shards come from worker processes, not the driver

    # Every node's metrics agent exports counters of the stage work done on it: both nodes worked, and the totals
    # add up to the run (each source passes the probe once; every sample passes the last per-source stage).
    deadline = time.monotonic() + 60
    while True:
        nodes = scrape(cluster)
        probe = sum(n.get(("s2v_records_passed", "probe"), 0.0) for n in nodes)
        if (all(nodes) and probe >= 2) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(nodes), f"a node exported no s2v metrics: {nodes}"
    assert probe == 2
    drops = sum(v for n in nodes for (name, _), v in n.items() if name == "s2v_records_stopped")
    assert drops > 0  # the quickstart's filters drop some clips: their reasons are counted too
