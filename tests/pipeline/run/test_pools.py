"""Model actor pools: their sizes, and the placement groups that hold their slots for the run."""

from __future__ import annotations

import time

from pipeline.core.config import RunConfig
from pipeline.core.record import Record, table_to_records
from pipeline.run.pools import (
    CostMeter,
    Pool,
    PoolBalancer,
    PoolDemand,
    PoolReservations,
    actor_bundle,
    ceiling,
    cpu_scale,
    plan_pools,
)
from pipeline.run.ray_hooks import balanced_pools
from pipeline.run.runner import build_dataset, cluster_capacity, pool_balancer
from pipeline.testing import faulty


def test_one_dominant_cpu_stage_gets_its_share_of_the_cpus_rounded_up():
    # Segmentation costs 5 CPU s per clip, everything else 2.5: it should have 2/3 of the 2 CPUs (1.33), and gets
    # two actors, whose processes then share the cores with the tasks' one about 2:1.
    seg = PoolDemand("segmentation", 5.0, num_cpus=1.0)
    assert plan_pools([seg], {"CPU": 2.0}, 2.5)["segmentation"].size == 2
    # On 16 CPUs the same costs ask for 10.67 CPUs: 11 one-CPU actors, or 6 two-CPU actors.
    assert plan_pools([seg], {"CPU": 16.0}, 2.5)["segmentation"].size == 11
    assert plan_pools([PoolDemand("segmentation", 5.0, num_cpus=2.0)], {"CPU": 16.0}, 2.5)["segmentation"].size == 6
    # A cheap model stage keeps one actor; the reason names its cost and share.
    plan = plan_pools([PoolDemand("faces", 0.1, num_cpus=1.0)], {"CPU": 16.0}, 2.5)["faces"]
    assert plan.size == 1 and "0.1 s/item" in plan.why and "0.62 of 16 CPUs" in plan.why


def test_two_gpu_stages_of_unequal_cost_share_one_gpu_by_cost():
    # The VLM costs three times what SAM does: 3/4 of the GPU against 1/4, in quarter-GPU actors.
    vlm = PoolDemand("caption", 3.0, num_cpus=1.0, num_gpus=0.25)
    sam = PoolDemand("segmentation", 1.0, num_cpus=1.0, num_gpus=0.25)
    plans = plan_pools([vlm, sam], {"CPU": 16.0, "GPU": 1.0}, 0.5)
    assert (plans["caption"].size, plans["segmentation"].size) == (3, 1)
    # Half-GPU actors: 0.75 of the GPU is one VLM actor, 0.25 rounds to none but a stage always gets one.
    plans = plan_pools([PoolDemand("caption", 3.0, 1.0, 0.5), PoolDemand("segmentation", 1.0, 1.0, 0.5)],
                       {"CPU": 16.0, "GPU": 1.0}, 0.5)
    assert (plans["caption"].size, plans["segmentation"].size) == (1, 1)


def test_fractional_gpus_left_over_go_to_the_slowest_pool_while_they_fit():
    # Equal costs, 0.3 GPU per actor on 2 GPUs: 1.0 each is 3 actors each (1.8 GPUs); the 0.2 left fits nothing.
    a, b = PoolDemand("a", 1.0, 1.0, 0.3), PoolDemand("b", 1.0, 1.0, 0.3)
    plans = plan_pools([a, b], {"CPU": 8.0, "GPU": 2.0}, 0.1)
    assert (plans["a"].size, plans["b"].size) == (3, 3)
    # b twice as costly: shares 0.67 and 1.33 -> 2 and 4 actors (1.8 GPUs); a (2/1) is then the slowest, and
    # another 0.3 does not fit in the 0.2 left.
    plans = plan_pools([a, PoolDemand("b", 2.0, 1.0, 0.3)], {"CPU": 8.0, "GPU": 2.0}, 0.1)
    assert (plans["a"].size, plans["b"].size) == (2, 4)
    # 0.4 GPU actors, equal costs on 1 GPU: one each from the shares (0.5 each), and the 0.2 left fits none.
    plans = plan_pools([PoolDemand("a", 1.0, 1.0, 0.4), PoolDemand("b", 1.0, 1.0, 0.4)], {"GPU": 1.0, "CPU": 4}, 0)
    assert (plans["a"].size, plans["b"].size) == (1, 1)


def test_fixed_workers_override_and_their_resources_come_off_the_top():
    fixed = PoolDemand("caption", 9.0, num_cpus=4.0, workers=3)
    seg = PoolDemand("segmentation", 2.0, num_cpus=1.0)
    plans = plan_pools([fixed, seg], {"CPU": 16.0}, 2.0)
    # 12 CPUs go to the fixed pool whatever its cost; segmentation and the tasks split the other 4 evenly.
    assert plans["caption"].size == 3 and plans["caption"].why == "fixed by resources.workers"
    assert plans["segmentation"].size == 2


def test_unmeasured_costs_count_as_the_tasks_and_memory_caps_the_pools():
    # Nothing measured yet (the warm-up): the pool counts as costly as the tasks, half the CPUs.
    plan = plan_pools([PoolDemand("segmentation", None, 1.0)], {"CPU": 8.0}, None)["segmentation"]
    assert plan.size == 4 and "not measured yet" in plan.why
    # 11 actors of 2 GiB do not fit 12 GiB: cut to 6.
    seg = PoolDemand("segmentation", 5.0, num_cpus=1.0, memory=2 * 2**30)
    plan = plan_pools([seg], {"CPU": 16.0, "memory": 12 * 2**30}, 2.5)["segmentation"]
    assert plan.size == 6 and "to fit 12.0 GiB" in plan.why


def test_each_cpu_pool_at_its_ceiling_leaves_one_cpu_to_the_tasks():
    seg = PoolDemand("segmentation", None, 1.0)
    assert ceiling(seg, {"CPU": 2.0}) == 2
    assert cpu_scale([seg], {"CPU": 2.0}) == 0.5  # two actors of 0.5 logical CPU, one CPU for the tasks
    assert cpu_scale([seg], {"CPU": 64.0}) == 63 / 64
    assert cpu_scale([seg, PoolDemand("faces", None, 1.0)], {"CPU": 2.0}) == 0.25
    # Two nodes of 2 CPUs: one CPU stays with the tasks on each node, so a pool of up to 4 holds half a CPU each.
    assert cpu_scale([seg], {"CPU": 4.0, "nodes": 2}) == 0.5
    gpu = PoolDemand("caption", None, 1.0, 0.5)
    assert ceiling(gpu, {"CPU": 8.0, "GPU": 2.0}) == 4
    assert cpu_scale([gpu], {"CPU": 8.0, "GPU": 2.0}) == 1.0


def test_the_balancer_grows_at_once_and_shrinks_only_when_the_smaller_plan_holds():
    meter, said = CostMeter(window=4), []
    pool = Pool(PoolDemand("segmentation", None, 1.0), ["segmentation"], ceiling=2, target=1)
    balancer = PoolBalancer({"segmentation": pool}, {"decode": ["decode"]}, {"CPU": 2.0}, meter, said.append,
                            replan_s=1.0, shrink_after_s=10.0)
    for _ in range(4):
        meter.observe({"cpu_s": {"decode": 1.0, "segmentation": 4.0}, "peak_rss_mb": {"segmentation": 900.0}})
    balancer.replan(now=100.0)
    assert pool.target == 2 and said == ["segmentation: pool 1 -> 2 actors (4 s/item: 1.60 of 2 CPUs)"]
    assert meter.peak_rss_mb == {"segmentation": 900.0}
    # The content turns cheap: the plan is 1 actor, but the pool keeps 2 until that has held for 10 s.
    for _ in range(4):
        meter.observe({"cpu_s": {"decode": 1.0, "segmentation": 0.1}})
    balancer.replan(now=101.0)
    balancer.replan(now=105.0)
    assert pool.target == 2
    balancer.replan(now=111.5)
    assert pool.target == 1 and said[-1].startswith("segmentation: pool 2 -> 1 actors (0.1 s/item")
    assert [(r["from"], r["to"]) for r in balancer.resizes] == [(1, 2), (2, 1)]


def free_cpus(ray, expected: float) -> float:
    """Free CPUs once they settle at `expected` (the resource view lags a removal by a moment), else as they are."""
    deadline = time.monotonic() + 10
    while (free := ray.available_resources().get("CPU", 0.0)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


def test_a_model_pool_runs_in_its_reserved_slots_until_the_run_closes_them(local_ray):
    config = RunConfig.model_validate({"ray": {"progress": False}})
    said = []
    names = [f"v{i}" for i in range(4)]
    records = [Record(kind="source", source_path=f"/videos/{name}.mp4", key=name) for name in names]
    with PoolReservations(say=said.append) as reservations:
        ds = build_dataset(records, [faulty.PidActor(config)], config, reservations)
        # With no task stages the pool has both CPUs to itself: two actors, each holding half its CPU in Ray's
        # accounting (cpu_scale: a CPU stays with the tasks), each bundle what an actor asks for.
        [group] = reservations.groups
        assert group.bundle_specs == [{"CPU": 0.5, "memory": 0.5 * 2**30}] * 2
        assert free_cpus(local_ray, 1.0) == 1.0  # held for the pool before any actor starts
        out = [r for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow") for r in table_to_records(batch)]
    assert sorted(r.key for r in out) == names
    assert {r.meta["placement_group"] for r in out} == {group.id.hex()}
    assert said == []
    assert free_cpus(local_ray, 2.0) == 2.0  # closed with the run


def test_a_pool_the_free_resources_cannot_hold_runs_unreserved_and_says_why(local_ray):
    said = []
    reservations = PoolReservations(say=said.append)
    assert reservations.reserve("segmentation", {"num_cpus": 1.0, "num_gpus": None}, 3) is None
    assert reservations.groups == []
    assert len(said) == 1 and "segmentation: pool of 3 not reserved" in said[0] and "'CPU': 3.0" in said[0]
    assert free_cpus(local_ray, 2.0) == 2.0
    # Switched off (ray.reserve_pools: false): nothing reserved, nothing said.
    assert PoolReservations(enabled=False, say=said.append).reserve("segmentation", {"num_cpus": 1.0}, 1) is None
    assert len(said) == 1


def test_a_bundle_asks_for_exactly_the_actors_resources():
    assert actor_bundle({"num_cpus": 2.0, "num_gpus": 0.5, "memory": 2**30, "batch_size": 4}) == \
        {"CPU": 2.0, "GPU": 0.5, "memory": 2**30}
    assert actor_bundle({"num_cpus": 1.0, "num_gpus": None, "memory": None}) == {"CPU": 1.0}


def run_balanced(local_ray, paths: list[str], **resources) -> tuple[list[Record], PoolBalancer]:
    """`paths` through a cheap task stage and the ShiftingCost model stage, its pool balanced by measured cost as
    `curate` does (re-planned every 0.2 s here)."""
    config = RunConfig.model_validate({"ray": {"progress": False}, "segmentation": {"resources": resources}})
    stages = [faulty.Pid(config), faulty.ShiftingCost(config)]
    meter = CostMeter(window=8)
    balancer = pool_balancer(stages, config, cluster_capacity(), meter)
    balancer.replan_s, balancer.shrink_after_s = 0.2, 1.0
    records = [Record(kind="source", source_path=path, key=f"k{i:02d}") for i, path in enumerate(paths)]
    out = []
    with PoolReservations() as reservations:
        ds = build_dataset(records, stages, config, reservations, balancer)
        with balanced_pools(balancer):
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for record in table_to_records(batch):
                    meter.observe(record.meta)
                    out.append(record)
    return out, balancer


def test_a_run_whose_costs_change_midway_resizes_its_pool_and_keeps_every_record(local_ray):
    # The first records cost nothing, the later ones 0.3 CPU s each in the model stage: the pool starts at its
    # warm-up size (one actor: unmeasured, it counts as costly as the tasks), and grows once the cost shows.
    paths = [f"/videos/light{i}.mp4" for i in range(6)] + [f"/videos/heavy{i}.mp4" for i in range(24)]
    out, balancer = run_balanced(local_ray, paths)
    pool = balancer.pools["shifting_cost"]
    assert pool.start == 1 and pool.ceiling == 2
    assert [(r["from"], r["to"]) for r in balancer.resizes][:1] == [(1, 2)], balancer.resizes
    assert "s/item" in balancer.resizes[0]["why"]
    assert len({r.meta["pid"] for r in out}) == 2  # the grown pool's second actor took records
    # The clean run: a fixed pool of one, never resized. Both end with exactly the same records.
    clean, fixed = run_balanced(local_ray, paths, workers=1)
    assert fixed.resizes == []
    assert sorted(r.key for r in out) == sorted(r.key for r in clean) == [f"k{i:02d}" for i in range(30)]
    assert all(r.alive for r in out)


def test_costs_come_from_one_source_for_every_operator():
    # Segmentation's wall time per row from Ray Data's metrics is known, the tasks' is not yet, while the records
    # already give CPU seconds for the tasks only: no source knows every operator, so the plan is the guess, never
    # the pool's inflated wall time weighed against the tasks' CPU time.
    meter = CostMeter(window=8)
    pool = Pool(PoolDemand("segmentation", None, 1.0), ["segmentation"], ceiling=2, target=1)
    balancer = PoolBalancer({"segmentation": pool}, {"decode": ["decode"]}, {"CPU": 2.0}, meter)
    balancer.op_costs["segmentation"] = 27.0
    for _ in range(3):
        meter.observe({"cpu_s": {"decode": 1.0}})
    assert balancer.costs() == {"segmentation": None, "decode": None}
    # Both operators' metrics known: both from there.
    balancer.op_costs["decode"] = 9.0
    assert balancer.costs() == {"segmentation": 27.0, "decode": 9.0}
    # A task operator after the pool has no rows yet: it counts as free until it has.
    balancer.task_groups["faces"] = ["faces"]
    assert balancer.costs() == {"segmentation": 27.0, "decode": 9.0, "faces": 0.0}
    # Records measured for both: those win.
    for _ in range(3):
        meter.observe({"cpu_s": {"decode": 1.0, "segmentation": 3.0}})
    del balancer.task_groups["faces"]
    assert balancer.costs() == {"segmentation": 1.5, "decode": 1.0}  # segmentation: 3 s on half the records
    assert balancer.plan()["segmentation"].size == 2  # 1.5 of 2.5 s: 1.2 of 2 CPUs, rounded up
