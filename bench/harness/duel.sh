#!/usr/bin/env bash
# Two builds (or two configs) of Synapse compared on one core at the same moment, which a noisy
# (shared, virtual) machine otherwise makes impossible: both gateways are pinned to CPU 1 and each is
# driven by its own wrk on CPU 0 (where the nginx upstream runs too). While both are busy the kernel
# gives them equal CPU time, so the ratio of their request counts is the inverse ratio of their CPU
# cost per request. An A/A run reads 0.99-1.01.
#
#   bench/harness/duel.sh BASELINE_BIN [CANDIDATE_BIN] [ROUNDS]
#
# BASELINE_BIN: `synapse` of the build to compare against (e.g. the previous commit, installed in its
# own venv with `pip install -e`); CANDIDATE_BIN defaults to .venv/bin/synapse. Side A is the
# baseline, side B the candidate. Knobs:
#   DUEL_CONNS      connections per gateway (32)
#   DUEL_SECONDS    measured seconds per round (10), after 2 s of warm-up
#   DUEL_BODY       request.json; request_stream.json for streams
#   DUEL_CONFIG_A   config of the baseline side (default: harness/litellm_config.yaml)
#   DUEL_CONFIG_B   config of the candidate side (default: harness/litellm_config.yaml too)
#   DUEL_AUTH_A     bearer the baseline's wrk sends (default: post.lua's sk-anchor-dummy)
#   DUEL_AUTH_B     bearer the candidate's wrk sends (same default)
# So the same binary twice with two configs compares configs, e.g. auth off against auth on:
#   DUEL_CONFIG_A=bench/harness/auth_off.yaml DUEL_CONFIG_B=bench/harness/auth_on.yaml \
#   DUEL_AUTH_B=sk-syn-0c68e029909a-R5Rb2wtwNboUGFF4De6mtS-hCmN5xcac \
#     bash bench/harness/duel.sh .venv/bin/synapse .venv/bin/synapse 5
# (that key is auth_on.yaml's benchmark key: it only unlocks the fake upstream, fine to publish).
# Each gateway gets its own fresh SYNAPSE_DATA_DIR every round (each writes a SQLite usage ledger),
# removed at exit. Before each round both sides must answer one request with 200, and a round whose
# wrk saw any non-2xx answer or socket error stops the run: a side that is refusing requests would
# otherwise look faster.
# Needs nginx and wrk (harness/setup.sh installs them). Prints one ratio per round and the median.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=$1; CAND=${2:-.venv/bin/synapse}; ROUNDS=${3:-5}
CONNS=${DUEL_CONNS:-32}; SECONDS_=${DUEL_SECONDS:-10}
RUN=${ANCHOR_RUN_DIR:-/tmp/anchor-run}
BODY=${DUEL_BODY:-request.json}
CONFIG_A=${DUEL_CONFIG_A:-$HERE/litellm_config.yaml}
CONFIG_B=${DUEL_CONFIG_B:-$HERE/litellm_config.yaml}
AUTH_A=${DUEL_AUTH_A:-}; AUTH_B=${DUEL_AUTH_B:-}
mkdir -p "$RUN"
DATA=$(mktemp -d /tmp/duel-data.XXXXXX)
python3 "$HERE/gen_upstream.py" "$RUN" >/dev/null
taskset -c 0 nginx -p "$RUN" -c "$RUN/nginx.conf" -g "daemon on;" 2>/dev/null || true  # the upstream stays off CPU 1
A=; B=
trap 'kill $A $B 2>/dev/null || true; nginx -p "$RUN" -c "$RUN/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$DATA"' EXIT
echo "baseline (A): $BASE --config $CONFIG_A${AUTH_A:+ (own bearer)}"
echo "candidate (B): $CAND --config $CONFIG_B${AUTH_B:+ (own bearer)}"
echo "$CONNS connections each, ${SECONDS_} s per round, body $BODY"

load() {  # load PORT SECONDS AUTH -> requests served (exits if wrk saw a non-2xx or a socket error)
  local out
  out=$(env ANCHOR_BODY_FILE="$RUN/$BODY" ${3:+ANCHOR_AUTH="$3"} taskset -c 0 wrk -t1 -c"$CONNS" -d"$2" \
    -s "$HERE/post.lua" "http://127.0.0.1:$1/v1/chat/completions" 2>&1 | grep '^ANCHOR_JSON ')
  python3 - "${out#ANCHOR_JSON }" "$1" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
errors = {k: v for k, v in r.items() if k.startswith("err_") and v}
if errors:
    sys.exit(f"port {sys.argv[2]}: wrk saw errors {errors}: the comparison is void")
print(r["requests"])
PY
}

check() {  # check PORT AUTH: one request must answer 200
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
    -H "Authorization: Bearer ${2:-sk-anchor-dummy}" --data-binary "@$RUN/$BODY" \
    "http://127.0.0.1:$1/v1/chat/completions")
  [ "$code" = 200 ] || { echo "port $1 answered $code, not 200: check its config and bearer" >&2; exit 1; }
}

ratios=()
for round in $(seq "$ROUNDS"); do
  mkdir -p "$DATA/a$round" "$DATA/b$round"
  SYNAPSE_DATA_DIR="$DATA/a$round" taskset -c 1 "$BASE" serve --config "$CONFIG_A" \
    --host 127.0.0.1 --port 4016 >/dev/null 2>&1 & A=$!
  SYNAPSE_DATA_DIR="$DATA/b$round" taskset -c 1 "$CAND" serve --config "$CONFIG_B" \
    --host 127.0.0.1 --port 4015 >/dev/null 2>&1 & B=$!
  for _ in $(seq 100); do
    curl -sf -o /dev/null localhost:4015/health/ready && curl -sf -o /dev/null localhost:4016/health/ready && break
    sleep 0.1
  done
  check 4016 "$AUTH_A"; check 4015 "$AUTH_B"
  load 4016 2 "$AUTH_A" >/dev/null & W=$!
  load 4015 2 "$AUTH_B" >/dev/null; wait $W  # warm-up, both at once
  load 4016 "$SECONDS_" "$AUTH_A" > "$RUN/duel-a" & W=$!
  b=$(load 4015 "$SECONDS_" "$AUTH_B"); wait $W; a=$(cat "$RUN/duel-a")
  kill $A $B; wait $A $B 2>/dev/null || true; A=; B=
  rm -rf "$DATA/a$round" "$DATA/b$round"
  ratio=$(python3 -c "print(f'{$b / $a:.3f}')")
  ratios+=("$ratio")
  echo "round $round: baseline $a, candidate $b requests: candidate/baseline $ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{r[NR]=$1} END {print "median candidate/baseline:", r[int((NR+1)/2)]}'
