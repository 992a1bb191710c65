"""A video's identity: every setting that changes its pixels, written into its record; resume compares it and
the files' sizes and hashes (`duca_video.jobs.resume`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from duca_video.conditioning.setup import condition_identity
from duca_video.configs import InferenceConfig
from duca_video.io.files import file_digest

from .plan import VideoJob
from .resume import canonical, weights_fingerprint

__all__ = ["VideoIdentity"]


class VideoIdentity:
    """`identity(job)`: what the record must show for the video to be this job's (all of it pixel-changing)."""

    def __init__(self, cfg: InferenceConfig, weights: dict[str, str | None]) -> None:
        from duca_video import cache as cache_lib

        self.cfg, self._digests = cfg, {}
        method = cfg.cache.method
        config = cache_lib.make_config(method, **cfg.cache.overrides)
        method_config = {} if method == "none" else dataclasses.asdict(config)
        # A variant may set sampler settings (`steps`: the step count): the video is made with those.
        scheduler = {**dataclasses.asdict(cfg.scheduler), **config.sampler_settings()}
        plain = cfg.to_dict()
        sections = {}
        # Where the weights are and whether T5 is offloaded after encoding do not change a pixel.
        unseen = ("from_pretrained", "spatial_from_pretrained", "offload")
        for name in ("model", "vae", "text_encoder"):
            section = {k: v for k, v in plain[name].items() if k not in unseen}
            section["weights"] = weights_fingerprint(weights.get(name))
            sections[name] = section
        sections["vae"]["spatial_weights"] = weights_fingerprint(cfg.vae.spatial_from_pretrained)
        # Without weights the model and the text encoder are drawn from the run seed (the VAEs either need
        # weights or, like the testbed's PixelVAE, have none).
        random_init = sections["model"]["weights"] is None or sections["text_encoder"]["weights"] is None
        self.common = canonical(
            {
                "method": method,
                "method_config": method_config,
                "scheduler": scheduler,
                **sections,
                "image_size": list(cfg.size),
                "num_frames": cfg.num_frames,
                "fps": cfg.fps,
                "save_fps": cfg.video_fps,
                "dtype": cfg.dtype,
                "init_seed": cfg.seed if random_init else None,
            }
        )
        # A method whose video depends on the parallel layout says how (absent for every other method, so
        # their records stay valid on any number of GPUs).
        inputs = config.input_digests()  # e.g. a calibration file: a changed file makes another video
        if inputs:
            self.common["method_inputs"] = canonical(inputs)
        layout = config.layout_identity(cfg_parallel=cfg.cfg_parallel)
        if layout:
            self.common["layout"] = canonical(layout)

    def __call__(self, job: VideoJob) -> dict[str, Any]:
        out = {"prompt": job.prompt, "text": job.text, "seed": job.seed, **self.common}
        if job.condition is not None:  # reference frames / loops change the pixels (absent: plain text-to-video)
            out["conditioning"] = {**condition_identity(job.condition, self.cfg, self._digest), "texts": job.texts}
        return out

    def _digest(self, path: str) -> str:
        if path not in self._digests:  # each reference hashed once per job
            self._digests[path] = file_digest(path)["sha256"]
        return self._digests[path]
