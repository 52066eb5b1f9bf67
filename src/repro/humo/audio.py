"""Stage humo_audio: the audio features of one split of the talking faces, per video frame.

HuMo conditions on Whisper-large-v3's encoder: hidden states of groups of layers
(means of 0-7, 8-15, 16-23, 24-31 and layer 32 alone), 50 Hz interpolated to the
video's 25 fps. At tiny scale the same code path computes a log-mel spectrogram pooled
to the video's frame rate (one group); `humo.audio.encoder` picks which
(repro.foundation.faces.audio_features does both). The file holds `features`
[N, T, G, D], T >= the clip's frames, row i for clip i of the faces file.

    python -m repro.humo.audio --faces data/faces/test.safetensors \
        --out data/humo/audio_test.safetensors --params '{"audio": {...}, ...}'
"""

from __future__ import annotations

import logging

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors

log = logging.getLogger(__name__)

KIND = "humo_audio"


def audio_params(params: dict, faces) -> dict:
    """The feature extractor's settings: humo.audio plus the clips' rates."""
    audio = dict(params["audio"])
    audio.update(fps=faces.fps, sample_rate=faces.sample_rate)
    return audio


def main(argv=None) -> None:
    from repro.core.stage import Stage
    from repro.foundation.faces import audio_features, load_faces

    stage = Stage(__doc__, paper="humo", out="the features (safetensors)")
    stage.parser.add_argument("--faces", required=True, help="a talking-faces split")
    args = stage.start(argv)
    if "audio" not in stage.params:
        raise ReproInputError("humo.audio: missing from --params")
    faces = load_faces(args.faces)
    settings = audio_params(stage.params, faces)
    features = audio_features(faces.audio, settings, section="humo.audio")
    frames = faces.video.shape[2]
    if features.shape[0] != len(faces.audio) or features.shape[1] < frames:
        raise ReproInputError(
            f"{args.faces}: audio features {tuple(features.shape)} cover fewer than the "
            f"{frames} frames of its {len(faces.audio)} clips (audio shorter than the clip)"
        )
    save_tensors(
        args.out,
        {"features": features.float()},
        KIND,
        {"faces": str(args.faces), "encoder": settings["encoder"], "fps": faces.fps},
    )
    log.info("%s: features %s (%s)", args.out, tuple(features.shape), settings["encoder"])
    stage.finish({"clips": len(features), "feature_dim": int(features.shape[-1])})


def load_audio(path, clips: int, frames: int):
    """The features of a humo_audio file [N, T, G, D], checked against its faces split:
    one row per clip, at least `frames` frames; errors name the file."""
    from repro.core.io import load_tensors

    tensors, _ = load_tensors(path, kind=KIND, required=("features",))
    features = tensors["features"]
    if features.ndim != 4:
        raise ReproInputError(f"{path}: features {tuple(features.shape)}, expected [N, T, G, D]")
    if features.shape[0] != clips:
        raise ReproInputError(f"{path}: {features.shape[0]} clips, the faces split has {clips}")
    if features.shape[1] < frames:
        raise ReproInputError(
            f"{path}: audio features of {features.shape[1]} frames are shorter than the "
            f"{frames}-frame clips"
        )
    return features


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
