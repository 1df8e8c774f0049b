#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, in one command per machine kind.
#   bash benchmarks/gpu.sh single OUT   one GPU: check, bench and long below
#   bash benchmarks/gpu.sh check OUT    CUDA tests, fast vs eager per family (scripts/gpu_check.py)
#   bash benchmarks/gpu.sh bench OUT    sdpa's kernels; Mistral-7B twin by length, the 1,000-prompt corpus, d sampled
#   bash benchmarks/gpu.sh long OUT     a Llama-3.1-8B twin at 131,072 tokens against a plain forward
#   bash benchmarks/gpu.sh pair OUT     two GPUs: data parallel (1 vs 2 processes), a 70B twin over both
# A random twin needs a tokenizer without the hub: SHEAFSCOPE_TWIN_TOKENIZER names a tokenizer directory.
set -uo pipefail
what=${1:?single, check, bench, long or pair}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SHEAFSCOPE_CACHE=${SHEAFSCOPE_CACHE:-/tmp/ssc}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
echo "${SHEAFSCOPE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" > "$out/commit"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.csv"
bench="python3 benchmarks/bench_traces.py --dtype bfloat16"

if [ "$what" = single ]; then
  for part in check bench long; do bash "$0" $part "$out"; done
elif [ "$what" = check ]; then
  python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -3
  python3 scripts/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tail -25
elif [ "$what" = bench ]; then
  python3 benchmarks/sdpa_kernels.py --out "$out/gpu_sdpa_kernels.json" > /dev/null
  $bench --model random:mistral-7b --context 65536 --lengths 16,512,2048,8192,32768,65536 --corpus-size 1000 \
    --prompts '' --methods abd --pairs 30 --max-seconds 45 --profile "$out/profile_mistral-7b.txt" \
    --out "$out/gpu_mistral-7b.json" 2>&1 | tail -20
elif [ "$what" = long ]; then
  $bench --model random:llama-3.1-8b --context 131072 --lengths 131072 --corpus-size 0 --prompts '' --methods ab \
    --pairs 3 --repeats 1 --out "$out/gpu_llama-3.1-8b_131072.json" 2>&1 | tail -8
elif [ "$what" = pair ]; then
  for n in 1 2; do
    start=$(date +%s.%N)
    python3 -m sheafscope run -m random:mistral-7b --prompts research-v1 --processes $n --out "$out/dp$n" --no-progress \
      > "$out/dp$n.log" 2>&1
    echo "research-v1, 7B twin, $n process(es): $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$out/dp.txt"
  done
  python3 scripts/compare_results.py "$out/dp1" "$out/dp2" | tail -3 | tee -a "$out/dp.txt"
  python3 -m sheafscope plan -m random:llama-3.1-70b --dtype bfloat16 --device-map auto --max-tokens 8192 \
    | tee "$out/plan_70b.txt"
  $bench --model random:llama-3.1-70b --device-map auto --lengths 512,8192 --corpus-size 0 --prompts '' --methods ab \
    --pairs 10 --out "$out/gpu_llama-3.1-70b_2gpu.json" 2>&1 | tail -10
else
  echo "usage: bash benchmarks/gpu.sh single|check|bench|long|pair OUT" >&2
  exit 2
fi
