"""A real multi-node Ray cluster on one machine, over loopback: for tests, benchmarks and trying cluster commands.

Each node is its own `ray start --block` process group (the head, then workers joining it), so the harness can stop
or kill exactly the nodes it started and never touches other Ray instances on the machine. Two settings make
loopback work: every node gets `--node-ip-address=127.0.0.2` (Ray would otherwise advertise the machine's external
address) and clients use token auth (`RAY_AUTH_MODE=token`, Ray's default for `ray start` clusters). The dashboard
and Ray Jobs API listen on 127.0.0.1 only.

    with LoopbackCluster(nodes=2, cpus_per_node=1) as cluster:
        ray.init(address=cluster.address)            # or s2v curate run --address ...,
                                                     # or Ray Jobs at cluster.dashboard_url
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

NODE_IP = "127.0.0.2"


class ClusterError(RuntimeError):
    """A loopback node failed to start; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    index: int
    process: subprocess.Popen
    log: Path
    metrics_port: int

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LoopbackCluster:
    nodes: int = 2
    cpus_per_node: int = 1
    object_store_mb: int = 300
    log_dir: Path | None = None
    start_timeout_s: float = 90.0
    # Node i runs on core i only (its raylet, workers and all): "a node" then means one core's worth of compute,
    # so a benchmark can compare one node with two on a small machine. `cpus_per_node` stays Ray's logical count.
    pin_cores: bool = False
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    members: list[Node] = field(default_factory=list)
    temp_dir: str | None = None

    @property
    def address(self) -> str:
        """What `ray.init(address=...)`, `s2v curate run --address` and `ray start --address` take."""
        return f"{NODE_IP}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and the Ray Jobs API (`s2v curate submit --address`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @staticmethod
    def client_env() -> dict[str, str]:
        """Environment for processes that talk to the cluster (CLIs, drivers), and for the nodes themselves.

        This Python's bin directory goes first on PATH, as `ray_cluster.yaml` does for its venv: a Ray job's
        entrypoint is a shell command run by the node, and `s2v curate submit` runs `s2v` there."""
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token"}

    def start(self) -> LoopbackCluster:
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="s2v-loopback-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_node(head=True)
            for _ in range(self.nodes - 1):
                self._start_node(head=False)
            self.wait_for_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self) -> Node:
        """One more worker node (e.g. to replace a killed one)."""
        node = self._start_node(head=False)
        self.wait_for_nodes(sum(n.alive for n in self.members))
        return node

    def _start_node(self, head: bool) -> Node:
        index = len(self.members)
        metrics_port = free_port()
        args = [
            str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
            f"--node-ip-address={NODE_IP}", f"--num-cpus={self.cpus_per_node}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={free_port()}",
        ]
        if head:
            # A short temp dir of its own (Unix socket paths are limited to ~107 bytes) keeps this cluster out of
            # the machine's /tmp/ray/ray_current_cluster record, which plain `ray.init()` would otherwise follow.
            self.temp_dir = tempfile.mkdtemp(prefix="s2vray", dir="/tmp")
            args += ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                     f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true"]
        else:
            args += [f"--address={self.address}"]
        log = self.log_dir / f"node{index}.log"
        with open(log, "wb") as out:
            # A session of its own: stop() signals the whole group, i.e. this node's raylet, GCS and workers only.
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.client_env(),
                                       start_new_session=True)
        if self.pin_cores:  # before `ray start` gets to spawn anything: its children inherit the affinity
            os.sched_setaffinity(process.pid, {index % os.cpu_count()})
        node = Node(index, process, log, metrics_port)
        self.members.append(node)
        if head:
            self._wait(lambda: _port_open("127.0.0.1", self.dashboard_port) and _port_open(NODE_IP, self.port),
                       node, "the head's GCS and dashboard")
        return node

    def wait_for_nodes(self, count: int) -> None:
        """Until the GCS lists `count` alive nodes (asked through the Ray CLI, so this process stays no driver)."""
        ray = str(Path(sys.executable).with_name("ray"))

        def ready() -> bool:
            status = subprocess.run([ray, "status", f"--address={self.address}"], capture_output=True, text=True,
                                    env=self.client_env(), timeout=30, check=False)
            return status.returncode == 0 and status.stdout.count("node_") >= count

        self._wait(ready, self.members[-1], f"{count} nodes to register")

    def _wait(self, check, node: Node, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not node.alive:
                raise ClusterError(f"loopback node {node.index} exited while waiting for {what}:\n{_tail(node.log)}")
            if check():
                return
            time.sleep(0.5)
        raise ClusterError(f"timed out after {self.start_timeout_s:.0f} s waiting for {what}:\n{_tail(node.log)}")

    def kill_node(self, index: int) -> None:
        """SIGKILL one node's whole process group: what a machine failure looks like to the rest of the cluster."""
        _signal_group(self.members[index].process, signal.SIGKILL)
        self.members[index].process.wait()

    def stop(self) -> None:
        """Stop the nodes this harness started, at once. A loopback cluster is disposable, and a polite stop costs
        time for nothing: on SIGTERM a raylet drains for ~10 s, and the GCS and `ray start --block` never exit."""
        for node in reversed(self.members):
            _signal_group(node.process, signal.SIGKILL)
        for node in reversed(self.members):
            node.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


TASK_WORKER, ACTOR_WORKER = "ray::MapBatches", "ray::MapWorker"


def kill_busy_worker(root_pids: list[int], timeout_s: float = 300.0, settle_s: float = 0.5,
                     kinds: tuple[str, ...] = (TASK_WORKER, ACTOR_WORKER)) -> str | None:
    """SIGKILL the first Ray worker process seen running a stage (Ray titles a worker after its task:
    `ray::MapBatches(...)` for tasks, `ray::MapWorker(...)` for Ray Data actors; `kinds` picks which) among the
    descendants of `root_pids` (a driver with its embedded Ray, or loopback nodes), so no other Ray on the machine is
    touched. Returns the killed process's title, or None when none was seen before the roots exited or `timeout_s`."""
    import psutil

    deadline = time.monotonic() + timeout_s
    roots = [psutil.Process(pid) for pid in root_pids]
    while time.monotonic() < deadline and any(r.is_running() for r in roots):
        for root in roots:
            try:
                for proc in root.children(recursive=True):
                    if _busy(" ".join(proc.cmdline()).strip(), kinds):
                        time.sleep(settle_s)  # let it get into its batch
                        title = " ".join(proc.cmdline()).strip()
                        if _busy(title, kinds):  # still in one (the same or the next)
                            proc.kill()
                            return title
            except psutil.Error:
                continue
        time.sleep(0.1)
    return None


def _busy(title: str, kinds: tuple[str, ...]) -> bool:
    """A worker in the middle of a batch, from its process title: a task worker is titled after its task while it
    runs one (`ray::IDLE` between tasks); an actor is `ray::MapWorker(...)` when idle and gains the method's name,
    `ray::MapWorker(...).submit`, while it runs one (`.__init__`: still loading its models)."""
    if title.startswith(ACTOR_WORKER):
        return ACTOR_WORKER in kinds and not title.endswith(("__init__", ")"))
    return title.startswith(kinds)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.testing.loopback`: start a cluster, print how to reach it, keep it until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.testing.loopback", description=main.__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args(argv)
    # SIGTERM (a `kill`, a CI runner) unwinds through the with block too, so the nodes are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LoopbackCluster(nodes=args.nodes, cpus_per_node=args.cpus_per_node) as cluster:
        print(f"loopback Ray cluster: {args.nodes} nodes x {args.cpus_per_node} CPU, logs in {cluster.log_dir}\n"
              f"  ray.init / s2v curate run --address   {cluster.address}\n"
              f"  dashboard and Ray Jobs (submit)       {cluster.dashboard_url}\n"
              f"clients need `export RAY_AUTH_MODE=token` before they start. Ctrl-C stops the cluster.", flush=True)
        try:
            while all(node.alive for node in cluster.members):
                time.sleep(1)
            print("a node exited; stopping the cluster", file=sys.stderr)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
