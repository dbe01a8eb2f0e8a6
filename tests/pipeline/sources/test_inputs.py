import json

import pytest

from pipeline.sources.inputs import InputError, caption_for_span, list_inputs, load_metadata, source_records

EXTS = [".mp4", ".mov"]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    for rel in ["a/one.mp4", "a/deep/two.MOV", "a/notes.txt", "b.mp4", "c.webm"]:
        (tmp_path / rel).write_bytes(b"x")
    return tmp_path


def test_directories_are_walked_for_video_extensions(tree):
    paths, problems = list_inputs([str(tree / "a")], EXTS)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["two.MOV", "one.mp4"]
    assert problems == []


def test_globs_explicit_files_and_dedup(tree):
    paths, _ = list_inputs([str(tree / "*.mp4"), str(tree / "b.mp4"), str(tree / "c.webm")], EXTS)
    # An explicitly named file is taken whatever its extension; the same file twice is listed once.
    assert [p.rsplit("/", 1)[1] for p in paths] == ["b.mp4", "c.webm"]
    recursive, _ = list_inputs([str(tree / "**" / "*.mp4")], EXTS)
    assert len(recursive) == 2


def test_missing_inputs_are_reported_not_fatal(tree):
    paths, problems = list_inputs([str(tree / "nope.mp4"), str(tree / "x*.mp4"), str(tree / "b.mp4")], EXTS)
    assert len(paths) == 1
    assert [p["reason"] for p in problems] == ["not_found", "not_found"]
    assert all(p["stage"] == "input" and "nope.mp4" in problems[0]["message"] for p in problems)


def test_metadata_matches_by_path_then_by_unique_name(tree):
    meta = tree / "meta.jsonl"
    meta.write_text(
        json.dumps({"video": "a/one.mp4", "caption": "one"}) + "\n\n"
        + json.dumps({"video": "/elsewhere/b.mp4", "shots": [{"start_s": 0, "end_s": 2, "caption": "bee"}]}) + "\n"
    )
    entries = load_metadata(str(meta))
    records = source_records([str(tree / "a" / "one.mp4"), str(tree / "b.mp4"), str(tree / "c.webm")], entries)
    assert [r.meta.get("input_metadata", {}).get("caption") for r in records] == ["one", None, None]
    assert records[1].meta["input_metadata"]["shots"][0]["caption"] == "bee"
    assert "input_metadata" not in records[2].meta


def test_metadata_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"video": "a.mp4"}\n{not json\n')
    with pytest.raises(InputError, match="m.jsonl, line 2"):
        load_metadata(str(bad))
    bad.write_text('{"caption": "no video"}\n')
    with pytest.raises(InputError, match="line 1: expected an object with a 'video' path"):
        load_metadata(str(bad))
    bad.write_text('{"video": "a.mp4", "shots": [{"start_s": 0, "caption": "no end"}]}\n')
    with pytest.raises(InputError, match="line 1: each shot needs numeric start_s and end_s"):
        load_metadata(str(bad))
    with pytest.raises(InputError, match="cannot read"):
        load_metadata(str(tmp_path / "missing.jsonl"))


def test_caption_for_span_prefers_the_most_overlapping_shot():
    entry = {"caption": "whole",
             "shots": [{"start_s": 0, "end_s": 3, "caption": "A"}, {"start_s": 3, "end_s": 9, "caption": "B"}]}
    assert caption_for_span(entry, 2.5, 6.0) == {"text": "B", "source": "metadata"}
    assert caption_for_span(entry, 0.0, 2.0)["text"] == "A"
    assert caption_for_span(entry, 20.0, 22.0)["text"] == "whole"
    assert caption_for_span(None, 0, 1) is None


def test_inputs_in_object_storage_by_prefix_object_and_pattern(s3_server):
    from pipeline.core.storage import open_storage
    from pipeline.sources.inputs import iter_inputs

    s3_server.create_bucket("inputs-test")
    store = open_storage("s3://inputs-test/corpus")
    for rel in ("a/one.mp4", "a/two.MOV", "a/notes.txt", "b/three.mp4"):
        store.write_bytes(rel, b"x" * 10)
    problems: list[dict] = []
    found = list(iter_inputs(["s3://inputs-test/corpus/a", "s3://inputs-test/corpus/b/three.mp4",
                              "s3://inputs-test/corpus/*.mp4", "s3://inputs-test/nothing/"], EXTS, problems))
    uris = [e.uri for e in found]
    # each input once, in listing order: the prefix walk keeps video extensions (any case), the named object and
    # the pattern add nothing new
    assert uris == ["s3://inputs-test/corpus/a/one.mp4", "s3://inputs-test/corpus/a/two.MOV",
                    "s3://inputs-test/corpus/b/three.mp4"]
    assert all(e.size == 10 and e.mtime_ns > 0 for e in found)
    assert [p["source"] for p in problems] == ["s3://inputs-test/nothing/"]
    records = source_records(found, {})
    assert records[0].source_path == uris[0] and records[0].meta["source"]["size"] == 10


HOSTILE_LINES = {
    "holds a NUL byte": json.dumps({"video": "a\x00b.mp4"}),
    "cannot be resolved": json.dumps({"video": "loop_a/x.mp4"}),
    "nested deeper than": '{"video": "a.mp4", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "'shots' is a JSON int, not a list": json.dumps({"video": "a.mp4", "shots": 5}),
}


@pytest.mark.parametrize("problem", sorted(HOSTILE_LINES))
def test_hostile_metadata_lines_are_clear_errors_naming_file_and_line(tmp_path, problem):
    """Each of these raised a traceback (ValueError, RuntimeError, RecursionError, TypeError), not an InputError."""
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"video": "a.mp4"}) + "\n" + HOSTILE_LINES[problem] + "\n")
    with pytest.raises(InputError, match=f"m.jsonl, line 2: .*{problem}"):
        load_metadata(str(meta))


def test_an_unreadable_metadata_file_is_a_clear_error(tmp_path):
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    with pytest.raises(InputError, match="loop.jsonl: cannot read it"):
        load_metadata(str(tmp_path / "loop.jsonl"))
    with pytest.raises(InputError, match="cannot read it"):
        load_metadata(str(tmp_path / "nul\x00.jsonl"))
