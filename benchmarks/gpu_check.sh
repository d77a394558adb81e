#!/usr/bin/env bash
# The GPU checks of issue 16 as one prepared script (about 6-8 minutes on one H200), for a session
# that is lent a device. Prepare here, on the CPU machine, once:
#   mkdir -p .gpu && cp -r ../shared/tiktoken_cache .gpu/ && cp -r ../shared/data .gpu/ \
#     && echo /.gpu/ >> .git/info/exclude
# then run it through the device tool with carry [".gpu"] and timeout_s 540:
#   bash benchmarks/gpu_check.sh
# It writes $OUT/gpu_check.log and the JSON results; copy the numbers into docs/benchmarks.md
# with the device, torch version, date and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TIKTOKEN_CACHE_DIR="$PWD/.gpu/tiktoken_cache"
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
SMS=.gpu/data/sms_spam_collection/SMSSpamCollection.tsv
RECORDS=.gpu/data/instruction-data.json
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)"
  date -u
  # 1. spam end to end (configs/spam.yaml as is, random weights, bf16), and the textbook's job beside it
  timeout 200 python benchmarks/e2e.py --config configs/spam.yaml --device cuda \
    --set model.weights=random --set train.mixed_precision=bf16 --set data.path=$SMS \
    --textbook --output "$OUT/e2e_spam.json"
  # 2. instruct end to end (gpt2-medium, all trainable, 2 epochs, 110 responses of up to 256 tokens)
  timeout 200 python benchmarks/e2e.py --config configs/instruct.yaml --device cuda \
    --set model.weights=random --set train.mixed_precision=bf16 --set data.path=$RECORDS \
    --output "$OUT/e2e_instruct.json"
  # 3. the language-modelling workload: gpt2-small, T=1024, bf16, eager and compiled
  timeout 120 python benchmarks/bench.py --task lm --impl gptft --device cuda --dtype bf16 \
    --seq-len 1024 --batch-size 16 --steps 20 --warmup 5 --repeats 2 --compile \
    --instruct-file "$RECORDS" --json "$OUT/lm.json"
} 2>&1 | tee "$OUT/gpu_check.log"
# 4. issue 25: the memory plan (gptft/plan.py) against torch.cuda.max_memory_allocated, reset when
#    fit starts, for the 8 configurations of benchmarks/plan_check.py, in fp32 and in bf16
{
  timeout 240 python benchmarks/plan_check.py --device cuda --json > "$OUT/plan_cuda_fp32.json"
  timeout 240 python benchmarks/plan_check.py --device cuda --set train.mixed_precision=bf16 \
    --json > "$OUT/plan_cuda_bf16.json"
  tail -n 20 "$OUT"/plan_cuda_*.json
} 2>&1 | tee -a "$OUT/gpu_check.log"
