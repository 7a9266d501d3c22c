#!/usr/bin/env bash
# A/B of the decode speed before and after the one-memory-core redesign: two checkouts, /work/base at 70af49b and
# /work/main, timed alternately (base, main, base, ...) at 32k, budget 256, 2 threads, on a quiet machine.
set -u
O=${OUT:-/work/runs/ab}
mkdir -p "$O"
for r in 1 2 3; do
  for side in base main; do
    cd /work/$side
    PYTHONPATH=/work/$side /work/main/.venv/bin/python -m livekv bench decode --methods dense,quest,freekv,clusterkv \
        --budget 256 --context 32768 --threads 2 --json $O/${side}_$r.json > $O/${side}_$r.log 2>&1
    echo "$side $r done $(date)"
  done
done
