"""Open-Sora 1.2 mask strategies: which reference frames go where in the latent video, and how firmly.

A strategy is groups separated by ";", each up to six comma-separated numbers (missing ones take the defaults):

    loop index, reference index, reference start, target start, length, edit ratio    (defaults 0,0,0,0,1,0)

all counted in *latent* frames. A group applies only in its loop (0 = the first clip). Negative starts count from
the end of the reference / the video; with `align`, both starts then snap to a multiple of it as upstream does
(`find_nearest_point`); the length is cut to what fits in both, as upstream. Each placed frame's mask value is
the edit ratio, which is the sampler's `frame_mask` convention (1 = generate, 0 = keep the reference frame, in
between = keep it until t falls to ratio * num_timesteps); frames no group touches get 1. Later groups
overwrite earlier ones where they overlap, as upstream.

Where upstream would index out of range or silently do nothing (a start outside the reference or the video, a
reference that does not exist, a length of 0), this module raises MaskStrategyError instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import MaskStrategyError

__all__ = [
    "FramePlan",
    "MaskGroup",
    "Placement",
    "check_reference_indices",
    "find_nearest_point",
    "format_mask_strategy",
    "loop_condition_group",
    "parse_mask_strategy",
    "plan_frames",
]

_FIELDS = ("loop index", "reference index", "reference start", "target start", "length", "edit ratio")
_DEFAULTS = (0, 0, 0, 0, 1, 0.0)


@dataclass(frozen=True)
class MaskGroup:
    """One `;`-separated group of a mask strategy."""

    loop: int = 0  # the loop (clip) it applies to
    reference: int = 0  # index into the prompt's references
    reference_start: int = 0  # first reference latent frame; negative counts from the end
    target_start: int = 0  # first video latent frame it replaces; negative counts from the end
    length: int = 1  # latent frames, cut to what fits
    edit_ratio: float = 0.0  # the mask value of the placed frames: 0 keeps them, 1 regenerates them

    def to_text(self) -> str:
        """The six-number form upstream writes (e.g. "1,1,-5,0,5,0.0")."""
        values = (self.loop, self.reference, self.reference_start, self.target_start, self.length)
        return ",".join(str(v) for v in values) + f",{self.edit_ratio}"


@dataclass(frozen=True)
class Placement:
    """Reference frames [reference_start, reference_start + length) go to video frames [target_start, ...)."""

    reference: int
    reference_start: int
    target_start: int
    length: int
    mask_value: float


@dataclass(frozen=True)
class FramePlan:
    """What one strategy does to one clip: the per-frame mask and the reference copies, in order."""

    mask: tuple[float, ...]
    placements: tuple[Placement, ...]

    @property
    def conditioned(self) -> bool:
        return bool(self.placements)


def _bad(where: str, index: int, group: str, message: str) -> MaskStrategyError:
    return MaskStrategyError(f"{where}: group {index} ({group!r}): {message}")


def _parse_int(text: str, where: str, index: int, group: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(where, index, group, f"{field} {text.strip()!r} is not an integer") from None


def _parse_group(group: str, where: str, index: int) -> MaskGroup:
    if not group.strip():
        raise _bad(where, index, group, "the group is empty; write 1 to 6 comma-separated numbers (or drop the ';')")
    parts = group.split(",")
    if len(parts) > len(_FIELDS):
        raise _bad(where, index, group, f"{len(parts)} fields, at most 6 are allowed ({', '.join(_FIELDS)})")
    ints = [_parse_int(text, where, index, group, _FIELDS[i]) for i, text in enumerate(parts[:5])]
    ints += list(_DEFAULTS[len(ints) : 5])  # type: ignore[arg-type]
    ratio = float(_DEFAULTS[5])
    if len(parts) == 6:
        try:
            ratio = float(parts[5])
        except ValueError:
            raise _bad(where, index, group, f"edit ratio {parts[5].strip()!r} is not a number") from None
        if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
            raise _bad(where, index, group, f"edit ratio {parts[5].strip()} is outside [0, 1]")
    loop, reference, _, _, length = ints
    for field, value in (("loop index", loop), ("reference index", reference)):
        if value < 0:
            raise _bad(where, index, group, f"{field} {value} is negative; it must be >= 0")
    if length < 1:
        raise _bad(where, index, group, f"length {length} must be >= 1 (latent frames)")
    return MaskGroup(loop, reference, ints[2], ints[3], length, ratio)


def parse_mask_strategy(text: str | None, where: str = "mask strategy") -> tuple[MaskGroup, ...]:
    """Parse "0;0,1,0,-1,1"-style text into its groups; None or "" is no conditioning. `where` names the input
    (a flag, a prompt) in error messages."""
    if text is None or text == "":
        return ()
    if not isinstance(text, str):
        raise MaskStrategyError(f'{where}: {text!r} is a {type(text).__name__}, not a string like "0,0,0,-5,5"')
    return tuple(_parse_group(group, where, n) for n, group in enumerate(text.split(";"), 1))


def format_mask_strategy(groups: Sequence[MaskGroup]) -> str:
    return ";".join(group.to_text() for group in groups)


def find_nearest_point(value: int, point: int, max_value: int) -> int:
    """Upstream's alignment: round `value` down to a multiple of `point`, or up when past the half way and the
    next multiple still leaves a whole `point`-long block below `max_value`."""
    t = value // point
    if value % point > point / 2 and t < max_value // point - 1:
        t += 1
    return t * point


def loop_condition_group(loop: int, reference: int, condition_frame_length: int, edit: float = 0.0) -> MaskGroup:
    """The group upstream adds for loop `loop` >= 1: the last `condition_frame_length` latent frames of the
    previous clip (reference `reference`) become the first frames of this one (`--condition-frame-edit` = edit)."""
    if loop < 1:
        raise MaskStrategyError(f"loop condition: loop index {loop} must be >= 1 (loop 0 has no previous clip)")
    if condition_frame_length < 1:
        raise MaskStrategyError(f"--condition-frame-length {condition_frame_length} must be >= 1 (latent frames)")
    if not (math.isfinite(edit) and 0.0 <= edit <= 1.0):
        raise MaskStrategyError(f"--condition-frame-edit {edit} is outside [0, 1]")
    return MaskGroup(loop, reference, -condition_frame_length, 0, condition_frame_length, float(edit))


def check_reference_indices(groups: Sequence[MaskGroup], num_references: int, where: str = "mask strategy") -> None:
    """Fail early (before any VAE runs) when a group names a reference that will not exist. In loop L >= 1 the
    clips generated by the loops before it are references too (appended after the user's ones, as upstream)."""
    for n, group in enumerate(groups, 1):
        available = num_references + group.loop
        if group.reference >= available:
            paths = f"{num_references} reference path{'s' if num_references != 1 else ''}"
            extra = f" plus {group.loop} generated clip{'s' if group.loop != 1 else ''}" if group.loop else ""
            raise _bad(
                where,
                n,
                group.to_text(),
                f"reference index {group.reference} does not exist: there "
                f"{'is' if available == 1 else 'are'} {paths}{extra} (indices 0..{available - 1})"
                if available
                else f"reference index {group.reference} does not exist: no reference "
                'path is given (--reference-path or "reference_path" in the prompt)',
            )


def _resolve_start(value: int, size: int, align: int | None, what: str, where: str, n: int, group: MaskGroup) -> int:
    start = value + size if value < 0 else value
    if not 0 <= start < size:
        field = "reference start" if what == "reference" else "target start"
        raise _bad(
            where,
            n,
            group.to_text(),
            f"{field} {value} is outside the {what} "
            f"({size} latent frame{'s' if size != 1 else ''}: allowed {-size}..{size - 1})",
        )
    return find_nearest_point(start, align, size) if align is not None else start


def plan_frames(
    groups: Sequence[MaskGroup],
    num_frames: int,
    reference_lengths: Sequence[int],
    loop: int = 0,
    align: int | None = None,
    where: str = "mask strategy",
) -> FramePlan:
    """Apply the groups of loop `loop` to a clip of `num_frames` latent frames, given the latent length of each
    reference, exactly as upstream's `apply_mask_strategy` (with its `align`, e.g. 5 in the v1.2 configs)."""
    if num_frames < 1:
        raise MaskStrategyError(f"{where}: the video has {num_frames} latent frames; at least 1 is needed")
    if align is not None and align < 1:
        raise MaskStrategyError(f"{where}: align {align} must be >= 1 (or None)")
    mask = [1.0] * num_frames
    placements = []
    for n, group in enumerate(groups, 1):
        if group.loop != loop:
            continue
        if group.reference >= len(reference_lengths):
            raise _bad(
                where,
                n,
                group.to_text(),
                f"reference index {group.reference} does not exist: loop {loop} "
                f"has {len(reference_lengths)} reference(s)",
            )
        ref_len = int(reference_lengths[group.reference])
        ref_start = _resolve_start(group.reference_start, ref_len, align, "reference", where, n, group)
        target_start = _resolve_start(group.target_start, num_frames, align, "video", where, n, group)
        length = min(group.length, num_frames - target_start, ref_len - ref_start)
        mask[target_start : target_start + length] = [group.edit_ratio] * length
        placements.append(Placement(group.reference, ref_start, target_start, length, group.edit_ratio))
    return FramePlan(tuple(mask), tuple(placements))
