"""Train the tiny pixel-space STDiT3 of the testbed on synthetic shape videos and export it to `weights/tiny`.

    python scripts/train_tiny.py --threads 2 --steps 4800 --time-limit-min 55      # fresh run (the shipped one)
    python scripts/train_tiny.py --resume                                           # continue the last run
    python scripts/train_tiny.py --export-only                                      # re-export from the checkpoint
    python scripts/train_tiny.py --depth 28 --grow-from weights/tiny --teacher weights/tiny --steps 370 \
        --warmup 20 --lr 3e-4 --batch-size 16 --ema-decay 0.99 --time-limit-min 26 --store int8 \
        --out weights/tiny28    # the deep model: weights/tiny's blocks repeated to 28 (testbed/grow.py), then
                                # distilled from it; stored as int8 rows (15 MB instead of 60)

The model is our STDiT3 (in_channels 3, pred_sigma False) trained with `RFlowSampler.training_loss` jointly
with a `WordTextEncoder`; t is logit-normal, shifted towards noise (`--t-shift`), and the sampler's timestep
transform is off (the videos are far smaller than its 512x512 reference; sample with it off too). 10% of
captions are replaced by the model's null caption (`y_embedder.y_embedding`, as Open-Sora's CFG dropout).
The learning rate warms up then follows a cosine; an EMA of the weights is what gets exported. A checkpoint
(model, text encoder, EMA, optimizer, step, RNG states) is written every few minutes, so `--resume` continues
exactly where the run stopped.

Design, measured on 2 CPU cores (see DataConfig): 8 frames of 16x16, patch (4, 2, 2), shapes that start near
the centre and head for the edge the caption names. Two choices make the direction words learnable in an hour:
- The temporal patch. STDiT3 has no absolute frame position (temporal RoPE is relative), so with one frame per
  token "left" and "right" differ only in how frames relate, a signal so weak at high noise that models with
  patch (1, 2, 2), (1, 4, 4) and (2, 2, 2) ignored the direction words after 1000-2800 steps (their output
  did not change when the word did). Inside a 4-frame token (as in the latents of Open-Sora's temporal VAE)
  the order of frames is explicit.
- The centre start. With tracks starting anywhere, the direction word does not change where the shape is on
  average, only how frames relate, and even patch (4, 2, 2) / (8, 2, 2) models ignored it after 1000-1700
  steps while learning colour. Starting near the centre, the word also says which half of the frame the shape
  is in: it explains 2/3 of what the other attributes leave unexplained in a clip (vs 1/5 before). The shipped
  run (the defaults, 55 min, 4366 steps) ignored the word for ~1000 steps, moved shapes the right way on
  average by ~1900 and had direction right on 32/32 prompts by ~2800 (100/100 at the end).
`--cond-frame-prob` (a clean frame through x_mask, as Open-Sora's mask ratios) needs temporal patch 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# On a shared machine, OpenMP threads that spin while waiting steal the cores other processes need (and the
# ones this process needs next): passive waiting made a training step 2-4x faster under contention here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from duca_video.models import STDiT3, STDiT3Config, read_state_dict
from duca_video.models.int8_rows import quantize_rows
from duca_video.sampling.rflow import RFlowSampler, add_noise, describe
from duca_video.testbed.data import DataConfig, SyntheticVideos
from duca_video.testbed.grow import grow_depth
from duca_video.testbed.text import WordTextEncoder
from duca_video.testbed.tiny import load_tiny

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "weights" / "tiny", help="where the final files go")
    p.add_argument("--run-dir", type=Path, default=None, help="checkpoint + loss log (default: OUT/run)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--export-only", action="store_true", help="only export the checkpoint's weights to OUT")
    p.add_argument("--export-raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument(
        "--store",
        choices=("fp32", "int8"),
        default="fp32",
        help="how model.safetensors holds the weights: float32, or int8 rows + scales (4x smaller; the rounded "
        "model is the exported one, see duca_video/models/int8_rows.py)",
    )
    # model
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, nargs=3, default=(4, 2, 2))
    p.add_argument("--text-dim", type=int, default=64, help="word embedding size (caption_channels)")
    p.add_argument("--max-words", type=int, default=16, help="model_max_length")
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="an exported model whose velocity is the target (distillation), e.g. weights/tiny",
    )
    p.add_argument(
        "--grow-from",
        type=Path,
        default=None,
        help="start from this exported shallower model (same width), its blocks repeated to --depth (testbed/grow.py)",
    )
    # optimisation
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--stop-at", type=int, default=None, help="pause at this step (the schedule still ends at --steps)")
    p.add_argument("--time-limit-min", type=float, default=55.0, help="stop (and export) after this much training")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="the cosine ends at lr * this")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--null-prob", type=float, default=0.1, help="fraction of captions replaced by the null one")
    p.add_argument("--t-shift", type=float, default=2.0, help="shift logit-normal t towards noise (1 = none)")
    p.add_argument(
        "--cond-frame-prob",
        type=float,
        default=0.0,
        help="fraction of clips with one random frame given clean (x_mask), as Open-Sora's mask ratios",
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-every-min", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=10)
    # how the exported model is meant to be sampled
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    return p.parse_args(argv)


def build(args: argparse.Namespace, data: DataConfig) -> tuple[STDiT3, WordTextEncoder]:
    config = STDiT3Config(
        depth=args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        patch_size=tuple(args.patch),
        in_channels=3,
        caption_channels=args.text_dim,
        model_max_length=args.max_words,
        pred_sigma=False,
        # With height/width given in pixels, this makes the 2D position table as smooth as upstream's at 512.
        input_sq_size=4 * max(data.height, data.width),
    )
    return STDiT3(config), WordTextEncoder(output_dim=args.text_dim, model_max_length=args.max_words)


def require_exported(source: Path, flag: str) -> None:
    """Exit with one line naming `flag` unless `source` is an exported testbed model folder."""
    missing = [f for f in ("config.json", "model.safetensors") if not (source / f).is_file()]
    if missing:
        raise SystemExit(f"error: {flag} {source}: no {' or '.join(missing)} there (expected an exported model folder)")


def grow_into(model: STDiT3, text: WordTextEncoder, source: Path) -> None:
    """Load a shallower exported model into `model`, its blocks repeated (duca_video.testbed.grow), and its word
    encoder into `text`; any other difference of architecture is refused, naming the field."""
    require_exported(source, "--grow-from")
    shallow = json.loads((source / "config.json").read_text())
    mine = model.config.to_dict()
    for field in ("hidden_size", "num_heads", "patch_size", "caption_channels", "model_max_length", "in_channels"):
        if _as_list(shallow[field]) != _as_list(mine[field]):
            raise SystemExit(f"--grow-from {source}: {field} is {shallow[field]} there, {mine[field]} here")
    model.load_state_dict(grow_depth(read_state_dict(source), model.config.depth), strict=True)
    text.load_state_dict(WordTextEncoder.from_pretrained(source).state_dict(), strict=True)
    print(f"grown from {source}: {shallow['depth']} -> {model.config.depth} blocks")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def grown_from(source: Path | None) -> dict[str, Any] | None:
    """What config.json records of a warm start: the source's depth and how it was trained."""
    if source is None:
        return None
    shallow = json.loads((source / "config.json").read_text())
    return {"depth": shallow["depth"], "training": shallow.get("testbed", {}).get("training")}


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


class Ema:
    """Exponential moving average of every parameter and buffer of `module`."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        # The usual warm-up of the decay, so early steps are not dominated by the random initialisation.
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v.detach().float(), 1 - decay)


def model_inputs(
    text: WordTextEncoder, model: STDiT3, captions: list[str], data: DataConfig, drop: torch.Tensor
) -> dict[str, Any]:
    """The model's keyword inputs for these captions; the captions flagged in `drop` become the null caption."""
    enc = text.encode(captions)
    y, mask, b = enc["y"], enc["mask"], len(captions)
    # As Open-Sora: a dropped caption becomes the null embedding, its token mask is kept.
    y_null = model.y_embedder.y_embedding[None, None].expand_as(y)
    y = torch.where(drop[:, None, None, None], y_null, y)
    full = lambda v: torch.full((b,), float(v))  # noqa: E731
    return {"y": y, "mask": mask, "fps": full(data.fps), "height": full(data.height), "width": full(data.width)}


def shifted_logit_normal(n: int, shift: float, num_timesteps: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal t in [0, num_timesteps), shifted towards the noisy end: t' = s t / (1 + (s - 1) t), the
    timestep transform's formula with a fixed ratio s.

    Why: where the shape is in each frame (hence its direction) is decided at high noise, where plain
    logit-normal puts ~4% of its mass (t > 0.85); s = 2 puts ~15% there and still ~25% below t = 0.5.
    """
    u = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * u / (1 + (shift - 1) * u) * num_timesteps


def clean_frame_mask(x0: torch.Tensor, noise: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor | None:
    """Give one random frame of a `prob` fraction of clips clean: x_mask False there (the model is told t = 0)
    and noise := x0 there, so `add_noise` leaves the frame clean and its velocity target is 0.

    Why: the model has no absolute frame position (RoPE is relative), and a caption's direction only changes
    how frames relate to each other, a weak signal at high noise. With a clean anchor frame, where the shape
    is in every other frame depends on the direction word directly, which teaches direction-aware temporal
    attention far faster; the same attention then carries the motion when no frame is given (Open-Sora 1.2
    trains with such masks too).
    """
    b, _, t = x0.shape[:3]
    chosen = torch.rand(b, generator=gen) < prob
    frame = torch.randint(t, (b,), generator=gen)
    if not bool(chosen.any()):
        return None
    x_mask = torch.ones(b, t, dtype=torch.bool)
    x_mask[chosen, frame[chosen]] = False
    clean = ~x_mask[:, None, :, None, None]
    noise.copy_(torch.where(clean, x0, noise))
    return x_mask


def load_teacher(source: Path) -> tuple[WordTextEncoder, STDiT3]:
    """An exported testbed model and its word encoder, frozen, for `distilled_pair`."""
    require_exported(source, "--teacher")
    bed = load_tiny(source)
    for part in (bed.model, bed.text_encoder):
        part.eval().requires_grad_(False)
    return bed.text_encoder, bed.model


@torch.no_grad()
def distilled_pair(
    teacher: tuple[WordTextEncoder, STDiT3], x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0', noise') giving the same x_t = (1 - s) x0 + s noise (s = t / 1000) whose target x0' - noise' is the
    teacher's velocity there: x0' = x_t + s v, noise' = x_t - (1 - s) v. The training loss is then the distance
    to the teacher, a far less noisy target than the clip itself (whose motion a student otherwise finds late)."""
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    x_t = add_noise(x0, noise, t)
    v = teacher[1](x_t, t, **kwargs)[:, : x0.shape[1]].float()
    return x_t + s * v, x_t - (1 - s) * v


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill during the write never leaves a broken checkpoint


def export(args: argparse.Namespace, ckpt: dict[str, Any], data: DataConfig, sampler: RFlowSampler) -> None:
    model, text = build(args, data)
    weights = ckpt["model"] if args.export_raw else {k[6:]: v for k, v in ckpt["ema"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    if not args.export_raw:
        text.load_state_dict({k[5:]: v for k, v in ckpt["ema"].items() if k.startswith("text.")}, strict=True)
    else:
        text.load_state_dict(ckpt["text"], strict=True)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.float().contiguous() for k, v in model.state_dict().items()}
    save_file(quantize_rows(weights) if args.store == "int8" else weights, str(args.out / "model.safetensors"))
    text.save_pretrained(args.out)
    config = model.config.to_dict()
    config["testbed"] = {
        "data": data.to_dict(),
        "num_frames": data.num_frames,
        "height": data.height,
        "width": data.width,
        "fps": data.fps,
        "sampler": {**describe(sampler), "num_sampling_steps": args.sample_steps, "cfg_scale": args.cfg_scale},
        "model_kwargs": {"fps": data.fps, "height": data.height, "width": data.width},
        "vae": "PixelVAE (pixels in [-1, 1] are the latents)",
        "text_encoder": "WordTextEncoder (text_encoder.json + text_encoder.safetensors)",
        "training": {
            "steps": ckpt["step"],
            "minutes": round(ckpt["elapsed"] / 60, 1),
            "final_loss": ckpt.get("last_loss"),
            "weights": "raw" if args.export_raw else f"ema {args.ema_decay}",
            "seed": args.seed,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "null_prob": args.null_prob,
            "bf16": args.bf16,
            "t_shift": args.t_shift,
            "cond_frame_prob": args.cond_frame_prob,
            "grown_from": grown_from(args.grow_from),
            "teacher": None if args.teacher is None else str(args.teacher),
            "storage": "int8 rows + float32 scales (duca_video/models/int8_rows.py)"
            if args.store == "int8"
            else "float32",
        },
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(
        f"exported {'raw' if args.export_raw else 'EMA'} weights of step {ckpt['step']} to {args.out} "
        f"({total / 2**20:.2f} MiB)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = args.run_dir or args.out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "loss.csv"
    data = DataConfig()
    sampler = RFlowSampler(use_timestep_transform=False)

    if args.export_only:
        export(args, torch.load(ckpt_path, weights_only=True), data, sampler)
        return

    if args.cond_frame_prob > 0 and args.patch[0] > 1:
        # STDiT3's x_mask is per input frame and assumes one frame per temporal token (as upstream).
        raise SystemExit("--cond-frame-prob needs a temporal patch size of 1")
    torch.manual_seed(args.seed)
    model, text = build(args, data)
    if args.grow_from is not None and not args.resume:
        grow_into(model, text, args.grow_from)
    teacher = load_teacher(args.teacher) if args.teacher is not None else None
    pair = torch.nn.ModuleDict({"model": model, "text": text}).train()
    params = [p for p in pair.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    ema = Ema(pair, args.ema_decay)
    # Separate streams, so that e.g. the caption dropout does not shift the data drawn after it.
    gens = {n: torch.Generator().manual_seed(args.seed * 1000 + i) for i, n in enumerate(("data", "noise", "drop"))}
    step, elapsed, last_loss = 0, 0.0, None
    if args.resume:
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        text.load_state_dict(ckpt["text"])
        opt.load_state_dict(ckpt["opt"])
        ema.shadow = ckpt["ema"]
        for name, g in gens.items():
            g.set_state(ckpt["rng"][name])
        step, elapsed, last_loss = ckpt["step"], ckpt["elapsed"], ckpt.get("last_loss")
        print(f"resumed at step {step} ({elapsed / 60:.1f} min of training)")
    elif log_path.exists():
        log_path.unlink()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"STDiT3 {model.config.to_dict()} ({n_params / 1e6:.2f} M parameters); data {data.to_dict()}")

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "text": text.state_dict(),
            "opt": opt.state_dict(),
            "ema": ema.shadow,
            "rng": {n: g.get_state() for n, g in gens.items()},
            "step": step,
            "elapsed": elapsed,
            "last_loss": last_loss,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }

    videos = SyntheticVideos(data)
    limit_s = args.time_limit_min * 60
    new_log = not log_path.exists()
    log_file = log_path.open("a", newline="")
    log = csv.writer(log_file)
    if new_log:
        log.writerow(["step", "loss", "lr", "minutes", "sec_per_step"])
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout)
    last_ckpt, window, t_window = time.monotonic(), [], time.monotonic()
    stop_at = min(args.steps, args.stop_at or args.steps)
    while step < stop_at and elapsed < limit_s:
        t0 = time.monotonic()
        # Progress is the further of steps and time, so a slow (shared) machine still ends its cosine in time.
        lr = lr_at(max(step / args.steps, elapsed / limit_s), step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, captions, _ = videos.batch(args.batch_size, gens["data"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            drop = torch.rand(len(captions), generator=gens["drop"]) < args.null_prob
            kwargs = model_inputs(text, model, captions, data, drop)
            noise = torch.randn(x0.shape, generator=gens["noise"])
            kwargs["x_mask"] = clean_frame_mask(x0, noise, args.cond_frame_prob, gens["drop"])
            t = shifted_logit_normal(x0.shape[0], args.t_shift, sampler.num_timesteps, gens["noise"])
            if teacher is not None:
                x0, noise = distilled_pair(teacher, x0, noise, t, model_inputs(*teacher, captions, data, drop))
            loss = sampler.training_loss(model, x0, kwargs, noise=noise, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        step += 1
        ema.update(pair, step)
        elapsed += time.monotonic() - t0
        window.append(loss.item())
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            last_loss = sum(window) / len(window)
            sec = (time.monotonic() - t_window) / len(window)
            log.writerow([step, f"{last_loss:.5f}", f"{lr:.3e}", f"{elapsed / 60:.2f}", f"{sec:.2f}"])
            log_file.flush()
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.1e}", min=f"{elapsed / 60:.1f}")
            window, t_window = [], time.monotonic()
        if time.monotonic() - last_ckpt > args.ckpt_every_min * 60:
            save_checkpoint(ckpt_path, state())
            last_ckpt = time.monotonic()
    bar.close()
    log_file.close()
    save_checkpoint(ckpt_path, state())
    print(f"stopped at step {step} after {elapsed / 60:.1f} min; loss {last_loss}")
    export(args, state(), data, sampler)


if __name__ == "__main__":
    main()
