"""FaceDetector: dlib with its real weights on real photos, insightface on tiny ONNX models built here.

Every check goes through `run_stage` on a clip record, so what is asserted is the stage contract: meta["faces"],
blobs["face_embeddings"] (rows in the same order) and the provenance. Numbers quoted in comments were measured on
these exact inputs (skimage photos letterboxed into 640x360 keyframes, the default clip size).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.models.faces import ARCFACE_TEMPLATE, dlib_margin, dlib_score
from pipeline.models.loader import ModelUnavailable
from pipeline.testing.clips import ASTRONAUT, ASTRONAUT_MIRRORED, CAMERAMAN, COFFEE
from stages.faces import FaceDetector

pytestmark = [
    # Third-party noise: torch's legacy ONNX exporter (the one environment.md recommends) and skimage's deprecation
    # of `estimate`, which insightface's face_align still calls.
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed"),
    pytest.mark.filterwarnings("ignore:`estimate` is deprecated"),
]




def clip_with(frames) -> Record:
    record = Record(kind="clip", source_path="clip.mp4", key="k")
    record.blobs["keyframes"] = np.stack(frames)
    record.meta["keyframes"] = [{"at": i / max(1, len(frames) - 1), "frame": i} for i in range(len(frames))]
    return record


def detect(frames, overrides=(), data_config=None) -> Record:
    [record] = run_stage(FaceDetector(build_config(data_config or {}, list(overrides))), [clip_with(frames)])
    return record




@pytest.fixture(scope="module")
def photos() -> Record:
    """One clip whose keyframes are the astronaut, the cameraman, a cup of coffee and the mirrored astronaut."""
    return detect([ASTRONAUT, CAMERAMAN, COFFEE, ASTRONAUT_MIRRORED])


def faces_on(record: Record, k: int) -> list[tuple[dict, np.ndarray]]:
    return [(f, e) for f, e in zip(record.meta["faces"], record.blobs["face_embeddings"]) if f["keyframe"] == k]


# --- dlib, real weights, real photos -----------------------------------------------------------------------------


def test_dlib_finds_the_one_frontal_face_of_each_photo(photos):
    assert photos.alive and "warnings" not in photos.meta
    assert [f["keyframe"] for f in photos.meta["faces"]] == [0, 3]  # no face on the cameraman or the coffee at 0.5
    assert photos.blobs["face_embeddings"].shape == (2, 128)
    assert photos.blobs["face_embeddings"].dtype == np.float32
    assert np.allclose(np.linalg.norm(photos.blobs["face_embeddings"], axis=1), 1.0, atol=1e-5)
    assert photos.meta["provenance"]["faces"].startswith("dlib ")

    [(face, _)] = faces_on(photos, 0)
    # Measured: score 0.847 (HOG margin 1.36), yaw +5.5, pitch -15.2 (the generic model reads her smile as a slight
    # nod), roll +2.7, a 62 px box around her face at x 266-328, y 59-122.
    assert face["frontal"] and abs(face["yaw"]) < 10 and abs(face["pitch"]) < 20 and abs(face["roll"]) < 10
    assert 0.8 < face["score"] < 0.9
    x0, y0, x1, y1 = face["box"]
    assert 250 < x0 < x1 < 345 and 40 < y0 < y1 < 140 and face["size_px"] == min(x1 - x0, y1 - y0) >= 55
    eye_r, eye_l, nose, mouth_r, mouth_l = np.array(face["landmarks"])
    assert eye_r[0] < nose[0] < eye_l[0] and mouth_r[0] < mouth_l[0]  # image-left first (the subject's right)
    assert max(eye_r[1], eye_l[1]) < nose[1] < min(mouth_r[1], mouth_l[1])
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in face["landmarks"])


def test_mirrored_face_keeps_its_identity_and_flips_its_yaw(photos):
    [(face, embedding)] = faces_on(photos, 0)
    [(mirrored, mirrored_embedding)] = faces_on(photos, 3)
    assert float(embedding @ mirrored_embedding) > 0.95  # measured 0.991
    assert face["yaw"] * mirrored["yaw"] < 0 and abs(face["yaw"] + mirrored["yaw"]) < 3  # +5.5 / -5.4
    assert abs(face["roll"] + mirrored["roll"]) < 3 and abs(face["pitch"] - mirrored["pitch"]) < 3


def test_cameraman_is_a_weak_detection_and_not_frontal(photos):
    # The cameraman looks into his viewfinder, turned most of the way toward the image's right. dlib's HOG scores
    # his face at margin 0.035 (score 0.28): below the default min_score, so `photos` has no face on him. With
    # min_score 0.2 he is found, and the pose says why he should not be a reference face: yaw +36 (the right
    # direction; a 68-point fit on a near-profile understates it), pitch -18 (looking down).
    record = detect([CAMERAMAN], ["faces.min_score=0.2"])
    [(face, embedding)] = faces_on(record, 0)
    assert 0.2 <= face["score"] < 0.5
    assert not face["frontal"] and face["yaw"] > 30 and face["pitch"] < 0
    # A different person: clearly less similar than the astronaut to her mirror image (0.83 vs 0.99 measured;
    # dlib's descriptors are not centred, so strangers still score ~0.8 in cosine).
    [(_, astronaut)], [(_, mirrored)] = faces_on(photos, 0), faces_on(photos, 3)
    assert float(embedding @ astronaut) < min(0.9, float(astronaut @ mirrored) - 0.1)


def test_no_face_leaves_an_empty_embedding_matrix_and_survives_the_arrow_row():
    record = detect([COFFEE, np.zeros_like(COFFEE)])
    assert record.alive and record.meta["faces"] == []
    assert record.blobs["face_embeddings"].shape == (0, 128) and record.blobs["face_embeddings"].dtype == np.float32
    assert "faces" in record.meta["provenance"]
    back = Record.from_row(record.to_row())
    assert back.meta["faces"] == [] and back.blobs["face_embeddings"].shape == (0, 128)


def test_thresholds_change_the_results_as_configured(photos):
    [(face, _)] = faces_on(photos, 0)
    yaw, pitch, score, size = abs(face["yaw"]), abs(face["pitch"]), face["score"], face["size_px"]

    def astronaut(*overrides):
        faces = detect([ASTRONAUT], overrides).meta["faces"]
        assert all(f["yaw"] == face["yaw"] for f in faces)  # thresholds decide; they never change the stats
        return faces

    assert astronaut(f"faces.max_yaw={yaw + 1}")[0]["frontal"]
    assert not astronaut(f"faces.max_yaw={yaw - 1}")[0]["frontal"]
    assert astronaut(f"faces.max_pitch={pitch + 1}")[0]["frontal"]
    assert not astronaut(f"faces.max_pitch={pitch - 1}")[0]["frontal"]
    assert len(astronaut(f"faces.min_face_px={size}")) == 1
    assert astronaut(f"faces.min_face_px={size + 1}") == []
    assert len(astronaut(f"faces.min_score={score - 0.01}")) == 1
    assert astronaut(f"faces.min_score={score + 0.01}") == []


def test_with_grounding_faces_are_searched_inside_person_boxes_only(photos):
    [(whole_frame_face, embedding)] = faces_on(photos, 0)
    x0, y0, x1, y1 = whole_frame_face["box"]
    record = clip_with([ASTRONAUT, ASTRONAUT])
    record.meta["entities"] = [{"id": "e0", "kind": "subject", "word": "woman", "category": "woman"}]
    # Keyframe 0: a "woman" box around her head and shoulders; keyframe 1: a person box elsewhere in the frame.
    record.meta["detections"] = [
        {"id": "d0", "keyframe": 0, "entity": "e0", "label": "woman", "part": None,
         "box": [x0 - 40, y0 - 40, x1 + 60, y1 + 120], "score": 0.9},
        {"id": "d1", "keyframe": 0, "entity": None, "label": "person", "part": None,
         "box": [x0 - 50, y0 - 50, x1 + 50, y1 + 50], "score": 0.8},
        {"id": "d2", "keyframe": 1, "entity": None, "label": "person", "part": None,
         "box": [0, 0, 60, 60], "score": 0.7},
    ]
    [out] = run_stage(FaceDetector(build_config()), [record])
    [face] = out.meta["faces"]  # found in both boxes, kept once, with the subject's box
    assert (face["keyframe"], face["detection"], face["entity"]) == (0, "d0", "e0")
    assert np.abs(np.array(face["box"]) - np.array(whole_frame_face["box"])).max() <= 3  # back in frame pixels
    assert float(out.blobs["face_embeddings"][0] @ embedding) > 0.98


def test_dlib_score_mapping():
    assert dlib_score(0.5) == pytest.approx(0.5)
    assert dlib_score(1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert dlib_margin(dlib_score(1.3)) == pytest.approx(1.3)
    assert dlib_margin(0.0) == -1.0 and dlib_margin(1.0) == math.inf


# --- failures are data ---------------------------------------------------------------------------------------------


def test_unusable_keyframes_fail_the_record_and_spare_the_others():
    config = build_config()
    gray = Record(kind="clip", source_path="a.mp4", key="gray")
    gray.blobs["keyframes"] = np.zeros((3, 360, 640), np.uint8)  # (K, H, W): grayscale, no channel axis
    floats = Record(kind="clip", source_path="b.mp4", key="floats")
    floats.blobs["keyframes"] = np.zeros((3, 360, 640, 3), np.float32)
    missing = Record(kind="clip", source_path="c.mp4", key="missing")
    good = clip_with([COFFEE])
    out = run_stage(FaceDetector(config), [gray, floats, missing, good])
    reasons = {r.key: [(e["stage"], e["reason"]) for e in r.errors] for r in out}
    assert reasons == {"gray": [("faces", "no_keyframes")], "floats": [("faces", "no_keyframes")],
                       "missing": [("faces", "no_keyframes")], "k": []}
    assert "(3, 360, 640)" in out[0].errors[0]["message"]


def test_a_keyframe_the_backend_fails_on_is_skipped_with_a_warning():
    # dlib handles every uint8 RGB frame we can build, so the backend failure is injected (only that is faked).
    stage = FaceDetector(build_config())
    stage.setup()
    real = stage.backend.detect

    def flaky(frame):
        if not frame.any():
            raise RuntimeError("backend choked")
        return real(frame)

    stage.backend.detect = flaky
    black = np.zeros_like(ASTRONAUT)
    partly, wholly = run_stage(stage, [clip_with([ASTRONAUT, black]), clip_with([black, black])])
    assert partly.alive and [f["keyframe"] for f in partly.meta["faces"]] == [0]
    assert partly.meta["warnings"] == [{"stage": "faces", "message": "keyframe 1: RuntimeError: backend choked"}]
    assert [(e["stage"], e["reason"]) for e in wholly.errors] == [("faces", "face_backend")]


def test_dlib_model_dir_from_config_must_hold_the_dat_files(tmp_path):
    stage = FaceDetector(build_config({"faces": {"model": {"path": str(tmp_path)}}}))
    with pytest.raises(ModelUnavailable, match="shape_predictor_68_face_landmarks.dat"):
        stage.setup()


# --- insightface on tiny ONNX models -------------------------------------------------------------------------------

DET_SIZE = 128  # the tiny detector has a fixed input; FaceAnalysis then runs it at that size whatever det_size says
SQUARE_LOGIT = 4.0  # score = sigmoid(4 * mean of the normalised red channel over a 32x32 cell)


class SquareSCRFD(nn.Module):
    """SCRFD-shaped (3 strides x score/bbox/kps = 9 outputs, 2 anchors per cell) with set weights, so detection is
    known in advance: the stride-32 head fires on cells whose red channel is bright, the box is exactly that cell
    (distances 0, 0, 1, 1 from the anchor at the cell's top-left corner), and the keypoints are the ArcFace
    template laid over the box. Strides 8 and 16 never fire."""

    def __init__(self):
        super().__init__()
        self.score = nn.ModuleList(nn.Conv2d(1, 2, 1) for _ in range(3))
        self.bbox = nn.ModuleList(nn.Conv2d(1, 8, 1) for _ in range(3))
        self.kps = nn.ModuleList(nn.Conv2d(1, 20, 1) for _ in range(3))
        with torch.no_grad():
            for heads in (self.score, self.bbox, self.kps):
                for head in heads:
                    head.weight.zero_()
            for i in range(3):
                self.score[i].bias.fill_(-20.0)
                self.bbox[i].bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0] * 2))
                self.kps[i].bias.copy_(torch.tensor(ARCFACE_TEMPLATE.ravel() / 112.0, dtype=torch.float32).repeat(2))
            self.score[2].weight.fill_(SQUARE_LOGIT)
            self.score[2].bias.zero_()

    def forward(self, x):
        cells = [F.avg_pool2d(x[:, :1], stride) for stride in (8, 16, 32)]

        def rows(t, width):  # (1, anchors * width, h, w) -> (h * w * anchors, width), SCRFD's output layout
            return t.permute(0, 2, 3, 1).reshape(-1, width)

        scores = [rows(torch.sigmoid(head(c)), 1) for head, c in zip(self.score, cells)]
        boxes = [rows(head(c), 4) for head, c in zip(self.bbox, cells)]
        kps = [rows(head(c), 10) for head, c in zip(self.kps, cells)]
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    """ArcFace-shaped: 1x3x112x112 -> 512, random init."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.fc = nn.Linear(8 * 4 * 4, 512)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


@pytest.fixture(scope="module")
def insightface_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("buffalo_tiny")
    torch.manual_seed(0)
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in (8, 16, 32)]
    torch.onnx.export(SquareSCRFD().eval(), torch.zeros(1, 3, DET_SIZE, DET_SIZE), str(directory / "det_tiny.onnx"),
                      input_names=["input.1"], output_names=names, dynamo=False)
    torch.onnx.export(TinyArcFace().eval(), torch.zeros(1, 3, 112, 112), str(directory / "w600k_tiny.onnx"),
                      input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}}, dynamo=False)
    return directory


def insightface_config(model_dir, *overrides):
    return build_config({"faces": {"backend": "insightface", "model": {"path": str(model_dir)}}}, list(overrides))


def square_frame(texture_seed: int | None = None) -> np.ndarray:
    """512x256 black frame with a bright 128 px square at x 256-384, y 128-256. Letterboxed into the 128 px
    detector it becomes the 32 px cell (2, 1): the box must decode back to exactly the square."""
    frame = np.zeros((256, 512, 3), np.uint8)
    square = np.full((128, 128, 3), 255, np.uint8)
    if texture_seed is not None:
        square[..., 1:] = np.random.default_rng(texture_seed).integers(0, 256, (128, 128, 2), dtype=np.uint8)
    frame[128:256, 256:384] = square
    return frame


def test_insightface_runs_end_to_end_and_decodes_the_box(insightface_dir):
    stage = FaceDetector(insightface_config(insightface_dir))
    assert stage.stateful and not FaceDetector(build_config()).stateful
    [record] = run_stage(stage, [clip_with([square_frame(), np.zeros((256, 512, 3), np.uint8)])])
    assert record.alive
    [face] = record.meta["faces"]  # the two anchors of the cell coincide; NMS keeps one
    assert face["keyframe"] == 0 and face["box"] == [256, 128, 384, 256] and face["size_px"] == 128
    assert face["score"] == pytest.approx(1 / (1 + math.exp(-SQUARE_LOGIT * 127.5 / 128)), abs=1e-3)
    expected = np.array([256.0, 128.0]) + ARCFACE_TEMPLATE * 128 / 112
    assert np.allclose(face["landmarks"], expected, atol=0.06)
    # Keypoints on the template are frontal by construction (the small pitch is perspective off the image centre).
    assert face["frontal"] and abs(face["yaw"]) < 2 and abs(face["pitch"]) < 5 and abs(face["roll"]) < 2
    embeddings = record.blobs["face_embeddings"]
    assert embeddings.shape == (1, 512) and embeddings.dtype == np.float32
    assert np.linalg.norm(embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    provenance = record.meta["provenance"]["faces"]
    assert provenance.startswith("insightface ") and "det_tiny.onnx" in provenance and "w600k_tiny.onnx" in provenance


def test_insightface_embeddings_follow_the_aligned_face(insightface_dir):
    stage = FaceDetector(insightface_config(insightface_dir))
    [record] = run_stage(stage, [clip_with([square_frame(1), square_frame(1), square_frame(2)])])
    a, b, c = record.blobs["face_embeddings"]
    assert float(a @ b) == pytest.approx(1.0, abs=1e-6) and float(a @ c) < 0.999


def test_insightface_thresholds(insightface_dir):
    frame = square_frame()
    score = 1 / (1 + math.exp(-SQUARE_LOGIT * 127.5 / 128))  # 0.982
    cases = [(f"faces.min_score={score - 0.01:.3f}", 1), (f"faces.min_score={score + 0.01:.3f}", 0),
             ("faces.min_face_px=128", 1), ("faces.min_face_px=129", 0)]
    for override, count in cases:
        [record] = run_stage(FaceDetector(insightface_config(insightface_dir, override)), [clip_with([frame])])
        assert len(record.meta["faces"]) == count, override
        assert record.blobs["face_embeddings"].shape == (count, 512)


def test_missing_insightface_model_is_a_setup_error_with_the_clear_message(tmp_path):
    # A model that is not there fails every record the same way: setup() raises (the job stops before it starts)
    # rather than pinning the same error on every clip.
    with pytest.raises(ModelUnavailable, match="faces model .* is not available on this machine"):
        FaceDetector(insightface_config(tmp_path / "buffalo_l")).setup()
    with pytest.raises(ModelUnavailable, match="no .onnx files"):
        FaceDetector(insightface_config(tmp_path)).setup()
