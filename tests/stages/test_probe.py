import pytest

from pipeline.core.config import build_config
from pipeline.core.stage import run_stage
from pipeline.sources.inputs import source_records
from stages.probe import Prober, content_id


def probe_all(files, overrides=()):
    stage = Prober(build_config({}, list(overrides)))
    records = source_records([str(p) for p in files.values()], {})
    out = run_stage(stage, records)
    return {r.source_path.rsplit("/", 1)[1][:-4]: r for r in out}


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero_bytes", "empty_file"),
        ("text", "not_a_video"),
        ("jpeg", "not_a_video"),
        ("audio_only", "no_video_stream"),
        ("truncated_tail", "not_a_video"),
        ("three_frames", "too_few_frames"),
        ("huge", "too_large"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(bad_inputs, name, reason):
    record = probe_all({name: bad_inputs[name]})[name]
    assert not record.alive
    assert record.errors[0]["stage"] == "probe"
    assert record.errors[0]["reason"] == reason
    assert str(bad_inputs[name]) in record.errors[0]["message"]


def test_good_and_damaged_but_readable_inputs_pass(bad_inputs):
    records = probe_all({k: bad_inputs[k] for k in ("good", "truncated_head")})
    good = records["good"]
    assert good.alive
    info = good.meta["source"]["probe"]
    assert (info["width"], info["height"], info["fps"], info["num_frames"]) == (320, 180, 24.0, 72)
    assert info["codec"] == "h264" and info["rotation"] == 0
    assert good.source_id == content_id(str(bad_inputs["good"])) and good.key == good.source_id[:16]
    assert records["truncated_head"].alive  # the front of a cut file is still usable footage


def test_huge_input_is_kept_when_downscaling_is_allowed(bad_inputs):
    record = probe_all({"huge": bad_inputs["huge"]}, ["limits.on_exceed=downscale"])["huge"]
    assert record.alive
    assert "downscaled" in record.meta["warnings"][0]["message"]


def test_duration_limit(bad_inputs):
    record = probe_all({"good": bad_inputs["good"]}, ["limits.max_duration_s=1.5"])["good"]
    assert record.errors[0]["reason"] == "too_long"
