"""The guarantees of docs/security.md: a static AST scan of the package sources for calls that would load pickled
data, run text as code or hand a string to a shell, and behavioural checks that names from data (tar members,
sample keys, shard paths, metadata paths) cannot address anything outside their sample or directory."""

from __future__ import annotations

import ast
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from pipeline.cli.main import main
from pipeline.core.config import ModelSpec, build_config, load_config
from pipeline.core.names import UnsafeName, check_key, check_part, shard_path, split_member
from pipeline.inspection.contact_sheet import ContactSheetError, find_sample
from pipeline.inspection.verify import verify
from pipeline.sources.inputs import load_metadata, source_records
from pipeline.store.ledger import Ledger
from pipeline.store.shards import read_shard_samples
from trainer.data import DataConfig, make_loader, resolve_shards

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["pipeline", "stages", "trainer", "taxonomies", "benchmarks"]

# ---------------------------------------------------------------------------------------------------------------
# Static scan

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}  # shelve.open unpickles every value it reads
YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin for every import in the module (`import numpy as np`: np -> numpy)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load" through the module's imports; None for calls on computed objects."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def forbidden_calls(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, what) for every forbidden call in `source`; see docs/security.md for why each is forbidden."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):  # {"trust_remote_code": True} handed on as **kwargs
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_const(value, True):
                    found.append((node.lineno, "trust_remote_code=True"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        module, _, attr = name.rpartition(".")
        if (module.split(".")[0] in PICKLE_MODULES and attr in PICKLE_CALLS) or attr == "read_pickle":
            found.append((node.lineno, f"{name} (unpickling)"))
        elif name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "numpy.load" and _keyword(node, "allow_pickle") is not None \
                and not _is_const(_keyword(node, "allow_pickle"), False):
            found.append((node.lineno, "numpy.load with allow_pickle"))
        elif module == "yaml" and attr in YAML_UNSAFE:
            found.append((node.lineno, f"{name} (not safe_load)"))
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in aliases:
            found.append((node.lineno, f"{node.func.id}()"))
        if _keyword(node, "shell") is not None and not _is_const(_keyword(node, "shell"), False):
            found.append((node.lineno, "shell=True"))
        if _is_const(_keyword(node, "trust_remote_code"), True):
            found.append((node.lineno, "trust_remote_code=True"))
    return sorted(found)


PLANTED = '''
import pickle, yaml, subprocess, joblib
import numpy as np
import torch
from pickle import loads as unpickle
from torch import load as tload
import cloudpickle as cp

a = pickle.load(f)                                  # planted
b = unpickle(data)                                  # planted
c = torch.load(path)                                # planted
d = tload(path, weights_only=False)                 # planted
e = np.load(buf, allow_pickle=True)                 # planted
g = yaml.load(text, Loader=yaml.Loader)             # planted
h = yaml.full_load(text)                            # planted
i = eval("1 + 1")                                   # planted
exec("x = 1")                                       # planted
subprocess.run("ls " + name, shell=True)            # planted
model = Auto.from_pretrained(p, trust_remote_code=True)  # planted
kw = {"trust_remote_code": True}                    # planted
j = joblib.load(path)                               # planted
k = cp.loads(blob)                                  # planted
'''

SAFE = '''
import pickle, yaml, subprocess
import numpy as np
import torch
model.eval()
state = torch.load(path, map_location="cpu", weights_only=True)
rows = np.load(buf, allow_pickle=False)
rows = np.load(buf)
cfg = yaml.safe_load(text)
subprocess.run(["pip", "download", name], capture_output=True)
subprocess.run(["ls"], shell=False)
try:
    pass
except pickle.UnpicklingError:
    pass
spec = Auto.from_pretrained(p, trust_remote_code=spec.trust_remote_code)
'''


def test_the_scan_catches_every_planted_forbidden_call():
    planted = [n for n, line in enumerate(PLANTED.splitlines(), 1) if line.endswith("# planted")]
    assert len(planted) == 14
    assert [line for line, _ in forbidden_calls(PLANTED)] == planted


def test_the_scan_passes_the_safe_forms():
    assert forbidden_calls(SAFE) == []


def test_package_sources_hold_no_forbidden_call():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 40  # the scan really walked the packages
    found = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in files
             for line, what in forbidden_calls(p.read_text(), str(p))]
    assert found == []


# ---------------------------------------------------------------------------------------------------------------
# Names from data


def test_name_checks_accept_the_pipelines_names_and_refuse_paths():
    assert check_key("0a1b2c3d4e5f6a7b-0000012-0000240") and check_key("0a1b2c3d4e5f6a7b-0000012-0000240-x")
    assert split_member("abc-1.ref0.png") == ("abc-1", "ref0.png")
    assert shard_path("/o", "shards/cross-000001.tar") == Path("/o/shards/cross-000001.tar")
    for key in ["../x", "a/b", "", ".hidden", "-rf", "a.b", "/etc/passwd", "a\\b", "a\x00b"]:
        with pytest.raises(UnsafeName):
            check_key(key)
    for part in ["../../etc/passwd", "json/..", "", "png/x", "a..b", "__key__", "__url__"]:  # _: a reader's own
        with pytest.raises(UnsafeName):
            check_part(part)
    for rel in ["../outside.tar", "shards/../../x.tar", "/etc/x.tar", "shards/a/b.tar", "shards/.tar", "x.tar"]:
        with pytest.raises(UnsafeName):
            shard_path("/o", rel)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member", ["../../etc/passwd", "k1/../../x.json", "sub/k1.json"])
def test_a_shard_with_a_path_as_member_name_is_refused(tmp_path, member):
    path = _tar(tmp_path / "s.tar", {"k1.json": b"{}", member: b"secret"})
    with pytest.raises(UnsafeName, match="refusing"):
        read_shard_samples(path)


def _run_dir(tmp_path: Path, url: str) -> Path:
    """An output directory whose index.json lists `url`; a readable shard lies just outside it."""
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    _tar(tmp_path / "outside.tar", {"k1.json": json.dumps({"key": "k1"}).encode(), "k1.mp4": b"x"})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "total_samples": 1,
             "shardlist": [{"url": url, "nsamples": 1, "filesize": 10, "sha256": "0" * 64}]}
    (out / "index.json").write_text(json.dumps(index))
    return out


def test_shards_show_refuses_a_key_that_is_a_path(tmp_path):
    out = _run_dir(tmp_path, "shards/train-000000.tar")
    result = CliRunner().invoke(main, ["shards", "show", str(out), "../x", "--out", str(tmp_path / "sheet.png")])
    assert result.exit_code != 0 and "not a sample key" in result.output
    assert not (tmp_path / "sheet.png").exists()


def test_an_index_pointing_outside_the_run_is_never_opened(tmp_path, caplog):
    out = _run_dir(tmp_path, "../outside.tar")
    with pytest.raises(ContactSheetError, match="not shards/NAME.tar"):
        find_sample(out, "k1")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        assert resolve_shards(out) == []  # the trainer leaves the entry out, and says so
    assert "'../outside.tar' is not shards/NAME.tar" in caplog.text
    problems = verify(out)
    assert [(p.what, p.shard) for p in problems if p.shard == "../outside.tar"] == [("bad_index", "../outside.tar")]


def test_a_ledger_line_cannot_make_recovery_delete_outside_shards(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    Ledger(out).append({"type": "shard", "shard": "../victim.txt", "keys": ["k1"], "sources": []})
    with pytest.raises(UnsafeName):
        Ledger(out).recover()  # the shard commits no source, so recovery would remove it
    assert victim.read_text() == "keep me"


def test_the_trainer_skips_samples_with_path_keys_or_path_references(tmp_path, caplog):
    from pipeline.testing import synthetic_shards as synthetic
    good = synthetic.synthetic_sample(1, 1, 0, 20, (96, 64))
    members = {f"{good['__key__']}.{ext}": data for ext, data in good.items() if not ext.startswith("__")}
    # A sample whose KEY.json names a reference member that is a path.
    meta = json.loads(good["json"])
    meta["entities"][0]["references"][0]["file"] = "../../etc/passwd"
    members.update({"bad-0000000-0000019.json": json.dumps(meta).encode(), "bad-0000000-0000019.mp4": good["mp4"]})
    shard = _tar(tmp_path / "train-000000.tar", members)
    # A member whose key is a path (it would name an embedding-cache file outside the cache directory): that tar is
    # not one of ours from there on.
    evil = _tar(tmp_path / "train-000001.tar", {f"../../evil.{ext}": data for ext, data in good.items()
                                                 if not ext.startswith("__")})
    cfg = DataConfig(shards=[str(shard), str(evil)], buckets=[(9, 64, 112)], epochs=1, batch_size=1, shuffle_buffer=0,
                     num_workers=0)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        keys = [k for batch in make_loader(cfg) for k in batch["key"]]
    assert keys == [good["__key__"]]
    assert "skipping the rest of shard" in caplog.text and "member '../../evil.mp4' is not KEY.PART" in caplog.text
    assert "'../../etc/passwd', not ref<N>.png" in caplog.text


def test_metadata_paths_only_match_inputs_and_open_nothing(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = videos / "a.mp4"
    clip.write_bytes(b"not read here")
    lines = [{"video": "../../../../etc/passwd", "caption": "escape"},
             {"video": "videos/../../outside/b.mp4", "caption": "elsewhere"},
             {"video": "videos/a.mp4", "caption": "the real one"}]
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text("\n".join(json.dumps(line) for line in lines))
    records = source_records([str(clip)], load_metadata(str(metadata)))
    # The metadata adds no input: only the listed file becomes a source, with its own caption.
    assert [r.source_path for r in records] == [str(clip)]
    assert records[0].meta["input_metadata"]["caption"] == "the real one"


# ---------------------------------------------------------------------------------------------------------------
# Remote code


def _model_specs(node, where=""):
    if isinstance(node, ModelSpec):
        yield where, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _model_specs(getattr(node, name), f"{where}.{name}".lstrip("."))


def test_trust_remote_code_is_off_unless_the_config_turns_it_on_for_that_model():
    sets = [f"{section}.model.path=/models/{section}" for section in ("caption", "entities", "clip_score")]
    config = build_config({}, sets)
    specs = dict(_model_specs(config))
    assert {"caption.model", "entities.model", "clip_score.model"} <= set(specs)
    assert not any(spec.trust_remote_code for spec in specs.values())
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        if "train" not in recipe.name:
            assert not any(s.trust_remote_code for _, s in _model_specs(load_config(recipe, []))), recipe.name
    config = build_config({}, [*sets, "caption.model.trust_remote_code=true"])
    assert {where for where, spec in _model_specs(config) if spec.trust_remote_code} == {"caption.model"}
