"""Throughput of the curation pipeline: sequential in one process (one core) vs the Ray Data pipeline on this
machine.

Both runs curate the same demo corpus, with its metadata captions, through the full quickstart flow into fresh
output directories, and must produce the same samples (same keys, more than none). The Ray run is timed after
`ray.init`, as a long-lived cluster would be. During it, peak RSS is sampled from the Ray worker processes and the
machine's idle CPU share is read from /proc/stat. Prints one JSON object on its last line:
  {"speedup", "idle_cpu_share", "samples": {"sequential", "ray"}, "stage_busy_s": {"ray", "sequential"},
   "sequential_clips_per_s", "ray_clips_per_s", "peak_rss_mb_per_worker", "pools", ...}
`stage_busy_s`: seconds each stage spent on the run's records (wall time inside the stage, summed over clips);
`stage_cpu_s`: the CPU seconds of the same calls (all threads of the worker process).
Targets on 2 CPUs: speedup >= 1.8, idle_cpu_share <= 0.10.

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

from pipeline.core.config import load_config
from pipeline.run.runner import connect_ray, curate
from pipeline.sources.demo_data import build_demo_corpus
from pipeline.store.ledger import Ledger

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


def stage_busy_s(out: Path) -> dict[str, float]:
    """Seconds each stage spent on the committed records of an output directory (the ledger's timings)."""
    busy: dict[str, float] = {}
    for entry in Ledger(out).read().sources.values():
        for stage, seconds in entry.get("timings", {}).items():
            busy[stage] = busy.get(stage, 0.0) + seconds
    return {stage: round(seconds, 1) for stage, seconds in sorted(busy.items(), key=lambda kv: -kv[1])}


def sample_keys(out: Path) -> list[str]:
    return sorted(s["key"] for e in Ledger(out).read().sources.values() for s in e["samples"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24, help="demo videos in the input set")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--profile", action="store_true",
                        help="start the Ray run's pools from the costs the sequential run measured")
    args = parser.parse_args()

    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_demo_corpus(tmp / "demo", videos=args.videos, seed=1)
        config = load_config(args.config, ["ray.progress=false", f"ray.num_cpus={args.cpus}"])
        config.input.paths = [str(tmp / "demo" / "videos")]
        config.input.metadata = str(tmp / "demo" / "metadata.jsonl")  # the captions: without them nothing is kept
        # A cold start: the Ray run sizes its pools from its own warm-up, not from costs the sequential run measured
        # (--profile keeps them, as a second run of a recipe would).
        config.ray.profile = str(tmp / "stage-profile.json") if args.profile else None

        start = time.perf_counter()
        seq = curate(config, tmp / "seq", console=quiet, sequential=True)
        seq_wall = time.perf_counter() - start

        connect_ray(config)  # started before the clock, as a long-lived cluster would be
        sampler = WorkerRssSampler()
        sampler.start()
        cpu_before = psutil.cpu_times()
        start = time.perf_counter()
        par = curate(config, tmp / "ray", console=quiet)
        ray_wall = time.perf_counter() - start
        cpu_after = psutil.cpu_times()
        peak_rss = sampler.stop()
        ray.shutdown()
        busy = {"ray": stage_busy_s(tmp / "ray"), "sequential": stage_busy_s(tmp / "seq")}
        keys = {"sequential": sample_keys(tmp / "seq"), "ray": sample_keys(tmp / "ray")}

    assert keys["sequential"], "the sequential run kept no samples: the benchmark would time a flow that makes nothing"
    assert keys["sequential"] == keys["ray"], "both modes must produce the same samples"
    idle = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("idle", "iowait"))
    total = sum(cpu_after) - sum(cpu_before)
    clips = seq["clips"]
    run = par["this_run"]
    result = {
        "videos": args.videos,
        "clips": clips,
        "samples": {mode: len(k) for mode, k in keys.items()},
        "input_video_s": round(seq["input_video_hours"] * 3600, 1),
        "cpus": args.cpus,
        "sequential_wall_s": round(seq_wall, 2),
        "ray_wall_s": round(ray_wall, 2),
        "sequential_clips_per_s": round(clips / seq_wall, 3),
        "ray_clips_per_s": round(clips / ray_wall, 3),
        "speedup": round(seq_wall / ray_wall, 3),
        "idle_cpu_share": round(idle / total, 3),
        "stage_busy_s": busy,
        "stage_cpu_s": {"ray": par["this_run"]["stage_cpu_s"], "sequential": seq["this_run"]["stage_cpu_s"]},
        "peak_rss_mb_per_worker": round(peak_rss, 1),
        "peak_rss_mb_by_stage": run["peak_rss_mb"],
        "pools": run["pools"],
        "pool_resizes": [f"{r['stage']} {r['from']}->{r['to']} at {r['at_s']}" for r in run["pool_resizes"]],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
