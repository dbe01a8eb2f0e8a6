"""Stage workers: what Ray Data runs. A `StageWorker` builds its stages once per process (a task process or a
model actor), limits native threads to the CPUs it declared, and runs the stages on each Arrow batch; task
operators get a named function and model pools a named actor class, so Ray's progress shows the stage names.

Two things happen on the worker that used to happen on the driver: an input in object storage is downloaded to the
worker's scratch for the stages that decode it (`local_sources`), and the last group writes each finished sample to
the output's staging area (`SampleStager`) so only a small digest per record travels back to the driver."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pyarrow as pa

from pipeline.core.config import RunConfig
from pipeline.core.record import Record, records_to_table, table_to_records
from pipeline.core.stage import ABANDONED, Stage, run_stages
from pipeline.core.storage import is_remote, open_storage, parent
from pipeline.store.assemble import SampleStager

# Stages that open the source file itself (the rest work on the clips cut from it).
DECODES_SOURCE = ("probe", "shot_cut", "clip_extract")
SCRATCH_RESERVE = 1 << 30  # left free on the scratch disk after a download: encoders and logs write there too


@contextmanager
def local_sources(records: list[Record], stages: list[Stage], scratch: str | None) -> Iterator[None]:
    """For the block: each source record whose input is in object storage gets a local copy in `scratch`, which the
    decoding stages open (`Record.local_path`); the copies are deleted when the block ends, so a worker holds at most
    its current batch's inputs. A download that fails fails the record (probe/unreadable); the job goes on."""
    if not any(s.name in DECODES_SOURCE for s in stages):
        yield
        return
    with ExitStack() as stack:
        for record in records:
            if record.kind != "source" or not is_remote(record.source_path) or not record.alive:
                continue
            uri = record.source_path
            size = record.meta.get("source", {}).get("size") or 0
            free = shutil.disk_usage(scratch or tempfile.gettempdir()).free
            if size > free - SCRATCH_RESERVE:  # fail this input, not the node's disk
                record.fail("probe", "no_scratch_space", f"{uri}: {size / 1e9:.1f} GB does not fit in the worker's "
                            f"scratch ({free / 1e9:.1f} GB free); point input.scratch_dir at a larger disk")
                continue
            try:
                store = open_storage(parent(uri))
                local = stack.enter_context(store.local_copy(uri.rsplit("/", 1)[1], scratch))
            except OSError as exc:
                record.fail("probe", "unreadable", f"{uri}: cannot download it ({exc})")
                continue
            record.meta["local_path"] = str(local)
        try:
            yield
        finally:
            for record in records:
                local = record.meta.pop("local_path", None)
                if local:  # messages name the input, never the scratch copy
                    for item in record.errors + record.meta.get("warnings", []):
                        item["message"] = item["message"].replace(local, record.source_path)


def limit_threads(num_cpus: float) -> None:
    """Run native libraries (OpenCV, torch) with as many threads as whole CPUs the worker owns, at least one.
    Their defaults (one thread per machine core) in every worker would oversubscribe the machine and slow all of
    them; an actor that owns several CPUs uses them all for its model. Call it after the stages' `setup()`: torch
    is set only where a stage has imported it (importing it here would cost every task worker ~1 s and 300 MB)."""
    import cv2

    threads = max(1, int(num_cpus))
    cv2.setNumThreads(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class StageWorker:
    """Ray Data entry point: builds its stages once per worker (task process or actor) and runs them in order
    on each Arrow batch. Consecutive stateless stages share one worker, so a source is decoded, cut and
    checked in one task without moving data between processes."""

    # Actor pools only: Ray recycles task workers itself (map_batches' max_calls).
    recycle = False

    def __init__(self, stage_classes: list[type[Stage]], config_json: str, finish: tuple | None = None):
        config = RunConfig.model_validate_json(config_json)
        self.timeout_s = config.ray.stage_timeout_s
        self.scratch = config.input.scratch_dir
        # The flow's last group: (output URI, run id, config hash, rejects per reason) for its SampleStager.
        self.stager = SampleStager(*finish) if finish else None
        self.recycle_after = config.ray.recycle_after if self.recycle else None
        self.calls = 0
        self.stages = [cls(config) for cls in stage_classes]
        self.group = "+".join(s.name for s in self.stages)
        for stage in self.stages:
            stage.setup()
        limit_threads(max(s.resources.num_cpus for s in self.stages))
        self.metrics = StageMetrics.create()

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """Yields one table per finished group of records: after a fan-out stage, one per part (clip), which Ray
        Data ships as its own block (see `build_dataset`), so no worker holds more than one clip of a source."""
        if (self.recycle_after and self.calls >= self.recycle_after) or any(t.is_alive() for t in ABANDONED):
            # Replace this process before taking more work: Ray restarts the actor (Ray Data sets max_restarts=-1)
            # or retries the task, and resubmits this batch to the fresh process, so nothing is lost; leaks in
            # native code and calls stuck past their deadline end with the process.
            os._exit(0)
        self.calls += 1
        observe = ((lambda stage, records, stopped: self.metrics.count(stage.name, records, stopped))
                   if self.metrics else None)
        records_in = table_to_records(batch)
        with local_sources(records_in, self.stages, self.scratch):
            for records in run_stages(self.stages, records_in, self.timeout_s, observe):
                if records:
                    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
                    for record in records:
                        # The worker's peak so far: the balancer packs pools by it and the run reports it per stage.
                        record.meta.setdefault("peak_rss_mb", {})[self.group] = round(peak_mb, 1)
                    if self.stager:
                        records = [self.stager.finish(record) for record in records]
                    yield records_to_table(records)


class StageMetrics:
    """Ray metrics (exported in Prometheus format by every node's metrics agent, `ray_` prefixed): records each
    stage passed on and records it stopped, by reason. Stats for watching a run; decisions stay in the records."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.passed = Counter("s2v_records_passed", "records a stage passed on to the next", tag_keys=("stage", "kind"))
        self.stopped = Counter("s2v_records_stopped", "records a stage dropped (a filter decision) or failed (an "
                               "error), by reason", tag_keys=("stage", "kind", "outcome", "reason"))

    @classmethod
    def create(cls) -> StageMetrics | None:
        import ray

        return cls() if ray.is_initialized() else None

    def count(self, stage: str, records: list[Record], stopped_before: set[int]) -> None:
        passed: dict[str, int] = {}
        for record in records:
            if record.alive:
                passed[record.kind] = passed.get(record.kind, 0) + 1
            elif id(record) not in stopped_before:
                outcome, reason = (("dropped", record.drop["reason"]) if record.drop
                                   else ("failed", record.errors[-1]["reason"]))
                self.stopped.inc(1, {"stage": stage, "kind": record.kind, "outcome": outcome, "reason": reason})
        for kind, n in passed.items():
            self.passed.inc(n, {"stage": stage, "kind": kind})


_TASK_WORKERS: dict = {}


def run_in_task(batch: pa.Table, stage_classes: list[type[Stage]], config_json: str,
                finish: tuple | None = None) -> Iterator[pa.Table]:
    """For stateless stages run as Ray tasks: one StageWorker per process, reused across batches."""
    key = (tuple(stage_classes), config_json, finish)
    if key not in _TASK_WORKERS:
        _TASK_WORKERS[key] = StageWorker(stage_classes, config_json, finish)
    yield from _TASK_WORKERS[key](batch)


def named_task_fn(stage_classes: list[type[Stage]]):
    """A task function named after its stages, so Ray's progress shows `MapBatches(probe+shot_cut+...)`."""

    def fn(batch, stage_classes, config_json, finish=None):
        yield from run_in_task(batch, stage_classes, config_json, finish)

    fn.__name__ = fn.__qualname__ = "+".join(cls.name for cls in stage_classes)
    return fn


def named_actor_class(stage_classes: list[type[Stage]]) -> type[StageWorker]:
    return type("+".join(cls.name for cls in stage_classes), (StageWorker,), {"recycle": True})
