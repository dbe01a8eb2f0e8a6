"""Model actor pools sized by measured cost: how many actors each model stage gets, resized while the run goes.

The cluster's CPUs and GPUs are divided among the stages in proportion to what each costs per item of the flow
(`plan_pools`, a pure function), so that their throughputs balance: a stage that takes two thirds of the flow's CPU
time gets two thirds of the CPUs. Costs are measured on the records themselves (`CostMeter`: each carries the CPU
and wall seconds every stage spent on it); until enough have come back (the warm-up), a stage costs what Ray Data's
metrics say its operator spends per row (wall time), else what an earlier run recorded (`StageProfile`), else an
unmeasured model stage counts as much as all the task stages together. `PoolBalancer` re-plans from the latest
costs every few seconds, and `pipeline.run.ray_hooks` applies the change to Ray Data's actor pools: a new actor loads
its model once; a pool shrinks only by retiring an idle actor (Ray Data never removes one in the middle of a batch).

Ray's CPU counts are logical. A pool may grow up to the whole cluster (`ceiling`), and each model actor holds a
fraction of its declared CPUs (`cpu_scale`), so that every CPU pool at its ceiling still leaves one CPU per node for
the task operators (decode, cutting, filters), which then never wait for a CPU a pool holds but does not use. The
balancer, not Ray's accounting, keeps the number of busy processes at the cluster's cores; a model still runs as
many threads as the CPUs it declared (`pipeline.run.worker.limit_threads`).

Each pool's first actors hold their slots in a placement group (`PoolReservations`), so that an actor that dies is
restarted into its own slot rather than wherever a CPU is free (on two nodes, beside the other actor of its pool,
while its own node ran out of work: recovery took 1.54x a clean run's wall time before the reservation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# How long to wait for a pool's reservation that the free resources could hold: placing it takes milliseconds on
# an idle cluster; longer means other work holds the resources (or nodes are still starting), and the run goes on
# without the reservation rather than wait.
RESERVE_WAIT_S = 30.0
# Records a stage's cost is averaged over: long enough to smooth one odd clip, short enough to follow a change of
# content within a run.
COST_WINDOW = 32
# Records per stage before its measured cost replaces the warm-up guess.
WARMUP_ITEMS = 3
# How often the balancer re-plans, and how long a new plan must hold before a pool shrinks (each regrowth costs a
# model load).
REPLAN_S = 5.0
SHRINK_AFTER_S = 20.0
# Declared memory over the measured peak: Ray Data warns below 1.25x its measured peak (USS; ours is RSS, higher).
MEMORY_HEADROOM = 1.25


@dataclass(frozen=True)
class PoolDemand:
    """What one model stage's pool asks for: its cost per item of the flow (None until measured), the resources
    of one actor, and `workers`, the fixed size that overrides the balancing."""

    name: str
    cost_s: float | None
    num_cpus: float
    num_gpus: float = 0.0
    memory: float = 0.0  # bytes per actor
    workers: int | None = None


@dataclass(frozen=True)
class PoolPlan:
    size: int
    why: str


def plan_pools(pools: list[PoolDemand], capacity: dict[str, float], task_cost_s: float | None) -> dict[str, PoolPlan]:
    """Actors per model pool, so that the stages' throughputs balance within `capacity` ({"CPU", "GPU",
    "memory"}). `task_cost_s` is what the task stages (everything outside the pools) cost per item, in CPU seconds;
    a pool's `cost_s` is CPU seconds for a CPU pool, wall seconds for a GPU pool.

    - `workers` fixes a pool; its resources come off the top.
    - GPU pools share the GPUs in proportion to their costs: floor(share / GPUs per actor) actors, at least one;
      a GPU left over goes to the pool that is then the slowest, while it fits.
    - CPU pools and the task stages share the remaining CPUs in proportion to their costs: ceil(share / CPUs per
      actor) actors, at least one. Rounding up lets a pool whose share is 1.4 CPUs run two actors beside the tasks:
      the OS divides the cores among the busy processes, so the pool gets about its share, where one actor would
      leave the rest of its share idle once the tasks ran out of work.
    - Memory: while the pools do not fit `capacity["memory"]`, the pool with the most throughput to spare loses an
      actor (never below one).
    An unmeasured cost counts as the task stages' cost (1 s when that is unmeasured too)."""
    guess = task_cost_s if task_cost_s else 1.0
    cost = {p.name: p.cost_s if p.cost_s else guess for p in pools}
    cpus, gpus = capacity.get("CPU", 1.0), capacity.get("GPU", 0.0)
    sizes: dict[str, int] = {}
    why: dict[str, str] = {}
    for p in pools:
        if p.workers:
            sizes[p.name], why[p.name] = p.workers, "fixed by resources.workers"
            cpus -= p.workers * p.num_cpus
            gpus -= p.workers * p.num_gpus

    on_gpu = [p for p in pools if p.num_gpus > 0 and not p.workers]
    gpu_cost = sum(cost[p.name] for p in on_gpu)
    for p in on_gpu:
        share = max(gpus, 0.0) * cost[p.name] / gpu_cost
        sizes[p.name] = max(1, math.floor(share / p.num_gpus + 1e-9))
        why[p.name] = f"{_cost(p, cost)}: {share:.2f} of {max(gpus, 0.0):g} GPUs"
    left = max(gpus, 0.0) - sum(sizes[p.name] * p.num_gpus for p in on_gpu)
    while on_gpu:
        slowest = min(on_gpu, key=lambda p: sizes[p.name] / cost[p.name])
        if slowest.num_gpus > left + 1e-9:
            break
        sizes[slowest.name] += 1
        left -= slowest.num_gpus
    cpus -= sum(sizes[p.name] * p.num_cpus for p in on_gpu)

    on_cpu = [p for p in pools if p.num_gpus == 0 and not p.workers]
    total = sum(cost[p.name] for p in on_cpu) + (guess if task_cost_s is None else task_cost_s)
    for p in on_cpu:
        share = max(cpus, 0.0) * cost[p.name] / total
        sizes[p.name] = max(1, math.ceil(share / p.num_cpus - 1e-9))
        why[p.name] = f"{_cost(p, cost)}: {share:.2f} of {max(cpus, 0.0):g} CPUs"

    memory = capacity.get("memory")
    if memory:
        def used():
            return sum(sizes[p.name] * p.memory for p in pools)

        while used() > memory:
            spare = [p for p in pools if not p.workers and sizes[p.name] > 1 and p.memory > 0]
            if not spare:
                break
            fastest = max(spare, key=lambda p: sizes[p.name] / cost[p.name])
            sizes[fastest.name] -= 1
            why[fastest.name] += f"; cut to fit {memory / 2**30:.1f} GiB of memory"
    return {p.name: PoolPlan(sizes[p.name], why[p.name]) for p in pools}


def _cost(pool: PoolDemand, cost: dict[str, float]) -> str:
    measured = "" if pool.cost_s else " (not measured yet)"
    return f"{cost[pool.name]:.3g} s/item{measured}"


def ceiling(pool: PoolDemand, capacity: dict[str, float]) -> int:
    """The most actors a pool may grow to: the whole cluster's GPUs (GPU pools), or its CPUs (CPU pools)."""
    if pool.workers:
        return pool.workers
    if pool.num_gpus > 0:
        return max(1, math.floor(capacity.get("GPU", 0.0) / pool.num_gpus + 1e-9))
    return max(1, math.floor(capacity.get("CPU", 1.0) / pool.num_cpus + 1e-9))


def cpu_scale(pools: list[PoolDemand], capacity: dict[str, float]) -> float:
    """The fraction of its declared CPUs each model actor holds in Ray's accounting: every pool at its ceiling
    then still leaves one CPU per node (`capacity["nodes"]`, default 1) to the task operators, so no node's flow
    waits for a CPU a pool holds (at most 1: a big cluster keeps nearly exact accounting)."""
    held = sum(ceiling(p, capacity) * p.num_cpus for p in pools)
    if not held:
        return 1.0
    return max(0.01, min(1.0, (capacity.get("CPU", 1.0) - capacity.get("nodes", 1)) / held))


class CostMeter:
    """Per stage, what it costs per item of the flow (the mean over the last `window` records that came back,
    counting records that never reached it as zero) and the peak resident memory of its workers."""

    def __init__(self, window: int = COST_WINDOW):
        self.recent: deque[tuple[dict, dict]] = deque(maxlen=window)
        self.records = 0
        self.seen: dict[str, int] = {}
        self.totals: dict[str, list[float]] = {}  # stage -> [CPU seconds, wall seconds] over the whole run
        self.peak_rss_mb: dict[str, float] = {}
        self.lock = threading.Lock()  # records arrive on the driver's thread; the executor's thread reads

    def observe(self, meta: dict) -> None:
        # A finished record's wall timings are in its digest (pipeline/store/assemble.py SampleStager).
        cpu, wall = dict(meta.get("cpu_s", {})), dict(meta.get("timings") or meta.get("digest", {}).get("timings", {}))
        with self.lock:
            self.recent.append((cpu, wall))
            self.records += 1
            for stage, seconds in cpu.items():
                self.seen[stage] = self.seen.get(stage, 0) + 1
                total = self.totals.setdefault(stage, [0.0, 0.0])
                total[0] += seconds
                total[1] += wall.get(stage, 0.0)
            for group, mb in meta.get("peak_rss_mb", {}).items():
                self.peak_rss_mb[group] = max(self.peak_rss_mb.get(group, 0.0), mb)

    def run_costs(self) -> dict[str, dict[str, float]]:
        """Per stage, CPU and wall seconds per item of the flow over the whole run so far."""
        with self.lock:
            return {stage: {"cpu_s": cpu / self.records, "wall_s": wall / self.records}
                    for stage, (cpu, wall) in self.totals.items()}

    def cost(self, stages: list[str], wall: bool = False) -> float | None:
        """Seconds per item of the flow that `stages` take together (wall seconds or CPU seconds); None until one
        of them has been measured on WARMUP_ITEMS records. (A stage few records reach, after a strict filter, must
        not hold the warm-up back: it counts zero for the records that never reached it anyway.)"""
        with self.lock:
            if not self.recent or all(self.seen.get(s, 0) < WARMUP_ITEMS for s in stages):
                return None
            index = 1 if wall else 0
            return sum(spent[index].get(s, 0.0) for spent in self.recent for s in stages) / len(self.recent)


class StageProfile:
    """What earlier runs measured, per stage and stage group, in a JSON file keyed by the config hash (the settings
    that shape the work, not where or how wide it runs): each stage's CPU and wall seconds per item of the flow,
    and each worker group's peak resident memory. A run starts its pools from these costs instead of the warm-up
    guess, and declares each operator's memory from the peak (with headroom) where that exceeds the config's. A
    file that cannot be read is ignored with a warning: it is a hint, never a reason to fail a run."""

    def __init__(self, path: str | Path | None, key: str, say: Callable[[str], None] | None = None):
        self.path = default_profile_path() if path == "auto" else (Path(path).expanduser() if path else None)
        self.key = key
        self.say = say or log.warning
        self.entry: dict = {}
        if self.path and self.path.exists():
            try:
                entry = json.loads(self.path.read_text()).get(key, {})
                self.entry = entry if isinstance(entry, dict) else {}
            except (OSError, ValueError, AttributeError) as exc:
                self.say(f"stage profile {self.path} ignored: {exc}")

    def cost(self, stages: list[str], wall: bool = False) -> float | None:
        """What `stages` cost per item together in the run recorded; None if it measured none of them."""
        costs = self.entry.get("costs", {})
        known = [costs[s] for s in stages if isinstance(costs.get(s), dict)]
        try:
            return sum(float(c["wall_s" if wall else "cpu_s"]) for c in known) if known else None
        except (KeyError, TypeError, ValueError):
            return None

    def memory(self, group: str) -> float | None:
        """Bytes to declare for one worker of `group`: its measured peak with headroom, or None if unmeasured."""
        peak = self.entry.get("peak_rss_mb", {}).get(group)
        return peak * 2**20 * MEMORY_HEADROOM if isinstance(peak, (int, float)) and peak > 0 else None

    def save(self, meter: CostMeter) -> None:
        """Merge this run's measurements in (a stage this run did not see keeps what it had) and write the file
        atomically, so concurrent runs cannot leave it half-written."""
        if not self.path or not meter.records:
            return
        try:
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        entry = data.get(self.key) if isinstance(data.get(self.key), dict) else {}
        entry = {"costs": {**entry.get("costs", {}), **meter.run_costs()},
                 "peak_rss_mb": {**entry.get("peak_rss_mb", {}), **meter.peak_rss_mb},
                 "updated": time.time()}
        data[self.key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:
            self.say(f"stage profile not saved to {self.path}: {exc}")


def default_profile_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "s2v-curate" / "stage-profile.json"


@dataclass
class Pool:
    """One model stage's pool in a run: what it asks for, the bounds Ray Data was given, and its current target."""

    demand: PoolDemand
    stages: list[str]
    ceiling: int
    target: int
    why: str = ""
    since: float = 0.0  # when the plan last differed from the target
    placement: ReservedPlacement | None = None
    start: int = 0

    def __post_init__(self):
        self.start = self.target


class PoolBalancer:
    """Keeps each pool's target size at the plan for the latest costs. `task_groups` maps each task operator's name
    to its stages. `say` prints each resize. It also carries what the runner gives Ray Data for the run: the CPU
    scale of every worker and each operator's declared memory (bytes, by operator name)."""

    def __init__(self, pools: dict[str, Pool], task_groups: dict[str, list[str]], capacity: dict[str, float],
                 meter: CostMeter, say: Callable[[str], None] | None = None, replan_s: float = REPLAN_S,
                 shrink_after_s: float = SHRINK_AFTER_S, profile: StageProfile | None = None,
                 cpu_scale: float = 1.0, memory: dict[str, float] | None = None):
        self.pools, self.task_groups, self.capacity, self.meter = pools, task_groups, capacity, meter
        self.profile, self.cpu_scale, self.memory = profile, cpu_scale, memory or {}
        self.say = say or log.info
        self.replan_s, self.shrink_after_s = replan_s, shrink_after_s
        self.last = 0.0
        self.started = time.monotonic()
        self.resizes: list[dict] = []
        # Wall seconds per row of each operator, from Ray Data's own metrics (set by the autoscaler): known as soon
        # as an operator has finished a few rows, long before the first record has passed the whole flow.
        self.op_costs: dict[str, float] = {}

    def costs(self) -> dict[str, float | None]:
        """Cost per item of every operator (pools and task operators, by name), all from one source so that they
        compare: measured on returned records once every stage has warmed up; before that Ray Data's operator
        metrics (wall seconds, once every operator has finished a few rows); before that what the profile knows;
        else None for all (the guess). Mixing sources (a pool's inflated wall time against the tasks' CPU time)
        made the plan swing between 1 and 4 actors in one run."""
        groups = {name: pool.stages for name, pool in self.pools.items()} | self.task_groups
        gpu = {name for name, pool in self.pools.items() if pool.demand.num_gpus > 0}
        sources = [lambda name, stages: self.meter.cost(stages, wall=name in gpu),
                   lambda name, stages: self.op_costs.get(name)]
        if self.profile is not None:
            sources.append(lambda name, stages: self.profile.cost(stages, wall=name in gpu))
        for index, source in enumerate(sources):
            costs = {name: source(name, stages) for name, stages in groups.items()}
            if index == 1 and all(costs[name] is not None for name in self.pools) and \
                    any(costs[name] is not None for name in self.task_groups):
                # Operator metrics arrive in flow order: a task operator after the pools has no rows until the
                # pools have done some work. Counting it as free until then starts the pools a little large,
                # where waiting for it kept segmentation at one actor for 155 s instead of 55-65 s.
                costs = {name: cost or 0.0 for name, cost in costs.items()}
            if all(cost is not None for cost in costs.values()):
                return costs
        return dict.fromkeys(groups)

    def demands(self, costs: dict[str, float | None] | None = None) -> list[PoolDemand]:
        costs = self.costs() if costs is None else costs
        return [PoolDemand(p.demand.name, costs[name], p.demand.num_cpus, p.demand.num_gpus, p.demand.memory,
                           p.demand.workers) for name, p in self.pools.items()]

    def plan(self) -> dict[str, PoolPlan]:
        costs = self.costs()
        tasks = [costs[name] for name in self.task_groups]
        task_cost = sum(tasks) if all(c is not None for c in tasks) else None
        return plan_pools(self.demands(costs), self.capacity, task_cost)

    def replan(self, now: float | None = None) -> None:
        """Re-plan at most every `replan_s`. A pool grows at once; it shrinks once the smaller plan has held for
        `shrink_after_s`, so a passing dip does not cost a model load to undo."""
        now = time.monotonic() if now is None else now
        if now - self.last < self.replan_s:
            return
        self.last = now
        for name, plan in self.plan().items():
            pool = self.pools[name]
            size = min(plan.size, pool.ceiling)
            if size == pool.target:
                pool.since = now
                continue
            if size < pool.target and now - pool.since < self.shrink_after_s:
                continue
            self.say(f"{name}: pool {pool.target} -> {size} actors ({plan.why})")
            self.resizes.append({"stage": name, "from": pool.target, "to": size, "why": plan.why,
                                 "at_s": round(now - self.started, 1)})
            pool.target, pool.why, pool.since = size, plan.why, now


def actor_bundle(remote_args: dict) -> dict[str, float]:
    """The placement-group bundle of one actor: exactly the CPUs, GPUs and memory its remote args ask for."""
    wanted = {"CPU": remote_args.get("num_cpus"), "GPU": remote_args.get("num_gpus"),
              "memory": remote_args.get("memory")}
    return {key: value for key, value in wanted.items() if value}


class ReservedPlacement:
    """`ray_remote_args_fn` of one pool (called once per actor Ray Data creates): an actor created while the pool
    has fewer actors than reserved bundles goes into the placement group, one beyond that is scheduled freely. So
    a grown pool never waits for a bundle, and an actor in a bundle is restarted into it. `actors` counts the pool
    as Ray Data creates it; the autoscaler resets it to the pool's size before each resize."""

    def __init__(self, group, bundles: int):
        self.group, self.bundles, self.actors = group, bundles, 0

    def __call__(self) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.actors += 1
        if self.actors > self.bundles:
            return {"scheduling_strategy": "SPREAD"}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group)}


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
