"""The Ray Data plan of a run: a source fans out into one block per clip, and the clip stages run as an operator
of their own, so no worker holds a whole source and the clips of one long video spread over the workers."""

from __future__ import annotations

from pipeline.core.config import RunConfig
from pipeline.core.record import table_to_records
from pipeline.run.runner import build_dataset, fuse
from pipeline.sources.inputs import source_records
from stages.clip_extract import ClipExtractor
from stages.probe import Prober
from stages.quality import QualityStats
from stages.shot_cut import ShotCutter


def operator_names(summary) -> list[str]:
    """The executed operators, in plan order, input reading left out; a fused pair would be one "A->B" name."""
    names = [name for parent in summary.parents for name in operator_names(parent)]
    names += [op.operator_name for op in summary.operators_stats if not op.is_sub_operator]
    return [n for n in names if n.startswith("MapBatches")]


def test_each_clip_of_a_source_reaches_the_driver_as_its_own_block(local_ray, demo_corpus):
    config = RunConfig.model_validate({"ray": {"progress": False}, "shots": {"min_clip_s": 1.0}})
    stages = [cls(config) for cls in (Prober, ShotCutter, ClipExtractor, QualityStats)]
    # One task decodes and cuts a source; the clips are checked by tasks of their own.
    assert [[s.name for s in group] for group in fuse(stages)] == [["probe", "shot_cut", "clip_extract"],
                                                                  ["quality_stats"]]
    video = min((demo_corpus / "videos").glob("*.mp4"))
    ds = build_dataset(source_records([str(video)], {}), stages, config)
    blocks = [table_to_records(t) for t in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    # Ray Data did not fuse the clip stages back into the decode operator (it would, given equal remote args): each
    # ran as an operator of its own (Ray Data's structured stats, not its text).
    assert operator_names(ds.get_stats_summary()) == ["MapBatches(probe+shot_cut+clip_extract)",
                                                      "MapBatches(quality_stats)"]
    clips = [r for block in blocks for r in block]
    assert len(clips) >= 3 and all(r.kind == "clip" for r in clips)
    assert {r.clips_planned for r in clips} == {len(clips)}
    assert [len(block) for block in blocks] == [1] * len(clips)
    assert len({r.key for r in clips}) == len(clips)
    assert all("mp4" in r.blobs and "quality_stats" in r.meta["timings"] for r in clips if r.alive)
