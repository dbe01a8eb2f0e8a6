"""The redux stage: a tiny random-init FluxPriorReduxPipeline (SigLIP + Redux projection) and a tiny FluxPipeline
without text encoders, saved with `save_pretrained` and loaded by path through the stage.

Random weights paint noise, so the tests assert what holds for any weights: the references drawn as redux are made
(not redrawn), at the configured size and the crop's aspect, with a whole-image mask, reproducibly under the seed,
and recorded with their backend; and the flow runs the stage only when both models are configured."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import build_config
from pipeline.core.stage import run_stage
from pipeline.testing.clips import clip, consolidate
from stages import build_flow, describe_flow
from stages.redux import Reduxer, working_size
from stages.references import ReferenceCutter


def save_tiny_redux(directory: Path) -> tuple[Path, Path]:
    """(prior directory, base directory). Redux feeds FLUX T5-sized (4096) prompt tokens and a CLIP-sized (768)
    pooled vector (zeros, with no text encoders), so the tiny transformer keeps those two input widths."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxPriorReduxPipeline,
        FluxTransformer2DModel,
    )
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8))
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    prior = FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=processor,
                                   image_embedder=ReduxImageEncoder(redux_dim=32, txt_in_features=4096))
    prior.save_pretrained(directory / "redux")
    latent, blocks = 4, 4
    vae = AutoencoderKL(
        block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=latent, norm_num_groups=4, layers_per_block=1,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent, out_channels=4 * latent, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    base = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    base.save_pretrained(directory / "base")
    return directory / "redux", directory / "base"


@pytest.fixture(scope="module")
def redux_config(tmp_path_factory):
    prior, base = save_tiny_redux(tmp_path_factory.mktemp("redux"))
    return build_config({}, [f"redux.model.path={prior}", f"redux.base_model.path={base}", "redux.steps=2",
                             "redux.size=64", "references.ratio={crop: 0, segment: 0, inpaint: 0, redux: 1}",
                             "grounding.model.path=/unused"])


def test_working_size_keeps_the_aspect_in_multiples():
    assert working_size(120, 60, 64, 16) == (64, 32)
    assert working_size(10, 400, 64, 16) == (16, 64)  # never below one multiple


def test_redux_references_are_generated_not_redrawn(redux_config):
    record = consolidate(clip())
    run_stage(ReferenceCutter(redux_config), [record])
    refs = record.meta["references"]
    assert [r["variant"] for r in refs] == ["redux", "redux"] and all(r["pending"] for r in refs)
    crops = [record.blobs[f"ref{r['k']}"].copy() for r in refs]
    stage = Reduxer(redux_config)
    stage.setup()
    [out] = run_stage(stage, [record])
    assert not out.errors
    for ref, crop in zip(refs, crops):
        image, mask = out.blobs[f"ref{ref['k']}"], out.blobs[f"refmask{ref['k']}"]
        assert image.dtype == np.uint8 and image.shape == (*working_size(*crop.shape[:2], 64, 16), 3)
        assert mask.shape == image.shape[:2] and mask.all()
        assert ref["pending"] is False and ref["redux_backend"].startswith("flux-redux: diffusers")
    assert "redux" in out.meta["provenance"]
    # Reproducible: the seed depends on the clip and the entity, not on the run.
    again = consolidate(clip())
    run_stage(ReferenceCutter(redux_config), [again])
    run_stage(stage, [again])
    for ref in refs:
        np.testing.assert_array_equal(again.blobs[f"ref{ref['k']}"], out.blobs[f"ref{ref['k']}"])


def test_the_flow_runs_redux_only_with_both_models(redux_config):
    names = [cls.name for cls in build_flow(redux_config)]
    assert names.index("references") < names.index("redux") < names.index("inpainting")
    assert "references.redux" not in describe_flow(redux_config)["off"]
    plain = build_config({}, ["grounding.model.path=/unused"])
    assert "redux" not in [cls.name for cls in build_flow(plain)]
    assert "references.redux" in describe_flow(plain)["off"]
    generative = build_config({}, ["grounding.model.path=/unused", "inpaint.backend=flux-fill",
                                   "inpaint.model.path=/x"])
    assert "inpainting" not in describe_flow(generative)["substitutes"]
    with pytest.raises(Exception, match="both model"):
        build_config({}, ["redux.model.path=/x"])
