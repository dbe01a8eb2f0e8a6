"""StageWorker: builds its stages once per process, runs native threads as the CPUs it owns, and reports each
stage's CPU time and the process's peak memory on the records."""

import time

from pipeline.core.config import build_config
from pipeline.core.record import Record, records_to_table, table_to_records
from pipeline.core.stage import Stage
from pipeline.run.worker import StageWorker


class TorchModel(Stage):
    """A model stage that builds a torch model in setup and notes how many threads it ran with."""

    name = "torch_model"
    stateful = True
    section = "segmentation"

    def setup(self):
        import torch

        self.model = torch.nn.Linear(4, 4)

    def process(self, records):
        import torch

        for r in records:
            r.meta["threads"] = torch.get_num_threads()
            end = time.process_time() + 0.05  # CPU time the record's cost should show
            while time.process_time() < end:
                pass
        return records


def test_a_model_worker_runs_as_many_threads_as_cpus_it_owns_and_reports_cost_and_memory():
    import torch

    before = torch.get_num_threads()
    try:
        for cpus, threads in ((2, 2), (1, 1), (0.5, 1)):
            config = build_config(overrides=[f"segmentation.resources.num_cpus={cpus}"])
            worker = StageWorker([TorchModel], config.model_dump_json())
            record = Record(kind="clip", source_path="a.mp4", key="a")
            [table] = list(worker(records_to_table([record])))
            [out] = table_to_records(table)
            assert out.meta["threads"] == threads
            assert out.meta["cpu_s"]["torch_model"] >= 0.05  # the busy loop's CPU time, measured
            assert out.meta["peak_rss_mb"]["torch_model"] > 50  # this process's peak, torch loaded
    finally:
        torch.set_num_threads(before)


def test_an_input_in_object_storage_is_decoded_from_a_scratch_copy_that_goes_with_its_batch(tmp_path, s3_server):
    from pathlib import Path

    from pipeline.core.storage import open_storage
    from pipeline.run.worker import local_sources
    from stages.probe import Prober

    config = build_config({})
    stages = [Prober(config)]
    s3_server.create_bucket("inputs")
    open_uri = "s3://inputs/v/a.mp4"
    open_storage("s3://inputs/v").write_bytes("a.mp4", b"not really a video")
    records = [Record(kind="source", source_path=open_uri, meta={"source": {"size": 18}}),
               Record(kind="source", source_path="s3://inputs/v/missing.mp4", meta={"source": {"size": 5}}),
               Record(kind="source", source_path="s3://inputs/v/huge.mp4", meta={"source": {"size": 10**15}})]
    with local_sources(records, stages, str(tmp_path)):
        local = Path(records[0].local_path)
        assert local.parent == tmp_path and local.read_bytes() == b"not really a video"
        stages[0].process(records[:1])  # probe reads the copy, and its message names the input
    assert not local.exists() and "local_path" not in records[0].meta
    assert records[0].errors[0]["stage"] == "probe" and str(local) not in records[0].errors[0]["message"]
    assert records[0].errors[0]["message"].startswith(open_uri)
    assert (records[1].errors[0]["reason"], records[2].errors[0]["reason"]) == ("unreadable", "no_scratch_space")
    assert "input.scratch_dir" in records[2].errors[0]["message"]
    assert list(tmp_path.iterdir()) == []
