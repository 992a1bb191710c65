"""A job's plan: its prompts (checked, cleaned, with their conditioning), one `VideoJob` per video with its
name and seed, in Open-Sora's batch order, and the shares of data-parallel groups and job arrays. Everything here
runs before any model is loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from duca_video.conditioning.prompts import ConditionedPrompt
from duca_video.conditioning.setup import condition_prompts, is_conditioned_run
from duca_video.configs import InferenceConfig
from duca_video.io import PromptError, append_scores, select_prompts, video_name
from duca_video.io.captions import clean_prompt
from duca_video.io.prompts import check_prompt, check_video_name, duplicate_names, load_prompt_lines

__all__ = [
    "MAX_VIDEOS",
    "VideoJob",
    "batch_jobs",
    "data_parallel_share",
    "encoder_text",
    "load_prompts",
    "plan_batches",
]


# One run plans every video in memory first; past this, split the job with --start-index / --end-index.
MAX_VIDEOS = 1_000_000


@dataclass(frozen=True)
class VideoJob:
    index: int  # position in the prompt list
    prompt: str  # as the user wrote it
    text: str  # as the text encoder sees it (with Open-Sora's score suffixes)
    k: int  # sample number for this prompt
    seed: int
    name: str
    # Image / video conditioning (duca_video.conditioning): None for a plain text-to-video prompt.
    condition: ConditionedPrompt | None = None
    texts: tuple[str, ...] = ()  # the encoder's text for each loop (--loop); () means `text` for every loop

    def __post_init__(self) -> None:
        check_video_name(self.name)  # whoever planned the job, its files stay inside the save folder


def batch_jobs(jobs: Sequence[VideoJob], size: int) -> list[list[VideoJob]]:
    """Batches of up to `size` jobs, in job order. Every video draws its noise and its token selection from
    its own seed, so how videos are batched does not change any of them."""
    jobs = list(jobs)
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def data_parallel_share(prompts: list, dp_size: int, dp_rank: int) -> list:
    """The contiguous range of prompts one data-parallel group generates (the groups' shares are disjoint and
    cover every prompt; a prompt's seed does not depend on which group draws it)."""
    per, extra = divmod(len(prompts), dp_size)
    start = dp_rank * per + min(dp_rank, extra)
    return prompts[start : start + per + (1 if dp_rank < extra else 0)]


def load_prompts(cfg: InferenceConfig) -> list[tuple[int, str]]:
    """(index, prompt) for the prompts this run generates, every one checked (readable text, a file name of
    its own) before anything is loaded: a bad prompt stops the run here instead of failing its whole batch."""
    if cfg.prompt:
        prompts = select_prompts(cfg.prompt, cfg.start_index, cfg.end_index, "--prompt")
        where = {i: f"prompt {i} (--prompt)" for i, _ in prompts}
    elif cfg.prompt_path is None:
        raise PromptError("no prompts: pass --prompt TEXT or --prompt-path FILE (or set prompt / prompt_path)")
    else:
        lines = load_prompt_lines(cfg.prompt_path)
        source = f"prompt file {cfg.prompt_path!r}"
        prompts = select_prompts([p for _, p in lines], cfg.start_index, cfg.end_index, source)
        where = {i: f"prompt {i} ({source}, line {lines[i][0]})" for i, _ in prompts}
    for i, prompt in prompts:
        check_prompt(prompt, where[i])
    if len(prompts) * cfg.num_sample > MAX_VIDEOS:
        raise PromptError(
            f"{len(prompts)} prompt(s) x num_sample {cfg.num_sample} = {len(prompts) * cfg.num_sample} "
            f"videos; one run plans at most {MAX_VIDEOS}: split it with --start-index / --end-index"
        )
    clashes = duplicate_names([(i, p, _name(cfg, i, p, k)) for i, p in prompts for k in range(cfg.num_sample)])
    if len(clashes) > 10:
        clashes = [*clashes[:10], f"... and {len(clashes) - 10} more"]
    if clashes:
        raise PromptError(
            "prompts that would write the same file (give each prompt once, or drop "
            "--prompt-as-path):\n  " + "\n  ".join(clashes)
        )
    return prompts


def _name(cfg: InferenceConfig, index: int, prompt: str, k: int) -> str:
    return video_name(index, prompt, k, cfg.num_sample, cfg.prompt_as_path, cfg.sample_name)


def encoder_text(cfg: InferenceConfig, index: int, prompt: str) -> str:
    """What the text encoder sees for `prompt`, as upstream builds it: the score suffixes appended, then Open-Sora's
    caption cleaning (twice) unless `clean_prompts` is off. A prompt that cleans to nothing is refused."""
    text = append_scores(prompt, cfg.aes, cfg.flow, cfg.camera_motion)
    if not cfg.clean_prompts:
        return text
    cleaned = clean_prompt(text)
    if not cleaned.strip():
        raise PromptError(
            f"prompt {index} ({prompt[:80]!r}) is empty after Open-Sora's prompt cleaning (links, ids and shop "
            "words are removed); reword it, or pass --no-clean-prompts to send it as is"
        )
    return cleaned


def plan_batches(cfg: InferenceConfig, prompts: list[tuple[int, str]]) -> list[list[VideoJob]]:
    """Open-Sora's order: batches of prompts, and within a batch the k-th sample of each (seed + k) together.
    Conditioned prompts (references, mask strategy, loops) are parsed and checked here, before any model."""
    conditions = _conditions(cfg, prompts)
    texts = {i: _texts(cfg, i, p, conditions.get(i)) for i, p in prompts}
    batches = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        for k in range(cfg.num_sample):
            batches.append(
                [
                    VideoJob(
                        i,
                        p,
                        texts[i][0],
                        k,
                        cfg.seed + k,
                        _name(cfg, i, p, k),
                        conditions.get(i),
                        texts[i] if conditions.get(i) is not None else (),
                    )
                    for i, p in chunk
                ]
            )
    return batches


def _conditions(cfg: InferenceConfig, prompts: list[tuple[int, str]]) -> dict[int, ConditionedPrompt | None]:
    if not is_conditioned_run(cfg) and not any("{" in p or p.startswith("|") for _, p in prompts):
        return {}
    total = len(cfg.prompt) if cfg.prompt else len(load_prompt_lines(cfg.prompt_path)) if cfg.prompt_path else 0
    source = "--prompt" if cfg.prompt else f"prompt file {cfg.prompt_path!r}"
    where = {i: f"prompt {i} ({source})" for i, _ in prompts}
    return condition_prompts(cfg, prompts, where, total)


def _texts(cfg: InferenceConfig, index: int, prompt: str, cond: ConditionedPrompt | None) -> tuple[str, ...]:
    """What the encoder sees in each loop: the prompt's text for that loop (no JSON part), with the score
    suffixes and Open-Sora's cleaning applied to each segment, as upstream."""
    if cond is None:
        return (encoder_text(cfg, index, prompt),)
    return tuple(encoder_text(cfg, index, cond.text_for_loop(loop)) for loop in range(cfg.loop))
