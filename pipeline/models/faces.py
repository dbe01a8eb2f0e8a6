"""Face backends: detection, 5 landmarks, head pose and an L2-normalised identity embedding per face, behind one
interface (`detect(rgb) -> [FoundFace]`). The faces stage, the offline grounding stand-in and the tracking stage use
them; `load_face_backend` builds the configured one.

- `dlib` (default; its real weights ship in the `face_recognition_models` package, so it runs offline anywhere):
  HOG frontal-face detector, 68-point landmarks, ResNet face descriptor (128-d).
- `insightface`: a buffalo_l-style directory (SCRFD detector with 5 keypoints + ArcFace recognizer, 512-d),
  loaded from config through `pipeline.models.loader.resolve_model_dir`, as OpenS2V-Nexus and Kaleido use it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.boxes import clip_box
from pipeline.core.config import FacesConfig
from pipeline.models.loader import ModelUnavailable, resolve_model_dir

# Landmark order for both backends (insightface's and ArcFace's 5-point order), in image terms for a face that
# looks at the camera: the eye on the image's left (the subject's right eye), the eye on the image's right, the nose
# tip, the mouth corner on the image's left, the mouth corner on the image's right.
LANDMARK_NAMES = ("eye_right", "eye_left", "nose", "mouth_right", "mouth_left")

# ArcFace's 112x112 alignment template: where those 5 points sit on an upright frontal face. It is the frontal
# reference insightface aligns every face to, so it doubles as the x/y of the 5-point pose model below.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

# 3D points for head pose, in the camera's axes for a face that looks straight into it (x right, y down, z away
# from the camera), so a frontal face has rotation identity.
# - 5 points (insightface keypoints): x/y = the ArcFace template centred on the eye midpoint (units: template px,
#   inter-ocular distance 35.2); depth from the generic face below, in inter-ocular units: the nose tip sits
#   0.43 IOD in front of the eyes, the mouth corners in the eye plane. A face whose keypoints match the template
#   therefore has yaw = pitch = roll = 0 by construction.
POSE_MODEL_5 = np.column_stack(
    [ARCFACE_TEMPLATE - ARCFACE_TEMPLATE[:2].mean(axis=0), [0.0, 0.0, -15.1, 0.0, 0.0]]
)
# - 6 points picked from dlib's 68 (nose tip 30, chin 8, outer eye corners 36/45, mouth corners 48/54) with the
#   widely used generic model of those points (S. Mallick, "Head Pose Estimation using OpenCV and Dlib",
#   learnopencv 2016), axes flipped to y down / z away. dlib's 68-point mouth corners sit much higher relative to
#   the eyes than the ArcFace template's (0.85 vs 1.16 IOD on skimage's smiling astronaut), so the 5-point model
#   above reads her frontal face as pitch -39; this one reads -13 (yaw +3 with either): the chin pins pitch far
#   better than mouth corners that move with expression.
DLIB_POSE_POINTS = [30, 8, 36, 45, 48, 54]
POSE_MODEL_DLIB = np.array(
    [[0.0, 0.0, 0.0], [0.0, 330.0, 65.0], [-225.0, -170.0, 135.0], [225.0, -170.0, 135.0],
     [-150.0, 150.0, 125.0], [150.0, 150.0, 125.0]]
)


def head_pose(points: np.ndarray, model: np.ndarray, width: int, height: int) -> tuple[float, float, float] | None:
    """(yaw, pitch, roll) in degrees of a face whose landmarks `points` correspond to the 3D `model`.

    Angles are relative to the line of sight from the camera to the face, so a face at the top of the frame that
    looks into the lens is frontal. yaw > 0: the face turns toward the image's right (the subject's left);
    pitch > 0: the face looks up; roll > 0: the face turns clockwise in the image. The camera is unknown: focal
    length = image width (about a 53 degree horizontal field of view), principal point at the centre.
    None when the pose cannot be solved.
    """
    camera = np.array([[width, 0.0, width / 2.0], [0.0, width, height / 2.0], [0.0, 0.0, 1.0]])
    # SQPnP: globally optimal and works from 3 points; the default iterative solver needs 6 non-coplanar points
    # to initialise and can settle in a mirrored minimum on 5.
    ok, rvec, tvec = cv2.solvePnP(model.astype(np.float64), points.astype(np.float64), camera, None,
                                  flags=cv2.SOLVEPNP_SQPNP)
    if not ok or not np.all(np.isfinite(tvec)) or tvec[2, 0] <= 0:
        return None
    rotation, _ = cv2.Rodrigues(rvec)
    rotation = _rotation_onto(tvec.ravel()).T @ rotation
    # Z-Y-X (roll-yaw-pitch) decomposition of rotation = Rz(roll) @ Ry(a) @ Rx(b).
    a = math.degrees(math.atan2(-rotation[2, 0], math.hypot(rotation[0, 0], rotation[1, 0])))
    b = math.degrees(math.atan2(rotation[2, 1], rotation[2, 2]))
    roll = math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))
    # Ry(a > 0) swings the nose (at -z) toward -x, the image's left; Rx(b > 0) swings it toward +y, down.
    return -a, -b, roll


def _rotation_onto(direction: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the optical axis (0, 0, 1) onto `direction`."""
    d = direction / np.linalg.norm(direction)
    axis = np.cross([0.0, 0.0, 1.0], d)
    s = np.linalg.norm(axis)
    if s < 1e-12:
        return np.eye(3)
    rvec = axis / s * math.atan2(s, d[2])
    return cv2.Rodrigues(rvec)[0]


# dlib's HOG detector returns an SVM margin, not a probability: 0 is its trained operating point, real faces of
# 80 px and more usually score 0.8-3, and margins in [0, 0.5] are mostly clutter or glimpses of half-profiles
# (on skimage's photos: the astronaut's suit fabric when mirrored at 0.03, the cameraman's three-quarter face
# at 0.04). The logistic below puts margin 0.5 at score 0.5, so faces.min_score reads the same way for both
# backends (insightface's det_score: ~0.5 = borderline, 0.65 = OpenS2V's cut): margin 1 -> 0.73, 1.5 -> 0.88.
DLIB_MARGIN_AT_HALF = 0.5
DLIB_MARGIN_SLOPE = 2.0
# Boxes below this margin were all clutter on skimage's photos; dlib is never asked for weaker ones, so a min_score
# under dlib_score(-1.0) = 0.05 acts as 0.05.
DLIB_MIN_MARGIN = -1.0


def dlib_score(margin: float) -> float:
    """Map a dlib HOG detection margin to [0, 1] (see DLIB_MARGIN_AT_HALF)."""
    return 1.0 / (1.0 + math.exp(-DLIB_MARGIN_SLOPE * (margin - DLIB_MARGIN_AT_HALF)))


def dlib_margin(score: float) -> float:
    """Inverse of `dlib_score`: the margin a score threshold corresponds to (clamped at DLIB_MIN_MARGIN)."""
    if score <= 0.0:
        return DLIB_MIN_MARGIN
    if score >= 1.0:
        return math.inf
    return max(DLIB_MIN_MARGIN, DLIB_MARGIN_AT_HALF + math.log(score / (1.0 - score)) / DLIB_MARGIN_SLOPE)


@dataclass
class FoundFace:
    """One face a backend kept (it already passed min_score and min_face_px)."""

    box: list[int]
    score: float
    landmarks: np.ndarray  # (5, 2) float, LANDMARK_NAMES order
    pose: tuple[float, float, float] | None
    embedding: np.ndarray  # (D,) float32, unit norm


def box_size(box: list[int]) -> int:
    """Short side of a box in pixels: the size faces.min_face_px is compared with."""
    return min(box[2] - box[0], box[3] - box[1])


def _unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def dlib_weights_dir() -> Path:
    """`<face_recognition_models>/models`, found without importing the package (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "faces model for backend dlib: the face_recognition_models package is not installed "
            "(pip install face-recognition-models), or set faces.model.path to a directory with its .dat files"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@functools.lru_cache(maxsize=2)
def _load_dlib(weights_dir: str):
    """dlib's detector, 68-point predictor and ResNet, loaded once per process (~1 s, mostly the 95 MB predictor):
    stateless Ray tasks reuse their process, and a second stage instance (other thresholds) shares them."""
    import dlib

    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(Path(weights_dir) / DlibFaces.LANDMARKS)),
        dlib.face_recognition_model_v1(str(Path(weights_dir) / DlibFaces.ENCODER)),
    )


class DlibFaces:
    """HOG detector + 68-point landmarks + ResNet descriptor, all from dlib's own .dat files."""

    dim = 128
    LANDMARKS = "shape_predictor_68_face_landmarks.dat"
    ENCODER = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(self, weights_dir: Path, min_score: float, min_face_px: int):
        import dlib

        missing = [name for name in (self.LANDMARKS, self.ENCODER) if not (weights_dir / name).is_file()]
        if missing:
            raise ModelUnavailable(
                f"faces model for backend dlib: {', '.join(missing)} not found in {weights_dir}. They ship in the "
                "face-recognition-models package (models/ folder); point faces.model.path at a copy of that folder."
            )
        self.min_score, self.min_face_px = min_score, min_face_px
        self.margin = dlib_margin(min_score)
        self.detector, self.predictor, self.encoder = _load_dlib(str(weights_dir))
        self._dlib = dlib
        self.description = (
            f"dlib {dlib.__version__}: HOG frontal_face_detector (score = logistic(2 * (margin - 0.5))), "
            f"{self.LANDMARKS}, {self.ENCODER} (128-d), from {weights_dir}"
        )

    def detect(self, rgb: np.ndarray) -> list[FoundFace]:
        height, width = rgb.shape[:2]
        # HOG scans an 80x80 window: upsampling once finds faces down to ~40 px at 4x the cost (~0.1 s instead of
        # ~0.025 s on a 640x360 frame, one core). Keyframes are 360p by default, where 40-80 px faces are common;
        # frames with a short side of 720 and more keep their native size (their 80 px is 11% of the height).
        upsample = 1 if min(height, width) < 720 else 0
        if math.isinf(self.margin):  # min_score 1.0: nothing can pass
            return []
        rects, margins, _ = self.detector.run(rgb, upsample, self.margin)
        kept = []
        for rect, margin in zip(rects, margins):
            score = dlib_score(margin)
            box = clip_box((rect.left(), rect.top(), rect.right(), rect.bottom()), width, height)
            if score < self.min_score or box_size(box) < self.min_face_px:
                continue
            kept.append((rect, score, box))
        if not kept:
            return []
        shapes = [self.predictor(rgb, rect) for rect, _, _ in kept]
        # The ResNet descriptor is the expensive step (~0.1 s per face on one core: dlib-bin is built without BLAS),
        # so it only runs on faces that passed min_score and min_face_px. The 68-point fit costs < 1 ms.
        descriptors = self.encoder.compute_face_descriptor(rgb, self._dlib.full_object_detections(shapes))
        faces = []
        for (_, score, box), shape, descriptor in zip(kept, shapes, descriptors):
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            landmarks = np.array([points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[30], points[48],
                                  points[54]])
            pose = head_pose(points[DLIB_POSE_POINTS], POSE_MODEL_DLIB, width, height)
            faces.append(FoundFace(box, score, landmarks, pose, _unit(descriptor)))
        return faces


class InsightFaces:
    """insightface's FaceAnalysis on a local model directory: SCRFD boxes + 5 keypoints, ArcFace embeddings."""

    def __init__(self, model_dir: Path, min_score: float, min_face_px: int, gpu: bool):
        import insightface
        from insightface.app import FaceAnalysis

        model_dir = model_dir.resolve()
        if not any(model_dir.glob("*.onnx")):
            raise ModelUnavailable(f"faces model for backend insightface: no .onnx files in {model_dir} "
                                   "(expected a buffalo_l-style directory: det_*.onnx + a recognition model)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        # An existing directory is used as is (FaceAnalysis only downloads when `name` is not a directory);
        # every .onnx in it is routed by its input/output shapes, so file names do not matter.
        try:
            self.app = FaceAnalysis(name=str(model_dir), providers=providers,
                                    allowed_modules=["detection", "recognition"])
        except AssertionError:
            raise ModelUnavailable(
                f"faces model for backend insightface: no detection model (SCRFD, >= 5 outputs) in {model_dir}"
            ) from None
        if "recognition" not in self.app.models:
            raise ModelUnavailable(
                f"faces model for backend insightface: no recognition model (NxN input, N >= 112) in {model_dir}"
            )
        # det_thresh = min_score: SCRFD drops weak boxes before NMS. det_size is used when the detector's input is
        # dynamic (buffalo_l); a detector exported with a fixed input size runs at that size.
        self.app.prepare(ctx_id=0 if gpu else -1, det_thresh=min_score, det_size=(640, 640))
        self.detector = self.app.models["detection"]
        self.recognizer = self.app.models["recognition"]
        if not getattr(self.detector, "use_kps", False):
            raise ModelUnavailable(f"faces model for backend insightface: the detector in {model_dir} has no "
                                   "keypoint outputs (needs an SCRFD with 9 or 15 outputs) to align faces for ArcFace")
        self.min_score, self.min_face_px = min_score, min_face_px
        out = self.recognizer.output_shape[-1]
        self.dim = out if isinstance(out, int) else 512
        self.description = (
            f"insightface {insightface.__version__}: {Path(self.detector.model_file).name} + "
            f"{Path(self.recognizer.model_file).name} ({self.dim}-d) from {model_dir}, "
            f"{'CUDA' if gpu else 'CPU'}"
        )

    def detect(self, rgb: np.ndarray) -> list[FoundFace]:
        from insightface.app.common import Face

        height, width = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface models take OpenCV's BGR order
        boxes, keypoints = self.detector.detect(bgr)
        faces = []
        for i in range(boxes.shape[0]):
            score = float(boxes[i, 4])
            box = clip_box(boxes[i, :4], width, height)
            if score < self.min_score or box_size(box) < self.min_face_px:
                continue
            # Embedding only for faces that are kept (FaceAnalysis.get would embed every box above det_thresh).
            face = Face(bbox=boxes[i, :4], kps=keypoints[i], det_score=score)
            self.recognizer.get(bgr, face)
            pose = head_pose(keypoints[i], POSE_MODEL_5, width, height)
            faces.append(FoundFace(box, score, keypoints[i].astype(np.float64), pose,
                                   face.normed_embedding.astype(np.float32)))
        return faces


def load_face_backend(cfg: FacesConfig) -> DlibFaces | InsightFaces:
    """The configured backend with its weights loaded (raises ModelUnavailable when they cannot be found)."""
    if cfg.backend == "dlib":
        weights = resolve_model_dir(cfg.model, "faces") if cfg.model is not None else dlib_weights_dir()
        return DlibFaces(weights, cfg.min_score, cfg.min_face_px)
    return InsightFaces(resolve_model_dir(cfg.model, "faces"), cfg.min_score, cfg.min_face_px,
                        gpu=cfg.resources.num_gpus > 0)
