"""`s2v shards verify` and `s2v shards show` as a user runs them: exit codes, output, files."""

import json
import shutil

from click.testing import CliRunner

from pipeline.cli.main import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_verify_exits_0_on_a_good_run_and_1_with_the_problems(curated_out, tmp_path):
    ok = invoke("shards", "verify", curated_out)
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    broken = tmp_path / "broken"
    shutil.copytree(curated_out, broken)
    shard = broken / json.loads((broken / "index.json").read_text())["shardlist"][0]["url"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    bad = invoke("shards", "verify", broken, "--json")
    assert bad.exit_code == 1
    problems = json.loads(bad.output)["problems"]
    assert problems and any("sha256" in p["what"] or "trunc" in p["what"] for p in problems), problems


def test_show_writes_a_contact_sheet_and_names_a_missing_key(curated_out, tmp_path):
    key = json.loads((curated_out / "index.json").read_text())
    first = next(iter(json.loads(line)["keys"] for line in (curated_out / "ledger.jsonl").read_text().splitlines()
                      if json.loads(line).get("type") == "shard"))[0]
    out = invoke("shards", "show", curated_out, first, "--out", tmp_path / "sheet.png", "--frames", 4)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and key["total_samples"] >= 1
    missing = invoke("shards", "show", curated_out, "no-such-key", "--out", tmp_path / "x.png")
    assert missing.exit_code == 2 and "no-such-key" in missing.output and not (tmp_path / "x.png").exists()
