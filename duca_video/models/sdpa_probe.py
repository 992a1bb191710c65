"""Which SDPA kernel each attention site of STDiT3 takes, for the shapes of a real video size.

    python -m duca_video.models.sdpa_probe [--device cuda] [--dtype bf16] [--resolution 480p] [--frames 51]
                                           [--sp 2] [--text-tokens 40] [--time] [--json OUT]

STDiT3 attends in three places: spatial self-attention (the tokens of one frame), temporal self-attention (one
spatial position over the frames) and cross-attention (video tokens to the caption). For each site, with the
shapes the model really uses (CFG batch, cut text keys, sequence-parallel padding cut from the keys), the probe
runs `scaled_dot_product_attention` once under `torch.nn.attention.sdpa_kernel([backend])` for every backend
and reports which accept, why the others refuse (PyTorch's own warnings), and which one the dispatcher picks by
itself. Two rows show the masked calls the model used to make (uncut text keys, masked SP padding), for
comparison. On a CPU only the math kernel and PyTorch's CPU flash kernel exist; the probe says so. There a
trial uses one sequence of each site's batch (the kernel choice does not depend on the batch size on a CPU)
unless `--trial-batch` says otherwise; on CUDA it uses the whole batch, as batch limits matter there.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from duca_video.cli_checks import ArgError, ToolParser, output_file, positive_int
from duca_video.io.files import atomic_write_json
from duca_video.sizes import ASPECT_RATIOS, RESOLUTIONS, image_size

from .attention import attention_backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


@dataclass(frozen=True)
class Site:
    """One attention call: SDPA's (batch, heads, queries, head_dim) x (keys) and whether a key mask is passed."""

    name: str
    batch: int
    heads: int
    queries: int
    keys: int
    head_dim: int
    masked: bool
    note: str = ""


@dataclass(frozen=True)
class Geometry:
    """The token grid STDiT3-XL/2 sees for one video size (Open-Sora 1.2's VAE: 8x spatial, 17 frames -> 5)."""

    frames: int  # T, latent frames (patch 1 in time)
    height: int  # H, patches
    width: int  # W, patches

    @property
    def spatial(self) -> int:
        return self.height * self.width


def geometry(resolution: str, aspect_ratio: str, num_frames: int, patch: Sequence[int] = (1, 2, 2)) -> Geometry:
    """Latent token grid of a video: each full 17-frame chunk gives 5 latent frames, a remainder r gives ceil(r/4)."""
    h, w = image_size(resolution, aspect_ratio)
    if num_frames < 1:
        raise ValueError(f"--frames must be >= 1, got {num_frames}")
    full, rest = divmod(num_frames, 17)
    t = full * 5 + math.ceil(rest / 4)
    pt, ph, pw = patch
    return Geometry(-(-t // pt), -(-(h // 8) // ph), -(-(w // 8) // pw))


def attention_sites(
    g: Geometry,
    rows: int = 2,
    heads: int = 16,
    head_dim: int = 72,
    sp: int = 1,
    text_tokens: int = 40,
    max_text: int = 300,
) -> list[Site]:
    """The calls one forward makes on one rank (rows = the CFG batch: 2 per prompt)."""
    if sp < 1 or heads % sp:
        raise ValueError(f"--sp {sp}: the SP size must divide the head count {heads}")
    if not 1 <= text_tokens <= max_text:
        raise ValueError(f"--text-tokens {text_tokens}: allowed 1..{max_text}")
    s, padded = g.spatial, -(-g.spatial // sp) * sp
    local = padded // sp  # spatial positions per rank (cross-attention and temporal attention run on these)
    cross, spatial_rows, spatial_heads = g.frames * local, rows * g.frames, heads // sp
    cut = "SP padding cut from the keys" if padded != s else ""
    same = "no mask: every row has the same valid length"
    # (name, batch, heads, queries, keys, masked, note), each with this head dim
    calls = [
        ("spatial self", spatial_rows, spatial_heads, padded, s, False, cut),
        ("temporal self", rows * local, heads, g.frames, g.frames, False, ""),
        ("cross, text cut, lengths agree", rows, heads, cross, text_tokens, False, same),
        ("cross, text cut, lengths differ", rows, heads, cross, text_tokens, True, "mask over the cut keys"),
        ("cross, uncut (before)", rows, heads, cross, max_text, True, f"all {max_text} text keys, masked"),
    ]
    if padded != s:
        masked_pad = f"{padded - s} padded keys masked"
        calls.insert(
            1, ("spatial self, padding masked (before)", spatial_rows, spatial_heads, padded, padded, True, masked_pad)
        )
    return [Site(name, b, h, q, k, head_dim, masked, note) for name, b, h, q, k, masked, note in calls]


def _tensors(site: Site, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, site.heads, site.queries, site.head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, site.heads, site.keys, site.head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, site.heads, site.keys, site.head_dim, device=device, dtype=dtype, generator=gen)
    mask = None
    if site.masked:  # row 0 keeps about half its keys, the others all: lengths differ, as in a real batch
        mask = torch.ones(batch, 1, 1, site.keys, device=device, dtype=torch.bool)
        mask[0, ..., max(1, site.keys // 2) :] = False
    return q, k, v, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _try(backend: SDPBackend, q, k, v, mask, repeats: int) -> tuple[bool, str, float | None]:
    """(accepted, why not / empty, seconds per call when timed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                if repeats < 1:
                    return True, "", None
                _sync(q.device)
                start = time.perf_counter()
                for _ in range(repeats):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                _sync(q.device)
                return True, "", (time.perf_counter() - start) / repeats
        except RuntimeError as exc:
            # On CUDA, PyTorch warns why each kernel refused (e.g. "Flash attention kernel not used because:").
            reasons = [str(w.message).strip() for w in caught]
            text = " | ".join(reasons) or str(exc).strip().splitlines()[0]
            return False, " ".join(text.split())[:300], None


def dispatcher_choice(q, k, v, mask) -> str:
    """The backend SDPA takes with every backend allowed (PyTorch's own choice function; private, so guarded)."""
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False)).name
    except Exception as exc:  # noqa: BLE001 - an older or newer PyTorch without this function
        return f"unknown ({type(exc).__name__})"


def probe(
    sites: list[Site], device: torch.device, dtype: torch.dtype, trial_batch: int | None = None, repeats: int = 0
) -> list[dict[str, Any]]:
    """For each site: the shapes, which backends accept, why the others do not, and the default choice."""
    results = []
    for site in sites:
        batch = site.batch if trial_batch is None else max(1, min(trial_batch, site.batch))
        q, k, v, mask = _tensors(site, batch, device, dtype)
        backends = {}
        for name in BACKENDS:
            ok, why, seconds = _try(getattr(SDPBackend, name), q, k, v, mask, repeats)
            backends[name] = {"accepted": ok, "reason": why, "ms": None if seconds is None else seconds * 1e3}
        results.append(
            {**asdict(site), "trial_batch": batch, "default": dispatcher_choice(q, k, v, mask), "backends": backends}
        )
        del q, k, v, mask
    return results


def _device_note(device: torch.device) -> str:
    if device.type == "cpu":
        return (
            "CPU: PyTorch offers its math kernel and a fused CPU flash kernel (which also takes masks); the "
            "memory-efficient and cuDNN kernels are CUDA only."
        )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"CUDA {name} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
    return device.type


def format_table(results: list[dict[str, Any]]) -> str:
    short = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn", "MATH": "math"}
    lines = [f"{'site':38} {'shape (batch, heads, q x k, d)':34} {'mask':5} {'default':20} accepted"]
    for r in results:
        shape = f"({r['batch']}, {r['heads']}, {r['queries']}x{r['keys']}, {r['head_dim']})"
        ok = []
        for name, b in r["backends"].items():
            ok.append(short[name] + (f" {b['ms']:.2f}ms" if b["ms"] is not None else "") if b["accepted"] else "")
        lines.append(
            f"{r['name']:38} {shape:34} {'yes' if r['masked'] else 'no':5} {r['default']:20} "
            + ", ".join(o for o in ok if o)
        )
    refused: dict[tuple[str, str], list[str]] = {}  # (backend, reason) -> sites, so a reason prints once
    for r in results:
        for name, b in r["backends"].items():
            if not b["accepted"]:
                refused.setdefault((short[name], b["reason"]), []).append(r["name"])
    if refused:
        lines.append("refused:")
        for (name, why), where in refused.items():
            sites = "every site" if len(where) == len(results) else "; ".join(where)
            lines.append(f"  {name} at {sites}: {why}")
    return "\n".join(lines)


def _parser() -> ToolParser:
    p = ToolParser(prog="python -m duca_video.models.sdpa_probe", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--resolution", default="480p", choices=RESOLUTIONS)
    p.add_argument("--aspect-ratio", default="9:16", choices=ASPECT_RATIOS)
    p.add_argument("--frames", type=int, default=51, help="pixel frames (51 = 2 s)")
    p.add_argument("--rows", type=positive_int, default=2, help="rows of the model's batch (2 per prompt with CFG)")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel size (shapes on one rank)")
    p.add_argument("--text-tokens", type=int, default=40, help="valid caption tokens of the longest prompt")
    p.add_argument("--num-heads", type=positive_int, default=16)
    p.add_argument("--head-dim", type=positive_int, default=72)
    p.add_argument(
        "--trial-batch",
        type=positive_int,
        default=None,
        help="sequences per trial (default: all on CUDA, 1 on the CPU)",
    )
    p.add_argument("--time", action="store_true", help="also time each accepted backend (10 calls)")
    p.add_argument("--json", default=None, help="write the results to this file (its folder must exist)")
    return p


def _checked(args: argparse.Namespace) -> tuple[torch.device, Geometry, list[Site]]:
    """The device, grid and sites the flags name; ArgError naming the flag and what is allowed."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ArgError(f"--device {args.device!r}: allowed values are cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ArgError(f"--device {args.device!r}: allowed values are cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgError("--device cuda: CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ArgError(f"--device {args.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        g = geometry(args.resolution, args.aspect_ratio, args.frames)
        sites = attention_sites(g, args.rows, args.num_heads, args.head_dim, args.sp, args.text_tokens)
    except ValueError as exc:
        raise ArgError(str(exc)) from None
    output_file(args.json, "--json")
    return device, g, sites


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device, g, sites = parser.check(_checked, args)
    trial = args.trial_batch if args.trial_batch is not None else (None if device.type == "cuda" else 1)
    results = probe(sites, device, DTYPES[args.dtype], trial, repeats=10 if args.time else 0)
    header = {
        "device": str(device),
        "device_note": _device_note(device),
        "dtype": args.dtype,
        "resolution": args.resolution,
        "aspect_ratio": args.aspect_ratio,
        "frames": args.frames,
        "grid": asdict(g),
        "sp": args.sp,
        "torch": torch.__version__,
        "duca_attention": attention_backend(device),
    }
    print(
        f"{header['device_note']}\nSTDiT3 grid T x H x W = {g.frames} x {g.height} x {g.width} patches "
        f"({args.resolution} {args.aspect_ratio}, {args.frames} frames), {args.dtype}, SP {args.sp}; "
        f"duca_video attention path: {header['duca_attention']}"
    )
    print(format_table(results))
    if args.json:
        atomic_write_json(args.json, {**header, "sites": results})  # never a half-written file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
