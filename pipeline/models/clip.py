"""CLIP (open_clip), the one CLIP wrapper of the project: caption alignment, keyframe embeddings, the instance
category check and the sample metrics all ask it."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from pipeline.core.config import ModelSpec
from pipeline.models.loader import ModelUnavailable, resolve_model_dir, torch_device, torch_dtype

PROMPT_TEMPLATE = "a photo of a {}"


# open_clip's precision names; "fp16"/"bf16" is its OpenAI-style mixed precision (LayerNorms stay fp32).
_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# The weight files open_clip's `local-dir:` loader picks up (it prefers *.safetensors).
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth")


class ClipScorer:
    """An open_clip model, its eval preprocessing and tokenizer, loaded once from a local model directory.

    The directory is what open_clip's `local-dir:` schema reads: `open_clip_config.json` ({"model_cfg": ...,
    "preprocess_cfg": ...}) next to one weights file, `open_clip_model.safetensors` preferred. Inputs go through
    the model in chunks of `max_batch`, which bounds peak accelerator memory when a stage batch holds many clips.
    """

    def __init__(self, model, preprocess, tokenizer, embed_dim: int, device: str, dtype, max_batch: int = 256):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.device = device
        self.dtype = dtype  # what the image tower takes: its weights are cast to it when dtype is not float32
        self.max_batch = max_batch

    @classmethod
    def from_spec(cls, spec: ModelSpec, role: str = "clip_score", max_batch: int = 256) -> ClipScorer:
        """Load the model named by `spec`; raise ModelUnavailable when its directory, config or weights are missing."""
        path = resolve_model_dir(spec, role).resolve()
        config_path = path / "open_clip_config.json"
        if not config_path.is_file():
            raise ModelUnavailable(
                f"{role} model '{spec.path}': {path} has no open_clip_config.json; an open_clip model directory "
                f"holds open_clip_config.json and its weights (open_clip_model.safetensors)."
            )
        # open_clip only logs a warning and random-inits when the config has no weights beside it: refuse instead,
        # a random CLIP would score every clip with confident noise.
        if not any(any(path.glob(pattern)) for pattern in _WEIGHT_GLOBS):
            raise ModelUnavailable(
                f"{role} model '{spec.path}': {path} has open_clip_config.json but no weights file "
                f"({', '.join(_WEIGHT_GLOBS)}); copy open_clip_model.safetensors there."
            )
        import open_clip

        device = torch_device(spec)
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", precision=_PRECISION[spec.dtype], device=device
        )
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        embed_dim = int(json.loads(config_path.read_text())["model_cfg"]["embed_dim"])
        return cls(model.eval(), preprocess, tokenizer, embed_dim, device, torch_dtype(spec.dtype), max_batch)

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings of N uint8 RGB images (H, W, 3), any size (the model's own resize
        and centre crop apply)."""
        import torch
        from PIL import Image

        out = [np.zeros((0, self.embed_dim), np.float32)]
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            for image in chunk:
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
            pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in chunk])
            pixels = pixels.to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                out.append(_unit(self.model.encode_image(pixels)))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings of N texts (truncated to the model's context length)."""
        import torch

        out = [np.zeros((0, self.embed_dim), np.float32)]
        for start in range(0, len(texts), self.max_batch):
            tokens = self.tokenizer(list(texts[start : start + self.max_batch])).to(self.device)
            with torch.inference_mode():
                out.append(_unit(self.model.encode_text(tokens)))
        return np.concatenate(out)

    def category_scores(self, crops: Sequence[np.ndarray], categories: Sequence[str]) -> np.ndarray:
        """(N_crops, N_categories) cosine of each crop with "a photo of a {category}"."""
        prompts = [PROMPT_TEMPLATE.format(category) for category in categories]
        return self.encode_images(crops) @ self.encode_texts(prompts).T

    def alignment(self, frames: Sequence[np.ndarray], caption: str) -> float:
        """Mean cosine of each frame with the caption."""
        return float(np.mean(self.encode_images(frames) @ self.encode_texts([caption])[0]))


def _unit(features) -> np.ndarray:
    # Normalise in float32: bf16 keeps ~3 significant digits, so a bf16 norm is off by up to ~1e-2, and these
    # scores are compared to thresholds.
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()
