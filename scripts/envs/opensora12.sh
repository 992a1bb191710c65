#!/usr/bin/env bash
# Open-Sora 1.2's own environment, built from the package registry as its README documents, then duca-video
# installed into it (after a dry run that must change none of its packages) and our tests run there.
#
#   scripts/envs/opensora12.sh [--python 3.9|3.10|PATH] [--env DIR] [--light] [--editable-upstream]
#
# --python       the interpreter (default 3.9, Open-Sora's `conda create -n opensora python=3.9`); a version is
#                looked up as pythonX.Y on PATH, then under ~/.pyenv/versions/X.Y.*
# --env DIR      the virtual environment (default .envs/opensora12-pyX.Y; reused when it is complete)
# --light        the install check and the main job only (no test suite)
# --editable-upstream   install Open-Sora with `pip install -e .` instead of the README's `pip install -v .`
#
# Open-Sora v1.2.0's source: $OPEN_SORA_ROOT, else the tag v1.2.0 exported from the git repository named by
# $OPEN_SORA_GIT (a clone or mirror of hpcaitech/Open-Sora). Without either, Open-Sora itself is not installed and
# the tests that need it skip, saying so. Downloads are cached by pip (PIP_CACHE_DIR) and reused between runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PYTHON=3.9 ENV_DIR="" LIGHT=0 UPSTREAM_EDITABLE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON=$2; shift 2 ;;
    --env) ENV_DIR=$2; shift 2 ;;
    --light) LIGHT=1; shift ;;
    --editable-upstream) UPSTREAM_EDITABLE=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

find_python() {
  if [ -x "$1" ]; then echo "$1"; return; fi
  if "python$1" -c pass >/dev/null 2>&1; then command -v "python$1"; return; fi  # (a pyenv shim may fail)
  local found
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1".*/bin/python 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$found" ]; then echo "$found"; return; fi
  echo "error: no Python $1 found (on PATH as python$1 or under ~/.pyenv/versions/$1.*)" >&2; exit 2
}
PY=$(find_python "$PYTHON")
VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ENV_DIR=${ENV_DIR:-.envs/opensora12-py$VER}
log() { echo "[opensora12 py$VER $(date +%H:%M:%S)] $*"; }

# -- 1. Open-Sora 1.2's environment -----------------------------------------------------------------------------
# requirements-cu121.txt (torch, torchvision; xformers has no CPU kernels, so it is left out here) and the
# inference part of requirements/requirements.txt. Two pins more than Open-Sora's files: what its packages need
# to work at all when installed today (diffusers 0.27.2 imports huggingface_hub's cached_download, removed in
# 0.26; torchvision 0.18's write_video fails on av >= 13; torch 2.3 was built against numpy 1).
CONSTRAINTS=$REPO/scripts/envs/opensora12-constraints.txt
NEEDED_GIB=6  # measured: 5.9 GiB for either Python version, most of it torch 2.3's CUDA libraries
if [ ! -f "$ENV_DIR/.built" ]; then
  log "building $ENV_DIR with $PY"
  mkdir -p "$(dirname "$ENV_DIR")"
  FREE_GIB=$(df -Pk "$(dirname "$ENV_DIR")" | awk 'NR==2 {printf "%d", $4 / 1048576}')
  if [ "$FREE_GIB" -lt "$NEEDED_GIB" ]; then
    echo "error: $FREE_GIB GiB free under $(dirname "$ENV_DIR"); the environment needs about $NEEDED_GIB GiB" \
      "(free space, or pass --env DIR on a larger disk)" >&2
    exit 2
  fi
  rm -rf "$ENV_DIR"
  "$PY" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/python" -m pip install -q torch==2.3.0 torchvision==0.18.0 -c "$CONSTRAINTS"
  "$ENV_DIR/bin/python" -m pip install -q colossalai==0.3.7 "mmengine>=0.10.3" "pandas>=2.0.3" timm==0.9.16 \
    rotary_embedding_torch==0.5.3 "ftfy>=6.2.0" diffusers==0.27.2 accelerate==0.29.2 "av>=12.0.0" -c "$CONSTRAINTS"
  touch "$ENV_DIR/.built"
fi
PIP=("$ENV_DIR/bin/python" -m pip)

# -- 2. Open-Sora v1.2.0 itself, as its README installs it ------------------------------------------------------
UPSTREAM=${OPEN_SORA_ROOT:-}
if [ -z "$UPSTREAM" ] && [ -n "${OPEN_SORA_GIT:-}" ]; then
  UPSTREAM=$ENV_DIR/open-sora-v1.2.0
  if [ ! -f "$UPSTREAM/setup.py" ]; then
    mkdir -p "$UPSTREAM"
    git --git-dir "$OPEN_SORA_GIT" archive v1.2.0 | tar -x -C "$UPSTREAM"
  fi
fi
if [ -n "$UPSTREAM" ]; then
  UPSTREAM=$(cd "$UPSTREAM" && pwd)
  if ! "$ENV_DIR/bin/python" -c 'import opensora' 2>/dev/null; then
    # Its requirements.txt also lists gradio, wandb, tensorboard, notebooks and linters (not inference): the
    # packages above are its inference part, so it goes in without pulling those.
    if [ "$UPSTREAM_EDITABLE" = 1 ]; then
      log "installing Open-Sora from $UPSTREAM (pip install -e, no deps)"
      "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$UPSTREAM"
    else
      log "installing Open-Sora from $UPSTREAM (pip install ., non-editable, no deps)"
      "${PIP[@]}" install -q --no-deps --no-build-isolation "$UPSTREAM"
    fi
  fi
  export OPEN_SORA_ROOT=$UPSTREAM
else
  log "no Open-Sora source (set OPEN_SORA_ROOT or OPEN_SORA_GIT): its tests will skip"
fi

# -- 3. installing duca-video must change none of the environment's packages -----------------------------------
"${PIP[@]}" list --format=freeze > "$ENV_DIR/packages-before.txt"
"${PIP[@]}" install -q --dry-run --report "$ENV_DIR/dry-run.json" "$REPO" >/dev/null
"$ENV_DIR/bin/python" scripts/envs/check_unchanged.py dry-run "$ENV_DIR/packages-before.txt" "$ENV_DIR/dry-run.json"
"${PIP[@]}" install -q -e "$REPO"
"${PIP[@]}" list --format=freeze > "$ENV_DIR/packages-after.txt"
"$ENV_DIR/bin/python" scripts/envs/check_unchanged.py installed "$ENV_DIR/packages-before.txt" \
  "$ENV_DIR/packages-after.txt"
"${PIP[@]}" install -q "pytest>=7" -c "$CONSTRAINTS"
log "duca-video installed; no package of the environment changed"
"$ENV_DIR/bin/python" -m pip freeze | grep -i -E '^(torch|torchvision|colossalai|transformers|diffusers|accelerate|huggingface.hub|numpy|av|timm|mmengine|rotary.embedding.torch|opensora|duca.video)[= @]' || true

# -- 4. the main job, then the tests ------------------------------------------------------------------------------
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$ENV_DIR/bin/python" scripts/inference.py --config configs/tiny.py --save-dir "$OUT" \
  --prompt "a large red circle moving left on a dark background" --batch-size 2 --num-sample 2 --cache duca
log "main job wrote $(ls "$OUT"/*.mp4 | wc -l) videos"
if [ "$LIGHT" = 1 ]; then exit 0; fi
"$ENV_DIR/bin/python" -m pytest -rs -p no:cacheprovider
