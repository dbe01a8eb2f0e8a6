"""Stages that misbehave on purpose, for the fault-tolerance tests. A record misbehaves when its source path
contains the trigger word, so one batch can mix good and bad items."""

from __future__ import annotations

import os
import time

from pipeline.core.stage import Stage


class Hang(Stage):
    """Never returns for a record whose path contains 'hang' (a stuck decoder or model call)."""

    name = "hang"

    def process(self, records):
        for record in records:
            if "hang" in record.source_path:
                self.stall()
            record.meta["hang_ok"] = True
        return records

    def stall(self):
        time.sleep(3600)


class HangActor(Hang):
    name = "hang_actor"
    stateful = True


class RaisingModel(Stage):
    """A model stage whose forward raises on one item of a batch (e.g. a shape it cannot take)."""

    name = "raising_model"
    stateful = True

    def setup(self):
        self.loaded = True

    def process(self, records):
        for record in records:
            if "boom" in record.source_path:
                raise RuntimeError(f"model cannot take {record.source_path}")
            record.meta["model_ok"] = self.loaded
        return records


class Pid(Stage):
    """Notes which worker process handled each record, and the placement group it ran in (None outside one)."""

    name = "pid"

    def process(self, records):
        import ray

        group = ray.get_runtime_context().get_placement_group_id()
        for record in records:
            record.meta["pid"] = os.getpid()
            record.meta["placement_group"] = group
        return records


class PidActor(Pid):
    name = "pid_actor"
    stateful = True


class ShiftingCost(Stage):
    """A model stage whose cost per record changes within a run: records whose path contains 'heavy' take 0.3 s
    of CPU (a busy loop, so the balancer's CPU-time meter sees it), the others about nothing."""

    name = "shifting_cost"
    stateful = True
    section = "segmentation"  # resources from config.segmentation.resources

    def process(self, records):
        for record in records:
            if "heavy" in record.source_path:
                end = time.process_time() + 0.3
                while time.process_time() < end:
                    pass
            record.meta["pid"] = os.getpid()
        return records
