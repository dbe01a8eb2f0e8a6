"""The Ray Data plan of a run: a source fans out into one block per clip, and the clip stages run as an operator
of their own, so no worker holds a whole source and the clips of one long video spread over the workers."""

from __future__ import annotations

import pytest

from pipeline.config import RunConfig
from pipeline.inputs import source_records
from pipeline.record import table_to_records
from pipeline.runner import build_dataset, fuse, pool_sizes
from stages.clip_extract import ClipExtractor
from stages.clip_score import ClipScore
from stages.probe import Prober
from stages.quality import QualityStats
from stages.segmentation import Segmenter
from stages.shot_cut import ShotCutter


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_each_clip_of_a_source_reaches_the_driver_as_its_own_block(local_ray, demo_corpus):
    config = RunConfig.model_validate({"ray": {"progress": False}, "shots": {"min_clip_s": 1.0}})
    stages = [cls(config) for cls in (Prober, ShotCutter, ClipExtractor, QualityStats)]
    # One task decodes and cuts a source; the clips are checked by tasks of their own.
    assert [[s.name for s in group] for group in fuse(stages)] == [["probe", "shot_cut", "clip_extract"],
                                                                  ["quality_stats"]]
    video = min((demo_corpus / "videos").glob("*.mp4"))
    ds = build_dataset(source_records([str(video)], {}), stages, config)
    blocks = [table_to_records(t) for t in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    # Ray Data did not fuse the clip stages back into the decode operator (it would, given equal remote args).
    stats = ds.stats()
    assert "MapBatches(probe+shot_cut+clip_extract): 1 tasks executed" in stats
    assert "Operator 2 MapBatches(quality_stats):" in stats
    clips = [r for block in blocks for r in block]
    assert len(clips) >= 3 and all(r.kind == "clip" for r in clips)
    assert {r.clips_planned for r in clips} == {len(clips)}
    assert [len(block) for block in blocks] == [1] * len(clips)
    assert len({r.key for r in clips}) == len(clips)
    assert all("mp4" in r.blobs and "quality_stats" in r.meta["timings"] for r in clips if r.alive)


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
