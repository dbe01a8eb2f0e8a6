"""Throughput of the curation pipeline: sequential in one process vs the Ray Data pipeline on this machine.

Both runs curate the same demo corpus with the same config into fresh output directories. The Ray run is timed
after `ray.init`, as a long-lived cluster would be. Peak RSS is sampled from the Ray worker processes.
Prints one JSON object on its last line:
  {"sequential_clips_per_s", "ray_clips_per_s", "speedup", "peak_rss_mb_per_worker", ...}
Target: speedup >= 1.6 on 2 CPUs.

    python benchmarks/pipeline_throughput.py [--videos 12] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from rich.console import Console

from pipeline.config import load_config
from pipeline.demo_data import build_demo_corpus
from pipeline.runner import connect_ray, curate

REPO = Path(__file__).resolve().parents[1]


class WorkerRssSampler(threading.Thread):
    """Samples the resident memory of every Ray worker process (their titles start with "ray::")."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = proc.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and proc.info["memory_info"]:
                    rss = proc.info["memory_info"].rss / 2**20
                    self.peak[proc.info["pid"]] = max(self.peak.get(proc.info["pid"], 0.0), rss)
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return max(self.peak.values(), default=0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24, help="demo videos in the input set")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    args = parser.parse_args()

    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_demo_corpus(tmp / "demo", videos=args.videos, seed=1)
        config = load_config(args.config, ["ray.progress=false", f"ray.num_cpus={args.cpus}"])
        config.input.paths = [str(tmp / "demo" / "videos")]

        start = time.perf_counter()
        seq = curate(config, tmp / "seq", console=quiet, sequential=True)
        seq_wall = time.perf_counter() - start

        connect_ray(config)  # started before the clock, as a long-lived cluster would be
        sampler = WorkerRssSampler()
        sampler.start()
        start = time.perf_counter()
        par = curate(config, tmp / "ray", console=quiet)
        ray_wall = time.perf_counter() - start
        peak_rss = sampler.stop()
        ray.shutdown()

    assert seq["samples"] == par["samples"], "both modes must produce the same samples"
    clips = seq["clips"]
    result = {
        "videos": args.videos,
        "clips": clips,
        "samples": seq["samples"],
        "input_video_s": round(seq["input_video_hours"] * 3600, 1),
        "cpus": args.cpus,
        "sequential_wall_s": round(seq_wall, 2),
        "ray_wall_s": round(ray_wall, 2),
        "sequential_clips_per_s": round(clips / seq_wall, 3),
        "ray_clips_per_s": round(clips / ray_wall, 3),
        "speedup": round(seq_wall / ray_wall, 3),
        "peak_rss_mb_per_worker": round(peak_rss, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
