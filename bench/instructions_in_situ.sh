#!/bin/bash
# Instructions per request that `otellama serve` (default settings) executes above bench/plain_proxy.py (the
# same app and server, recording nothing), counted by valgrind's callgrind in the running servers: each
# server in turn runs under callgrind in front of bench/upstream.py, gets 100 sequential GenAI requests to
# warm up, then N more with counting switched on (callgrind_control -i on/off). Instruction counts do not
# depend on how fast or busy the machine is, so this figure holds still where CPU times wander; set it
# beside telemetry_bench.py's in-situ CPU to tell extra code from the same code running slower.
#
#   N=300 bench/instructions_in_situ.sh        (needs valgrind; a few minutes: everything runs ~50x slower)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-300}
PY=$PWD/.venv/bin/python
UPSTREAM_PORT=18534
PORT=18535
work=$(mktemp -d)
trap 'kill $upstream 2>/dev/null; rm -rf "$work"' EXIT

requests() {  # $1 requests to the server on $PORT, one at a time (waits up to 10 minutes for it to start)
  "$PY" - "$1" "$PORT" <<'PY'
import sys, time
import httpx
count, port = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 600
while True:
    try:
        httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=5).raise_for_status()
        break
    except httpx.HTTPError:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
with httpx.Client(timeout=60) as client:
    for _ in range(count):
        body = b'{"model":"m","prompt":"Why is the sky blue?"}'
        client.post(f"http://127.0.0.1:{port}/api/generate?chunks=0", content=body).raise_for_status()
PY
}

"$PY" bench/upstream.py --port $UPSTREAM_PORT > "$work/upstream.log" 2>&1 &
upstream=$!
declare -A counted
for kind in plain serve; do
  if [ $kind = plain ]; then server=("$PWD/bench/plain_proxy.py"); else server=(-m otellama serve); fi
  (cd "$work" && exec env -u OTEL_EXPORTER_OTLP_ENDPOINT PYTHONHASHSEED=0 OTELLAMA_LOG_FILE="$work/$kind.jsonl" \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$kind.out" \
    "$PY" "${server[@]}" --host 127.0.0.1 --port $PORT --upstream http://127.0.0.1:$UPSTREAM_PORT \
    > "$work/$kind.log" 2>&1) &
  requests 100
  pid=$(pgrep -f "callgrind.*--port $PORT")
  callgrind_control -i on "$pid" > /dev/null 2>&1
  requests "$N"
  callgrind_control -i off "$pid" > /dev/null 2>&1
  kill -TERM "$pid"
  while kill -0 "$pid" 2> /dev/null; do sleep 0.5; done
  sleep 1  # valgrind writes its summary as it exits
  counted[$kind]=$(grep -o 'Collected : [0-9]*' "$work/$kind.log" | awk '{print $3}')
  echo "$kind: ${counted[$kind]} instructions for $N requests"
done
echo "otellama serve above plain_proxy: $(( (counted[serve] - counted[plain]) / N )) instructions per request"
