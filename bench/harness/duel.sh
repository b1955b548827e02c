#!/usr/bin/env bash
# Two builds of Synapse compared on one core at the same moment, which a noisy (shared, virtual)
# machine otherwise makes impossible: both gateways are pinned to CPU 1 and each is driven by its own
# wrk on CPU 0. While both are busy the kernel gives them equal CPU time, so the ratio of their
# request counts is the inverse ratio of their CPU cost per request. An A/A run reads 0.99-1.01.
#
#   bench/harness/duel.sh BASELINE_BIN [CANDIDATE_BIN] [ROUNDS]
#
# BASELINE_BIN: `synapse` of the build to compare against (e.g. the previous commit, installed in its
# own venv with `pip install -e`); CANDIDATE_BIN defaults to .venv/bin/synapse. Knobs: DUEL_CONNS
# (32 per gateway), DUEL_SECONDS (10), DUEL_BODY (request.json; request_stream.json for streams).
# Needs nginx and wrk (harness/setup.sh installs them). Prints one ratio per round and the median.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=$1; CAND=${2:-.venv/bin/synapse}; ROUNDS=${3:-5}
CONNS=${DUEL_CONNS:-32}; SECONDS_=${DUEL_SECONDS:-10}
RUN=${ANCHOR_RUN_DIR:-/tmp/anchor-run}
BODY=${DUEL_BODY:-request.json}
mkdir -p "$RUN"
python3 "$HERE/gen_upstream.py" "$RUN" >/dev/null
nginx -p "$RUN" -c "$RUN/nginx.conf" -g "daemon on;" 2>/dev/null || true
trap 'nginx -p "$RUN" -c "$RUN/nginx.conf" -s stop 2>/dev/null || true' EXIT

load() {  # load PORT SECONDS -> requests served
  ANCHOR_BODY_FILE="$RUN/$BODY" taskset -c 0 wrk -t1 -c"$CONNS" -d"$2" -s "$HERE/post.lua" \
    "http://127.0.0.1:$1/v1/chat/completions" 2>&1 | grep -o '"requests":[0-9]*' | cut -d: -f2
}

ratios=()
for round in $(seq "$ROUNDS"); do
  taskset -c 1 "$BASE" serve --config "$HERE/litellm_config.yaml" --host 127.0.0.1 --port 4016 >/dev/null 2>&1 & A=$!
  taskset -c 1 "$CAND" serve --config "$HERE/litellm_config.yaml" --host 127.0.0.1 --port 4015 >/dev/null 2>&1 & B=$!
  for _ in $(seq 100); do
    curl -sf -o /dev/null localhost:4015/health/ready && curl -sf -o /dev/null localhost:4016/health/ready && break
    sleep 0.1
  done
  load 4016 2 >/dev/null & W=$!
  load 4015 2 >/dev/null; wait $W  # warm-up, both at once
  load 4016 "$SECONDS_" > "$RUN/duel-a" & W=$!
  b=$(load 4015 "$SECONDS_"); wait $W; a=$(cat "$RUN/duel-a")
  kill $A $B; wait $A $B 2>/dev/null || true
  ratio=$(python3 -c "print(f'{$b / $a:.3f}')")
  ratios+=("$ratio")
  echo "round $round: baseline $a, candidate $b requests: candidate/baseline $ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{r[NR]=$1} END {print "median candidate/baseline:", r[int((NR+1)/2)]}'
