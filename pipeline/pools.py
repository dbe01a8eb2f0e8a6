"""Model actor pools: how many actors each model stage gets, and the placement groups that hold their slots.

A pool is fixed for the run (see `build_dataset`). Its slots are reserved in a placement group, one bundle per
actor spread over the nodes, so an actor that dies is restarted into its own slot. Without the reservation, the
dead actor's CPU went to a queued task within a second, and Ray restarted the actor wherever a CPU was free: on a
2-node run, beside the other segmentation actor, which then shared its core for the rest of the run while the
first node ran out of work (recovery 1.54x a clean run's wall time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pipeline.stage import Stage

log = logging.getLogger(__name__)

# How long to wait for a pool's reservation that the free resources could hold: placing it takes milliseconds on
# an idle cluster; longer means other work holds the resources (or nodes are still starting), and the run goes on
# without the reservation rather than wait.
RESERVE_WAIT_S = 30.0


def pool_sizes(model_stages: list[Stage], available: dict[str, float]) -> dict[int, int]:
    """The fixed actor count of each model stage's pool, keyed by id(stage).

    `workers` sets it. Otherwise the model stages split the cluster: those asking for GPUs share the GPUs equally;
    those on CPUs share half the CPUs, the other half staying with the task operators around them (decode, cutting,
    filters), which a pool of every CPU would starve. At least one actor each."""
    on_gpu = sum(s.resources.num_gpus > 0 for s in model_stages)
    on_cpu = len(model_stages) - on_gpu
    sizes = {}
    for stage in model_stages:
        res = stage.resources
        if res.workers:
            share = res.workers
        elif res.num_gpus > 0:
            share = available.get("GPU", 0.0) / on_gpu // res.num_gpus
        else:
            share = available.get("CPU", 1.0) / 2 / on_cpu // res.num_cpus
        sizes[id(stage)] = max(1, int(share))
    return sizes


def actor_bundle(remote_args: dict) -> dict[str, float]:
    """The placement-group bundle of one actor: exactly the CPUs, GPUs and memory its remote args ask for."""
    wanted = {"CPU": remote_args.get("num_cpus"), "GPU": remote_args.get("num_gpus"), "memory": remote_args.get("memory")}
    return {key: value for key, value in wanted.items() if value}


class PoolReservations:
    """The placement groups of one run's model pools; `close()` (or leaving the `with`) removes them. Ray also
    removes them when the driver exits, so a killed run leaves none behind."""

    def __init__(self, enabled: bool = True, say: Callable[[str], None] | None = None,
                 wait_s: float = RESERVE_WAIT_S):
        self.enabled, self.wait_s = enabled, wait_s
        self.say = say or log.warning
        self.groups = []

    def reserve(self, name: str, remote_args: dict, size: int):
        """A placement group with `size` bundles of `actor_bundle(remote_args)`, strategy SPREAD (one per node
        where they fit, packed where they do not). None, with a printed reason, when reservations are off, when
        the free resources cannot hold the pool now, or when it is not placed within `wait_s`; the pool then runs
        unreserved, as Ray would schedule it anyway."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if not self.enabled:
            return None
        bundle = actor_bundle(remote_args)
        free = ray.available_resources()
        short = {k: v * size for k, v in bundle.items() if v * size > free.get(k, 0.0) + 1e-9}
        if short:
            self.say(f"{name}: pool of {size} not reserved: it needs {short}, the cluster has "
                     f"{ {k: free.get(k, 0.0) for k in short} } free; its actors are scheduled without a reservation")
            return None
        group = placement_group([bundle] * size, strategy="SPREAD")
        started = time.monotonic()
        ready, _ = ray.wait([group.ready()], timeout=self.wait_s)
        if not ready:
            remove_placement_group(group)
            self.say(f"{name}: pool of {size} x {bundle} not placed within {self.wait_s:.0f} s; its actors are "
                     "scheduled without a reservation")
            return None
        log.info("%s: reserved %d x %s in %.2f s", name, size, bundle, time.monotonic() - started)
        self.groups.append(group)
        return group

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if ray.is_initialized():  # else the cluster is gone, and the groups with it
            for group in self.groups:
                remove_placement_group(group)
        self.groups = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
