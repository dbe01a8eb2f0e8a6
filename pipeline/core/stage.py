"""The stage contract: a named, resource-declaring unit with `setup()` once per worker and `process(batch)`.

`run_stage` is the safety net around `process`: records that already failed or were dropped pass through
untouched, and an unexpected exception is pinned on the record that caused it instead of failing the job.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from pipeline.core.config import RunConfig, StageResources
from pipeline.core.record import Record


class Stage:
    """Base class. Subclasses set `name`, and `stateful = True` when `setup()` loads a model (-> Ray actor pool)."""

    name: ClassVar[str] = "stage"
    stateful: ClassVar[bool] = False
    # The config section whose `resources` this stage asks for; None = the defaults (1 CPU, 0.5 GB, batch 1).
    section: ClassVar[str | None] = None
    # Blobs every record must carry for this stage (see INPUTS). `run_stage` checks them before `process` sees the
    # batch and fails a record that lacks one (reason `no_<blob>`), so stages do not each guard their inputs.
    requires: ClassVar[tuple[str, ...]] = ()
    # What makes this stage's output (model, version, settings), set in `__init__` or `setup()`. `run_stage`
    # records it as meta["provenance"][name] on every record the stage passes on (see `provenance_of`).
    description: str | None = None

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
        """Transform live records. Must not raise for bad input."""
        raise NotImplementedError

    def provenance_of(self, record: Record) -> str | None:
        """The provenance line for a record this stage passed on; None records none. Override when it depends on
        the record (a caption kept from the metadata, a fallback taken for this record)."""
        return self.description


class FanOutStage(Stage):
    """A stage that turns one record into several (a source into its clips) and finishes them one at a time.

    `split` plans the parts (cheap, no content); `stream` fills them in and yields each as soon as it is done, and
    keeps no reference to a part it has yielded. The runner passes each part through the rest of the flow before
    the next one is finished, so a worker holds one part at a time, not a whole source's worth, and the parts spread
    over the workers downstream."""

    def split(self, record: Record) -> list[Record]:
        raise NotImplementedError

    def stream(self, record: Record, parts: list[Record]) -> Iterator[Record]:
        raise NotImplementedError

    def process(self, records: list[Record]) -> list[Record]:
        return [part for record in records for part in self.stream(record, self.split(record))]


class StageTimeout(Exception):
    """A stage call ran past its deadline (`ray.stage_timeout_s` per record)."""


def call_with_deadline(fn, seconds: float | None):
    """fn(), or StageTimeout once `seconds` pass.

    The call runs on a thread of its own (Ray Data runs actor calls on a pool thread anyway, where signals cannot
    reach). A call that overruns is abandoned, not interrupted: nothing is torn down mid-way in native code, and a
    call stuck in C is cut off as surely as one stuck in Python. The worker then replaces its process before its
    next batch (StageWorker), so stuck calls cannot pile up; in a sequential run the thread lingers until exit."""
    if not seconds:
        return fn()
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="s2v-stage-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        ABANDONED.append(worker)
        raise StageTimeout(f"no result after {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _keyframes_problem(blob) -> str | None:
    if blob is None:
        return "none"
    if (not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 4 or blob.shape[-1] != 3
            or len(blob) == 0):
        return f"{getattr(blob, 'dtype', type(blob).__name__)} {getattr(blob, 'shape', '')}".strip()
    return None


# What a stage can declare in `requires`: the blob, what it must be, and why a given value is not that (None = ok).
INPUTS = {"keyframes": ("uint8 (K, H, W, 3) keyframes, K >= 1", _keyframes_problem)}


def missing_inputs(stage: Stage, record: Record) -> bool:
    """Fail `record` for the first input `stage` requires that it lacks; True when it did."""
    for name in stage.requires:
        what, problem_of = INPUTS[name]
        problem = problem_of(record.blobs.get(name))
        if problem:
            record.fail(stage.name, f"no_{name}", f"{stage.name} needs {what}; the record has {problem}")
            return True
    return False


# Calls that timed out and may still be running: their process is replaced before its next batch.
ABANDONED: list[threading.Thread] = []


def run_stage(stage: Stage, records: list[Record], timeout_s: float | None = None) -> list[Record]:
    """Apply `stage` to the live records, isolating failures and hangs to the record that caused them.

    `timeout_s` is per record: a batch gets that much per live record. When a batch fails or times out, each record
    is retried alone, so one bad or hanging input costs its own record only."""
    done = [r for r in records if not r.alive]
    arrived = [r for r in records if r.alive]
    # A record without an input the stage requires fails here and keeps its place among the others.
    rejected = {id(r) for r in arrived if missing_inputs(stage, r)}
    live = [r for r in arrived if id(r) not in rejected]
    if not live:
        return done + arrived
    start, cpu_start = time.perf_counter(), time.process_time()
    # A failed batch may have changed some of its records before it raised, and a call that overran goes on
    # changing them on its abandoned thread: the retries start from copies taken before the call.
    before = [r.to_row() for r in live] if len(live) > 1 else []
    try:
        out = call_with_deadline(lambda: stage.process(live), timeout_s and timeout_s * len(live))
    except Exception as exc:  # noqa: BLE001 - the safety net: any failure is pinned on its record
        if len(live) == 1:
            out = [_pin_failure(stage, live[0], exc)]
        else:
            out = []
            for record in map(Record.from_row, before):
                try:
                    out.extend(call_with_deadline(lambda r=record: stage.process([r]), timeout_s))
                except Exception as single:  # noqa: BLE001
                    out.append(_pin_failure(stage, record, single))
    share = max(1, len(out))
    for record in out:
        add_timing(record, stage.name, (time.perf_counter() - start) / share, (time.process_time() - cpu_start) / share)
        _record_provenance(stage, record)
    if rejected:
        results = iter(out)
        placed = [r if id(r) in rejected else next(results, None) for r in arrived]
        out = [r for r in placed if r is not None] + list(results)
    return done + out


def add_timing(record: Record, stage: str, wall_s: float, cpu_s: float) -> None:
    """Add what `stage` spent on `record`: wall seconds (`timings`) and this process's CPU seconds (`cpu_s`, all
    its threads), which the pool balancer reads as the stage's cost (pipeline.run.pools)."""
    for key, seconds in (("timings", wall_s), ("cpu_s", cpu_s)):
        spent = record.meta.setdefault(key, {})
        spent[stage] = spent.get(stage, 0.0) + seconds


def _record_provenance(stage: Stage, record: Record) -> None:
    """The stage's provenance line on a record it passed on (KEY.json keeps it)."""
    if record.alive and (line := stage.provenance_of(record)) is not None:
        record.meta.setdefault("provenance", {})[stage.name] = line


def _pin_failure(stage: Stage, record: Record, exc: Exception) -> Record:
    if isinstance(exc, StageTimeout):
        record.fail(stage.name, "timeout", f"{stage.name} gave no result for this record: {exc} (ray.stage_timeout_s)")
    else:
        record.fail(stage.name, "exception", f"{type(exc).__name__}: {exc}")
        record.meta.setdefault("tracebacks", {})[stage.name] = traceback.format_exc(limit=5)
    return record


def fan_out(stage: FanOutStage, record: Record, timeout_s: float | None = None) -> Iterator[Record]:
    """The parts of one record, each yielded as `stage` finishes it (a dead record passes through as it is).

    Every planned part comes out: when the stream raises or a part overruns `timeout_s`, the parts not yet
    finished carry that failure, so the source can still be accounted for clip by clip."""
    if not record.alive:
        yield record
        return
    try:
        parts = call_with_deadline(lambda: stage.split(record), timeout_s)
    except Exception as exc:  # noqa: BLE001 - the safety net, as in run_stage
        yield _pin_failure(stage, record, exc)
        return
    pending = {id(part): part for part in parts}
    stream = stage.stream(record, parts)
    del parts  # a part is referenced here only until it is yielded (see FanOutStage)
    while pending:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            part = call_with_deadline(lambda: next(stream, None), timeout_s)
        except Exception as exc:  # noqa: BLE001
            for part in pending.values():
                yield _pin_failure(stage, part, exc)
            return
        if part is None:  # the stage ended without finishing some parts: never lose them silently
            for part in pending.values():
                yield _pin_failure(stage, part, RuntimeError(f"{stage.name} did not produce this part"))
            return
        del pending[id(part)]
        add_timing(part, stage.name, time.perf_counter() - start, time.process_time() - cpu_start)
        _record_provenance(stage, part)
        yield part


def run_stages(stages: list[Stage], records: list[Record], timeout_s: float | None = None,
               observe=None) -> Iterator[list[Record]]:
    """Apply `stages` in order, yielding lists of finished records. From a fan-out stage on, each part goes
    through the rest of the stages on its own and is yielded at once. `observe(stage, records, stopped_before)`
    sees each stage's output (for metrics)."""
    for index, stage in enumerate(stages):
        if isinstance(stage, FanOutStage):
            for record in records:
                stopped = set() if record.alive else {id(record)}
                for part in fan_out(stage, record, timeout_s):
                    if observe:
                        observe(stage, [part], stopped)
                    yield from run_stages(stages[index + 1:], [part], timeout_s, observe)
            return
        stopped = {id(r) for r in records if not r.alive} if observe else set()
        records = run_stage(stage, records, timeout_s)
        if observe:
            observe(stage, records, stopped)
    yield records
