#!/usr/bin/env bash
# The CUDA checks, as one call on a lent GPU machine, in this order (docs/bench/2026-12-04-cuda-h200-* hold what
# they measured):
#   smollm2, qwen3  scripts/bench.py --device cuda (bf16 autocast): SmolLM2-135M and Qwen3-0.6B shapes,
#                   lora-cli vs transformers + PEFT;
#   cli             the CLI end to end on CUDA on tiny presets (train / eval / predict / merge / export, bf16 and
#                   fp16 with a 16-bit base), eval's numbers on CUDA in fp32 against the CPU's for the same adapter;
#   profile         one SmolLM2 round of each system under torch.profiler: the top CUDA kernels and kernels per step
#                   (lora-cli launched 3,924 a step to PEFT's 8,561 in the same count on the CPU, yet ran no faster);
#   warmup          a gpt2-tiny epoch with CUDA's lazy module loading and with eager loading, to tell whether the slow
#                   first epoch (15-26 s against 3-5 s on 2026-12-04) is loading kernels;
#   gpt2            the book's 5-epoch GPT-2 small recipe timed on the GPU: lora-cli vs PEFT and the book's code
#                   (the book's only where llms-from-scratch is importable);
#   serve           scripts/bench_serve.py with the server on the GPU (SmolLM2-135M shape), then, where vLLM is
#                   installed, scripts/vllm_smoke.py: a PEFT export answers /classify under `vllm serve --enable-lora`
#                   as under `lora-cli serve`.
# Usage: scripts/device_check.sh DATA_DIR OUT_DIR [STAGES]   (DATA_DIR holds sms_spam/ and gpt2_bpe/, a copy of
#        ../shared/data inside the checkout, since only the checkout travels; STAGES: a comma list, by default
#        smollm2,qwen3,profile,warmup: about 7 minutes there, one call of a 15-minute lease; cli,gpt2 make a second).
#        lora-cli runs from the checkout (python -m lora_cli) on the machine's own torch, transformers and peft.
# With the device tool: copy ../shared/data/{sms_spam,gpt2_bpe} to .devdata/ (listed in .git/info/exclude),
# `pip download --no-deps llms-from-scratch -d .whl`, carry both, and run
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site scripts/device_check.sh .devdata $OUT
# DEVICE=cpu runs the same stages on the CPU (fp16 becomes bf16), to try the script where there is no GPU.
set -uo pipefail
data="$(cd "$1" && pwd)"
out="$(mkdir -p "$2" && cd "$2" && pwd)"
stages="${3:-smollm2,qwen3,profile,warmup}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LORA_CLI_SHARED_DATA="$data" \
  LORA_CLI_BPE_DIR="$data/gpt2_bpe" LORA_CLI_HOME="$(mktemp -d)"
py=python3
dev="${DEVICE:-cuda}"  # DEVICE=cpu tries the script on a machine without a GPU
half=fp16 half_dtype=float16; [[ $dev == cuda ]] || { half=bf16 half_dtype=bfloat16; }
lc() { "$py" -m lora_cli "$@"; }
has() { [[ ",$stages," == *",$1,"* ]]; }
step() { echo; echo "=== $* ($(date -u +%T))"; }

cli_stage() {
  step "CLI on CUDA, tiny presets"
  work="$(mktemp -d)"
  (
    set -e
    cd "$work"
    lc data sms-spam --source "$data/sms_spam/SMSSpamCollection" --out data/sms
    "$py" "$repo/scripts/make_tokenizer.py" "$data/sms_spam/SMSSpamCollection" tok.json
    for preset in gpt2-tiny qwen3-tiny; do
      tok=(); [[ $preset == gpt2-tiny ]] || tok=(--tokenizer tok.json)
      lc init --preset "$preset" --out "$preset.safetensors"
      lc train --rank 16 --alpha 16 --model "$preset.safetensors" "${tok[@]}" --data data/sms --epochs 1 --no-head-bias \
        --device "$dev" --out "runs/$preset" --quiet
      lc eval --adapter "runs/$preset" --data data/sms/test.csv --device "$dev" --json > "eval-$preset-bf16.json"
      lc eval --adapter "runs/$preset" --data data/sms/test.csv --device "$dev" --precision fp32 --json > "eval-$preset-fp32.json"
      lc eval --adapter "runs/$preset" --data data/sms/test.csv --device cpu --json > "eval-$preset-cpu.json"
      lc predict --adapter "runs/$preset" --device "$dev" "You won a free prize, call now!" "see you at lunch"
    done
    # fp16 with loss scaling and a 16-bit base
    lc init --preset llama3-tiny --out llama3-tiny.safetensors
    lc train --rank 8 --alpha 16 --model llama3-tiny.safetensors --tokenizer tok.json --data data/sms --epochs 1 --no-head-bias \
      --device "$dev" --precision "$half" --base-dtype "$half_dtype" --out runs/half --quiet
    lc eval --adapter runs/half --data data/sms/test.csv --device "$dev"
    lc merge --adapter runs/qwen3-tiny --out merged.safetensors
    lc merge --adapter runs/qwen3-tiny --format hf --out merged-hf
    lc export-adapter runs/qwen3-tiny --out exported.safetensors --dtype bfloat16
    lc info exported.safetensors | head -8
    "$py" - <<'PY'
import json
for preset in ("gpt2-tiny", "qwen3-tiny"):
    r = {d: json.load(open(f"eval-{preset}-{d}.json")) for d in ("bf16", "fp32", "cpu")}
    print(preset, ", ".join(f"{d}: accuracy {v['accuracy']:.4f} loss {v['loss']:.6f}" for d, v in r.items()),
          f"| fp32 loss on the device - cpu: {r['fp32']['loss'] - r['cpu']['loss']:.2e}")
PY
  ) 2>&1 | tee "$out/cli.log"
  echo "cli stage exit ${PIPESTATUS[0]}"
}

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
"$py" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("transformers", "peft", "tokenizers", "tiktoken", "typer", "llms_from_scratch"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:  # noqa: BLE001
        print(m, "missing:", type(exc).__name__)
PY

bench() {  # name, timeout, bench.py arguments
  local name="$1" limit="$2"; shift 2
  step "bench $name"
  timeout "$limit" "$py" "$repo/scripts/bench.py" --device "$dev" --shared "$data" "$@" \
    --json-out "$out/$name.json" 2>&1 | tee "$out/$name.txt"
  echo "bench $name exit ${PIPESTATUS[0]}"
}
# Sizes: on 2026-12-04 a bench round took 8-15 s per system there (the step is host-bound: about 220 ms for SmolLM2
# at batch 8) and every fresh CUDA process 15-25 s of warm-up; --time-budget ends each benchmark with its summary,
# the timeout is only the backstop.
has smollm2 && bench cuda-smollm2-135m 170 --preset smollm2-135m --systems lora-cli,peft \
  --steps 30 --warmup 10 --rounds 5 --predict-rounds 2 --predict-texts 64 --time-budget 100
has qwen3 && bench cuda-qwen3-0.6b 170 --preset qwen3-0.6b --systems lora-cli,peft \
  --steps 30 --warmup 10 --rounds 5 --predict-rounds 2 --predict-texts 64 --time-budget 100
has cli && cli_stage
has profile && bench cuda-smollm2-135m-profile 120 --preset smollm2-135m --systems lora-cli,peft \
  --steps 20 --warmup 10 --rounds 1 --predict-rounds 0 --profile-steps 5 --time-budget 60
if has warmup; then
  step "first epoch, lazy vs eager CUDA module loading"
  work="$(mktemp -d)"
  (
    cd "$work" && lc data sms-spam --source "$data/sms_spam/SMSSpamCollection" --out data/sms >/dev/null &&
      lc init --preset gpt2-tiny --out tiny.safetensors >/dev/null
    for loading in LAZY EAGER; do
      echo "CUDA_MODULE_LOADING=$loading"
      CUDA_MODULE_LOADING=$loading timeout 120 "$py" -m lora_cli train --rank 16 --alpha 16 --model tiny.safetensors \
        --data data/sms --epochs 2 --device "$dev" --out "runs/$loading" --overwrite --quiet 2>&1 | grep -E "^epoch|^done"
    done
  ) 2>&1 | tee "$out/warmup.log"
fi
book=,book; "$py" -c "import llms_from_scratch" 2>/dev/null || book=
has gpt2 && bench cuda-gpt2-small-recipe 200 --preset gpt2-small --systems "lora-cli,peft$book" \
  --steps 30 --warmup 10 --rounds 3 --predict-rounds 1 --predict-texts 64 --accuracy-epochs 5 --time-budget 60
if has serve; then
  step "serve: many adapters on the GPU; the same adapter under vLLM"
  timeout 300 "$py" "$repo/scripts/bench_serve.py" --preset smollm2-135m --device "$dev" --shared "$data" \
    --seconds 5 --rounds 2 --skip-memory --json "$out/serve.json" 2>&1 | tee "$out/serve.txt"
  if "$py" -c "import vllm" 2>/dev/null; then
    timeout 420 "$py" "$repo/scripts/vllm_smoke.py" --shared "$data" 2>&1 | tee "$out/vllm-smoke.txt"
  else
    echo "vllm is not installed here: the scale-out smoke test is skipped" | tee "$out/vllm-smoke.txt"
  fi
fi
step done
