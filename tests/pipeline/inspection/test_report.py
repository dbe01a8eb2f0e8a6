"""The HTML statistics report: one self-contained file whose plots are real PNGs, on a finished, an empty, a partial
run and several directories together; and what a browser shows of it (Debian's Chromium, headless)."""

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.inspection.report import SECTIONS, THRESHOLD, VALID, write_report
from pipeline.inspection.stats import StatsError, load_run, shard_stats
from pipeline.store.ledger import Ledger
from pipeline.testing.synthetic_runs import synthetic_run, write_config

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])


def images(page: str) -> dict[str, np.ndarray]:
    """alt text -> decoded RGB pixels of every inline image; each must be a PNG."""
    found = {}
    for alt, data in IMG.findall(page):
        raw = base64.b64decode(data, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n", alt
        found[alt] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    return found


def share_near(pixels: np.ndarray, color: np.ndarray, tolerance: int = 12) -> float:
    return float((np.abs(pixels.astype(int) - color).max(axis=-1) <= tolerance).mean())


def has_metrics(out: Path) -> bool:
    """Whether the run's samples carry stats.metrics (another stage may add them): the report then has a section
    more."""
    return any(load_run(out).facts.metric_values())


def check_page(page: str, with_metrics: bool) -> dict[str, np.ndarray]:
    """Self-contained, every section there, one PNG per figure, each a real picture (not one flat colour)."""
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for external in ("<script", "<link", 'src="http', "url(", "@import"):
        assert external not in page, external
    expected = [s for s in SECTIONS if s != "metrics" or with_metrics]
    assert re.findall(r'<section id="([^"]+)">', page) == expected
    pictures = images(page)
    assert len(pictures) == page.count("<img") == len(expected) - 2  # the overview and inputs are tables only
    for alt, pixels in pictures.items():
        assert pixels.shape[0] > 150 and pixels.shape[1] > 400, alt
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, alt
    return pictures


@pytest.fixture(scope="module")
def curated_report(curated_out, tmp_path_factory):
    path = write_report([curated_out], tmp_path_factory.mktemp("report") / "sub" / "report.html")
    return path, path.read_text(encoding="utf-8")


def test_report_on_a_curated_run(curated_out, curated_report):
    path, page = curated_report
    assert path.name == "report.html" and not path.with_name("report.html.tmp").exists()
    stats = shard_stats(curated_out)
    pictures = check_page(page, with_metrics=has_metrics(curated_out))
    overview = page.split('<section id="overview">')[1].split("</section>")[0]
    assert f"<td>{curated_out}</td>" in overview and f"<td>{stats['samples']}</td>" in overview
    # The thresholds are drawn (dashed red) on the filter histograms and on the data-quality metrics' face cosine
    # (the face flags' limits), and the data in blue around them.
    for alt in ("quality filter", "instance filter", "faces", "metrics"):
        assert share_near(pictures[alt], rgb(THRESHOLD["color"]), tolerance=40) > 0.001, alt
        assert share_near(pictures[alt], rgb(VALID)) > 0.005, alt
    for step in stats["funnel"]:
        assert f"<td>{step['stage']}</td><td>{step['unit']}</td><td>{step['in']}</td><td>{step['out']}</td>" in page


def test_report_on_an_empty_run(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_config(out)
    Ledger(out).append({"type": "source", "path": "/x.mp4", "source_id": "x", "size": 1, "mtime_ns": 1,
                                    "duration_s": None, "status": "rejected", "stage": "probe",
                                    "reason": "not_a_video", "samples": [], "clips": [], "errors": []})
    page = write_report([out], tmp_path / "empty.html").read_text()
    pictures = check_page(page, with_metrics=False)
    assert "<p>0 samples" in page and "not_a_video" in page
    assert share_near(pictures["instance filter"], rgb(VALID)) == 0  # nothing to plot: no bars


def test_report_on_a_partial_run(curated_out, tmp_path):
    # A job still writing: a torn ledger line being appended and a shard under its .tmp name.
    out = tmp_path / "partial"
    shutil.copytree(curated_out, out)
    with open(out / "ledger.jsonl", "a") as f:
        f.write('{"type":"shard","shard":"shards/train-000099.tar","nsam')
    shutil.copy(next((out / "shards").glob("*.tar")), out / "shards" / "train-000099.tar.tmp")
    page = write_report([out], tmp_path / "partial.html").read_text()
    check_page(page, with_metrics=has_metrics(out))
    assert "train-000099.tar.tmp is being written" in page
    assert f"<p>{shard_stats(curated_out)['samples']} samples" in page

    # Three of four shards committed: only their samples are in the report.
    run = synthetic_run(tmp_path / "synthetic", range(4), shard_max_samples=5, finished=False)
    lines = (run / "ledger.jsonl").read_text().splitlines()
    (run / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    page = write_report([run], tmp_path / "synthetic.html").read_text()
    check_page(page, with_metrics=False)
    assert "<p>15 samples" in page and "no finished run yet" in page


def test_report_on_two_directories(curated_out, tmp_path):
    other = synthetic_run(tmp_path / "other", range(6), metrics=True, cross=True)
    page = write_report([curated_out, other], tmp_path / "both.html").read_text()
    pictures = check_page(page, with_metrics=True)
    both = [shard_stats(curated_out), shard_stats(other)]
    overview = page.split('<section id="overview">')[1].split("</section>")[0]
    assert overview.count("<tr>") == 1 + 2 + 1  # header, one row per directory, total
    assert f"<td>total</td><td>{sum(s['sources'] for s in both)}</td>" in overview
    assert f"<p>{sum(s['samples'] for s in both)} samples ({both[1]['cross_pairs']['samples']} cross" in page
    assert "face.copy_paste (flag)" in page and "metrics" in pictures
    assert f"other/{other.name[:12]}" in page  # runs are named by their directory


def test_report_needs_an_output_directory(tmp_path):
    with pytest.raises(StatsError, match="no ledger.jsonl"):
        write_report([tmp_path], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_chromium_renders_the_plots(request, tmp_path):
    binary = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium): the headless render of the HTML "
                    "report is not checked here")
    path, _ = request.getfixturevalue("curated_report")  # only now: a skip should not build a curated run
    shot = tmp_path / "shot.png"
    # --no-sandbox: the sandbox refuses to start as root (CI containers); the page has no script to contain.
    proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1200,2400", path.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 20  # not a blank page
    # The plots' blue bars are only in the PNGs: a page whose images did not decode has none of that colour.
    assert share_near(pixels, rgb(VALID)) > 0.01
