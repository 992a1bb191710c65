"""FLOP counting on the meta device: no weights, no real compute, so Open-Sora sizes fit on a laptop.

Counts with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; one fused
multiply-add = 2 FLOPs). Run as a command:

    python -m duca_video.metrics.flops --image-size 480 854 --num-frames 51
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from duca_video.cli_checks import ToolParser, int_at_least, positive_int
from duca_video.models.stdit3 import STDiT3, STDiT3Config


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run `fn(*args, **kwargs)` under a FLOP counter; returns (flops, result)."""
    counter = flop_counter()
    with counter, torch.no_grad():
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, taught the CPU flash-attention kernel it does not know (else attention is 0)."""
    from torch.utils.flop_counter import sdpa_flop_count

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def meta_inputs(
    config: STDiT3Config,
    latent_shape: tuple[int, int, int],
    batch: int,
    image_size: tuple[int, int],
    text_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs on the meta device; the mask and height/width stay on the CPU (their values are read)."""
    text_tokens = config.model_max_length if text_tokens is None else text_tokens
    t, h, w = latent_shape
    with torch.device("meta"):
        inputs = dict(
            x=torch.empty(batch, config.in_channels, t, h, w),
            timestep=torch.empty(batch),
            y=torch.empty(batch, 1, text_tokens, config.caption_channels),
            fps=torch.empty(batch),
        )
    # The mask, height and width stay on the CPU: their values are what the model reads of them.
    inputs["mask"] = torch.ones(batch, text_tokens, dtype=torch.long)
    inputs["height"] = torch.full((batch,), float(image_size[0]))
    inputs["width"] = torch.full((batch,), float(image_size[1]))
    return inputs


def stdit3_forward_flops(
    config: STDiT3Config,
    latent_shape: tuple[int, int, int],
    image_size: tuple[int, int],
    batch: int = 1,
    text_tokens: int | None = None,
) -> int:
    """FLOPs of one STDiT3 forward for `batch` samples of latent size (T, H, W); all text tokens valid."""
    with torch.device("meta"):
        model = STDiT3(config).eval()
    flops, _ = count_flops(model, **meta_inputs(config, latent_shape, batch, image_size, text_tokens))
    return flops


class SamplingFlops:
    """FLOPs of whole sampling loops, counted on a meta copy of the model *after* a timed run, so the counter's
    per-operator Python overhead never lands in a measured latency.

    The copy has the model's architecture and dtype and the same cache method; it runs the same sampler on meta
    tensors of the batch's shapes. What the cache decides from real data is replayed: TeaCache's full / reuse
    choice per step is taken from the real run's history (`kinds`); which tokens a selector picks does not change
    the cost. Counts are memoised per (batch size, decisions), so a long job pays for one replay per batch size.
    The count is the single-device loop (sequence parallelism splits the same work over its ranks).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, method: Any, sampler: Any) -> None:
        from duca_video import cache as cache_lib

        with torch.device("meta"):
            self.model = type(model)(model.config).eval().to(dtype)
        self.sampler, self.dtype = sampler, dtype
        self.controller = None if method is None else cache_lib.enable(self.model, method)
        self._memo: dict[tuple, int] = {}

    def count(
        self,
        batch: int,
        latent_shape: tuple[int, ...],
        model_kwargs: dict[str, Any],
        kinds: list[str] | None = None,
        text_tokens: int | None = None,
    ) -> int:
        """FLOPs of one loop for `batch` videos of latent (C, T, H, W); `kinds` = the real run's step kinds;
        `text_tokens` = the caption keys cross-attention really attends to (the sampler cuts the text to the
        batch's longest caption; None = all of model_max_length)."""
        replayed = tuple(kinds) if kinds is not None and self._data_dependent() else None
        key = (batch, tuple(latent_shape), replayed, text_tokens)
        if key not in self._memo:
            self._memo[key] = self._replay(batch, latent_shape, model_kwargs, replayed, text_tokens)
        return self._memo[key]

    def _data_dependent(self) -> bool:
        return self.controller is not None and self.controller.config.data_dependent

    def _replay(
        self,
        batch: int,
        latent_shape: tuple[int, ...],
        model_kwargs: dict[str, Any],
        kinds,
        text_tokens: int | None = None,
    ) -> int:
        config = self.model.config
        with torch.device("meta"):
            z = torch.empty(batch, *latent_shape, dtype=self.dtype)
            y = torch.empty(batch, 1, config.model_max_length, config.caption_channels, dtype=self.dtype)
        # The mask stays on the CPU (its values say how far the sampler cuts the text keys, at no cost).
        mask = torch.zeros(batch, config.model_max_length, dtype=torch.long)
        mask[:, : config.model_max_length if text_tokens is None else text_tokens] = 1
        # Sizes keep their values on the CPU: they set the position scale and the timestep transform.
        kwargs = {
            k: (v.to("cpu") if k in ("height", "width", "num_frames") else v.to("meta"))
            for k, v in model_kwargs.items()
        }
        if self.controller is not None:
            self.controller.replay_kinds = list(kinds) if kinds is not None else None
        y_null = torch.empty_like(y)
        flops, _ = count_flops(
            self.sampler.sample, self.model, z, y, y_null, mask, model_kwargs=kwargs, progress=False, seed=[0] * batch
        )
        return int(flops)


def video_latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Open-Sora 1.2 VAE latent size: 8x spatial (floor), 17-frame chunks -> 5 latents, a partial chunk of r
    frames -> ceil(r / 4) latents."""
    full, rest = divmod(num_frames, 17)
    return full * 5 + -(-rest // 4), height // 8, width // 8


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(
        prog="python -m duca_video.metrics.flops", description="FLOPs of one STDiT3-XL/2 forward (meta device)."
    )
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int_at_least(8),
        default=[480, 854],
        metavar=("H", "W"),
        help="pixels, each >= 8 (one latent row)",
    )
    parser.add_argument("--num-frames", type=positive_int, default=51)
    parser.add_argument("--batch", type=positive_int, default=1)
    args = parser.parse_args(argv)
    h, w = args.image_size
    latent = video_latent_shape(args.num_frames, h, w)
    flops = stdit3_forward_flops(STDiT3Config(), latent, (h, w), batch=args.batch)
    print(
        f"STDiT3-XL/2, {h}x{w}, {args.num_frames} frames (latent {latent}), batch {args.batch}: "
        f"{flops / 1e12:.2f} TFLOPs per forward"
    )


if __name__ == "__main__":
    main()
