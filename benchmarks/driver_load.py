"""What the data path costs the driver now that shards are written on the workers.

Curates the demo corpus through the full quickstart flow on Ray (this machine, embedded) into an output in an
S3-compatible store (moto's server on 127.0.0.1, started here; `--posix` writes a local directory instead), then
reads the run's ledger line: the bytes of record tables the driver received from the workers (`driver_bytes_in`,
digests only) and its CPU seconds, against the mean size of a sample in the shards written in the same run.

Prints one JSON object on its last line:
  {"driver_bytes_per_sample", "sample_bytes_mean", "driver_share", "driver_cpu_s_per_sample", "samples",
   "shards", "wall_s", "output", "shard_writers"}
`driver_share` = driver_bytes_per_sample / sample_bytes_mean (target <= 0.01). Before this design every sample's
bytes went through the driver, which wrote the shards: a share of at least 1.0. `shard_writers` counts the distinct
processes that wrote shards (none of them the driver).

    python benchmarks/driver_load.py [--videos 4] [--cpus 2] [--posix]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from pipeline.core.config import load_config
from pipeline.run.runner import curate
from pipeline.sources.demo_data import build_demo_corpus
from pipeline.store.ledger import Ledger
from pipeline.testing.s3server import S3Server

REPO = Path(__file__).resolve().parents[1]


def measure(out: str, corpus: Path, cpus: int, u2netp: str) -> dict:
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         [f"grounding.model.path={u2netp}", "ray.progress=false", f"ray.num_cpus={cpus}"])
    config.input.paths = [str(corpus / "videos")]
    config.input.metadata = str(corpus / "metadata.jsonl")
    started = time.time()
    summary = curate(config, out, console=Console(quiet=True))
    wall = time.time() - started
    run = summary["this_run"]
    state = Ledger(out).read()
    samples = sum(e["nsamples"] for e in state.shards.values())
    assert samples > 0, "the run produced no samples: nothing to measure"
    # A shard's bytes over its samples: the tar framing is part of what a driver writing shards would have handled.
    sample_bytes = sum(e["bytes"] for e in state.shards.values()) / samples
    per_sample = run["driver_bytes_in"] / samples
    return {
        "driver_bytes_per_sample": round(per_sample),
        "sample_bytes_mean": round(sample_bytes),
        "driver_share": round(per_sample / sample_bytes, 5),
        "driver_cpu_s_per_sample": round(run["driver_cpu_s"] / samples, 3),
        "samples": samples,
        "shards": len(state.shards),
        "wall_s": round(wall, 1),
        "output": "s3" if out.startswith("s3://") else "posix",
        "shard_writers": len({e["written_by"]["pid"] for e in state.shards.values()} - {os.getpid()}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--posix", action="store_true", help="a local output directory instead of s3://")
    parser.add_argument("--u2netp", default=str(REPO / "models" / "u2netp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s2v-driver-load-") as tmp:
        corpus = Path(tmp) / "demo"
        build_demo_corpus(corpus, videos=args.videos, seed=0)
        if args.posix:
            result = measure(str(Path(tmp) / "out"), corpus, args.cpus, args.u2netp)
        else:
            with S3Server() as server:
                server.create_bucket("bench")
                result = measure("s3://bench/out", corpus, args.cpus, args.u2netp)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
