"""Model actor pools: their sizes, and the placement groups that hold their slots for the run."""

from __future__ import annotations

import time

from pipeline.config import RunConfig
from pipeline.pools import PoolReservations, actor_bundle, pool_sizes
from pipeline.record import Record, table_to_records
from pipeline.runner import build_dataset
from stages.clip_score import ClipScore
from stages.segmentation import Segmenter
from tests.conftest import faulty


def test_model_pools_split_the_cluster_and_leave_half_the_cpus_to_tasks():
    def sizes(available, **sections):
        config = RunConfig.model_validate({k: {"resources": v} for k, v in sections.items()})
        seg, clip = Segmenter(config), ClipScore(config)
        got = pool_sizes([seg, clip], available)
        return got[id(seg)], got[id(clip)]

    # Two CPU model stages on 8 CPUs share 4: two actors each.
    assert sizes({"CPU": 8.0}) == (2, 2)
    # On 2 CPUs each still gets one actor; a 2-CPU actor counts twice.
    assert sizes({"CPU": 2.0}) == (1, 1)
    assert sizes({"CPU": 16.0}, clip_score={"num_cpus": 2}) == (4, 2)
    # A GPU stage shares the GPUs with the other GPU stages only, by its fraction of one; the CPU stage then has
    # the model stages' half of the CPUs to itself.
    assert sizes({"CPU": 16.0, "GPU": 2.0}, clip_score={"num_gpus": 0.5}) == (8, 4)
    assert sizes({"CPU": 16.0, "GPU": 2.0}, segmentation={"num_gpus": 0.5}, clip_score={"num_gpus": 0.25}) == (2, 4)
    # `workers` fixes a pool whatever the cluster.
    assert sizes({"CPU": 2.0}, segmentation={"workers": 3}) == (3, 1)


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
        # Half of the 2 CPUs go to the one model pool: one actor, its bundle what the actor asks for.
        [group] = reservations.groups
        assert group.bundle_specs == [{"CPU": 1.0, "memory": 0.5 * 2**30}]
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
