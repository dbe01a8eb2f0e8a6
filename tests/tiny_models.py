"""Tiny random-init models of every production model class, saved with their libraries' own save functions into
one directory each: for tests that run several model stages together and for benchmarks/model_stages.py.
The builders themselves live next to each stage's tests; this module only calls them.

Loaded by file path (`load_module`): pytest's importlib mode gives tests/ no package to import from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

STAGE_TESTS = Path(__file__).resolve().parent / "stages"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_models(root: Path) -> dict[str, Path]:
    """{"qwen", "gdino", "sam", "clip"} -> model directories under root."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    qwen = load_module(STAGE_TESTS / "tiny_qwen.py").build_tiny_qwen(root / "qwen")
    (root / "gdino").mkdir()
    load_module(STAGE_TESTS / "test_grounding.py").save_tiny_grounding_dino(root / "gdino")
    segmentation = load_module(STAGE_TESTS / "test_segmentation.py")
    (root / "sam").mkdir()
    torch.manual_seed(0)
    sam = segmentation.build_sam(segmentation.SamArchitecture(**segmentation.TINY_SAM))
    save_file(sam.state_dict(), str(root / "sam" / "sam.safetensors"))
    (root / "sam" / "sam_config.json").write_text(json.dumps(segmentation.TINY_SAM))
    clip = load_module(STAGE_TESTS / "test_clip_score.py")
    (root / "clip").mkdir()
    save_file(open_clip.CLIP(**clip.TINY_CLIP).state_dict(), str(root / "clip" / "open_clip_model.safetensors"))
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip.TINY_CLIP}))
    return {"qwen": qwen, "gdino": root / "gdino", "sam": root / "sam", "clip": root / "clip"}
