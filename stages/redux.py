"""`redux` references (Kaleido): the subject re-imagined by FLUX Redux, for pose and lighting the clip lacks.

FLUX.1-Redux-dev is an image prior: a SigLIP encoder and a projection turn the reference crop into prompt
embeddings that FLUX.1-dev generates from, in place of text. The output is a new picture of the subject, not a
crop of the clip, so a model trained on it cannot copy the clip's pixels. `ReferenceCutter` cuts the crop and
marks the reference `pending`; this stage replaces `blobs["ref{k}"]` by the generated image (RGB, long side
`redux.size`, the crop's aspect), its mask by the whole image (the generated picture is not segmented), and sets
`redux_backend` to what made it. The seed comes from `redux.seed`, the clip key and the entity, so reruns repeat.
A GPU stage: on CPU it only runs with the tiny models of the tests.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.record import Record, clip_rng
from pipeline.core.stage import Stage
from pipeline.models.loader import load_pipeline, torch_device


def working_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """(height, width) with the crop's aspect, the long side `long_side`, both multiples of `multiple`."""
    scale = long_side / max(height, width)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


class Reduxer(Stage):
    name = "redux"
    stateful = True
    section = "redux"  # resources come from config.redux.resources

    def setup(self) -> None:
        import diffusers
        from diffusers import FluxPipeline, FluxPriorReduxPipeline

        cfg = self.config.redux
        self.prior = load_pipeline(FluxPriorReduxPipeline, cfg.model, self.name)
        # Redux's image embeddings stand in for the prompt: FLUX.1-dev's CLIP and T5 are never loaded.
        self.pipe = load_pipeline(FluxPipeline, cfg.base_model, self.name, text_encoder=None, text_encoder_2=None,
                                  tokenizer=None, tokenizer_2=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = torch_device(cfg.base_model)
        # FLUX packs 2x2 latent patches: sides must be multiples of twice the VAE's downscale factor.
        self.multiple = self.pipe.vae_scale_factor * 2
        self.description = (f"flux-redux: diffusers {diffusers.__version__} FluxPriorReduxPipeline {cfg.model.path} + "
                            f"FluxPipeline {cfg.base_model.path} steps={cfg.steps} guidance_scale={cfg.guidance_scale} "
                            f"size={cfg.size} seed={cfg.seed} dtype={cfg.base_model.dtype} device={self.device}")

    def generate(self, crop: np.ndarray, seed: int) -> np.ndarray:
        """One uint8 RGB image of the subject in `crop` (uint8 RGB)."""
        import torch
        from PIL import Image

        cfg = self.config.redux
        height, width = working_size(*crop.shape[:2], cfg.size, self.multiple)
        # The prior sums its outputs over the batch into one prompt, so images go through one at a time.
        prompt = self.prior(image=Image.fromarray(crop))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = self.pipe(prompt_embeds=prompt.prompt_embeds, pooled_prompt_embeds=prompt.pooled_prompt_embeds,
                        height=height, width=width, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                        generator=generator, output_type="np").images[0]
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            for reference in record.meta.get("references", []):
                if reference.get("variant") != "redux" or reference.get("pending") is not True:
                    continue
                k = reference["k"]
                crop = record.blobs.get(f"ref{k}")
                if crop is None or crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
                    found = "missing" if crop is None else f"{crop.dtype} {crop.shape}"
                    record.fail(self.name, "bad_reference", f"reference {k}: blobs['ref{k}'] must be uint8 "
                                                            f"(h, w, 3), got {found}")
                    break
                seed = clip_rng(self.config.redux.seed, record.key, reference["entity"]).randrange(2**31)
                image = self.generate(crop, seed)
                record.blobs[f"ref{k}"] = image
                record.blobs[f"refmask{k}"] = np.ones(image.shape[:2], np.uint8)
                reference["pending"] = False
                reference["redux_backend"] = self.description
        return records
