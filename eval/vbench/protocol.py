"""VBench 1.0's protocol as data (standard library only): the 16 dimensions, their normalisation, the prompt suite,
the file names VBench looks for, our seed rule, and how the files are split between jobs.

Facts from VBench 0.1.5 (`vbench/__init__.py`, `scripts/constant.py`, `scripts/cal_final_score.py`):
- standard mode looks, for every entry of VBench_full_info.json, for `{prompt_en}-{i}{ext}`, i = 0..4, in one
  folder; `ext` is the extension of whichever file os.listdir() returns first, so that folder must hold the
  videos and nothing else (score.py gives VBench a folder of links to the mp4 files only).
- norm = (raw - min) / (max - min) * weight; quality = sum(norm) / sum(weights) over the 7 quality dimensions
  (6.5: dynamic_degree weighs 0.5); semantic likewise over 9; total = (4 * quality + 1 * semantic) / 5.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.common import EvalError

__all__ = [
    "DIMENSIONS",
    "NORMALIZATION",
    "NUM_SAMPLES",
    "QUALITY_DIMENSIONS",
    "QUALITY_WEIGHT",
    "SEMANTIC_DIMENSIONS",
    "SEMANTIC_WEIGHT",
    "Shard",
    "SuiteVideo",
    "dimension_videos",
    "find_full_info",
    "load_suite",
    "parse_shard",
    "plan_videos",
    "select_shard",
]

QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)
SEMANTIC_DIMENSIONS = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0

# dimension -> (min, max, weight) of VBench's normalisation.
NORMALIZATION: dict[str, tuple[float, float, float]] = {
    "subject_consistency": (0.1462, 1.0, 1.0),
    "background_consistency": (0.2615, 1.0, 1.0),
    "temporal_flickering": (0.6293, 1.0, 1.0),
    "motion_smoothness": (0.706, 0.9975, 1.0),
    "dynamic_degree": (0.0, 1.0, 0.5),
    "aesthetic_quality": (0.0, 1.0, 1.0),
    "imaging_quality": (0.0, 1.0, 1.0),
    "object_class": (0.0, 1.0, 1.0),
    "multiple_objects": (0.0, 1.0, 1.0),
    "human_action": (0.0, 1.0, 1.0),
    "color": (0.0, 1.0, 1.0),
    "spatial_relationship": (0.0, 1.0, 1.0),
    "scene": (0.0, 0.8222, 1.0),
    "appearance_style": (0.0009, 0.2855, 1.0),
    "temporal_style": (0.0, 0.364, 1.0),
    "overall_consistency": (0.0, 0.364, 1.0),
}

# Rough single-GPU minutes per dimension for the full suite (Open-Sora 1.2's notes in its calc_vbench.py); only
# used to balance dimensions over GPUs, longest first.
RELATIVE_COST = {
    "subject_consistency": 4,
    "imaging_quality": 6,
    "background_consistency": 2,
    "motion_smoothness": 5,
    "overall_consistency": 2,
    "human_action": 3,
    "multiple_objects": 14,
    "spatial_relationship": 14,
    "object_class": 12,
    "color": 12,
    "aesthetic_quality": 2.5,
    "appearance_style": 6,
    "temporal_flickering": 2,
    "scene": 3,
    "temporal_style": 2,
    "dynamic_degree": 4,
}

# Files VBench 0.1.5 reads from $VBENCH_CACHE_DIR per dimension in local mode (vbench/utils.py init_submodules,
# aesthetic_quality.py, third_party/ViCLIP/simple_tokenizer.py); it would try to download any that is missing.
# Two more caches are read (eval/vbench/offline.py checks them): see TORCH_HUB_FILES and HF_MODELS.
_GRIT = ("grit_model/grit_b_densecap_objectdet.pth",)
_VICLIP = ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz")
LOCAL_FILES: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": _GRIT,
    "multiple_objects": _GRIT,
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "color": _GRIT,
    "spatial_relationship": _GRIT,
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
    "temporal_style": _VICLIP,
    "overall_consistency": _VICLIP,
}

# subject_consistency: VBench passes `path=` to DINO's hubconf, which ignores it and loads the weights with
# torch.hub.load_state_dict_from_url, i.e. from $TORCH_HOME/hub/checkpoints (default ~/.cache/torch).
TORCH_HUB_FILES: dict[str, tuple[str, ...]] = {"subject_consistency": ("dino_vitbase16_pretrain.pth",)}
# bert-base-uncased from the Hugging Face cache: GRiT's text decoder (the four detectron2 dimensions) loads its
# tokenizer (grit_roi_heads.py), Tag2Text (scene) its tokenizer and weights (tag2text.py).
HF_MODELS: dict[str, tuple[str, ...]] = {
    "object_class": ("bert-base-uncased",),
    "multiple_objects": ("bert-base-uncased",),
    "color": ("bert-base-uncased",),
    "spatial_relationship": ("bert-base-uncased",),
    "scene": ("bert-base-uncased",),
}

# Dimensions whose VBench 0.1.5 code runs on torch.device("cpu"): nothing on their path calls CUDA (GRiT sets
# MODEL.DEVICE from the device; RAFT's torch.cuda.amp.autocast is disabled; motion_smoothness has a CPU branch)
# and their checkpoints are loaded with map_location="cpu". Not aesthetic_quality: it loads its linear head with
# torch.load and no map_location (VBench added map_location="cpu" only after 0.1.5).
CPU_DIMENSIONS = tuple(d for d in DIMENSIONS if d != "aesthetic_quality")

# The per-dimension field of auxiliary_info VBench reads (object_class.py, color.py, ...): {dim: {key: value}}.
AUXILIARY_KEYS = {
    "object_class": "object",
    "multiple_objects": "object",
    "color": "color",
    "spatial_relationship": "spatial_relationship",
    "scene": "scene",
    "appearance_style": "appearance_style",
}

NUM_SAMPLES = 5  # videos per prompt in VBench's standard mode
FULL_INFO_NAME = "VBench_full_info.json"
# Longest file name we write for a video: NAME + ".latent.safetensors" inside the ".{..}.{pid}.tmp" temporary
# name must fit the usual 255-byte limit (the longest VBench prompt, 210 bytes, does).
_MAX_NAME_BYTES = 255 - len(".latent.safetensors") - len("..4194304.tmp")


# ---------------------------------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class SuiteEntry:
    index: int  # position in VBench_full_info.json
    prompt: str
    dimensions: tuple[str, ...]


def find_full_info() -> Path:
    """VBench_full_info.json inside the installed vbench package, found without importing vbench (its import
    pulls in torch and friends; a top-level find_spec only locates the package)."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(f"the vbench package is not installed here: pass --full-info PATH/{FULL_INFO_NAME}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FULL_INFO_NAME
        if path.is_file():
            return path
    raise EvalError(f"the installed vbench package has no {FULL_INFO_NAME}: pass --full-info PATH")


def load_suite(path: str | os.PathLike) -> list[SuiteEntry]:
    """The entries of a VBench full-info file, checked: a list of objects with a non-empty string `prompt_en`,
    a non-empty list `dimension` of VBench dimensions and, for the dimensions VBench reads it for, the field
    `auxiliary_info.DIMENSION.KEY` (AUXILIARY_KEYS)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"full-info file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise EvalError(f"full-info file {str(path)!r} cannot be read as JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise EvalError(f"full-info file {str(path)!r}: expected a non-empty JSON list of prompt entries")
    return [_entry(i, item, f"full-info file {str(path)!r}, entry {i}") for i, item in enumerate(data)]


def _entry(index: int, item: object, where: str) -> SuiteEntry:
    if not isinstance(item, dict):
        raise EvalError(f"{where}: expected an object, got {type(item).__name__}")
    prompt = item.get("prompt_en")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvalError(f"{where}: field 'prompt_en' must be a non-empty string, got {prompt!r}")
    dims = item.get("dimension")
    if not isinstance(dims, list) or not dims or not all(isinstance(d, str) for d in dims):
        raise EvalError(f"{where}: field 'dimension' must be a non-empty list of names, got {dims!r}")
    unknown = [d for d in dims if d not in NORMALIZATION]
    if unknown:
        raise EvalError(f"{where}: field 'dimension' has {unknown}; allowed: {', '.join(DIMENSIONS)}")
    aux = item.get("auxiliary_info", {})
    if not isinstance(aux, dict):
        raise EvalError(f"{where}: field 'auxiliary_info' must be an object, got {aux!r}")
    for dim in (d for d in dims if d in AUXILIARY_KEYS):
        key = AUXILIARY_KEYS[dim]
        value = aux.get(dim)
        inner = value.get(key) if isinstance(value, dict) else None
        if not isinstance(inner, (str, dict)) or not inner:
            raise EvalError(
                f"{where}: field 'auxiliary_info.{dim}.{key}' must be a non-empty string or object "
                f"(VBench's {dim} reads it), got {value!r}"
            )
    return SuiteEntry(index, prompt, tuple(dims))


def suite_digest(path: str | os.PathLike) -> str:
    """sha256 of the full-info file, recorded so a result can be traced to the exact suite."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- the files
@dataclass(frozen=True)
class SuiteVideo:
    name: str  # file name without extension: `{prompt}-{k}`, exactly what VBench looks for
    prompt: str
    k: int  # sample index, 0..num_samples-1
    seed: int
    prompt_index: int  # first entry of the suite with this prompt
    dimensions: tuple[str, ...]  # union over the entries with this prompt


def video_name(prompt: str, k: int) -> str:
    """VBench's name, untouched: VBench 1.0 neither truncates nor escapes it, so neither may we."""
    name = f"{prompt}-{k}"
    if "/" in prompt or "\0" in prompt or (os.altsep and os.altsep in prompt):
        raise EvalError(f"prompt {prompt!r} contains a path separator: VBench's name {name!r} cannot be a file")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise EvalError(
            f"prompt {prompt[:60]!r}...: the file name would be {len(name.encode())} bytes, more than "
            f"the {_MAX_NAME_BYTES} this file system allows with our suffixes"
        )
    return name


def sample_seed(base_seed: int, k: int) -> int:
    """The seed rule: sample k of every prompt uses base_seed + k (Open-Sora's one fixed seed per sample index,
    and the same rule as `scripts/inference.py --num-sample`). Same name -> same seed for every method, so cached
    videos are compared with uncached ones made from the same noise."""
    return base_seed + k


def plan_videos(entries: Sequence[SuiteEntry], num_samples: int, base_seed: int) -> list[SuiteVideo]:
    """Every distinct file once, in suite order (prompt by prompt, k = 0..num_samples-1). A prompt listed twice
    in the suite (VBench 1.0 has two) names the same files, so it is generated once."""
    if num_samples < 1:
        raise EvalError(f"--num-samples {num_samples}: must be >= 1 (VBench's standard mode uses {NUM_SAMPLES})")
    dims: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for e in entries:
        first.setdefault(e.prompt, e.index)
        dims.setdefault(e.prompt, [])
        dims[e.prompt] += [d for d in e.dimensions if d not in dims[e.prompt]]
    # Names never collide: k holds no "-", so the last "-" of a name splits it back into (prompt, k).
    return [
        SuiteVideo(video_name(p, k), p, k, sample_seed(base_seed, k), first[p], tuple(dims[p]))
        for p in first
        for k in range(num_samples)
    ]


def dimension_videos(entries: Sequence[SuiteEntry], num_samples: int) -> dict[str, frozenset[str]]:
    """{dimension: the names of the videos the suite lists for it}: `{prompt}-{k}` for every entry with the
    dimension and k < num_samples, exactly the files VBench's standard mode looks for (a prompt listed twice
    names its files once)."""
    if num_samples < 1:
        raise EvalError(f"--num-samples {num_samples}: must be >= 1 (VBench's standard mode uses {NUM_SAMPLES})")
    names: dict[str, set[str]] = {d: set() for d in DIMENSIONS}
    for e in entries:
        for dim in e.dimensions:
            names[dim].update(video_name(e.prompt, k) for k in range(num_samples))
    return {d: frozenset(v) for d, v in names.items() if v}


# ---------------------------------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`i/n` with 0 <= i < n (0-based: `--shard 0/8` .. `--shard 7/8`)."""
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise EvalError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/8 .. 7/8")
    return shard


def select_shard(videos: Sequence[SuiteVideo], shard: Shard) -> list[SuiteVideo]:
    """Shard i of n: the i-th of n contiguous blocks whose sizes differ by at most one. A pure function of the
    planned list, so shards never overlap and together cover it; it composes, so data-parallel groups inside
    one job can take `select_shard(select_shard(videos, job_shard), Shard(group_rank, num_groups))`."""
    base, extra = divmod(len(videos), shard.count)
    start = shard.index * base + min(shard.index, extra)
    stop = start + base + (1 if shard.index < extra else 0)
    return list(videos[start:stop])
