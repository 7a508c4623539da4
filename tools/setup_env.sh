#!/usr/bin/env bash
# Create .venv with the pinned OpenMMLab 2.0 stack (CPU-runnable) and mlla_mm in editable mode.
# Idempotent: a second run checks a stamp and the imports, and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CACHE=${MLLA_MM_CACHE:-$HOME/.cache/mlla_mm}
WHEELS="$CACHE/wheels"
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
MMCV_VERSION=2.1.0
PINS="mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 ftfy regex setuptools<82"
EXTRAS="${EXTRAS:-det,seg,cls,deploy,dev}"

stamp_key() { cat tools/setup_env.sh setup.py | sha256sum | cut -c1-16; }
STAMP="$VENV/.mlla_mm_setup_$(stamp_key)"

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, mlla_mm" 2>/dev/null; then
  echo "setup: $VENV is up to date ($STAMP)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel "setuptools<82" ninja

# 1. torch + torchvision: the registry's standard builds (they run on CPU).
$VENV/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
  || $PIP install -q $TORCH_PIN

# 2. mmcv 2.1.0 with ops, built once from source and cached as a wheel per torch version.
TV=$($VENV/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
WDIR="$WHEELS/torch$TV"
WHL=$(ls "$WDIR"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHL" ]; then
  echo "setup: building mmcv $MMCV_VERSION with ops against torch $TV (about 10 minutes on 2 cores)"
  BUILD=$(mktemp -d)
  $PIP download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$BUILD"
  tar -xzf "$BUILD"/mmcv-$MMCV_VERSION.tar.gz -C "$BUILD"
  # torch 2.14's headers need C++20; mmcv 2.1.0's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
  (cd "$BUILD/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$ROOT/$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation . -w "$BUILD/out")
  mkdir -p "$WDIR"
  BUILT=$(ls "$BUILD"/out/mmcv-*.whl)
  cp "$BUILT" "$WDIR/.tmp.whl" && mv "$WDIR/.tmp.whl" "$WDIR/$(basename "$BUILT")"
  WHL="$WDIR/$(basename "$BUILT")"
  rm -rf "$BUILD"
fi

# 3. The rest of the stack and this package.
$PIP install -q "$WHL" $PINS -e ".[$EXTRAS]"
$VENV/bin/python -c "import mmcv.ops, mmdet, mmseg, mmpretrain, mlla_mm; print('setup: stack OK')"
rm -f "$VENV"/.mlla_mm_setup_*
touch "$STAMP"
