#!/bin/bash
# The GPU plan of docs/perf/engines.md as one resumable script for short device calls (a machine stays warm ~30 s
# between calls; /tmp survives, long jobs run under setsid and outlive a call). One phase per call:
#
#   bash scripts/gpu_session.sh start   # bench build in the background; GPU tests; tiny fp8 build with its parity
#                                       # check (--trace), validate, run = v4run on it
#   bash scripts/gpu_session.sh bench   # waits for the bench build; bench model (engine, eager, floor, KV bytes:
#                                       # one run, no torch.compile); v4run + run on the bench engine; then a
#                                       # torch.compile-only bench model in the background (call again to collect)
#
#   QUICK=1 ... start                   # only the two background builds (then `bench` in the same call: short budgets)
#   NO_BENCH_BUILD=1 KBENCH="mhc linear" ... start   # no bench build; then `bench kernels mhc linear` after the tests
#
# Logs go to /tmp/bm and, packed as logs.tgz with the JSON / plot beside it, to $OUT (the device tool's folder;
# ./gpu_out elsewhere). DL: seconds this call may use (570).
# BENCH_SOURCE / BENCH_TARGET / BENCH_LIMITS / CONTEXTS / PREFILL replace the bench engine's preset, target,
# build limits and the timed shapes (e.g. a tiny cpu engine to try the script without a GPU).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT" /tmp/bm
T0=$(date +%s); DL=${DL:-570}
el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( DL - ($(date +%s) - T0) )); }
python3 -c "import v4compile.graph" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
V="python3 -m v4compile"
E=/tmp/bench_eng
SRC=${BENCH_SOURCE:-bench}; TGT=${BENCH_TARGET:-h200}
BUILD="$V build --preset $SRC --target $TGT --no-check ${BENCH_LIMITS:---precision fp8 --max-batch 64 --max-len 1048576} -o $E"
CTX="--contexts ${CONTEXTS:-4096,131072,1048576} --batch 1 --steps 8"
BM1="$V bench model --engine $E $CTX --prefill ${PREFILL:-8192} --no-compile --profile --json /tmp/bm/model.json --plot /tmp/bm/latency.png"
BM2="$V bench model --preset $SRC --no-engine --no-eager $CTX --prefill '' --compile --json /tmp/bm/compile.json"
PROMPT="--prompt-ids 5,17,300,42,9,77,128,3 --max-new-tokens 8"

bg() {  # bg NAME COMMAND: run under setsid, log /tmp/bm/NAME.log, /tmp/NAME.done when finished
  touch /tmp/$1.started
  setsid bash -c "$2 > /tmp/bm/$1.log 2>&1; echo rc=\$? >> /tmp/bm/$1.log; touch /tmp/$1.done" < /dev/null > /dev/null 2>&1 &
  el "started $1: $2"
}
snap() {  # the device tool returns at most 8 files: every log in one archive, the results beside it
  sort -n /tmp/gpumem.log 2>/dev/null | tail -1 > /tmp/bm/gpu_mib_max.txt
  tar czf "$OUT"/logs.tgz -C /tmp bm 2>/dev/null
  for f in model.json compile.json latency.png tiny_validate.json kbench.json; do [ -f /tmp/bm/$f ] && cp /tmp/bm/$f "$OUT"/; done
}
waitfor() { while [ ! -f /tmp/$1.done ] && [ "$(left)" -gt 15 ]; do sleep 5; snap; done; }
stages() { tr '\r' '\n' < "$1" | grep -E "done|Error|error|rc=" | tail -"${2:-20}"; }
v4run_bin() { [ -s /tmp/v4run.path ] && cat /tmp/v4run.path; }

case "${1:-}" in
start)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  setsid bash -c "nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 2 > /tmp/gpumem.log" \
    < /dev/null > /dev/null 2>&1 &
  [ -f /tmp/build.started ] || [ -n "${NO_BENCH_BUILD:-}" ] || bg build "$BUILD"
  setsid bash -c "python3 -m v4compile.runtime.cpp_build /tmp/v4run-build > /tmp/v4run.path 2> /tmp/bm/cpp_build.log" \
    < /dev/null > /dev/null 2>&1 &
  if [ -n "${QUICK:-}" ]; then el "QUICK: bench build and v4run build only"; snap; el end; exit 0; fi
  (TRITON_INTERPRET=0 timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/plugins/test_tensorrt_aot_gpu.py \
     tests/model/test_reference_model.py tests/runtime/test_weights.py tests/targets/test_kv_layout_gpu.py \
     tests/plugins/test_compressor.py tests/plugins/test_mhc.py tests/plugins/test_fp8_linear.py \
     > /tmp/bm/gpu_tests.log 2>&1; echo rc=$? >> /tmp/bm/gpu_tests.log) &
  GT=$!
  el "tiny fp8 build (production layout, check on, --trace)"
  timeout $(( $(left) - 120 )) $V build --preset tiny --target h200 --precision fp8 --trace -o /tmp/t \
    > /tmp/bm/tiny_build.log 2>&1; el "tiny build rc=$?"
  grep -n -i "aligned\|Traceback\|Error" /tmp/bm/tiny_build.log | head -10
  python3 -c "import json; m = json.load(open('/tmp/t/manifest.json')); p = m['parity'] or {}; \
print({k: v for k, v in p.items()}); print(m['build']['stage_seconds'])" 2>&1 | tail -2
  timeout 90 $V validate /tmp/t --steps 4 --json > /tmp/bm/tiny_validate.json 2> /tmp/bm/tiny_validate.err
  el "validate rc=$?"; tail -2 /tmp/bm/tiny_validate.err
  $V run /tmp/t $PROMPT --json 2>&1 | tail -1
  [ -n "$(v4run_bin)" ] && timeout 60 "$(v4run_bin)" /tmp/t $PROMPT 2>&1 | tail -1
  wait $GT; el "gpu tests: $(tail -2 /tmp/bm/gpu_tests.log | tr '\n' ' ')"
  if [ -n "${KBENCH:-}" ] && [ "$(left)" -gt 90 ]; then  # kernel benchmark groups, e.g. KBENCH=compressor
    timeout $(( $(left) - 30 )) $V bench kernels $KBENCH --json /tmp/bm/kbench.json > /tmp/bm/kbench.log 2>&1
    el "bench kernels $KBENCH rc=$?"; grep -v "^\s*$" /tmp/bm/kbench.log | tail -40
  fi
  el "bench build so far:"; stages /tmp/bm/build.log
  ;;
bench)
  while [ ! -f /tmp/build.done ] && [ "$(left)" -gt 20 ]; do sleep 5; snap; done
  el "bench build:"; stages /tmp/bm/build.log 30
  if [ -f $E/manifest.json ]; then
    if [ ! -f /tmp/bm1.started ]; then
      python3 -c "import json; m = json.load(open('$E/manifest.json')); print(m['build']['stage_seconds']); \
print(m['kernels'])"
      du -sh $E; bg bm1 "$BM1"
    fi
    waitfor bm1
    if [ -f /tmp/bm1.done ] && [ ! -f /tmp/ran ]; then
      touch /tmp/ran
      [ -n "$(v4run_bin)" ] && { el v4run; timeout 150 "$(v4run_bin)" $E $PROMPT 2>&1 | tail -2; }
      el run; timeout 150 $V run $E $PROMPT --json 2>&1 | tail -1
    fi
    [ -f /tmp/ran ] && [ ! -f /tmp/bm2.started ] && bg bm2 "$BM2"
    waitfor bm2
  fi
  for f in bm1 bm2; do [ -f /tmp/bm/$f.log ] && { el "$f:"; grep -v "^\s*$" /tmp/bm/$f.log | tail -45; }; done
  ;;
*)
  echo "usage: bash scripts/gpu_session.sh start|bench" >&2; exit 2 ;;
esac
snap
echo "gpu MiB max: $(cat /tmp/bm/gpu_mib_max.txt 2>/dev/null)"; df -h /tmp | tail -1
el end
