"""The stage contract: a named, resource-declaring unit with `setup()` once per worker and `process(batch)`.

`run_stage` is the safety net around `process`: records that already failed or were dropped pass through
untouched, and an unexpected exception is pinned on the record that caused it instead of failing the job.
"""

from __future__ import annotations

import time
import traceback
from typing import ClassVar

import pyarrow as pa

from pipeline.config import RunConfig, StageResources
from pipeline.record import Record, records_to_table, table_to_records


class Stage:
    """Base class. Subclasses set `name`, and `stateful = True` when `setup()` loads a model (-> Ray actor pool)."""

    name: ClassVar[str] = "stage"
    stateful: ClassVar[bool] = False
    # The config section whose `resources` this stage asks for; None = the defaults (1 CPU, 0.5 GB, batch 1).
    section: ClassVar[str | None] = None

    def __init__(self, config: RunConfig):
        self.config = config

    @property
    def resources(self) -> StageResources:
        """CPUs, GPUs (fractional allowed), memory and batch size one worker of this stage asks for."""
        if self.section is None:
            return StageResources()
        return getattr(self.config, self.section).resources

    def setup(self) -> None:
        """Load models and other per-worker state. Called once per worker before the first batch."""

    def process(self, records: list[Record]) -> list[Record]:
        """Transform live records; may return more records than given (fan-out). Must not raise for bad input."""
        raise NotImplementedError


def run_stage(stage: Stage, records: list[Record]) -> list[Record]:
    """Apply `stage` to the live records, isolating failures to the record that caused them."""
    done = [r for r in records if not r.alive]
    live = [r for r in records if r.alive]
    if not live:
        return done
    start = time.perf_counter()
    try:
        out = stage.process(live)
    except Exception:
        out = []
        for record in live:
            try:
                out.extend(stage.process([record]))
            except Exception as exc:
                record.fail(stage.name, "exception", f"{type(exc).__name__}: {exc}")
                record.meta.setdefault("tracebacks", {})[stage.name] = traceback.format_exc(limit=5)
                out.append(record)
    per_record = (time.perf_counter() - start) / max(1, len(out))
    for record in out:
        timings = record.meta.setdefault("timings", {})
        timings[stage.name] = timings.get(stage.name, 0.0) + per_record
    return done + out


def limit_threads(num_cpus: float) -> None:
    """Keep native libraries to the cores a worker was given. Ray runs one worker per core; OpenCV's default
    pool (one thread per machine core) in every worker would oversubscribe the machine and slow all of them."""
    import cv2

    cv2.setNumThreads(max(1, int(num_cpus)))


class StageWorker:
    """Ray Data entry point: builds its stages once per worker (task process or actor) and runs them in order
    on each Arrow batch. Consecutive stateless stages share one worker, so a source is decoded, cut and
    checked in one task without moving data between processes."""

    def __init__(self, stage_classes: list[type[Stage]], config_json: str):
        config = RunConfig.model_validate_json(config_json)
        self.stages = [cls(config) for cls in stage_classes]
        limit_threads(max(s.resources.num_cpus for s in self.stages))
        for stage in self.stages:
            stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = table_to_records(batch)
        for stage in self.stages:
            records = run_stage(stage, records)
        return records_to_table(records)


_TASK_WORKERS: dict = {}


def run_in_task(batch: pa.Table, stage_classes: list[type[Stage]], config_json: str) -> pa.Table:
    """For stateless stages run as Ray tasks: one StageWorker per process, reused across batches."""
    key = (tuple(stage_classes), config_json)
    if key not in _TASK_WORKERS:
        _TASK_WORKERS[key] = StageWorker(stage_classes, config_json)
    return _TASK_WORKERS[key](batch)


def named_task_fn(stage_classes: list[type[Stage]]):
    """A task function named after its stages, so Ray's progress shows `MapBatches(probe+shot_cut+...)`."""

    def fn(batch, stage_classes, config_json):
        return run_in_task(batch, stage_classes, config_json)

    fn.__name__ = fn.__qualname__ = "+".join(cls.name for cls in stage_classes)
    return fn


def named_actor_class(stage_classes: list[type[Stage]]) -> type[StageWorker]:
    return type("+".join(cls.name for cls in stage_classes), (StageWorker,), {})
