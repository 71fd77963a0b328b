#!/usr/bin/env bash
# Runs `speechlm-train` on this machine: one process on its devices, or a rehearsal of a
# multi-host run as N local processes joined by jax.distributed (coordinator on localhost),
# optionally on simulated CPU devices.
#
#   launch/local.sh -- --config configs/asr.py:tiny --workdir /tmp/asr
#   launch/local.sh --cpu-devices 8 -- --config configs/asr.py:tiny --workdir /tmp/asr
#   launch/local.sh --processes 2 --cpu-devices 4 -- --config configs/asr.py:tiny --workdir /tmp/asr2
#   launch/local.sh --dry-run --processes 2 --cpu-devices 4 -- --config ...   # print, do not run
#
# Options (before `--`; everything after it goes to speechlm-train unchanged):
#   --processes N     local processes (default 1); each gets JAX_COORDINATOR_ADDRESS,
#                     JAX_NUM_PROCESSES and JAX_PROCESS_ID (speechlm_jax.distributed reads them)
#   --cpu-devices D   run on the CPU with D simulated devices per process
#   --port P          coordinator port (default 12321)
#   --log-dir DIR     per-process logs for N > 1 (default ./logs/local); process 0's is streamed
#   --dry-run         print the exact commands and exit
# SPEECHLM_TRAIN overrides the training command (default: speechlm-train).
#
# With N > 1 the script waits for every process; when one fails it stops the others and
# exits with that process's status.
set -euo pipefail

processes=1
cpu_devices=0
port=12321
log_dir=logs/local
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
if ! [[ "$processes" =~ ^[1-9][0-9]*$ && "$cpu_devices" =~ ^[0-9]+$ && "$port" =~ ^[0-9]+$ ]]; then
  echo "local.sh: --processes, --cpu-devices and --port take positive integers" >&2
  exit 2
fi
read -r -a train <<< "${SPEECHLM_TRAIN:-speechlm-train}"

# The environment of process $1 as VAR=value words.
process_env() {
  local env=()
  if (( cpu_devices > 0 )); then
    env+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${cpu_devices}")
  fi
  if (( processes > 1 )); then
    env+=(JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="${processes}" JAX_PROCESS_ID="$1")
  fi
  (( ${#env[@]} )) && printf '%s\n' "${env[@]}"
  return 0
}

command_line() {
  local env
  mapfile -t env < <(process_env "$1")
  printf '%q ' env "${env[@]}" "${train[@]}" "${@:2}"
}

if (( dry_run )); then
  for ((i = 0; i < processes; i++)); do
    line=$(command_line "$i" "$@")
    if (( processes > 1 )); then
      echo "${line}> ${log_dir}/process_${i}.log 2>&1 &"
    else
      echo "${line% }"
    fi
  done
  exit 0
fi

if (( processes == 1 )); then
  mapfile -t env < <(process_env 0)
  exec env "${env[@]}" "${train[@]}" "$@"
fi

mkdir -p "$log_dir"
pids=()
for ((i = 0; i < processes; i++)); do
  mapfile -t env < <(process_env "$i")
  env "${env[@]}" "${train[@]}" "$@" > "${log_dir}/process_${i}.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -F "${log_dir}/process_0.log" &
tail_pid=$!

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; kill "$tail_pid" 2>/dev/null || true' INT TERM

status=0
remaining=("${pids[@]}")
while (( ${#remaining[@]} )); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    elif wait "$pid"; then
      :
    else
      status=$?
      echo "local.sh: a process exited with status ${status}; stopping the others (logs in ${log_dir})" >&2
      stop_all
      next=()
      break
    fi
  done
  remaining=("${next[@]}")
  (( ${#remaining[@]} )) && sleep 1
done
wait "${pids[@]}" 2>/dev/null || true
sleep 0.5
kill "$tail_pid" 2>/dev/null || true
exit "$status"
