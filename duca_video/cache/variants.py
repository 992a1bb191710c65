"""Variants: a method with settings, written as one word, e.g. for `scripts/benchmark.py --methods`.

    duca                               the method's defaults
    teacache[threshold=0.2]            one setting
    taylorseer[interval=3;order=2]     several (";" between them)
    toca[recompute=attn|mlp]           a list ("|" between its items)
    steps[num_steps=12]                fewer steps: a sampler setting (`config.sampler_settings()`)

A variant is a cache config plus the sampler settings it implies; the label is the text as written.
"""

from __future__ import annotations

from typing import Any

from .config import CacheConfig, make_config


def _value(text: str) -> Any:
    if "|" in text:
        return [_value(part) for part in text.split("|") if part]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_variant(spec: str) -> CacheConfig:
    """The validated config a variant names; errors name the variant and what is allowed."""
    spec = spec.strip()
    name, _, rest = spec.partition("[")
    overrides: dict[str, Any] = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"variant {spec!r}: settings go in brackets, e.g. teacache[threshold=0.2]")
        for item in filter(None, (p.strip() for p in rest[:-1].split(";"))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"variant {spec!r}: {item!r} is not KEY=VALUE")
            overrides[key.strip()] = _value(value.strip())
    try:
        return make_config(name.strip(), **overrides)
    except ValueError as exc:
        raise ValueError(f"variant {spec!r}: {exc}") from None


def split_variants(text: str) -> list[str]:
    """Comma-separated variants; commas inside brackets belong to the variant."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [v.strip() for v in out if v.strip()]


__all__ = ["parse_variant", "split_variants"]
