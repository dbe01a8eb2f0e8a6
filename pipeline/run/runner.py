"""The job runner: list inputs, skip committed sources, stream records through the stages on Ray Data, and
commit finished sources.

Consecutive stateless stages run together in one Ray task (so a source is decoded and cut without moving data
between processes); model stages run in actor pools so their model loads once per actor. The last group writes each
finished sample to the output's staging area where it ran; the driver receives a small digest per record, groups
whole sources into shards that tasks on the worker nodes assemble, and commits them (pipeline/store/shards.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import yaml
from rich.console import Console

from pipeline import __version__
from pipeline.core.config import ConfigError, RunConfig
from pipeline.core.record import Record, table_to_records
from pipeline.core.stage import FanOutStage, Stage, run_stages
from pipeline.core.storage import Storage, StorageError, open_storage
from pipeline.postpass.cross_pairs import build_cross_pairs
from pipeline.run.pools import (
    CostMeter,
    Pool,
    PoolBalancer,
    PoolDemand,
    PoolReservations,
    ReservedPlacement,
    StageProfile,
    ceiling,
    cpu_scale,
)
from pipeline.run.progress import RunProgress
from pipeline.run.worker import limit_threads, local_sources, named_actor_class, named_task_fn
from pipeline.sources.inputs import iter_inputs, load_metadata, source_records
from pipeline.store.assemble import RejectSampler, SampleStager, SourceAssembly, SourceCollector
from pipeline.store.funnel import Funnel
from pipeline.store.ledger import STAGING_DIR, Ledger
from pipeline.store.outputs import write_outputs, write_summary
from pipeline.store.shards import InlineTasks, ShardAssembler, assemble_shard, shard_number


def _check_config(out: Storage, config: RunConfig) -> None:
    """Refuse to mix samples made under different settings in one output directory."""
    if out.info("config.yaml") is not None:
        previous = (yaml.safe_load(out.read_text("config.yaml")) or {}).get("config_hash")
        if previous and previous != config.hash():
            raise ConfigError(
                f"{out} was curated with a different config (hash {previous}, this run {config.hash()}). "
                "Resume with the same settings (input.*, ray.*, resources and shard sizes may change), "
                "or use a new --output directory."
            )


def _check_writable(out: Storage) -> None:
    """Fail at once, naming the output, when it cannot be written (a missing bucket, a read-only role, a directory
    without permission), not after the inputs were listed."""
    probe = ".s2v-write-check"
    try:
        out.write_bytes(probe, b"")
        out.delete(probe)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"--output {out}: cannot write there ({exc.strerror or exc})") from None


def _save_config(out: Storage, config: RunConfig) -> None:
    body = {"config_hash": config.hash(), "pipeline_version": __version__, **config.model_dump(mode="json")}
    out.write_text("config.yaml", yaml.safe_dump(body, sort_keys=False))


def connect_ray(config: RunConfig) -> bool:
    """Join the configured cluster, or start an embedded local Ray. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"cannot join the Ray cluster at {address!r} ({exc}). Check the address (host:port of the head, "
                "ray://host:10001, or auto) and, for token-auth clusters, RAY_AUTH_MODE=token with the cluster's token."
            ) from None
    else:
        # address="local" always starts a fresh embedded Ray: plain ray.init() would attach to whatever cluster a
        # `ray start` left recorded on this machine (even a dead one, and then hang).
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


class RayTasks:
    """Shard assembly as Ray tasks on the nodes that run stages, round-robin: they reserve no CPU (they copy bytes;
    the stages keep their CPUs), and a node without CPUs (the head in ray_cluster.yaml) gets none. Soft affinity: a
    task whose node died runs elsewhere; Ray retries one that failed (a lost node, a refused request)."""

    def __init__(self):
        import ray

        self._remote = ray.remote(num_cpus=0, max_retries=3, retry_exceptions=True)(assemble_shard)
        self._nodes: list[str] = []
        self._turn = 0

    def submit(self, fn, *args):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        assert fn is assemble_shard
        if self._turn % 64 == 0:  # now and then: nodes an autoscaler added, or lost
            self._nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
        options = {}
        if self._nodes:
            node = self._nodes[self._turn % len(self._nodes)]
            self._turn += 1
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        return self._remote.options(**options).remote(*args)

    def ready(self, handles: list, wait: bool = False) -> list:
        import ray

        done, _ = ray.wait(handles, num_returns=len(handles), timeout=None if wait else 0, fetch_local=True)
        return done

    def result(self, handle):
        import ray

        return ray.get(handle)


def fuse(stages: list[Stage]) -> list[list[Stage]]:
    """Consecutive stateless stages form one group (one Ray task); each model stage is a group of its own. A
    fan-out stage ends its group: what follows works on single clips, which then spread over all workers instead
    of following their source's decode one after another in one task."""
    groups: list[list[Stage]] = []
    for stage in stages:
        last = groups[-1][-1] if groups else None
        if last is not None and not stage.stateful and not last.stateful and not isinstance(last, FanOutStage):
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


BLOCK_BYTES = 1 << 20  # a clip record carries its mp4 and keyframes: a few MB at 360p


def pool_balancer(stages: list[Stage], config: RunConfig, capacity: dict[str, float], meter: CostMeter | None = None,
                  say=None, profile: StageProfile | None = None) -> PoolBalancer:
    """The run's model pools at their starting sizes (`plan_pools` on the costs `profile` knows, else the warm-up
    guess), with the bounds, CPU scale and declared memory Ray Data is given, and a balancer that re-plans them from
    `meter` as the run goes."""
    groups = fuse(stages)
    memory = {}  # bytes per worker, by group: the config's, or the measured peak with headroom when higher
    for group in groups:
        declared = max(s.resources.memory_gb for s in group) * 2**30
        measured = profile.memory(group_name(group)) if profile else None
        memory[group_name(group)] = max(declared, measured or 0.0)
    demands, names = [], {}
    for group in groups:
        if group[0].stateful:
            res = group[0].resources
            name = group_name(group)
            demands.append(PoolDemand(name, None, res.num_cpus, res.num_gpus, memory[name], res.workers))
            names[name] = [s.name for s in group]
    pools = {d.name: Pool(d, names[d.name], ceiling(d, capacity), 1) for d in demands}
    task_groups = {group_name(group): [s.name for s in group] for group in groups if not group[0].stateful}
    balancer = PoolBalancer(pools, task_groups, capacity, meter or CostMeter(), say, profile=profile,
                            cpu_scale=cpu_scale(demands, capacity), memory=memory)
    for name, plan in balancer.plan().items():
        pool = pools[name]
        pool.target = pool.start = min(plan.size, pool.ceiling)
        pool.why = plan.why
    return balancer


def cluster_capacity() -> dict[str, float]:
    """The connected cluster's CPUs, GPUs and memory, and `nodes`: how many alive nodes have CPUs."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU"))
    return {**ray.cluster_resources(), "nodes": max(1, nodes)}


def group_name(group: list[Stage]) -> str:
    """An operator's name in Ray Data's progress: `MapBatches(probe+shot_cut+...)`."""
    return "+".join(s.name for s in group)


def build_dataset(records: list[Record], stages: list[Stage], config: RunConfig,
                  reservations: PoolReservations | None = None, balancer: PoolBalancer | None = None,
                  finish: tuple | None = None):
    """The Ray Data plan: one block per source in, one map_batches per stage group with its resources, and one
    block per clip from the fan-out on. Model pools start at `balancer`'s sizes (a fresh one when not given) and
    their first actors run in placement groups from `reservations` when given. `finish` (output URI, run id, config
    hash, rejects per reason) makes the last group stage finished samples (pipeline.store.assemble.SampleStager)."""
    import ray

    config_json = config.model_dump_json()
    groups = fuse(stages)
    # No per-operator resource reservation. With it, Ray Data held a task operator to about one task at a time (its
    # share of the budget) while CPUs idled, and started one task and waited to learn output sizes before the next.
    # Model pools are sized by the balancer (pipeline.run.pools), tasks take the CPUs the pools leave, and Ray Data's
    # object-store budget still bounds what runs ahead. Set every time: the context is per process.
    context = ray.data.DataContext.get_current()
    context.op_resource_reservation_enabled = False
    # Workers yield a table per clip (StageWorker); a block target below one clip's size ships each as its own
    # block, so the clips of one long source spread over the model actors instead of queueing at one, and no
    # worker buffers up to Ray's default 128 MiB of them first.
    context.target_max_block_size = BLOCK_BYTES
    from pipeline.run.ray_hooks import use_policies

    use_policies(context)  # which Ray Data backpressure policies, and why (pipeline.run.ray_hooks)
    if balancer is None:
        balancer = pool_balancer(stages, config, cluster_capacity())
    ds = ray.data.from_items([r.to_row() for r in records], override_num_blocks=max(1, len(records)))
    for previous, group in zip([None, *groups], groups):
        classes = [type(s) for s in group]
        last = finish if group is groups[-1] else None
        res = [s.resources for s in group]
        kwargs = {
            "batch_size": res[0].batch_size,
            "batch_format": "pyarrow",
            "num_cpus": max(r.num_cpus for r in res),
            "num_gpus": max(r.num_gpus for r in res) or None,
            "memory": int(balancer.memory[group_name(group)]) or None,
        }
        if previous and isinstance(previous[-1], FanOutStage):
            # Ray Data's default for small blocks, said out loud: Ray Data fuses an operator into the one before it
            # only when their remote args match, and fused, the clips would stay in their source's decode worker.
            kwargs["scheduling_strategy"] = "SPREAD"
        if group[0].stateful:
            pool = balancer.pools[group_name(group)]
            kwargs["num_cpus"] *= balancer.cpu_scale  # logical CPUs (pipeline.run.pools.cpu_scale)
            reserved = reservations.reserve(pool.demand.name, kwargs, pool.target) if reservations else None
            if reserved:  # a restarted actor comes back into its own bundle (pipeline.run.pools)
                pool.placement = ReservedPlacement(reserved, pool.target)
                kwargs["ray_remote_args_fn"] = pool.placement
            with _remote_args_deprecated():
                ds = ds.map_batches(
                    named_actor_class(classes),
                    fn_constructor_args=(classes, config_json, last),
                    # The pool starts at its warm-up size, all of it at once: each actor loads its model once.
                    # Left to Ray Data's own autoscaling, the segmentation pool shrank before its first clip arrived
                    # and grew back one model load at a time; the balancer resizes it by measured cost instead.
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(pool.ceiling, pool.target),
                                                       initial_size=pool.target),
                    **kwargs,
                )
        else:
            # Tasks hold the same fraction of their CPUs as model actors, so the CPU per node that the pools leave
            # runs as many task processes as the pools' CPUs run actors: at the start, when the pools have nothing
            # to do yet, decode and the clip stages both run instead of one waiting for the other's CPU. At most
            # one task per CPU in flight per operator: unbounded, Ray Data queued 79 clip tasks in Ray's scheduler
            # ahead of a new segmentation actor, and 22 decode tasks ahead of the clip tasks that feed the pool.
            kwargs["num_cpus"] *= balancer.cpu_scale
            with _remote_args_deprecated():
                ds = ds.map_batches(
                    named_task_fn(classes),
                    fn_kwargs={"stage_classes": classes, "config_json": config_json, "finish": last},
                    compute=ray.data.TaskPoolStrategy(size=max(1, int(balancer.capacity.get("CPU", 1)))),
                    max_calls=config.ray.recycle_after, **kwargs,  # a fresh worker process after this many batches
                )
    return ds


def _counted(batches, received: list[int]):
    for batch in batches:
        received[0] += batch.nbytes
        yield batch


@contextmanager
def _remote_args_deprecated():
    """Ray 2.60 has no named map_batches parameter for a scheduling strategy, nor another way to give each actor
    its own: the remote-args routes used here are deprecated for 2.64, and Ray is pinned. Not the newcomer's
    concern, so not printed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        yield


def run_sequential(records: list[Record], stages: list[Stage], timeout_s: float | None = None,
                   finish: tuple | None = None, scratch: str | None = None):
    """The same flow in this process, one record at a time, on one core (for benchmarks and debugging); with
    `finish`, finished samples are staged as the last Ray group would."""
    for stage in stages:
        stage.setup()
    limit_threads(1)
    stager = SampleStager(*finish) if finish else None
    for record in records:
        with local_sources([record], stages, scratch):
            for batch in run_stages(stages, [record], timeout_s):
                yield from (stager.finish(r) for r in batch) if stager else batch


def curate(config: RunConfig, out_dir: str | Path, console: Console | None = None, sequential: bool = False) -> dict:
    """Run one curation job into out_dir (a path or an s3:// / gs:// URI; resuming it if it exists). Returns the
    summary."""
    from stages import build_flow, describe_flow, preflight

    console = console or Console(stderr=True)
    started = time.time()
    out = open_storage(out_dir, "--output", strict=True)
    _check_writable(out)
    _check_config(out, config)
    preflight(config)
    input_errors: list[dict] = []
    metadata = load_metadata(config.input.metadata) if config.input.metadata else {}
    ledger = Ledger(out)
    state = ledger.recover()
    committed = state.committed_files()
    # The listing streams in pages; only the inputs still to do are kept.
    listed, todo = 0, []
    for entry in iter_inputs(config.input.paths, config.input.extensions, input_errors):
        listed += 1
        if (entry.uri, entry.size, entry.mtime_ns) not in committed:
            todo.append(entry)
    _save_config(out, config)  # only once the inputs are known to be usable
    for problem in input_errors:
        console.print(f"[yellow]warning[/]: {problem['message']} (recorded in errors.parquet)")
        if (problem["source"], problem["reason"]) not in state.input_errors:
            ledger.append({"type": "input_error", **problem})
    flow = describe_flow(config)
    console.print(f"stages: {' -> '.join(flow['stages'])}")
    for stage, what in flow["substitutes"].items():
        console.print(f"  substitute  {stage}: {what}")
    if flow["off"]:
        console.print(f"  off (no model configured): {', '.join(flow['off'])}")
    console.print(
        f"[bold]s2v curate[/]: {listed} input videos, {listed - len(todo)} already committed, "
        f"{len(todo)} to process -> {out.uri}"
    )
    if not todo:
        build_cross_pairs(out, config, ledger, ledger.read(), console)  # a no-op unless its settings changed
        return {**write_outputs(out, ledger.read()), "this_run": None}

    # Largest files first: a long video scheduled last would leave the other workers idle at the end.
    todo.sort(key=lambda e: -e.size)
    records = source_records(todo, metadata)
    stages = [cls(config) for cls in build_flow(config)]
    run_id = uuid.uuid4().hex[:12]
    finish = (out.uri, run_id, config.hash(), config.output.rejects_per_reason)
    started_ray = False
    def warn(msg: str) -> None:
        console.print(f"[yellow]warning[/]: {msg}")

    reservations = PoolReservations(config.ray.reserve_pools, warn)
    meter, balancer = CostMeter(), None
    received = [0]  # bytes of the record tables this driver pulled from Ray: digests, never samples
    driver_cpu = time.process_time()
    profile = StageProfile(config.ray.profile, config.hash(), warn)
    try:
        if sequential:
            stream, cpus = run_sequential(records, stages, config.ray.stage_timeout_s, finish,
                                          config.input.scratch_dir), 1.0
            counts, incomplete = _commit_stream(stream, len(records), out, config, ledger, state, run_id, console,
                                                [s.name for s in stages], meter.observe, InlineTasks())
        else:
            import ray

            started_ray = connect_ray(config)
            capacity = cluster_capacity()
            cpus = float(capacity.get("CPU", 1.0))
            balancer = pool_balancer(stages, config, capacity, meter, lambda msg: console.print(f"  pools: {msg}"),
                                     profile)
            for name, pool in balancer.pools.items():
                console.print(f"  pools: {name}: {pool.target} actors to start, up to {pool.ceiling} ({pool.why}; "
                              "resized as costs are measured)")
            batches = build_dataset(records, stages, config, reservations, balancer, finish).iter_batches(
                batch_size=None, batch_format="pyarrow")
            stream = (r for batch in _counted(batches, received) for r in table_to_records(batch))
            from pipeline.run.ray_hooks import balanced_pools

            with balanced_pools(balancer):
                counts, incomplete = _commit_stream(stream, len(records), out, config, ledger, state, run_id,
                                                    console, [s.name for s in stages], meter.observe, RayTasks())
    finally:
        reservations.close()
        if started_ray:
            import ray

            ray.shutdown()

    profile.save(meter)
    if balancer:
        _warn_memory(balancer, console, meter.peak_rss_mb, profile.path is not None)
    wall = time.time() - started
    run = {
        "type": "run",
        "run": run_id,
        "started": started,
        "wall_s": wall,
        "cpus": cpus,
        **counts,
        "clips_per_s": counts["clips"] / wall,
        # Cosmos-Curate's headline KPI, per CPU core here since these stages run on CPUs.
        "video_hours_per_day_per_core": (counts["video_s"] / 3600) / (wall / 86400) / cpus,
        "mode": "sequential" if sequential else "ray",
        "flow": flow,
        "peak_rss_mb": meter.peak_rss_mb,
        # CPU seconds each stage's workers spent on this run's records (all threads of the process).
        "stage_cpu_s": {stage: round(cpu, 1) for stage, (cpu, _) in meter.totals.items()},
        "pools": {name: {"started": pool.start, "ended": pool.target, "why": pool.why}
                  for name, pool in balancer.pools.items()} if balancer else {},
        "pool_resizes": balancer.resizes if balancer else [],
        # What the data path costs the driver: bytes it received from the workers, and its own CPU seconds
        # (benchmarks/driver_load.py).
        "driver_bytes_in": received[0],
        "driver_cpu_s": round(time.process_time() - driver_cpu, 2),
        "version": __version__,
    }
    ledger.append(run)
    # After the run line, so its throughput is the streaming pass's; the cross line records its own time.
    build_cross_pairs(out, config, ledger, ledger.read(), console)
    return {**write_outputs(out, ledger.read(), incomplete), "this_run": run}


def _warn_memory(balancer: PoolBalancer, console: Console, peaks: dict[str, float], profiled: bool) -> None:
    """Say where a worker group declared less memory than this run measured it to use (peaks in MB): Ray packs
    workers by the declared figure, and too low a one packs too many onto a node."""
    for group, declared in balancer.memory.items():
        peak = peaks.get(group)
        if peak and peak * 2**20 > declared:
            fix = ("the next run with these settings declares that with headroom (ray.profile)" if profiled else
                   "raise its resources.memory_gb")
            console.print(f"[yellow]note[/]: {group} workers peaked at {peak:.0f} MB resident against the "
                          f"{declared / 2**30:.2f} GiB declared; {fix}")


# Ledger lines of sources without samples (and of duplicates) are committed in batches of this many, or with the
# next shard commit: on an object store each commit is one object. Losing a batch to a crash only redoes its sources.
LOOSE_BATCH = 64


def _commit_stream(stream, total: int, out: Storage, config: RunConfig, ledger: Ledger, state, run_id: str,
                   console: Console, stage_names: list[str], observe, tasks) -> tuple[dict, list[dict]]:
    """Group the digests of finished records by source; each whole source goes to the shard assembler (its
    samples are already staged by the workers), which has shards written by `tasks` and commits them. `observe`
    sees each record's meta as it arrives (the balancer's cost meter)."""
    failed: list[dict] = []

    def on_failure(sources: list[dict], exc: Exception) -> None:
        for entry in sources:
            failed.append({"source": entry["path"], "stage": "runner", "reason": "shard_write_failed",
                           "message": f"its shard could not be written ({exc}); rerun to retry"})
        console.print(f"[yellow]warning[/]: a shard could not be written ({exc}); its {len(sources)} sources stay "
                      "uncommitted and the next run redoes them")

    shards = ShardAssembler(out, config.output, ledger, max((shard_number(n) + 1 for n in state.shards), default=0),
                            tasks, on_failure=on_failure)
    rejects = ShardAssembler(out, config.output, ledger, max((shard_number(n) + 1 for n in state.rejects), default=0),
                             tasks, kind="rejects")
    sampler = RejectSampler(config.output.rejects_per_reason, state.rejects)
    collector = SourceCollector(sampler if sampler.per_reason else None)
    seen_ids = set(state.sources)
    loose: list[dict] = []
    counts = {"sources": 0, "clips": 0, "samples": 0, "video_s": 0.0}
    refresher = SummaryRefresher(out, ledger, run_id, total, counts, config.ray.summary_every_s, stage_names)
    funnel = Funnel()
    progress = RunProgress(funnel, stage_names, console, disable=not config.ray.progress)

    def commit(wait: bool = False) -> None:
        with refresher.lock:  # the summary thread reads the ledger: never in the middle of a commit
            committed = shards.poll(wait) + rejects.poll(wait)
            if loose and (committed or len(loose) >= LOOSE_BATCH or wait):
                ledger.append_many(loose)
                loose.clear()

    with progress, refresher:
        task = progress.add_task("curate", total=total, samples=0)
        for record in stream:
            observe(record.meta)
            assembly = collector.add(record)
            if assembly is not None:
                entry = _commit_source(assembly, shards, loose, seen_ids, counts, run_id)
                if entry:  # examples of its dropped clips (a duplicate source's are not kept)
                    rejects.add_source(None, assembly.staged_rejects(), assembly.reject_reasons)
                    funnel.add(entry)
                progress.update(task, advance=1, samples=counts["samples"])
            commit()
        shards.dispatch()
        rejects.dispatch()
        commit(wait=True)
    # Records that never came back (a worker died for good): the source stays uncommitted and the next run
    # redoes it. Say so rather than lose it silently.
    incomplete = [
        {"source": path, "stage": "runner", "reason": "incomplete",
         "message": f"{assembly.arrived} of {assembly.planned} clips came back; rerun to retry"}
        for path, assembly in collector.incomplete().items()
    ] + failed
    # Samples staged for sources that never committed (incomplete, duplicates, examples not kept): scratch.
    out.delete_tree(f"{STAGING_DIR}/{run_id}")
    return counts, incomplete


def _commit_source(assembly: SourceAssembly, shards: ShardAssembler, loose: list[dict], seen_ids: set, counts: dict,
                   run_id: str) -> dict | None:
    """Hand one whole source to the shard assembler; returns its ledger entry (None for a duplicate of a source
    already curated)."""
    entry = assembly.entry(run_id)
    if entry["source_id"] in seen_ids:
        # Same bytes as a source already curated (a copy under another name): never write it twice.
        loose.append({"type": "duplicate", "path": entry["path"], "source_id": entry["source_id"],
                      "size": entry["size"], "mtime_ns": entry["mtime_ns"], "run": run_id})
        return None
    seen_ids.add(entry["source_id"])
    staged = assembly.staged_samples()
    if staged:
        shards.add_source(entry, staged)
    else:
        loose.append(entry)
    counts["sources"] += 1
    counts["clips"] += len(entry["clips"])
    counts["samples"] += len(staged)
    counts["video_s"] += entry["duration_s"] or 0.0
    return entry


class SummaryRefresher:
    """Rewrites summary.json every `every_s` seconds while a run streams (status "running" plus this run's
    progress), so a watcher (`cat`, a dashboard, `s2v shards stats`) sees the run move without waiting for its end."""

    def __init__(self, out: Path, ledger: Ledger, run_id: str, total: int, counts: dict, every_s: float,
                 stages: list[str]):
        self.out, self.ledger, self.run_id, self.total, self.counts, self.every_s = (
            out, ledger, run_id, total, counts, every_s
        )
        self.stages = stages  # the funnel's order before this run's ledger line records it
        self.lock = threading.Lock()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="s2v-summary", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.write()

    def write(self) -> None:
        with self.lock:
            elapsed = time.time() - self.started
            progress = {"run": self.run_id, "updated": time.time(), "elapsed_s": round(elapsed, 1),
                        "sources_total": self.total, **self.counts,
                        "clips_per_s": round(self.counts["clips"] / elapsed, 4) if elapsed > 0 else 0.0}
            try:
                write_summary(self.out, self.ledger.read(), progress=progress, order=self.stages)
            except OSError as exc:  # a full disk must not kill the run that is writing the data
                logging.getLogger(__name__).warning("could not refresh %s/summary.json: %s", self.out, exc)
