#!/usr/bin/env bash
# The checks a lent GPU machine runs (the `device` tool; CI never needs one). Its image holds torch, transformers,
# peft and accelerate but not our other dependencies: their wheels travel in .whl (python 3.12, manylinux), made by
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     diffusers==0.42.1 pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv \
#     soundfile cffi pycparser tensorboardX importlib_metadata zipp starlette imagebind-unofficial ftfy wcwidth
#   (the versions .venv holds) and iopath (an sdist: `pip wheel --no-deps iopath==0.1.10 -w .whl`); steps 4 and 5
#   (the served stack) add fastapi annotated-doc uvicorn httptools python-multipart prometheus_client soxr redis
#   pillow einops (same command, same versions).
# PyAV stays behind (35 MB; only video files need it, and it is imported with the first). Results go to $OUT (the tool brings them back).
#   1. decoders in fp16 keep their meaning: `nextgpt world eval --part image --part video --part audio` on cuda;
#   2. batched decoding on the GPU: bench/decoder_batching.py, tiny / world / an SD-1.5-sized decoder, 8 jobs;
#   3. NExT-GPT's stages under accelerate on the GPU: stage 2 and stage 3 from the world bundle, a few hundred steps;
#   4. the served stack on cuda (encoder and LLM in fp16, decoders fp16): `nextgpt serve` with the world bundle, then
#      `nextgpt eval world` through its public API (rows without video: PyAV does not travel);
#   5. bench-chat's continuous batching (CPU engine, as here) on a machine whose cores are not shared by the
#      client, the server and the engine.
# STEPS picks steps (default "1 2 3"), e.g. STEPS="4 5".
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

STEPS=" ${STEPS:-1 2 3} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

want 1 && {
step "1. world decoders from held-out captions, fp16 on cuda"
timeout 150 $NEXTGPT world eval --bundle bundles/nextgpt-world --part image --part video --part audio \
  --device cuda --json "$OUT/world_eval_cuda.json" 2>&1 | grep -v Warning | tee "$OUT/world_eval.log" | tail -8
}
want 2 && {
step "2. batched decoding"
timeout 240 python3 -m bench.decoder_batching --device cuda --pools embedded,thread --bundles tiny,world,sd-size \
  --out "$OUT/decoder_batching.json" 2>&1 | grep -vE "Loading|it/s\]|Warning|deprecate" | tee "$OUT/decoders.log" \
  | tail -16
}

want 3 && {
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
}

want 4 && {
step "4. the served stack on cuda, judged through its API"
export NEXTGPT_CACHE_DIR=/tmp/serve-cache
NEXTGPT_ENCODER__DEVICE=cuda NEXTGPT_ENCODER__DTYPE=float16 NEXTGPT_LLM__DEVICE=cuda NEXTGPT_LLM__DTYPE=float16 \
  NEXTGPT_DECODERS__DEVICE=cuda $NEXTGPT serve --bundle bundles/nextgpt-world --port 8790 > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do
  $NEXTGPT health --url http://127.0.0.1:8790/readyz --timeout 2 2>/dev/null && break
  kill -0 $server 2>/dev/null || break; sleep 1
done
started=$(date +%s)
timeout 240 $NEXTGPT eval world --url http://127.0.0.1:8790 --count "${EVAL_COUNT:-12}" --modality image \
  --modality audio --json "$OUT/eval_cuda.json" 2>&1 | grep -v "^[0-9]*/[0-9]*$" | tee "$OUT/eval.log" | tail -30
echo "eval took $(( $(date +%s) - started )) s"
curl -s http://127.0.0.1:8790/metrics 2>/dev/null | grep -E "^nextgpt_(decoder_batch_size|llm)_" | head -20
kill $server; wait $server 2>/dev/null
tail -5 "$OUT/serve.log"
}

want 5 && {
step "5. continuous batching through /v1/chat on $(nproc) cores"
timeout 300 python3 -m bench.chat_batching --rounds "${CHAT_ROUNDS:-2}" --out "$OUT/chat_batching.json" 2>&1 \
  | tail -12
}
step "done"
