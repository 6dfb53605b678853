#!/usr/bin/env bash
# The whole product on this machine, end to end:
#   install -> Kafka + Redis up -> worker + API up -> a year of simulated history streamed,
#   folded and archived -> the trainer learns from the archive and promotes a model -> the
#   running worker picks it up (no restart) -> everyone rescored -> a live stream scored as it
#   arrives -> top users by CLV, one user's lookup (Redis and HTTP), consumer lag.
# Knobs: DEMO_USERS (2000), DEMO_DAYS (365), DEMO_LIVE_RATE (events/s, 2000), DEMO_LIVE_EVENTS (20000),
#        DEMO_KEEP=1 leaves the services running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${DEMO_USERS:-2000}
DAYS=${DEMO_DAYS:-365}
RATE=${DEMO_LIVE_RATE:-2000}
LIVE=${DEMO_LIVE_EVENTS:-20000}
export COLUMNS=${COLUMNS:-110}
say() { printf '\n\033[1;32m==> %s\033[0m\n' "$*"; }

scripts/install.sh

say "starting Kafka (KRaft) + Redis"
infra/services.sh start
eval "$(infra/services.sh env)"
export CLV_DATA_DIR=${CLV_DATA_DIR:-var/demo}
export CLV_MODEL_POLL_S=2
rm -rf "$CLV_DATA_DIR"; mkdir -p "$CLV_DATA_DIR"
CLV=.venv/bin/clv
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ "${DEMO_KEEP:-0}" != 1 ]]; then infra/services.sh stop >/dev/null; echo "services stopped"; fi
}
trap cleanup EXIT

say "fresh demo topics and Redis keys"
redis-cli -u "$CLV_REDIS_URL" --scan --pattern 'clv:*' | xargs -r -n 500 redis-cli -u "$CLV_REDIS_URL" del >/dev/null
for t in clicks orders reviews profiles scores dlq; do
  java -cp "${CLV_CACHE_DIR:-$HOME/.cache/clv}/kafka-3.9.1/libs/*" kafka.admin.TopicCommand \
    --bootstrap-server "$CLV_KAFKA_BOOTSTRAP" --delete --if-exists --topic "clv.$t" >/dev/null 2>&1 || true
done
sleep 2
$CLV topics

say "worker (logs: $CLV_DATA_DIR/worker.log, metrics :6066/metrics) and lookup API (:8000)"
$CLV worker > "$CLV_DATA_DIR/worker.log" 2>&1 & PIDS+=($!)
$CLV serve > "$CLV_DATA_DIR/api.log" 2>&1 & PIDS+=($!)
sleep 5

START=$(date -u -d "-$((DAYS + 1)) days" +%Y-%m-%d)
say "history: $USERS simulated customers over $DAYS days from $START -> Kafka (1% duplicates, 0.2% bad)"
$CLV simulate --users "$USERS" --days "$DAYS" --start "$START" --seed 7 --to-kafka \
  --duplicates 0.01 --bad 0.002 --no-progress
$CLV lag --wait 600 --interval 1

say "trainer: point-in-time sets from the archive -> model -> ONNX -> registry -> promote"
$CLV train --quick
sleep 4
grep -E "now serving model" "$CLV_DATA_DIR/worker.log" | tail -1 || true

say "rescoring every user with the promoted model"
$CLV rescore

say "live: $LIVE events at $RATE/s, scored as they arrive"
$CLV simulate --users "$USERS" --days 365 --start "$START" --seed 8 --to-kafka --rate "$RATE" \
  --limit "$LIVE" --live --no-progress
$CLV lag --wait 300 --interval 2

say "top users by expected CLV"
$CLV top -n 10
U=$(redis-cli -u "$CLV_REDIS_URL" zrevrange clv:v1:top 0 0)
say "lookup of user $U (Redis client, then HTTP)"
$CLV lookup "$U"
curl -s "http://127.0.0.1:8000/v1/users/$U/clv"; echo
say "ops counters (clv:v1:stats)"
redis-cli -u "$CLV_REDIS_URL" hgetall clv:v1:stats | paste - - | sort
say "done: ops page was at http://127.0.0.1:8000/ops, API docs at /docs"
