#!/bin/bash
# Answers per minute at concurrency 8 on one machine: one engine on every core
# against two engines pinned to half the cores each, both behind one `sotserve serve`
# (its replica set), alternating the two layouts REPEATS times; prints the ratio.
#
#   evals/replicas_vs_one.sh [QUESTIONS=16] [REPEATS=2]
#
# Linux only (taskset). Uses .venv/bin/python and ports 8201, 8202 and 8210.
set -u
cd "$(dirname "$0")/.."
N=${1:-16}; REPEATS=${2:-2}
PY=.venv/bin/python
OUT=$(mktemp -d)
CORES=$(nproc); HALF=$((CORES / 2))
G=$($PY -c "from engine.loader import embedded_gguf_path as e; print(e())")
export HF_HUB_OFFLINE=1
up() { for _ in $(seq 600); do curl -s -m 2 "$1/health" >/dev/null && return 0; sleep 0.5; done; return 1; }
layout() {  # $1: one|two, $2: repeat
  pids=()
  if [ "$1" = one ]; then
    OMP_NUM_THREADS=$CORES $PY -m engine.server --port 8201 >"$OUT/w1.log" 2>&1 & pids+=($!)
    up http://127.0.0.1:8201; backends="--backend http://127.0.0.1:8201"
  else
    OMP_NUM_THREADS=$HALF taskset -c 0-$((HALF - 1)) $PY -m engine.server --port 8201 \
      >"$OUT/w1.log" 2>&1 & pids+=($!)
    OMP_NUM_THREADS=$HALF taskset -c $HALF-$((CORES - 1)) $PY -m engine.server --port 8202 \
      >"$OUT/w2.log" 2>&1 & pids+=($!)
    up http://127.0.0.1:8201; up http://127.0.0.1:8202
    backends="--backend http://127.0.0.1:8201 --backend http://127.0.0.1:8202"
  fi
  # shellcheck disable=SC2086
  $PY -m sotserve serve $backends --model SmolLM2-135M-Instruct.Q4_1 --tokenizer "$G" \
    --port 8210 >"$OUT/front.log" 2>&1 & pids+=($!)
  up http://127.0.0.1:8210
  $PY -m evals.latency --backend http://127.0.0.1:8210 --tokenizer "$G" \
    --dataset ../shared/data/vicuna80.jsonl --suitable-only --limit "$N" --concurrency 8 \
    --modes sot --max-tokens 512 --judge none --timeout 600 --out "$OUT/$1-$2" >/dev/null 2>&1
  kill "${pids[@]}"; wait 2>/dev/null; sleep 2
}
for r in $(seq "$REPEATS"); do layout one "$r"; layout two "$r"; done
$PY - "$OUT" <<'PY'
import glob, json, sys
rate = {}
for name in ("one", "two"):
    n = t = 0
    for d in sorted(glob.glob(f"{sys.argv[1]}/{name}-*")):
        rows = [json.loads(line) for line in open(f"{d}/results.jsonl")]
        # a batch of 8 starts together: its wall time is its slowest answer
        t += sum(max(r["latency_s"] for r in rows[i:i + 8]) for i in range(0, len(rows), 8))
        n += sum(r["ok"] for r in rows)
    rate[name] = 60 * n / t
    print(f"{name} replica(s): {rate[name]:.1f} answers/min ({n} answers)")
print(f"two replicas / one: {rate['two'] / rate['one']:.2f}x")
PY
