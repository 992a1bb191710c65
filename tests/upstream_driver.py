"""A reduced scripts/inference.py for the `python -m duca_video.opensora` tests (run by it via `--script`).

The steps upstream's inference script takes, through the same upstream functions: `parse_configs` (its
command line and config file), `build_module(cfg.model, MODELS, ...)`, `build_module(cfg.scheduler,
SCHEDULERS)` and `scheduler.sample(model, text_encoder, z=..., prompts=..., additional_args=...)`. T5 and the
VAE need real weights, so fixed caption embeddings stand in for the text encoder and the final latent is
saved instead of a decoded video. The model type "STDiT3-tiny-test" is upstream's STDiT3 at the tests' size.
"""

from pathlib import Path

import torch
from opensora.registry import MODELS, SCHEDULERS, build_module
from opensora.utils.config_utils import parse_configs

from tests.upstream import FixedTextEncoder, import_upstream, open_sora_root, tiny_inputs, tiny_upstream_model

UP = import_upstream(open_sora_root())
if "STDiT3-tiny-test" not in MODELS:
    MODELS.register_module("STDiT3-tiny-test", module=lambda **kwargs: tiny_upstream_model(UP, **kwargs))


def main() -> None:
    torch.set_grad_enabled(False)
    cfg = parse_configs(training=False)
    model = build_module(cfg.model, MODELS, enable_sequence_parallelism=False).eval()
    scheduler = build_module(cfg.scheduler, SCHEDULERS)
    data = tiny_inputs(batch=len(cfg.prompt))
    z = scheduler.sample(
        model,
        FixedTextEncoder(model, data["y"], data["mask"]),
        z=data["z"],
        prompts=cfg.prompt,
        device="cpu",
        additional_args=data["extra"],
        progress=False,
    )
    Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
    torch.save(z, Path(cfg.save_dir) / "latent.pt")


if __name__ == "__main__":
    main()
