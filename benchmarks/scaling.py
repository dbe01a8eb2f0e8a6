"""Scaling and recovery on a real Ray cluster: the quickstart recipe over a demo corpus on one loopback node, on
two, and on two with one worker process killed mid-job (pipeline.testing.loopback).

- clips_per_s_1node / clips_per_s_2nodes: clips out of the clip-extraction stage per second of the job (the run
  line of the ledger: from the driver's start to its last commit, cluster start-up excluded).
- scaling = 2 nodes / 1 node (target >= 1.7). Each node is pinned to one core of its own (`pin_cores`) and has
  the same logical CPUs, so "a node" is the same compute in both runs, as on a real cluster.
- recovery_overhead = wall time of the two-node job with one worker process SIGKILLed while it runs a stage,
  over the clean two-node job (target <= 1.3): the worse of two runs, one killing a task worker (the first busy
  one, usually the decode) and one killing a model actor (Ray restarts it and it reloads its model). The sample
  sets of all four runs must be equal.

Prints one JSON object on its last line.

Shards are written on the nodes (the flow's last group stages samples, tasks on the nodes assemble shards); `--s3`
puts the outputs in an S3-compatible server so the nodes share no output directory either.

    python benchmarks/scaling.py [--videos 6] [--cpus-per-node 2] [--work /tmp/s2v-scaling] [--s3]    # ~17 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.storage import open_storage
from pipeline.store.ledger import Ledger
from pipeline.testing.loopback import ACTOR_WORKER, TASK_WORKER, LoopbackCluster, kill_busy_worker
from pipeline.testing.s3server import S3Server

REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path, videos: int) -> tuple[Path, Path]:
    corpus = work / f"demo{videos}"
    if not (corpus / "metadata.jsonl").exists():
        subprocess.run([sys.executable, "-m", "pipeline.cli.main", "demo-data", str(corpus), "--videos", str(videos)],
                       check=True, cwd=REPO)
    model = REPO / "models" / "u2netp"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "pipeline.cli.main", "models", "fetch", "u2netp", "--dir", "models"],
                       check=True, cwd=REPO)
    return corpus, model


def run(nodes: int, cpus: int, corpus: Path, model: Path, out: Path, kill: str | None = None,
        s3: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    log_path = out.with_name(out.name + ".log")
    if s3:  # the same name under the benchmark's bucket; the nodes then share no output directory
        out = f"s3://scaling/{out.name}"
        open_storage(out).delete_tree("")
    with LoopbackCluster(nodes=nodes, cpus_per_node=cpus, pin_cores=True, object_store_mb=500) as cluster:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli.main", "curate", "run", "--config", "configs/quickstart.yaml",
             "--set", f"grounding.model.path={model}", "--input", str(corpus / "videos"),
             "--metadata", str(corpus / "metadata.jsonl"), "--output", str(out), "--address", cluster.address,
             "--set", "ray.progress=false",
             # Every run a cold start: pools sized from their own warm-up, not from costs an earlier run measured.
             "--set", "ray.profile=null"],
            cwd=REPO, env=cluster.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        killed: list[tuple[str | None, float]] = []  # (title, seconds since the driver started)
        started = time.monotonic()
        if kill:
            roots = [n.process.pid for n in cluster.members]

            def kill_one():
                title = kill_busy_worker(roots, settle_s=5.0, kinds=(kill,))
                killed.append((title, round(time.monotonic() - started, 1)))

            watcher = threading.Thread(target=kill_one)
            watcher.start()
        log = driver.communicate()[0]
        if kill:
            watcher.join()
    # The driver's output (Ray Data's timestamped progress lines) beside the run, to see where a run lost time.
    log_path.write_text(log)
    if driver.returncode != 0:
        raise SystemExit(f"curation on {nodes} node(s) failed:\n{log[-3000:]}")
    line = Ledger(out).read().runs[-1]
    with open_storage(out).open_read("manifest.parquet") as f:
        samples = sorted(r["key"] for r in pq.read_table(f, columns=["key"]).to_pylist())
    return {"wall_s": round(line["wall_s"], 1), "clips": line["clips"], "clips_per_s": line["clips"] / line["wall_s"],
            "samples": samples, "killed": killed[0][0] if killed else None,
            "killed_after_s": killed[0][1] if killed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--cpus-per-node", type=int, default=2,
                        help="Ray's logical CPUs per node (each node is pinned to one core either way)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/s2v-scaling"))
    parser.add_argument("--s3", action="store_true", help="outputs in an S3-compatible server on 127.0.0.1 (moto, "
                        "unpinned: it takes CPU from the nodes) instead of directories under --work")
    args = parser.parse_args()
    corpus, model = prepare(args.work, args.videos)
    with contextlib.ExitStack() as stack:
        if args.s3:
            stack.enter_context(S3Server()).create_bucket("scaling")
        result = measure(args, corpus, model)
    print(json.dumps(result))


def measure(args, corpus: Path, model: Path) -> dict:
    one = run(1, args.cpus_per_node, corpus, model, args.work / "out-1node", s3=args.s3)
    print(f"1 node: {one['wall_s']} s", file=sys.stderr)
    two = run(2, args.cpus_per_node, corpus, model, args.work / "out-2nodes", s3=args.s3)
    print(f"2 nodes: {two['wall_s']} s", file=sys.stderr)
    hits = {}
    for kind, title in (("task", TASK_WORKER), ("actor", ACTOR_WORKER)):
        hits[kind] = run(2, args.cpus_per_node, corpus, model, args.work / f"out-2nodes-kill-{kind}", kill=title,
                         s3=args.s3)
        print(f"2 nodes, one {kind} worker killed ({hits[kind]['killed']}): {hits[kind]['wall_s']} s", file=sys.stderr)
    overhead = {kind: round(hit["wall_s"] / two["wall_s"], 3) for kind, hit in hits.items()}
    return {
        "clips_per_s_1node": round(one["clips_per_s"], 4),
        "clips_per_s_2nodes": round(two["clips_per_s"], 4),
        "scaling": round(two["clips_per_s"] / one["clips_per_s"], 3),
        "recovery_overhead": max(overhead.values()),
        "recovery_overhead_by_kill": overhead,
        "wall_s": {"1node": one["wall_s"], "2nodes": two["wall_s"],
                   **{f"2nodes_kill_{kind}": hit["wall_s"] for kind, hit in hits.items()}},
        "killed": {kind: hit["killed"] for kind, hit in hits.items()},
        # seconds after the driver started (its wall_s excludes Ray start-up)
        "killed_after_s": {kind: hit["killed_after_s"] for kind, hit in hits.items()},
        "same_sample_set": all(one["samples"] == r["samples"] for r in (two, *hits.values())),
        "samples": len(one["samples"]), "clips": one["clips"], "videos": args.videos,
        "cpus_per_node": args.cpus_per_node, "cores": "one per node (pinned)",
        "output": "s3 (moto on 127.0.0.1)" if args.s3 else "posix",
    }


if __name__ == "__main__":
    main()
