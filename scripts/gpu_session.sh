#!/usr/bin/env bash
# One lent-GPU call, in parts (the device tool's call limit is 10 minutes; each part has its own budget and
# leaves its output under $OUT even when cut off). Run from the repository root on the GPU host:
#
#   bash scripts/gpu_session.sh probe levers tests     # kernel probe, batch-128 levers, the GPU tests
#   bash scripts/gpu_session.sh serving serving        # the FP8-as-served benchmark, twice
#   bash scripts/gpu_session.sh epilogue                # fc1 + GELU + quantize: cuBLASLt against max-autotune
#
# The GPU hosts have torch, transformers and onnx; ModelOpt, pydantic and the rest come from wheels carried in
# .whl/a (see docs/testing.md, "GPU tests").
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/smi.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ -n "${SMI_TRACE:-}" ]; then  # clocks, power and why the clocks are held down, every 100 ms, for the whole call
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 100 > "$OUT/smi-trace.csv" 2>&1 &
fi
run=0
for part in "$@"; do
  run=$((run + 1))
  case $part in
    probe)
      timeout 150 python benchmarks/probe_fp8_kernels.py --out "$OUT/kernels.json" > "$OUT/probe.log" 2>&1
      echo "probe rc $?"; grep -v -i warn "$OUT/probe.log" | tail -40 ;;
    levers)
      timeout 270 python benchmarks/bench_fp8_serving.py --batch-sizes 128 --rounds 5 --budget-s 220 --profile \
        --variants fp16,fp8-qkv-div,fp8-qkv,fp16-cdt,fp8-qkv-cdt \
        --out "$OUT/levers.json" > "$OUT/levers.log" 2>&1
      echo "levers rc $?"; grep -v -i warn "$OUT/levers.log" | grep -v "^min cosine" | tail -8 ;;
    epilogue)
      timeout "${EPILOGUE_TIMEOUT:-300}" python benchmarks/probe_fp8_kernels.py --sections epilogue \
        --out "$OUT/epilogue.json" > "$OUT/epilogue.log" 2>&1
      echo "epilogue rc $?"; grep -v -i warn "$OUT/epilogue.log" | grep "^epilogue" | cut -c1-400 ;;
    serving)
      args_var="SERVING_ARGS_$run"  # this part's own arguments (the N-th part of the call), else SERVING_ARGS
      timeout "${SERVING_TIMEOUT:-280}" python benchmarks/bench_fp8_serving.py ${!args_var:-${SERVING_ARGS:-}} --out "$OUT/serving-$run.json" \
        > "$OUT/serving-$run.log" 2>&1
      echo "serving rc $?"; grep -v -i warn "$OUT/serving-$run.log" | tail -12 ;;
    tests)
      if ! python -c "import modelopt" 2>/dev/null; then
        { python -m pip install -q --no-index --no-deps .whl/a/*.whl && python -m pip install -q --no-deps --no-build-isolation -e . ; } \
          > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -5 "$OUT/install.log"; }
      fi
      timeout "${TESTS_TIMEOUT:-240}" python -m pytest -m gpu -p no:cacheprovider -q --durations=10 \
        "tests/test_gpu_fp8.py::test_compiled_fp8_linear_saturates_an_overflowing_input_as_the_eager_clamp_does" \
        "tests/test_gpu_fp8.py::test_the_loaded_runtime_serves_each_size_by_the_form_its_table_names_and_the_forms_agree" \
        "tests/test_gpu_fp8.py::test_the_benchmark_stages_serving_table_serves_each_size_by_its_verdict_and_the_runtime_follows_it" \
        tests/test_gpu_benchmark.py \
        tests/test_gpu_fp8.py::test_torch_fp8_loads_runs_compiled_matches_fakequant_and_holds_fp8_weights \
        > "$OUT/tests.log" 2>&1
      echo "tests rc $?"; grep -E "passed|failed|Error|error|^E " "$OUT/tests.log" | tail -15 ;;
    *) echo "unknown part: $part"; exit 2 ;;
  esac
done
