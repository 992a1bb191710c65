"""Build the models a config describes: text encoder, VAE and STDiT3, from weights or (testbed) from the seed.

Sections name their classes with Open-Sora's type names; testbed classes take their constructor arguments
from the keys next to `type`, checked against the constructor so that a typo names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from duca_video.models import STDiT3, STDiT3Config

from .preflight import InputError
from .schema import TORCH_DTYPES, ConfigError, InferenceConfig

__all__ = ["build_model", "build_text_encoder", "build_vae"]


def _call_checked(fn: Any, kwargs: dict[str, Any], where: str, given: tuple[str, ...] = ()) -> Any:
    """Call `fn(**kwargs)` after checking every key against its signature, so a typo names the key."""
    params = [p for p in inspect.signature(fn).parameters if p not in ("self", *given)]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        name = getattr(getattr(fn, "func", fn), "__qualname__", str(fn))  # look through functools.partial
        raise ConfigError(
            f"{where}: unknown key {', '.join(map(repr, unknown))} for {name}; allowed: {', '.join(params) or 'none'}"
        )
    return fn(**kwargs)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Random init must depend on the run seed only, and must not disturb anyone else's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_text_encoder(cfg: InferenceConfig, path: str | None, device: torch.device) -> Any:
    """T5 from a local folder, or the testbed's word encoder (from its folder, or seeded random init)."""
    sec = cfg.text_encoder
    if sec.type == "t5":
        from duca_video.models.text_encoder import T5LoadError, T5TextEncoder

        length = 300 if sec.model_max_length is None else sec.model_max_length
        try:
            return T5TextEncoder(
                path, model_max_length=length, device=device, dtype=TORCH_DTYPES[sec.dtype], offload=sec.offload
            )
        except T5LoadError as exc:  # an unusable folder or a missing package: a user error, not a traceback
            raise InputError(f"text_encoder.from_pretrained: {exc}") from None
    from duca_video.testbed import WordTextEncoder

    kwargs = dict(sec.extra)
    if path is not None:
        if sec.model_max_length is not None:
            kwargs["model_max_length"] = sec.model_max_length  # rejected below: the saved vocabulary fixes it
        load = functools.partial(WordTextEncoder.from_pretrained, path)
        encoder = _call_checked(load, kwargs, "text_encoder", ("device",))
    else:
        if sec.model_max_length is not None:
            kwargs["model_max_length"] = sec.model_max_length
        with _seeded(cfg.seed):
            encoder = _call_checked(WordTextEncoder, kwargs, "text_encoder")
    return encoder.to(device).eval()


def build_vae(cfg: InferenceConfig, path: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """Open-Sora 1.2's VAE from its combined checkpoint (or spatial folder + temporal weights), or PixelVAE."""
    sec = cfg.vae
    if sec.type == "OpenSoraVAE_V1_2":
        from duca_video.models import OpenSoraVAE

        kw = dict(
            micro_batch_size=sec.micro_batch_size,
            micro_frame_size=sec.micro_frame_size,
            dtype=dtype,
            device=device,
            temporal_config=sec.temporal_config,
        )
        if sec.spatial_from_pretrained is not None:
            if sec.spatial_config is not None:
                raise ConfigError("vae.spatial_config: the spatial VAE's config comes from spatial_from_pretrained")
            vae = OpenSoraVAE.from_pretrained(sec.spatial_from_pretrained, path, **kw)
        else:
            vae = OpenSoraVAE.from_checkpoint(path, spatial_config=sec.spatial_config, **kw)
        return vae.eval()
    from duca_video.testbed import PixelVAE

    if path is not None:
        raise ConfigError("vae.from_pretrained: PixelVAE has no weights; remove the path")
    return _call_checked(PixelVAE, dict(sec.extra), "vae", ("dtype",)).to(device=device, dtype=dtype).eval()


def build_model(
    cfg: InferenceConfig, path: str | None, vae: Any, encoder: Any, device: torch.device, dtype: torch.dtype
) -> tuple[STDiT3, str]:
    """The STDiT3 and a description of where its weights came from; its sizes must fit the VAE and encoder."""
    from duca_video.models.checkpoint import CheckpointError, read_config

    sec = cfg.model
    if path is not None:
        # The architecture: config.json next to the weights (else STDiT3-XL/2), overridden by fields next to
        # `type`. Only architecture keys are read from the file: exports add their own metadata to it.
        fields = {f.name for f in dataclasses.fields(STDiT3Config)}
        try:  # preflight read the headers; a file cut inside its data (or changed since) fails only here
            saved = {k: v for k, v in (read_config(path) or {}).items() if k in fields}
            arch = STDiT3Config.from_dict({**saved, **sec.extra})
            model, source = STDiT3.from_pretrained(path, config=arch, dtype=dtype, device=device), path
        except (CheckpointError, TypeError) as exc:
            raise InputError(f"model weights: {exc}") from None
    else:
        # As upstream's build: channels and text length follow the VAE and the text encoder unless set.
        sizes = dict(
            in_channels=int(vae.out_channels),
            caption_channels=int(encoder.output_dim),
            model_max_length=int(encoder.model_max_length),
        )
        with _seeded(cfg.seed):
            model = STDiT3(STDiT3Config.from_dict({**sizes, **sec.extra}))
        model, source = model.to(device=device, dtype=dtype), f"random init (seed {cfg.seed})"
    c = model.config
    for key, mine, theirs, what in (
        ("in_channels", c.in_channels, int(vae.out_channels), "the VAE's latent channels"),
        ("caption_channels", c.caption_channels, int(encoder.output_dim), "the text encoder's output size"),
        ("model_max_length", c.model_max_length, int(encoder.model_max_length), "the text encoder's length"),
    ):
        if mine != theirs:
            raise InputError(f"model.{key}={mine} does not match {what} ({theirs})")
    return model.eval().requires_grad_(False), source
