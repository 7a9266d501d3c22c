#!/usr/bin/env bash
# `livekv bench serve` against plain `livekv serve` and `livekv serve --ray` (1 replica x 2 threads, 2 replicas x 1
# thread), one server at a time, the same load; the resident memory of each server's process tree after the load.
# Run from the repository root with the .venv made by `make`: bash docs/results/serve_side_by_side.sh [OUT]
set -u
OUT=${1:-out/serve}; mkdir -p "$OUT"
PY=.venv/bin/python
LOAD="--sessions 1,2,4,8,16 --duration 30 --fps 2 --ask-every 10"
descendants() { for c in $(pgrep -P "$1"); do echo -n "$c "; descendants "$c"; done; }
one() {  # name port server-args...
  local name=$1 port=$2; shift 2
  $PY -m livekv serve --port $port --model none --max-sessions 64 "$@" > "$OUT/$name.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do grep -q "Uvicorn running\|Ctrl-C stops it" "$OUT/$name.server.log" && break; sleep 1; done
  sleep 5
  echo "== $name ($*)" | tee -a "$OUT/summary.txt"
  $PY -m livekv bench serve --url http://127.0.0.1:$port $LOAD --json "$OUT/serve_$name.json" | tee -a "$OUT/summary.txt"
  local tree; tree=$(echo $pid $(descendants $pid))
  ps -o rss= -p "${tree// /,}" | awk -v n=$(wc -w <<< "$tree") \
    '{s += $1} END {printf "process tree RSS %.0f MiB over %d processes\n", s / 1024, n}' | tee -a "$OUT/summary.txt"
  kill -INT $pid; wait $pid
}
one plain 8501 --threads 2
one ray1x2 8502 --ray --replicas 1 --replica-cpus 2 --threads 2 --state-dir "$OUT/state-ray1x2"
one ray2x1 8503 --ray --replicas 2 --replica-cpus 1 --threads 1 --state-dir "$OUT/state-ray2x1"
