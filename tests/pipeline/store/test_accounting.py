import pyarrow.parquet as pq
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.store.accounting import clip_rows, input_outcomes, source_rows, why
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import write_outputs


def entry(sid, status="curated", clips=(), kept_rows=(), stage=None, reason=None, errors=()):
    return {"type": "source", "path": f"/in/{sid}.mp4", "source_id": sid, "size": 1, "mtime_ns": 1,
            "duration_s": 10.0, "status": status, "stage": stage, "reason": reason, "run": "r1",
            "samples": [{"key": k, "shard": "shards/train-000000.tar", "duration_s": 2.0} for k in kept_rows],
            "errors": list(errors),
            "clips": [{"key": f"{sid}-{i}", "status": s, "stage": st, "reason": r, "start_s": 2.0 * i,
                       "end_s": 2.0 * i + 2} for i, (s, st, r) in enumerate(clips)]}


def a_run(out):
    ledger = Ledger(out)
    ledger.append(entry("bad", "rejected", stage="probe", reason="not_a_video",
                        errors=[{"source": "/in/bad.mp4", "key": "bad", "stage": "probe", "reason": "not_a_video",
                                 "message": "moov atom not found"}]))
    ledger.append(entry("short", "no_clips", stage="shot_cut", reason="no_usable_shots"))
    nobody = ("dropped", "consolidation", "no_valid_entity")
    # Every clip dropped: in no errors.parquet row, yet it must be accounted for.
    ledger.append(entry("empty", clips=[nobody, nobody, ("dropped", "quality_filter", "too_dark")]))
    kept = ("kept", None, None)
    ok = entry("ok", clips=[kept, ("failed", "clip_extract", "truncated")], kept_rows=["ok-0"],
               errors=[{"source": "/in/ok.mp4", "key": "ok-1", "stage": "clip_extract", "reason": "truncated",
                        "message": "ffmpeg: end of file at 1.2 s"}])
    ledger.append({"type": "shard", "shard": "shards/train-000000.tar", "nsamples": 1, "bytes": 10, "sha256": "x",
                   "keys": ["ok-0"], "sources": [ok]})
    ledger.append({"type": "duplicate", "path": "/in/copy-of-ok.mp4", "source_id": "ok", "size": 1, "mtime_ns": 2,
                   "run": "r1"})
    ledger.append({"type": "input_error", "source": "/in/*.mkv", "reason": "not_found",
                   "message": "no file matches /in/*.mkv"})
    return Ledger(out).read()


def test_every_input_has_a_row_with_why_it_gave_no_sample(tmp_path):
    rows = {r["source"]: r for r in source_rows(a_run(tmp_path))}
    assert set(rows) == {"/in/bad.mp4", "/in/short.mp4", "/in/empty.mp4", "/in/ok.mp4", "/in/copy-of-ok.mp4",
                         "/in/*.mkv"}
    assert rows["/in/empty.mp4"]["status"] == "curated" and rows["/in/empty.mp4"]["samples"] == 0
    assert rows["/in/empty.mp4"]["reason"] == "consolidation/no_valid_entity"  # the most frequent of its 3 clips
    assert rows["/in/empty.mp4"]["detail"] == "consolidation/no_valid_entity x2, quality_filter/too_dark x1"
    assert (rows["/in/bad.mp4"]["reason"], rows["/in/bad.mp4"]["detail"]) == ("probe/not_a_video",
                                                                              "moov atom not found")
    assert rows["/in/short.mp4"]["reason"] == "shot_cut/no_usable_shots"
    assert rows["/in/ok.mp4"]["reason"] is None and rows["/in/ok.mp4"]["clips_failed"] == 1
    assert rows["/in/copy-of-ok.mp4"]["status"] == "duplicate" and "/in/ok.mp4" in rows["/in/copy-of-ok.mp4"]["detail"]
    assert rows["/in/*.mkv"]["status"] == "not_found"


def test_every_planned_clip_has_a_row(tmp_path):
    rows = {r["key"]: r for r in clip_rows(a_run(tmp_path))}
    assert len(rows) == 5
    assert rows["ok-0"]["shard"] == "shards/train-000000.tar" and rows["ok-0"]["status"] == "kept"
    assert rows["ok-1"]["message"] == "ffmpeg: end of file at 1.2 s"
    assert (rows["empty-1"]["stage"], rows["empty-1"]["reason"], rows["empty-1"]["start_s"]) == (
        "consolidation", "no_valid_entity", 2.0)


def test_tables_are_written_and_why_answers_in_one_line(tmp_path):
    state = a_run(tmp_path)
    write_outputs(tmp_path, state)
    assert pq.read_table(tmp_path / "sources.parquet").num_rows == 6
    assert pq.read_table(tmp_path / "clips.parquet").num_rows == 5
    assert why(state, "empty.mp4") == ["/in/empty.mp4: curated, 3 clips planned, 0 kept, 3 dropped, 0 failed; "
                                       "0 samples; no sample because consolidation/no_valid_entity "
                                       "[consolidation/no_valid_entity x2, quality_filter/too_dark x1]"]
    assert why(state, "empty-2") == ["clip empty-2 of /in/empty.mp4 (4.00-6.00 s): dropped at quality_filter: "
                                     "too_dark"]
    assert why(state, "nothing-like-it") == []
    outcomes = input_outcomes(state)
    assert (outcomes["inputs"], outcomes["with_samples"], outcomes["without_samples"]) == (6, 1, 5)

    result = CliRunner().invoke(main, ["shards", "why", str(tmp_path), "ok-1"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == ("clip ok-1 of /in/ok.mp4 (2.00-4.00 s): failed at clip_extract: truncated "
                                     "(ffmpeg: end of file at 1.2 s)")
    missing = CliRunner().invoke(main, ["shards", "why", str(tmp_path), "zzz"])
    assert missing.exit_code == 1 and "not in" in missing.output
    stats = CliRunner().invoke(main, ["shards", "stats", str(tmp_path)])
    assert "Inputs: 6" in stats.output and "/in/empty.mp4" in stats.output


def test_rejects_shards_commit_by_their_own_line_and_debris_is_removed(tmp_path):
    from pipeline.core.config import OutputConfig
    from pipeline.store.assemble import RejectSampler
    from pipeline.store.shards import InlineTasks, ShardAssembler, read_shard_samples, stage_sample

    ledger = Ledger(tmp_path)
    rejects = ShardAssembler(tmp_path, OutputConfig(shard_max_samples=1), ledger, 0, InlineTasks(), kind="rejects")
    staged = [(f"k{i}", stage_sample(tmp_path, "run", {"__key__": f"k{i}", "json": b"{}", "mp4": b"v"}))
              for i in range(3)]
    rejects.add_source(None, staged, {"k0": "quality_filter/too_dark", "k1": "quality_filter/too_dark",
                                      "k2": "consolidation/x"})
    rejects.close()
    (tmp_path / "rejects" / "rejects-000009.tar.tmp").write_bytes(b"half")
    (tmp_path / "rejects" / "stray.tar").write_bytes(b"not ours")
    state = ledger.recover()
    assert sorted(p.name for p in (tmp_path / "rejects").iterdir()) == [
        "rejects-000000.tar", "rejects-000001.tar", "rejects-000002.tar"]
    assert state.reject_shards()["k2"] == "rejects/rejects-000002.tar"
    assert read_shard_samples(tmp_path / "rejects" / "rejects-000001.tar")["k1"]["mp4"] == b"v"
    # A resumed run tops the counts up from the committed ones and never keeps a committed key again.
    sampler = RejectSampler(2, state.rejects)

    def staged_example(key: str, reason: str) -> dict:
        return {"key": key, "reject": {"reason": reason, "staged": {"rel": "x", "bytes": 1}}}

    assert sampler.take(staged_example("k3", "quality_filter/too_dark")) is None
    assert sampler.take(staged_example("k2", "consolidation/x")) is None
    assert sampler.take(staged_example("k4", "consolidation/x")) == "consolidation/x"
    assert sampler.take({"key": "k5", "reject": None}) is None  # the worker staged no example of it


def test_why_and_stats_print_escape_sequences_from_the_ledger_escaped(tmp_path):
    """A ledger from elsewhere can hold any text in paths and messages: a terminal shows it, never obeys it."""
    hostile = "/in/\x1b]0;owned\x07\x1b]52;c;ZXZpbA==\x07[link=http://x]v[/link][/x].mp4"
    Ledger(tmp_path).append({**entry("h", "rejected", stage="probe", reason="not_a_video"), "path": hostile})
    result = CliRunner().invoke(main, ["shards", "why", str(tmp_path), "h"])
    assert result.exit_code == 0 and "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;owned\\x07" in result.output
    stats = CliRunner().invoke(main, ["shards", "stats", str(tmp_path)], env={"COLUMNS": "300"})
    assert stats.exit_code == 0, stats.output  # before: rich MarkupError on "[/x]"
    assert "\x1b]" not in stats.output and "\x07" not in stats.output and "[link=http://x]" in stats.output
