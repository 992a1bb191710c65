"""RFlow sampler: timesteps vs upstream's lists, CFG math, frame masks, events, validation, training loss."""

from __future__ import annotations

import json

import pytest
import torch

from duca_video.sampling.events import SampleStart, StepStart, register_listener
from duca_video.sampling.rflow import RFlowSampler, add_noise, timestep_transform
from tests.helpers import reference_dir

REF_SIZES = {
    "480p_51f": (480, 854, 51),
    "240p_51f": (240, 426, 51),
    "720p_102f": (720, 1280, 102),
    "480p_image": (480, 854, 1),
}
B, C, T, H, W, L, CY = 2, 3, 4, 2, 3, 5, 6


@pytest.fixture(scope="module")
def ref_timesteps() -> dict[str, list[float]]:
    folder = reference_dir()
    path = None if folder is None else folder / "stdit3_reference_public.json"
    if path is None or not path.is_file():
        pytest.skip(f"reference file absent: {path}")
    return json.loads(path.read_text())["rflow_timesteps_30"]


class StandIn(torch.nn.Module):
    """A linear function of x, t and the masked mean of y; returns 2C channels (the second half is junk)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(C, generator=g) * 0.3
        self.b = torch.randn(C, generator=g)
        self.c = torch.randn(C, CY, generator=g)
        self.calls: list[dict] = []
        self.fail_at = fail_at

    def forward(self, x, timestep, y, mask=None, x_mask=None, **kwargs):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("boom")
        self.calls.append(dict(t=timestep.clone(), mask=mask, x_mask=x_mask, n=x.shape[0], kwargs=kwargs))
        return self.fn(x, timestep, y, mask)

    def fn(self, x, timestep, y, mask):
        yy = y[:, 0]
        if mask is not None:
            m = mask.to(yy.dtype)[..., None]
            ymean = (yy * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            ymean = yy.mean(1)
        bias = (ymean @ self.c.T)[:, :, None, None, None]
        v = self.a.view(1, C, 1, 1, 1) * x + self.b.view(1, C, 1, 1, 1) * (timestep / 1000).view(-1, 1, 1, 1, 1)
        return torch.cat([v + bias, torch.full_like(v, 99.0)], 1)


class Recorder:
    def __init__(self) -> None:
        self.events: list = []

    def on_sample_start(self, event: SampleStart) -> None:
        self.events.append(event)

    def on_step_start(self, event: StepStart) -> None:
        self.events.append(event)

    def on_sample_end(self) -> None:
        self.events.append("end")


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, T, H, W, generator=g)
    y = torch.randn(B, 1, L, CY, generator=g)
    y_null = torch.randn(1, 1, L, CY, generator=g).expand(B, 1, L, CY).clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kw = dict(height=torch.tensor([240.0, 240.0]), width=torch.tensor([426.0, 426.0]), fps=torch.tensor([24.0] * B))
    kw["num_frames"] = 51
    return z, y, y_null, mask, kw


# ---------------------------------------------------------------- timesteps
@pytest.mark.parametrize("name", sorted(REF_SIZES))
def test_timesteps_match_upstream(ref_timesteps, name):
    got = RFlowSampler().timesteps(*REF_SIZES[name])
    assert len(got) == 30
    assert max(abs(a - b) for a, b in zip(got, ref_timesteps[name])) < 1e-3


def test_transform_in_fp16_does_not_overflow():
    # 720 * 1280 > 65504 overflows in fp16 upstream; here the arithmetic is float32.
    t = torch.tensor([500.0, 500.0])
    half = timestep_transform(t, torch.tensor([720.0] * 2).half(), torch.tensor([1280.0] * 2).half(), 102)
    ref = timestep_transform(500.0, 720, 1280, 102)
    assert torch.isfinite(half).all() and torch.allclose(half, torch.tensor([ref] * 2))
    assert timestep_transform(1000.0, 720, 1280, 102) == pytest.approx(1000.0)
    assert timestep_transform(500.0, 512, 512, 1) == pytest.approx(500.0)  # r == 1 is the identity


def test_transform_rejects_zero_time_ratio():
    with pytest.raises(ValueError, match="num_frames"):
        timestep_transform(500.0, 480, 854, 16)


def test_timestep_options():
    plain = RFlowSampler(num_sampling_steps=4, use_timestep_transform=False).timesteps(480, 854, 51)
    assert plain == [1000.0, 750.0, 500.0, 250.0]
    disc = RFlowSampler(num_sampling_steps=3, use_timestep_transform=False, use_discrete_timesteps=True)
    assert disc.timesteps(1, 1, 1) == [1000.0, 667.0, 333.0]
    with pytest.raises(ValueError):
        RFlowSampler(num_sampling_steps=0)


# ---------------------------------------------------------------- sampling
def _hand_loop(model, sampler, z, y, y_null, mask, scale):
    ts = sampler.timesteps(240, 426, 51)
    for i, t in enumerate(ts):
        tt = torch.full((2 * B,), t)
        out = model.fn(torch.cat([z, z]), tt, torch.cat([y, y_null]), torch.cat([mask, mask]))[:, :C]
        v = out[B:] + scale * (out[:B] - out[B:])
        dt = (ts[i] - ts[i + 1]) if i + 1 < len(ts) else ts[i]
        z = z + v * dt / 1000
    return z


def test_cfg_matches_hand_written_loop():
    z, y, y_null, mask, kw = _inputs()
    model = StandIn()
    sampler = RFlowSampler(num_sampling_steps=5, cfg_scale=4.5)
    got = sampler.sample(model, z, y, y_null, mask, model_kwargs=kw, progress=False)
    want = _hand_loop(model, sampler, z, y, y_null, mask, 4.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    call = model.calls[0]
    assert call["n"] == 2 * B and call["x_mask"] is None
    assert torch.equal(call["mask"], torch.cat([mask, mask]))  # the null half reuses the prompt's mask
    assert call["kwargs"]["height"].shape == (B,) and call["kwargs"]["num_frames"] == 51  # passed as given
    assert torch.allclose(call["t"], torch.full((2 * B,), 1000.0))


def test_last_step_integrates_to_zero():
    # A constant velocity must move z by exactly v over the whole path: the last dt is t_last, not 0.
    class Const(torch.nn.Module):
        def forward(self, x, t, y, mask=None, x_mask=None, **kw):
            half = x.shape[0] // 2
            v = torch.cat([torch.full_like(x[:half], 2.0), torch.full_like(x[half:], 1.0)])
            return torch.cat([v, v], 1)

    z, y, y_null, mask, kw = _inputs()
    out = RFlowSampler(num_sampling_steps=7, cfg_scale=3.0).sample(
        Const(), z, y, y_null, mask, model_kwargs=kw, progress=False
    )
    torch.testing.assert_close(out, z + (1.0 + 3.0 * (2.0 - 1.0)), rtol=0, atol=1e-5)


def test_scale_one_skips_null_half():
    z, y, _, mask, kw = _inputs()
    model, rec = StandIn(), Recorder()
    register_listener(model, rec)
    out = RFlowSampler(num_sampling_steps=3).sample(
        model, z, y, None, mask, model_kwargs=kw, guidance_scale=1.0, progress=False
    )
    assert all(c["n"] == B for c in model.calls) and out.shape == z.shape
    assert rec.events[0].cfg is False


def test_events_in_order():
    z, y, y_null, mask, kw = _inputs()
    model, rec = StandIn(), Recorder()
    register_listener(model, rec)
    sampler = RFlowSampler(num_sampling_steps=4)
    sampler.sample(model, z, y, y_null, mask, model_kwargs=kw, progress=True, seed=123)
    ts = sampler.timesteps(240, 426, 51)
    start, *steps, end = rec.events
    assert start == SampleStart(4, tuple(ts), B, True, 123)
    assert steps == [StepStart(i, 4, ts[i]) for i in range(4)]
    assert end == "end"


def test_listener_told_of_end_when_model_raises():
    z, y, y_null, mask, kw = _inputs()
    model, rec = StandIn(fail_at=2), Recorder()
    register_listener(model, rec)
    with pytest.raises(RuntimeError, match="boom"):
        RFlowSampler(num_sampling_steps=5).sample(model, z, y, y_null, mask, model_kwargs=kw, progress=False)
    assert rec.events[-1] == "end" and len(rec.events) == 1 + 3 + 1


def test_frame_mask_keeps_reference_frames():
    z, y, y_null, mask, kw = _inputs()
    fm = torch.tensor([[0.0, 1.0, 1.0, 0.5], [1.0, 0.0, 1.0, 1.0]])
    model = StandIn()
    sampler = RFlowSampler(num_sampling_steps=6, use_timestep_transform=False)
    out = sampler.sample(
        model,
        z,
        y,
        y_null,
        mask,
        model_kwargs=kw,
        frame_mask=fm,
        progress=False,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(out[0, :, 0], z[0, :, 0]) and torch.equal(out[1, :, 1], z[1, :, 1])
    assert not torch.allclose(out[0, :, 1], z[0, :, 1]) and not torch.allclose(out[0, :, 3], z[0, :, 3])
    for t, call in zip(sampler.timesteps(0, 0, 1), model.calls):
        upper = fm * 1000 >= t
        assert torch.equal(call["x_mask"], torch.cat([upper, upper]))


def test_frame_mask_noise_is_reproducible():
    z, y, y_null, mask, kw = _inputs()
    fm = torch.tensor([[0.0, 1.0, 1.0, 0.5]] * B)
    sampler = RFlowSampler(num_sampling_steps=4, use_timestep_transform=False)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sampler.sample(
            StandIn(), z, y, y_null, mask, model_kwargs=kw, frame_mask=fm, progress=False, generator=g
        )

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, :, 3], c[:, :, 3])  # the half-masked frame was noised from the generator
    torch.testing.assert_close(a[:, :, :3], c[:, :, :3])  # other frames never see the extra noise
    seeded = sampler.sample(StandIn(), z, y, y_null, mask, model_kwargs=kw, frame_mask=fm, progress=False, seed=7)
    assert torch.equal(seeded, a)


def test_bf16_latent_is_promoted():
    z, y, y_null, mask, kw = _inputs()
    out = RFlowSampler(num_sampling_steps=2).sample(
        StandIn(), z.bfloat16(), y, y_null, mask, model_kwargs=kw, progress=False
    )
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(z=a["z"][0]), "z must be"),
        (lambda a: a.update(y=a["y"][:, 0]), "y must be"),
        (lambda a: a.update(y=a["y"][:1]), "batch"),
        (lambda a: a.update(mask=a["mask"][:, :3]), "mask must be"),
        (lambda a: a.update(y_null=None), "y_null"),
        (lambda a: a.update(frame_mask=torch.ones(B, T + 1)), "frame_mask"),
        (lambda a: a.update(frame_mask=torch.full((B, T), 2.0)), r"\[0, 1\]"),
        (lambda a: a["model_kwargs"].update(mask=None), "must not contain"),
        (lambda a: a["model_kwargs"].pop("height"), "height"),
        (lambda a: a["model_kwargs"].update(width=torch.tensor([426.0, 400.0])), "one value"),
    ],
)
def test_bad_inputs(change, match):
    z, y, y_null, mask, kw = _inputs()
    args = dict(z=z, y=y, y_null=y_null, mask=mask, model_kwargs=kw, frame_mask=None)
    change(args)
    model, rec = StandIn(), Recorder()
    register_listener(model, rec)
    with pytest.raises(ValueError, match=match):
        RFlowSampler(num_sampling_steps=2).sample(model, progress=False, **args)
    assert not model.calls


# ---------------------------------------------------------------- training
def test_add_noise_endpoints():
    x0, eps = torch.zeros(2, 1, 1, 1, 1), torch.ones(2, 1, 1, 1, 1)
    assert add_noise(x0, eps, torch.tensor([0.0, 1000.0])).flatten().tolist() == [0.0, 1.0]
    assert add_noise(x0, eps, 250.0).flatten().tolist() == [0.25, 0.25]


def test_training_loss_target_and_sign():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(B, C, T, H, W, generator=g), torch.randn(B, C, T, H, W, generator=g)
    seen = {}

    class Oracle(torch.nn.Module):
        def forward(self, x, t, **kw):
            seen.update(x=x, t=t)
            return torch.cat([x0 - eps, torch.zeros_like(x0)], 1)  # upstream's target is x0 - noise

    sampler = RFlowSampler()
    _, _, _, _, kw = _inputs()
    loss = sampler.training_loss(Oracle(), x0, kw, noise=eps, t=torch.tensor([100.0, 900.0]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(seen["x"], add_noise(x0, eps, torch.tensor([100.0, 900.0])))
    per = sampler.training_loss(Oracle(), x0, kw, noise=-eps, t=torch.tensor(500.0), reduction="none")
    want = (2 * eps).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per, want)

    # Drawn timesteps: reproducible with a generator, transformed (shifted towards 1000) for 240p/51f.
    for method in ("logit-normal", "uniform"):
        sampler.training_loss(Oracle(), x0, kw, sample_method=method, generator=torch.Generator().manual_seed(1))
        t1 = seen["t"].clone()
        sampler.training_loss(Oracle(), x0, kw, sample_method=method, generator=torch.Generator().manual_seed(1))
        assert torch.equal(t1, seen["t"]) and ((t1 > 0) & (t1 < 1000)).all()
    with pytest.raises(ValueError):
        sampler.training_loss(Oracle(), x0, kw, sample_method="beta")
