"""Typed inference configuration: Open-Sora 1.2's field names, checked when loaded.

A config is plain data (dicts, numbers, strings) until `InferenceConfig.from_dict` turns it into these
dataclasses; every unknown key and every bad value is an error that names the key and what is allowed, so a
typo fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from duca_video import sizes
from duca_video.cache.registry import METHODS as CACHE_REGISTRY
from duca_video.io.prompts import PromptError, check_sample_name

from .fields import ConfigError, _build, _positive

__all__ = [
    "CACHE_METHODS",
    "DTYPES",
    "TORCH_DTYPES",
    "CacheSection",
    "ConfigError",
    "InferenceConfig",
    "ModelSection",
    "SchedulerSection",
    "TextEncoderSection",
    "VAESection",
]

# The names duca_video.cache.enable accepts: the registry's methods (docs/methods.md).
CACHE_METHODS = tuple(CACHE_REGISTRY)  # the one registry of methods (duca_video/cache/registry.py)
# Upstream's spellings (opensora.utils.misc.to_torch_dtype) plus torch's.
TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "half": torch.float16,
}
DTYPES = tuple(TORCH_DTYPES)
ModelType = Literal["STDiT3-XL/2", "STDiT3"]
VAEType = Literal["OpenSoraVAE_V1_2", "PixelVAE"]
TextEncoderType = Literal["t5", "word"]
# torch.Generator.manual_seed takes any 64-bit value, but a negative seed is the same generator as a large one:
# seeds are 0..2**63-1 (an int64 wherever they are stored), and so is seed + k for the k-th sample.
MAX_SEED = 2**63 - 1
# An mp4 frame rate is a fraction of 32-bit ints; ffmpeg refuses frames with (W + 128) * (H + 128) >= 2**28.
MAX_FPS = 2**31 - 1
_MAX_FRAME_AREA = 2**28
MAX_LOOP = 1000
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class ModelSection:
    """The diffusion model. `STDiT3-XL/2` needs weights; `STDiT3` with no weights is randomly initialised
    (seeded by the run seed) from the STDiT3Config fields given next to `type`."""

    type: ModelType = "STDiT3-XL/2"
    from_pretrained: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # STDiT3Config fields (Open-Sora's names)

    def __post_init__(self) -> None:
        from duca_video.models import STDiT3Config

        try:  # validates names and values now; the VAE / text encoder fill in their sizes later
            STDiT3Config.from_dict(self.extra)
        except (ValueError, TypeError) as exc:
            besides = " (besides type and from_pretrained)" if str(exc).startswith("unknown") else ""
            raise ConfigError(f"model: {exc}{besides}") from None

    @property
    def needs_weights(self) -> bool:
        return self.type == "STDiT3-XL/2"


@dataclass
class VAESection:
    type: VAEType = "OpenSoraVAE_V1_2"
    from_pretrained: str | None = None  # the combined checkpoint (hpcai-tech/OpenSora-VAE-v1.2)
    # Optional: a diffusers AutoencoderKL folder, when from_pretrained holds the temporal VAE only.
    spatial_from_pretrained: str | None = None
    micro_frame_size: int | None = 17
    micro_batch_size: int | None = 4
    # Architecture overrides for other VAEs of this design (None: Open-Sora 1.2's SDXL VAE / VAE_Temporal_SD).
    spatial_config: dict[str, Any] | None = None
    temporal_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # constructor arguments of a testbed VAE

    def __post_init__(self) -> None:
        _positive("vae", micro_frame_size=self.micro_frame_size, micro_batch_size=self.micro_batch_size)
        if self.type == "OpenSoraVAE_V1_2" and self.extra:
            raise ConfigError(
                f"vae: unknown key {', '.join(map(repr, sorted(self.extra)))}; allowed: type, from_pretrained, "
                "spatial_from_pretrained, micro_frame_size, micro_batch_size, spatial_config, temporal_config"
            )

    @property
    def needs_weights(self) -> bool:
        return self.type == "OpenSoraVAE_V1_2"


@dataclass
class TextEncoderSection:
    type: TextEncoderType = "t5"
    from_pretrained: str | None = None
    model_max_length: int | None = None  # None: the encoder's own (300 for T5, as STDiT3 was trained)
    dtype: str = "fp32"  # upstream runs T5-XXL in fp32
    # T5-XXL is 19 GB in fp32: "cpu" keeps it in host memory and moves it to the GPU only while encoding,
    # "free" drops it after encoding (reloaded from disk for the next batch), "none" keeps it on the device.
    offload: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)  # constructor arguments of the testbed encoder

    def __post_init__(self) -> None:
        _positive("text_encoder", model_max_length=self.model_max_length)
        if self.dtype not in DTYPES:
            raise ConfigError(f"text_encoder.dtype={self.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        if self.offload not in ("none", "cpu", "free"):
            raise ConfigError(f"text_encoder.offload={self.offload!r} is not allowed; allowed: none, cpu, free")
        if self.type == "t5" and self.extra:
            raise ConfigError(
                f"text_encoder: unknown key {', '.join(map(repr, sorted(self.extra)))}; allowed: type, "
                "from_pretrained, model_max_length, dtype, offload"
            )

    @property
    def needs_weights(self) -> bool:
        return self.type == "t5"


@dataclass
class SchedulerSection:
    type: Literal["rflow"] = "rflow"
    num_sampling_steps: int = 30
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    transform_scale: float = 1.0
    use_discrete_timesteps: bool = False
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        _positive(
            "scheduler",
            num_sampling_steps=self.num_sampling_steps,
            num_timesteps=self.num_timesteps,
            transform_scale=self.transform_scale,
        )
        if self.num_sampling_steps > self.num_timesteps:  # the sampler's steps divide num_timesteps
            raise ConfigError(
                f"scheduler.num_sampling_steps={self.num_sampling_steps} is not allowed: at most "
                f"scheduler.num_timesteps ({self.num_timesteps})"
            )


@dataclass
class CacheSection:
    """`method` plus that method's settings (checked by duca_video.cache when it is enabled)."""

    method: str = "none"
    # Keep the cache in host memory, each block's share on the device only while it runs (same pixels).
    offload: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in CACHE_METHODS:
            raise ConfigError(f"cache.method={self.method!r} is not allowed; allowed: {', '.join(CACHE_METHODS)}")
        if self.method == "none" and self.extra:
            raise ConfigError(
                f"cache: settings {', '.join(map(repr, sorted(self.extra)))} given for method 'none', which has none"
            )

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.extra)


_SECTIONS = {
    "model": (ModelSection, True),
    "vae": (VAESection, True),
    "text_encoder": (TextEncoderSection, True),
    "scheduler": (SchedulerSection, False),
    "cache": (CacheSection, True),
}


@dataclass
class InferenceConfig:
    """Everything one inference run needs. Field names are Open-Sora 1.2's where it has them."""

    model: ModelSection = field(default_factory=ModelSection)
    vae: VAESection = field(default_factory=VAESection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    cache: CacheSection = field(default_factory=CacheSection)
    # size: image_size (H, W) wins; otherwise resolution x aspect_ratio from Open-Sora's table
    resolution: str | None = None
    aspect_ratio: str | None = None
    image_size: tuple[int, int] | None = None
    num_frames: int | str = 51
    fps: int = 24
    save_fps: int | None = None
    frame_interval: int = 1
    # generation
    seed: int = 42
    batch_size: int = 1
    dtype: str = "bf16"
    device: str = "auto"
    aes: float | None = None
    flow: float | None = None
    camera_motion: str | None = None
    # prompts and outputs
    prompt: list[str] | None = None
    prompt_path: str | None = None
    start_index: int = 0
    end_index: int | None = None
    num_sample: int = 1
    prompt_as_path: bool = False
    sample_name: str | None = None
    save_dir: str = "samples"
    save_latents: bool = False
    # "I/N": this job's share of the planned videos (the I-th of N contiguous blocks, 0-based), for job arrays
    # (SLURM, ...) writing into one folder; the shards are disjoint and cover the whole job.
    shard: str = "0/1"
    # Open-Sora cleans prompts before T5 (lower case, links, HTML, ...): the same here, so T5 sees upstream's text.
    clean_prompts: bool = True
    # Resume: a video whose record shows other pixel-changing settings is refused unless overwrite is set.
    overwrite: bool = False
    count_flops: bool = True
    quiet: bool = False
    sp_size: int | None = None  # ranks per sequence-parallel group under torchrun (None: all of them)
    # The two classifier-free-guidance halves on two ranks (mesh dp x cfg x sp), one exchange per step.
    cfg_parallel: bool = False
    # torch.compile each block's attention, cross-attention and MLP (duca_video.cache.compile_blocks): the first
    # batch compiles (one graph per step kind's shapes), later ones run the compiled kernels; rounding may differ.
    compile: bool = False
    # Image / video conditioning, Open-Sora 1.2's names (duca_video.conditioning): one value for every prompt
    # or one per prompt; paths separated by ";"; a prompt's inline JSON overrides both for that prompt.
    reference_path: list[str] | None = None
    mask_strategy: list[str] | None = None
    loop: int = 1  # clips per video; clip k >= 1 starts from the last condition_frame_length latent frames of k-1
    condition_frame_length: int = 5  # latent frames
    condition_frame_edit: float = 0.0  # edit ratio of those frames (0 keeps them)
    align: int | None = None  # snap negative strategy starts to multiples of this (5 in Open-Sora 1.2's config)

    def __post_init__(self) -> None:
        self._check_size()
        _positive("config", fps=self.fps, save_fps=self.save_fps, frame_interval=self.frame_interval)
        _positive("config", batch_size=self.batch_size, num_sample=self.num_sample, sp_size=self.sp_size)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        if self.cfg_parallel and self.scheduler.cfg_scale == 1.0:
            raise ConfigError("cfg_parallel needs classifier-free guidance: with cfg_scale=1 there is no second half")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device={self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N (N = 0, 1, ..)")
        self._check_outputs()
        self._check_limits()
        self._check_conditioning()

    def _check_size(self) -> None:
        self.num_frames = _checked(lambda: sizes.parse_num_frames(self.num_frames), "num_frames")
        _checked(lambda: sizes.check_num_frames(self.num_frames, self.scheduler.use_timestep_transform), "num_frames")
        if self.image_size is None:
            if self.resolution is None or self.aspect_ratio is None:
                raise ConfigError("set image_size (H, W), or both resolution and aspect_ratio")
            _checked(lambda: sizes.image_size(self.resolution, self.aspect_ratio), ("resolution", "aspect_ratio"))
        elif min(self.image_size) < 1:
            raise ConfigError(f"image_size={list(self.image_size)} is not allowed: both sides must be >= 1")

    def _check_outputs(self) -> None:
        """Which prompts, and where their files go."""
        if self.start_index < 0:
            raise ConfigError(f"start_index={self.start_index} is not allowed: it must be >= 0")
        if self.end_index is not None and self.end_index <= self.start_index:
            raise ConfigError(f"end_index={self.end_index} must be greater than start_index={self.start_index}")
        if not str(self.save_dir).strip():  # "" would write into the working directory
            raise ConfigError(
                f"save_dir={self.save_dir!r} is not allowed: it is empty (give a folder; '.' is the working directory)"
            )
        _parse_shard(self.shard)
        if self.sample_name is not None:
            try:
                check_sample_name(self.sample_name)
            except PromptError as exc:
                raise ConfigError(f"sample_name: {exc}") from None

    def _check_limits(self) -> None:
        """Upper bounds: values past them would overflow a generator seed or the mp4 writer mid-run."""
        if not 0 <= self.seed <= MAX_SEED - (self.num_sample - 1):
            last = f" (and seed + num_sample - 1 = {self.seed + self.num_sample - 1})" if self.num_sample > 1 else ""
            raise ConfigError(f"seed={self.seed} is not allowed: seeds{last} must be in 0..2**63-1 = {MAX_SEED}")
        for key, value in (("fps", self.fps), ("save_fps", self.save_fps)):
            if value is not None and value > MAX_FPS:
                raise ConfigError(f"{key}={value} is not allowed: an mp4 frame rate is at most 2**31-1 = {MAX_FPS}")
        h, w = self.size
        if (h + 128) * (w + 128) >= _MAX_FRAME_AREA:
            raise ConfigError(
                f"image_size=[{h}, {w}] is not allowed: the mp4 writer (ffmpeg) refuses frames with "
                "(H + 128) * (W + 128) >= 2**28, e.g. larger than 16000 x 16000"
            )
        if 3 * self.num_frames * h * w >= 2**63:
            raise ConfigError(
                f"num_frames={self.num_frames} is not allowed at {h}x{w}: the video would have more "
                "values than a tensor can hold (2**63)"
            )

    def _check_conditioning(self) -> None:
        _positive("config", loop=self.loop, condition_frame_length=self.condition_frame_length, align=self.align)
        if self.loop > MAX_LOOP:  # each loop is a whole clip; the pre-load check alone grows with loop**2
            raise ConfigError(f"loop={self.loop} is not allowed: at most {MAX_LOOP} clips per video")
        if not 0.0 <= self.condition_frame_edit <= 1.0:
            raise ConfigError(
                f"condition_frame_edit={self.condition_frame_edit} is not allowed: it must be in "
                "[0, 1] (0 keeps the frames, 1 regenerates them)"
            )

    @property
    def shard_index(self) -> int:
        return _parse_shard(self.shard)[0]

    @property
    def shard_count(self) -> int:
        return _parse_shard(self.shard)[1]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the generated video as requested (the VAE may round it down to its factor)."""
        if self.image_size is not None:
            return self.image_size
        return sizes.image_size(self.resolution, self.aspect_ratio)

    @property
    def video_fps(self) -> int:
        """Frame rate written into the mp4 (upstream: save_fps, else fps // frame_interval)."""
        return self.save_fps if self.save_fps is not None else max(1, self.fps // self.frame_interval)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InferenceConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a dict of fields, got {type(values).__name__}")
        top = dict(values)
        sections = {}
        for name, (section_cls, extra_ok) in _SECTIONS.items():
            if name in top:
                sections[name] = _build(section_cls, top.pop(name), name, extra_ok)
        for key in ("prompt", "reference_path", "mask_strategy"):  # one value given as a string: a list of one
            if isinstance(top.get(key), str):
                top[key] = [top[key]]
        config = _build(_TopLevel, top, "config")
        return cls(**sections, **dataclasses.asdict(config))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for run records); section `extra` keys are folded back next to their siblings."""
        out = dataclasses.asdict(self)
        for name in _SECTIONS:
            section = out[name]
            section.update(section.pop("extra", {}))
        out["image_size"] = list(self.size)
        return out


def _parse_shard(text: Any) -> tuple[int, int]:
    index, sep, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard={text!r} is not allowed: expected I/N with 0 <= I < N, e.g. 0/8 .. 7/8")
    return i, n


def _checked(fn: typing.Callable[[], Any], keys: str | tuple[str, ...]) -> Any:
    keys = (keys,) if isinstance(keys, str) else keys
    try:
        return fn()
    except ValueError as exc:  # the sizes module's messages already start with the key
        raise ConfigError(str(exc) if str(exc).startswith(keys) else f"{keys[0]}: {exc}") from None


# The top-level scalar fields on their own, so `_build` can check them before the sections are attached.
_TopLevel = dataclasses.make_dataclass(
    "_TopLevel",
    [
        (f.name, f.type, field(default=f.default))
        for f in dataclasses.fields(InferenceConfig)
        if f.name not in _SECTIONS
    ],
)
_TopLevel.__module__ = __name__
