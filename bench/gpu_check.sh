#!/usr/bin/env bash
# The checks a lent GPU machine runs (the `device` tool; CI never needs one). Its image holds torch, transformers,
# peft and accelerate but not our other dependencies: their wheels travel in .whl (python 3.12, manylinux), made by
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     diffusers==0.42.1 pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv \
#     soundfile cffi pycparser tensorboardX importlib_metadata zipp starlette imagebind-unofficial ftfy wcwidth
#   (the versions .venv holds) and iopath (an sdist: `pip wheel --no-deps iopath==0.1.10 -w .whl`)
# PyAV stays behind (35 MB; only video files need it, and it is imported with the first). Results go to $OUT (the tool brings them back).
#   1. decoders in fp16 keep their meaning: `nextgpt world eval --part image --part video --part audio` on cuda;
#   2. batched decoding on the GPU: bench/decoder_batching.py, tiny / world / an SD-1.5-sized decoder, 8 jobs;
#   3. NExT-GPT's stages under accelerate on the GPU: stage 2 and stage 3 from the world bundle, a few hundred steps.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
NEXTGPT="python3 -m services.cli.main"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, diffusers, peft, accelerate; print(sys.version.split()[0], 'torch',
torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft',
peft.__version__, 'accelerate', accelerate.__version__)"

step() { echo "== $1 ($(date +%T))"; }

# ONLY_TRAIN=1: step 3 alone.
[ -n "${ONLY_TRAIN:-}" ] || {
step "1. world decoders from held-out captions, fp16 on cuda"
timeout 150 $NEXTGPT world eval --bundle bundles/nextgpt-world --part image --part video --part audio \
  --device cuda --json "$OUT/world_eval_cuda.json" 2>&1 | grep -v Warning | tee "$OUT/world_eval.log" | tail -8

step "2. batched decoding"
timeout 240 python3 -m bench.decoder_batching --device cuda --pools embedded,thread --bundles tiny,world,sd-size \
  --out "$OUT/decoder_batching.json" 2>&1 | grep -vE "Loading|it/s\]|Warning|deprecate" | tee "$OUT/decoders.log" \
  | tail -16
}

step "3. training stages on cuda"
$NEXTGPT world data --out /tmp/world --images 300 --videos 300 --audios 300 > /dev/null 2>&1
for stage in "align-decoder 200" "instruct 300 --lora-name gpucheck"; do
  set -- $stage
  name=$1 steps=$2
  shift 2
  timeout 150 $NEXTGPT train "$name" --bundle bundles/nextgpt-world --data /tmp/world --out "/tmp/$name" \
    --steps "$steps" --force "$@" > "$OUT/train_$name.log" 2>&1
  echo "$name exit $?"; tail -3 "/tmp/$name.work/loss.jsonl" 2>/dev/null
  cp "/tmp/$name.work/report.json" "$OUT/train_$name.json" 2>/dev/null && cat "$OUT/train_$name.json"
done
step "done"
