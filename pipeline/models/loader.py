"""The one way a stage gets a model: from a local directory, the team's own object storage (s3://, gs://) or a hub id
named in config, never downloaded from a model hub at run time, with safetensors preferred, `trust_remote_code` off
unless the config turns it on for that model, and `torch.load(weights_only=True)` for any raw checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.core.config import ModelSpec
from pipeline.core.storage import is_remote, name, open_storage

DTYPES = ("float32", "float16", "bfloat16")


class ModelUnavailable(RuntimeError):
    """The model is not on this machine; the message says where we looked and how to fetch it."""


def resolve_model_dir(spec: ModelSpec, role: str) -> Path:
    """The local directory holding `spec`'s files. Looks at the path itself, then the hub cache, offline only. An
    s3:// or gs:// path is copied once per machine into the model cache (`cached_model_dir`)."""
    if is_remote(spec.path):
        return cached_model_dir(spec.path, role)
    local = Path(os.path.expanduser(spec.path))
    if local.is_dir():
        return local
    looked = [f"{local.resolve()} (no such directory)"]
    if _looks_like_hub_id(spec.path):
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(spec.path, revision=spec.revision, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            looked.append(f"the Hugging Face cache {constants.HF_HUB_CACHE}")
        fetch = f"hf download {spec.path} --local-dir models/{spec.path.split('/')[-1]}"
    else:
        fetch = "copy the model directory there, or name a hub id and fetch it with `hf download ID --local-dir DIR`"
    raise ModelUnavailable(
        f"{role} model '{spec.path}' is not available on this machine (models are never downloaded during a run). "
        f"Looked in: {'; '.join(looked)}. Fetch it on a machine with internet: {fetch}, then point the config "
        f"at that directory."
    )


# Model directories from object storage land here, one folder per URI; S2V_MODEL_CACHE moves it (a node's fast disk).
MODEL_CACHE = Path(os.environ.get("S2V_MODEL_CACHE", "~/.cache/s2v/models")).expanduser()


def cached_model_dir(uri: str, role: str) -> Path:
    """A local copy of the model directory at `uri`, made once per machine: downloaded into a temporary folder and
    renamed into place when complete, so concurrent workers on one node and a download cut short never leave a
    half directory that looks whole (the loser of a race drops its copy). Later calls reuse it without a request."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = MODEL_CACHE / f"{name(uri) or 'model'}-{digest}"
    if target.is_dir():
        return target
    store = open_storage(uri, f"{role}.model.path")
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=MODEL_CACHE))
    try:
        count = 0
        for entry in store.list():
            store.download(entry.rel, tmp / entry.rel)
            count += 1
        if not count:
            raise ModelUnavailable(f"{role} model '{uri}': nothing is stored under that prefix")
        try:
            os.rename(tmp, target)
        except OSError:  # another worker finished first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def torch_device(spec: ModelSpec) -> str:
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


def load_pretrained(model_cls, spec: ModelSpec, role: str, **kwargs):
    """`model_cls.from_pretrained` on the resolved local directory, offline, in eval mode on the spec's device."""
    path = resolve_model_dir(spec, role)
    has_safetensors = any(path.glob("*.safetensors"))
    model = model_cls.from_pretrained(
        str(path),
        dtype=torch_dtype(spec.dtype),
        trust_remote_code=spec.trust_remote_code,
        local_files_only=True,
        use_safetensors=True if has_safetensors else None,
        **kwargs,
    )
    return model.to(torch_device(spec)).eval()


def load_processor(processor_cls, spec: ModelSpec, role: str, **kwargs):
    """Tokenizers/processors from the same resolved directory as their model."""
    path = resolve_model_dir(spec, role)
    return processor_cls.from_pretrained(
        str(path), trust_remote_code=spec.trust_remote_code, local_files_only=True, **kwargs
    )


def load_state_dict(path: str | Path) -> dict:
    """A raw checkpoint: safetensors when it is one, else torch.load with weights_only=True (no pickled code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_pipeline(pipeline_cls, spec: ModelSpec, role: str, **kwargs):
    """A diffusers `pipeline_cls.from_pretrained` on the resolved local directory (the `save_pretrained` layout:
    `model_index.json` plus one folder per component), offline, on the spec's device and dtype.

    No `trust_remote_code` is passed: the caller names the pipeline class, so no code from the directory is needed,
    and diffusers only consults that flag for custom pipelines."""
    path = resolve_model_dir(spec, role)
    if not (path / "model_index.json").is_file():
        raise ModelUnavailable(
            f"{role} model '{spec.path}': {path} has no model_index.json; a diffusers pipeline directory "
            f"(as written by save_pretrained or `hf download`) holds model_index.json and one folder per component"
        )
    # Each component keeps its weights in its own subfolder, hence rglob rather than glob.
    has_safetensors = any(path.rglob("*.safetensors"))
    pipeline = pipeline_cls.from_pretrained(
        str(path),
        dtype=torch_dtype(spec.dtype),  # diffusers 0.42 deprecates `torch_dtype` in favour of `dtype`
        local_files_only=True,
        use_safetensors=True if has_safetensors else None,
        **kwargs,
    )
    return pipeline.to(torch_device(spec))
