"""What a run's conditioning settings mean for each prompt, checked before any model loads.

`condition_prompts` turns every prompt plus the run's --reference-path / --mask-strategy / --loop settings into a
ConditionedPrompt (or None for a plain text-to-video prompt), probes every reference file once and plans every
loop of every prompt against the latent frame counts, so that a missing file, an unreadable one or a group
that points outside its reference or the video fails in seconds, naming the prompt, the file or the group.

Frame counts come from `FrameGeometry`, built from the config alone (the temporal VAE on the meta device, no
weights) or from the loaded VAE; both use the VAE's own `get_latent_size` arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from duca_video.io.media import MediaError, MediaInfo, probe_media

from .errors import ConditioningError
from .prompts import ConditionedPrompt, parse_conditioned_prompt
from .strategy import MaskGroup, format_mask_strategy, loop_condition_group, plan_frames

__all__ = [
    "FrameGeometry",
    "condition_identity",
    "condition_prompts",
    "is_conditioned_run",
    "loop_groups",
    "per_prompt",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameGeometry:
    """Pixel <-> latent frame counts of a VAE. `micro_frames` / `micro_latents`: its chunk (17 -> 5 for
    Open-Sora 1.2's VAE), None when it encodes frame by frame (PixelVAE) or in one piece."""

    latent_of: Callable[[int], int]
    micro_frames: int | None = None
    micro_latents: int | None = None

    @classmethod
    def of_vae(cls, vae: Any) -> FrameGeometry:
        micro, micro_z = getattr(vae, "micro_frame_size", None), getattr(vae, "micro_z_frame_size", None)
        return cls(lambda n: int(vae.get_latent_size((n, None, None))[0]), micro, micro_z)

    @classmethod
    def of_config(cls, cfg: Any) -> FrameGeometry:
        if cfg.vae.type == "PixelVAE":
            return cls(lambda n: n)
        import torch

        from duca_video.models.vae import TEMPORAL_VAE_SD_CONFIG
        from duca_video.models.vae_temporal import TemporalVAE

        with torch.device("meta"):  # sizes only: no memory, no weights
            temporal = TemporalVAE(**(cfg.vae.temporal_config or TEMPORAL_VAE_SD_CONFIG))
        micro = cfg.vae.micro_frame_size
        micro_z = None if micro is None else temporal.get_latent_size((micro, None, None))[0]

        def latent_of(n: int) -> int:  # OpenSoraVAE.get_latent_size: whole chunks, then the rest
            if micro is None:
                return temporal.get_latent_size((n, None, None))[0]
            full, rest = divmod(n, micro)
            return full * micro_z + (temporal.get_latent_size((rest, None, None))[0] if rest else 0)

        return cls(latent_of, micro, micro_z)

    def pixels_of(self, latents: int) -> int:
        """Pixel frames that `latents` leading latent frames decode to: what a loop drops from each later clip
        (upstream's dframe_to_frame: 5 latent frames are 17 pixel frames)."""
        if self.micro_frames is not None and self.micro_latents is not None:
            if latents % self.micro_latents:
                raise ConditioningError(
                    f"--condition-frame-length {latents} must be a multiple of {self.micro_latents} latent frames "
                    f"(one VAE chunk of {self.micro_frames} frames) so that whole frames can be dropped from the "
                    "next clip, as Open-Sora requires"
                )
            return latents // self.micro_latents * self.micro_frames
        if all(self.latent_of(n) == n for n in (1, 2, 3)):  # frame-by-frame VAE: a latent frame is a frame
            return latents
        raise ConditioningError("--loop needs a VAE that encodes in chunks (vae.micro_frame_size) or frame by frame")


def is_conditioned_run(cfg: Any) -> bool:
    return bool(cfg.reference_path or cfg.mask_strategy or cfg.loop > 1)


def per_prompt(values: Sequence[str] | None, index: int, total: int, key: str) -> str | None:
    """The run's value of --reference-path / --mask-strategy for prompt `index`: one value for every prompt,
    or one per prompt of the whole list (as upstream, "" meaning none)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) != total:
        flag = "--" + key.replace("_", "-")
        raise ConditioningError(
            f"{flag} / {key}: {len(values)} values for {total} prompt(s); give one for every "
            "prompt, or a single one for all of them"
        )
    return values[index]


def loop_groups(cond: ConditionedPrompt, loop: int, cfg: Any) -> tuple[MaskGroup, ...]:
    """The strategy groups in effect at loop `loop`: the prompt's own, plus upstream's appended group for every
    earlier loop k >= 1 (the last --condition-frame-length latent frames of clip k-1, which is reference
    len(references) + k - 1)."""
    extra = tuple(
        loop_condition_group(k, len(cond.references) + k - 1, cfg.condition_frame_length, cfg.condition_frame_edit)
        for k in range(1, loop + 1)
    )
    return cond.strategy + extra


def _check_loops(cond: ConditionedPrompt, infos: list[MediaInfo], cfg: Any, geo: FrameGeometry, where: str) -> None:
    video = geo.latent_of(cfg.num_frames)
    lengths = [geo.latent_of(info.frames) for info in infos]
    if cfg.loop > 1 and cfg.condition_frame_length >= video:  # each later clip adds video - length new frames
        raise ConditioningError(
            f"{where}: --condition-frame-length {cfg.condition_frame_length} leaves no new "
            f"frame for a loop to add: it must be less than the clip's {video} latent frames; "
            f"allowed: 1..{video - 1}"
        )
    if cfg.loop > 1:
        geo.pixels_of(cfg.condition_frame_length)  # the frames each later clip drops must be whole frames
    for loop in range(cfg.loop):
        plan_frames(
            loop_groups(cond, loop, cfg),
            video,
            lengths + [video] * loop,
            loop,
            cfg.align,
            f"{where}: mask_strategy" + (f" (loop {loop})" if cfg.loop > 1 else ""),
        )


def condition_prompts(
    cfg: Any,
    prompts: Sequence[tuple[int, str]],
    where: dict[int, str],
    total: int,
    geometry: FrameGeometry | None = None,
) -> dict[int, ConditionedPrompt | None]:
    """prompt index -> its ConditionedPrompt, or None for a plain prompt (no JSON part, no reference, one loop)."""
    out: dict[int, ConditionedPrompt | None] = {}
    probed: dict[str, MediaInfo] = {}
    geo = geometry
    for i, prompt in prompts:
        refs = per_prompt(cfg.reference_path, i, total, "reference_path")
        strategy = per_prompt(cfg.mask_strategy, i, total, "mask_strategy")
        if "{" not in prompt and not prompt.startswith("|") and not (refs or strategy) and cfg.loop == 1:
            out[i] = None  # plain: upstream's path without any mask
            continue
        cond = parse_conditioned_prompt(prompt, refs, strategy, cfg.loop, where[i])
        infos = []
        for n, path in enumerate(cond.references):
            if path not in probed:
                try:
                    probed[path] = probe_media(path)
                except MediaError as exc:
                    raise MediaError(f"{where[i]}: reference {n}: {exc}") from None
            infos.append(probed[path])
        used = {g.reference for g in cond.strategy}
        for n, path in enumerate(cond.references):
            if n not in used:
                log.warning(
                    "%s: reference %d (%s) is used by no mask strategy group; it has no effect (as in "
                    "Open-Sora, whose default strategy is empty)",
                    where[i],
                    n,
                    path,
                )
        geo = geo or FrameGeometry.of_config(cfg)
        _check_loops(cond, infos, cfg, geo, where[i])
        out[i] = cond
    return out


def condition_identity(cond: ConditionedPrompt, cfg: Any, digest: Callable[[str], str]) -> dict[str, Any]:
    """The pixel-changing conditioning settings of one video, for its record's identity (resume compares it):
    the references by content (`digest(path)`, so a replaced file is noticed and a moved one is not), the
    strategy, the loop texts, and the loop and alignment settings that are in effect."""
    out: dict[str, Any] = {
        "references": [digest(path) for path in cond.references],
        "mask_strategy": format_mask_strategy(cond.strategy),
        "align": cfg.align if cond.strategy else None,
        "loop": cfg.loop,
    }
    if cfg.loop > 1:
        out.update(condition_frame_length=cfg.condition_frame_length, condition_frame_edit=cfg.condition_frame_edit)
    return out
