"""What clusters do to jobs: stage calls that hang, models that raise on one item, worker processes that die, and
workers recycled to bound leaks. The stages run on a real local Ray through the runner's own Ray Data plan."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.core import stage as stage_module
from pipeline.core.config import RunConfig
from pipeline.core.record import Record, table_to_records
from pipeline.core.stage import run_stage
from pipeline.run.runner import build_dataset
from pipeline.testing import faulty
from pipeline.testing.loopback import ACTOR_WORKER, TASK_WORKER, _busy

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def forget_abandoned_calls():
    """Calls abandoned here (sleeping threads of this pytest process) must not make a later in-process
    StageWorker replace its process: that is for Ray workers."""
    yield
    RELEASE.set()  # let the calls abandoned in this process end rather than linger until exit
    for thread in stage_module.ABANDONED:
        thread.join(timeout=10)
    stage_module.ABANDONED.clear()
    RELEASE.clear()


RELEASE = threading.Event()


class Stuck(faulty.Hang):
    """Hang, in-process: stuck until the test ends (Ray tests use faulty.Hang, which workers get by value)."""

    def stall(self):
        RELEASE.wait(3600)


def records(*names: str) -> list[Record]:
    return [Record(kind="source", source_path=f"/videos/{name}.mp4", key=name) for name in names]


def by_key(out: list[Record]) -> dict[str, Record]:
    assert len({r.key for r in out}) == len(out), "a record came back twice"
    return {r.key: r for r in out}


def test_a_hanging_call_is_cut_off_and_only_its_record_fails():
    stage = Stuck(RunConfig())
    start = time.monotonic()
    out = by_key(run_stage(stage, records("a", "hang", "b"), timeout_s=0.5))
    # The batch gets 3 x 0.5 s, then each record alone gets 0.5 s: the hang costs its own deadline only.
    assert time.monotonic() - start < 10
    [error] = out["hang"].errors
    assert (error["stage"], error["reason"]) == ("hang", "timeout")
    assert error["message"] == "hang gave no result for this record: no result after 0.5 s (ray.stage_timeout_s)"
    assert out["a"].alive and out["a"].meta["hang_ok"] and out["b"].alive


def test_a_stage_catching_its_own_errors_cannot_keep_a_hung_record_alive():
    class Swallower(Stuck):
        def process(self, records):
            try:
                return super().process(records)
            except Exception:  # noqa: BLE001 - what a stage does with bad input; must not keep a hung record alive
                return records

    [record] = run_stage(Swallower(RunConfig()), records("hang"), timeout_s=0.3)
    assert record.errors[0]["reason"] == "timeout"


def run_on_ray(stage_classes, names, **ray_settings) -> dict[str, Record]:
    config = RunConfig.model_validate({"ray": {"progress": False, **ray_settings}})
    stages = [cls(config) for cls in stage_classes]
    ds = build_dataset(records(*names), stages, config)
    return by_key([r for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                   for r in table_to_records(batch)])


def test_on_ray_a_hang_in_a_task_or_an_actor_becomes_that_items_timeout(local_ray):
    out = run_on_ray([faulty.Hang, faulty.HangActor], ["a", "hang", "b", "c"], stage_timeout_s=2)
    assert set(out) == {"a", "hang", "b", "c"}
    assert out["hang"].errors[0]["stage"] == "hang" and out["hang"].errors[0]["reason"] == "timeout"
    assert all(out[k].alive and out[k].meta["hang_ok"] for k in "abc")
    # The same hang past the task group, in an actor: a dead record is not retried, so plant it behind a good stage.
    out = run_on_ray([faulty.Pid, faulty.HangActor], ["d", "hang2"], stage_timeout_s=2)
    assert out["hang2"].errors[0]["stage"] == "hang_actor" and out["d"].alive


def test_on_ray_a_model_raising_on_one_item_records_it_and_processes_the_rest(local_ray):
    out = run_on_ray([faulty.RaisingModel], ["a", "boom", "b", "c"])
    error = out["boom"].errors[0]
    assert (error["stage"], error["reason"]) == ("raising_model", "exception")
    assert "model cannot take /videos/boom.mp4" in error["message"]
    assert "RuntimeError" in out["boom"].meta["tracebacks"]["raising_model"]
    assert all(out[k].alive and out[k].meta["model_ok"] for k in "abc")


def test_on_ray_workers_are_recycled_after_the_configured_batches(local_ray):
    names = [f"v{i}" for i in range(8)]
    for stage in (faulty.Pid, faulty.PidActor):  # a task worker (Ray's max_calls), an actor (exits, Ray restarts it)
        out = run_on_ray([stage], names, recycle_after=2)
        assert set(out) == set(names) and all(r.alive for r in out.values())
        pids = [r.meta["pid"] for r in out.values()]
        assert max(pids.count(p) for p in set(pids)) <= 2, (stage.name, pids)
        assert len(set(pids)) >= 4


def test_a_worker_counts_as_busy_only_while_its_title_names_a_running_batch():
    both = (TASK_WORKER, ACTOR_WORKER)
    assert _busy("ray::MapBatches(probe+shot_cut+clip_extract)", both)
    assert not _busy("ray::IDLE", both)
    assert _busy("ray::MapWorker(MapBatches(segmentation)).submit", both)
    assert not _busy("ray::MapWorker(MapBatches(segmentation))", both)  # an idle actor
    assert not _busy("ray::MapWorker(MapBatches(segmentation)).__init__", both)  # still loading its model
    assert not _busy("ray::MapWorker(MapBatches(segmentation)).submit", (TASK_WORKER,))
    assert not _busy("ray::MapBatches(faces)", (ACTOR_WORKER,))
