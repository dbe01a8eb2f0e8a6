"""Fill masked regions of a clip's images: a clean background plate per clip, and `inpaint` reference images whose
subject's surroundings are erased.

Why: subject-to-video training wants references that carry the subject and nothing of the frame it was cut from
(else the model learns to copy the frame), and a background image with every subject removed. Kaleido and LumosX
build both with FLUX inpainting (FLUX.1-Fill). Two backends write the same record format:

- `flux-fill`: diffusers `FluxFillPipeline` from `inpaint.model` (a FLUX.1-Fill-dev directory), with the
  configured prompt, steps, guidance and seed. The image is processed with its long side at most `inpaint.max_side`
  and both sides multiples of the pipeline's `2 * vae_scale_factor` (16 for FLUX), then resized back.
- `opencv` (default): classical `cv2.inpaint` (Telea) at a reduced size. It propagates the colours around a hole
  inward, so large holes come out smooth and textureless: the honest CPU fallback, recorded as `opencv-telea` in
  `meta["background"]["backend"]` and in the provenance so that such samples can be told apart later.

Either way only the pixels inside the fill mask change; every other pixel is the input's, byte for byte.

Record fields read: `blobs["keyframes"]` (uint8 (K, H, W, 3)), `meta["detections"]` (`keyframe`, `box`, `part`),
`blobs["masks"]` (uint8 (N, H, W), one per detection; optional: without it the boxes are filled as rectangles),
`meta["references"]` entries `{"k", "variant", "pending", ...}` with `blobs["ref{k}"]` (uint8 (h, w, 3) crop) and
`blobs["refmask{k}"]` (uint8 (h, w), 1 = the subject).

Record fields written: `blobs["background"]` (uint8 (H, W, 3)) and `meta["background"]` = `{"keyframe",
"backend", "mask_area" (fraction of the keyframe filled), "dilate_px"}` when `background.enabled`; for each pending
`inpaint` reference, `blobs["ref{k}"]` replaced by the filled crop, `pending` set to false and `inpaint_backend` set
to the backend's description; `meta["provenance"]["inpainting"]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.core.config import InpaintConfig, RunConfig
from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.loader import ModelUnavailable, load_pipeline, torch_device

# Telea works on the whole hole at once and its cost grows with the hole's pixel count; at 512 px a 640x360 plate
# with a large mask fills in a few hundredths of a second, and Telea's smooth output loses nothing by the upscale.
OPENCV_MAX_SIDE = 512


def _check_pair(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mask as bool (True = to be generated), after checking it fits the image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image's {image.shape[:2]}")
    return mask.astype(bool)


def _cover(hole: np.ndarray, width: int, height: int) -> np.ndarray:
    """`hole` resized to (width, height), True wherever any part of a pixel was in the hole: a pixel that is half
    foreground must be filled, not used as a known colour to fill from."""
    return cv2.resize(hole.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0


def _paste(image: np.ndarray, filled: np.ndarray, hole: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[hole] = filled[hole]
    return out


class OpenCvFill:
    """`cv2.inpaint` with Telea's method, at a long side of at most `max_side` (and at most 512)."""

    name = "opencv-telea"

    def __init__(self, max_side: int = OPENCV_MAX_SIDE, radius: int = 3):
        self.max_side = min(OPENCV_MAX_SIDE, max_side)
        self.radius = radius
        self.description = (f"opencv-telea: opencv {cv2.__version__} cv2.inpaint INPAINT_TELEA radius={radius} "
                            f"at long side <= {self.max_side} px, upscaled and pasted inside the mask "
                            f"(classical CPU fallback, not a generative fill)")

    def fill(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) with the pixels where `mask` (H, W) is nonzero filled from their surroundings; the
        other pixels are `image`'s exactly."""
        hole = _check_pair(image, mask)
        if not hole.any():
            return image.copy()
        if hole.all():
            # Nothing known to propagate from (Telea would hand the input back unchanged, foreground included).
            return np.full_like(image, 128)
        height, width = hole.shape
        scale = min(1.0, self.max_side / max(height, width))
        image = np.ascontiguousarray(image)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small_hole = _cover(hole, *size) if scale < 1 else hole
        if scale < 1 and not small_hole.all():
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            filled = cv2.inpaint(small, small_hole.astype(np.uint8), self.radius, cv2.INPAINT_TELEA)
            filled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR)
        else:  # small already, or the known pixels are too thin to survive the downscale
            filled = cv2.inpaint(image, hole.astype(np.uint8), self.radius, cv2.INPAINT_TELEA)
        return _paste(image, filled, hole)

    def fill_many(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return [self.fill(image, mask) for image, mask in items]


class FluxFill:
    """diffusers `FluxFillPipeline`: images of the same working size are filled together, up to `max_batch` at
    a time; each image gets its own generator seeded with `seed`, so a result does not depend on its batch."""

    name = "flux-fill"

    def __init__(self, pipe, prompt: str, steps: int, guidance_scale: float, max_side: int, seed: int,
                 description: str, max_batch: int = 4):
        self.pipe = pipe
        self.prompt = prompt
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.max_side = max_side
        self.seed = seed
        self.description = description
        self.max_batch = max_batch
        # FLUX packs 2x2 latent patches, so each side must be a multiple of twice the VAE's downscale factor.
        self.multiple = pipe.vae_scale_factor * 2

    @classmethod
    def from_config(cls, cfg: InpaintConfig, role: str = "inpainting") -> FluxFill:
        import diffusers
        from diffusers import FluxFillPipeline

        spec = cfg.model
        if spec is None:
            raise ModelUnavailable(f"{role}: backend flux-fill needs inpaint.model.path (a FLUX.1-Fill directory)")
        pipe = load_pipeline(FluxFillPipeline, spec, role)
        # A FLUX.1-dev (text-to-image) directory loads into FluxFillPipeline without complaint and then fails on
        # every image with a shape error: the Fill transformer also takes the masked image and the mask.
        latent = pipe.vae.config.latent_channels
        expected = 4 * latent * 2 + pipe.vae_scale_factor ** 2 * 4
        got = pipe.transformer.config.in_channels
        if got != expected:
            raise ModelUnavailable(
                f"{role} model '{spec.path}' is not a FLUX Fill model: its transformer takes {got} input channels, "
                f"a Fill transformer with this VAE takes {expected} (latents, masked-image latents and the mask); "
                f"use FLUX.1-Fill-dev"
            )
        pipe.set_progress_bar_config(disable=True)
        description = (f"flux-fill: diffusers {diffusers.__version__} FluxFillPipeline {spec.path} steps={cfg.steps} "
                       f"guidance_scale={cfg.guidance_scale} max_side={cfg.max_side} seed={cfg.seed} "
                       f"prompt={cfg.prompt!r} dtype={spec.dtype} device={torch_device(spec)}")
        return cls(pipe, cfg.prompt, cfg.steps, cfg.guidance_scale, cfg.max_side, cfg.seed, description)

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the model sees: long side at most `max_side`, both multiples of `self.multiple`."""
        m = self.multiple
        scale = min(1.0, self.max_side / max(height, width))
        top = max(m, self.max_side // m * m)
        return tuple(min(top, max(m, round(side * scale / m) * m)) for side in (height, width))

    def fill(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Same contract as `OpenCvFill.fill`."""
        return self.fill_many([(image, mask)])[0]

    def fill_many(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """`fill` for each (image, mask) pair, batched by working size."""
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        holes = []
        for i, (image, mask) in enumerate(items):
            hole = _check_pair(image, mask)
            holes.append(hole)
            if hole.any():
                groups.setdefault(self.working_size(*hole.shape), []).append(i)
            else:
                out[i] = image.copy()
        for (height, width), indices in groups.items():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                filled = self._run(height, width, [items[i][0] for i in chunk], [holes[i] for i in chunk])
                for i, result in zip(chunk, filled):
                    image = items[i][0]
                    back = cv2.resize(result, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
                    out[i] = _paste(image, back, holes[i])
        return out

    def _run(self, height: int, width: int, images: list[np.ndarray], holes: list[np.ndarray]) -> list[np.ndarray]:
        import torch
        from PIL import Image

        pil_images, pil_masks = [], []
        for image, hole in zip(images, holes):
            shrink = height * width <= image.shape[0] * image.shape[1]
            resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
            pil_images.append(Image.fromarray(resized))
            pil_masks.append(Image.fromarray(_cover(hole, width, height).astype(np.uint8) * 255))
        # CPU generators: the same noise on any device, so a plate is reproducible across machines.
        generators = [torch.Generator().manual_seed(self.seed) for _ in images]
        with torch.inference_mode():
            result = self.pipe(
                prompt=[self.prompt] * len(images),
                image=pil_images,
                mask_image=pil_masks,
                height=height,
                width=width,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
                output_type="np",
            ).images
        return [np.clip(np.round(r * 255), 0, 255).astype(np.uint8) for r in result]


@dataclass
class _FillJob:
    blob: str  # where the result goes
    image: np.ndarray
    mask: np.ndarray  # bool, True = to be generated
    reference: dict | None = None  # the meta["references"] entry it completes


@dataclass
class _Plan:
    jobs: list[_FillJob] = field(default_factory=list)
    background: dict | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


class Inpainter(Stage):
    """Background plate and `inpaint` references of each clip record (see the module docstring for the fields).

    A record fails (and only that record) with `no_keyframes` (background enabled but no usable keyframes),
    `bad_mask` (a mask whose shape does not fit its image), `bad_detection` (a box that cannot be filled when no
    masks exist) or `bad_reference` (a pending reference whose crop is missing or not RGB). A reference whose
    subject mask is empty is left as it was, marked `inpaint_skipped`, with a warning.
    """

    name = "inpainting"
    section = "inpaint"  # resources come from config.inpaint.resources

    @property
    def description(self) -> str | None:  # the provenance line (pipeline.core.stage)
        return self.filler.description if getattr(self, "filler", None) is not None else None

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.backend_name = config.inpaint.backend
        self.filler: OpenCvFill | FluxFill | None = None

    @property
    def stateful(self) -> bool:  # FLUX lives in an actor; OpenCV needs no state
        return self.backend_name == "flux-fill"

    def setup(self) -> None:
        if self.filler is not None:
            return
        cfg = self.config.inpaint
        if self.backend_name == "flux-fill":
            self.filler = FluxFill.from_config(cfg, role=self.name)
        else:
            self.filler = OpenCvFill(cfg.max_side)

    def process(self, records: list[Record]) -> list[Record]:
        self.setup()
        plans = [(record, plan) for record in records if (plan := self._plan(record)) is not None]
        # One call for the whole batch, so FLUX can batch images of the same size across records.
        results = iter(self.filler.fill_many([(job.image, job.mask) for _, plan in plans for job in plan.jobs]))
        for record, plan in plans:
            for job in plan.jobs:
                record.blobs[job.blob] = next(results)
                if job.reference is not None:
                    job.reference["pending"] = False
                    job.reference["inpaint_backend"] = self.filler.description
            for reference in plan.skipped:
                reference["pending"] = False
                reference["inpaint_skipped"] = "empty subject mask"
            for message in plan.warnings:
                record.warn(self.name, message)
            if plan.background is not None:
                record.meta["background"] = plan.background
        return records

    def _plan(self, record: Record) -> _Plan | None:
        """What to fill for `record`, without touching it (a retry after a backend error must start clean).
        None after failing the record."""
        plan = _Plan()
        if self.config.background.enabled and not self._plan_background(record, plan):
            return None
        for reference in record.meta.get("references", []):
            if reference.get("variant") != "inpaint" or reference.get("pending") is not True:
                continue
            k = reference.get("k")
            crop, subject = record.blobs.get(f"ref{k}"), record.blobs.get(f"refmask{k}")
            if crop is None or crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
                found = "missing" if crop is None else f"{crop.dtype} {crop.shape}"
                record.fail(self.name, "bad_reference", f"reference {k}: blobs['ref{k}'] must be uint8 (h, w, 3), "
                                                        f"got {found}")
                return None
            if subject is None or subject.shape != crop.shape[:2]:
                found = "missing" if subject is None else str(subject.shape)
                record.fail(self.name, "bad_mask", f"reference {k}: blobs['refmask{k}'] must be (h, w) = "
                                                   f"{crop.shape[:2]} like its crop, got {found}")
                return None
            if not subject.any():
                plan.warnings.append(f"reference {k}: the subject mask is empty; the crop was left as it was")
                plan.skipped.append(reference)
                continue
            # Exactly the outside: the subject's own pixels are kept as cut, its surroundings are generated.
            plan.jobs.append(_FillJob(f"ref{k}", crop, subject == 0, reference))
        return plan

    def _plan_background(self, record: Record, plan: _Plan) -> bool:
        cfg = self.config.background
        keyframes = record.blobs.get("keyframes")
        if (keyframes is None or keyframes.ndim != 4 or len(keyframes) == 0 or keyframes.shape[3] != 3
                or keyframes.dtype != np.uint8):
            found = "none" if keyframes is None else f"{keyframes.dtype} {keyframes.shape}"
            record.fail(self.name, "no_keyframes", f"a background plate needs uint8 (K, H, W, 3) keyframes, "
                                                   f"got {found}")
            return False
        count, height, width, _ = keyframes.shape
        k = cfg.keyframe
        if k >= count:
            k = count // 2
            plan.warnings.append(f"background.keyframe {cfg.keyframe} is past the clip's {count} keyframes; "
                                 f"the middle one ({k}) was used")
        detections = record.meta.get("detections") or []
        chosen = [i for i, d in enumerate(detections) if d.get("keyframe") == k and d.get("part") is None]
        hole = np.zeros((height, width), dtype=bool)
        masks = record.blobs.get("masks")
        if masks is not None:
            if masks.ndim != 3 or masks.shape != (len(detections), height, width):
                record.fail(self.name, "bad_mask", f"blobs['masks'] is {masks.shape}; expected one "
                                                   f"{height}x{width} mask per detection ({len(detections)})")
                return False
            for i in chosen:
                hole |= masks[i] > 0
        else:  # segmentation did not run: the boxes are the best outline there is
            for i in chosen:
                box = detections[i].get("box")
                if not (isinstance(box, (list, tuple)) and len(box) == 4
                        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
                    record.fail(self.name, "bad_detection", f"detection {i}: box {box!r} is not [x0, y0, x1, y1]")
                    return False
                x0, x1 = (min(max(v, 0), width) for v in (math.floor(box[0]), math.ceil(box[2])))
                y0, y1 = (min(max(v, 0), height) for v in (math.floor(box[1]), math.ceil(box[3])))
                hole[y0:y1, x0:x1] = True
        if cfg.dilate_px > 0 and hole.any():
            size = 2 * cfg.dilate_px + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            hole = cv2.dilate(hole.astype(np.uint8), kernel) > 0
        plan.jobs.append(_FillJob("background", keyframes[k], hole))
        plan.background = {"keyframe": k, "backend": self.filler.name,
                           "mask_area": float(hole.mean()), "dilate_px": cfg.dilate_px}
        return True
