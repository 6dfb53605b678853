#!/usr/bin/env bash
# Local services for development and tests: Kafka 3.9.1 (KRaft, single node), Redis, Prometheus.
#
#   infra/services.sh start|stop|restart|status|kill [SERVICE...]
#   infra/services.sh env        # export lines for the app (eval "$(infra/services.sh env)")
#
# SERVICE: kafka | redis | prometheus (alias prom) | all (= kafka redis) | full (= all + prometheus)
# Defaults: start/restart -> all; stop/status -> full (so `stop` leaves nothing running);
# kill (SIGKILL, crash simulation) needs explicit names.
#
# Everything is loopback only and lives in CLV_INFRA_DIR (default <repo>/var/infra):
#   conf/ (rendered configs)  data/ (kafka log dirs, redis AOF, prometheus TSDB)
#   logs/ (kafka/server.log, redis.log, prometheus.log ...)  run/ (pid files, lock)
# Environment knobs (shell only; the Python app reads streams.settings.Settings):
#   CLV_INFRA_DIR, CLV_CACHE_DIR (jar cache, default ~/.cache/clv), CLV_INFRA_KAFKA_LIBS,
#   CLV_INFRA_KAFKA_PORT=19092 CLV_INFRA_KAFKA_CONTROLLER_PORT=19093 CLV_INFRA_KAFKA_SASL_PORT=19094
#   CLV_INFRA_KAFKA_SASL=0|1 CLV_INFRA_KAFKA_SASL_USER=clv CLV_INFRA_KAFKA_SASL_PASSWORD=clv-secret
#   CLV_INFRA_KAFKA_PARTITIONS=4 CLV_INFRA_KAFKA_OFFSETS_PARTITIONS=8
#   CLV_INFRA_KAFKA_HEAP_OPTS="-Xms256m -Xmx512m" CLV_INFRA_KAFKA_SESSION_TIMEOUT_MS=4000
#   CLV_INFRA_REDIS_PORT=16379 CLV_INFRA_REDIS_PASSWORD (optional requirepass)
#   CLV_INFRA_REDIS_APPENDFSYNC=always|everysec (always: no acknowledged write is lost if Redis dies)
#   CLV_INFRA_PROM_PORT=19090 CLV_INFRA_SCRAPE_TARGETS=127.0.0.1:6066 CLV_INFRA_SCRAPE_INTERVAL=1s
#   CLV_INFRA_METRICS_PATH=/metrics
#   CLV_INFRA_TIMEOUT_S=120 (wait for "answers") CLV_INFRA_STOP_TIMEOUT_S=30 (SIGTERM -> SIGKILL)
#   CLV_INFRA_PYTHON (python with aiokafka for the Kafka readiness probe; default .venv/bin/python)
# See docs/infra.md.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

KAFKA_VERSION=3.9.1
CACHE_DIR=${CLV_CACHE_DIR:-$HOME/.cache/clv}
KAFKA_LIBS=${CLV_INFRA_KAFKA_LIBS:-$CACHE_DIR/kafka-$KAFKA_VERSION/libs}
INFRA_DIR=${CLV_INFRA_DIR:-$REPO/var/infra}
KAFKA_PORT=${CLV_INFRA_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${CLV_INFRA_KAFKA_CONTROLLER_PORT:-19093}
KAFKA_SASL=${CLV_INFRA_KAFKA_SASL:-0}
KAFKA_SASL_PORT=${CLV_INFRA_KAFKA_SASL_PORT:-19094}
KAFKA_SASL_USER=${CLV_INFRA_KAFKA_SASL_USER:-clv}
KAFKA_SASL_PASSWORD=${CLV_INFRA_KAFKA_SASL_PASSWORD:-clv-secret}
KAFKA_PARTITIONS=${CLV_INFRA_KAFKA_PARTITIONS:-4}
KAFKA_OFFSETS_PARTITIONS=${CLV_INFRA_KAFKA_OFFSETS_PARTITIONS:-8}
KAFKA_HEAP_OPTS=${CLV_INFRA_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}
KAFKA_SESSION_TIMEOUT_MS=${CLV_INFRA_KAFKA_SESSION_TIMEOUT_MS:-4000}
REDIS_PORT=${CLV_INFRA_REDIS_PORT:-16379}
REDIS_PASSWORD=${CLV_INFRA_REDIS_PASSWORD:-}
REDIS_APPENDFSYNC=${CLV_INFRA_REDIS_APPENDFSYNC:-always}
PROM_PORT=${CLV_INFRA_PROM_PORT:-19090}
SCRAPE_TARGETS=${CLV_INFRA_SCRAPE_TARGETS:-127.0.0.1:6066}
SCRAPE_INTERVAL=${CLV_INFRA_SCRAPE_INTERVAL:-1s}
METRICS_PATH=${CLV_INFRA_METRICS_PATH:-/metrics}
TIMEOUT_S=${CLV_INFRA_TIMEOUT_S:-120}
STOP_TIMEOUT_S=${CLV_INFRA_STOP_TIMEOUT_S:-30}
PYTHON=${CLV_INFRA_PYTHON:-$REPO/.venv/bin/python}

CONF=$INFRA_DIR/conf
DATA=$INFRA_DIR/data
LOGS=$INFRA_DIR/logs
RUN=$INFRA_DIR/run
KAFKA_PROPS=$CONF/server.properties
KAFKA_DATA=$DATA/kafka
KAFKA_LOGS=$LOGS/kafka
REDIS_CONF=$CONF/redis.conf
REDIS_DATA=$DATA/redis
PROM_CONF=$CONF/prometheus.yml
PROM_DATA=$DATA/prometheus

say() { printf '[services] %s\n' "$*" >&2; }
die() { printf 'services.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "See the header of infra/services.sh and docs/infra.md for every environment knob."
}

# --- validation ------------------------------------------------------------------------------
check_port() { # name value
  [[ $2 =~ ^[0-9]+$ ]] && ((10#$2 >= 1 && 10#$2 <= 65535)) ||
    die "$1=$2 is not a TCP port (1-65535)"
}
validate() {
  check_port CLV_INFRA_KAFKA_PORT "$KAFKA_PORT"
  check_port CLV_INFRA_KAFKA_CONTROLLER_PORT "$KAFKA_CONTROLLER_PORT"
  check_port CLV_INFRA_KAFKA_SASL_PORT "$KAFKA_SASL_PORT"
  check_port CLV_INFRA_REDIS_PORT "$REDIS_PORT"
  check_port CLV_INFRA_PROM_PORT "$PROM_PORT"
  [[ $KAFKA_PARTITIONS =~ ^[1-9][0-9]*$ ]] || die "CLV_INFRA_KAFKA_PARTITIONS=$KAFKA_PARTITIONS must be >= 1"
  [[ $KAFKA_OFFSETS_PARTITIONS =~ ^[1-9][0-9]*$ ]] ||
    die "CLV_INFRA_KAFKA_OFFSETS_PARTITIONS=$KAFKA_OFFSETS_PARTITIONS must be >= 1"
  [[ $KAFKA_SESSION_TIMEOUT_MS =~ ^[0-9]+$ ]] && ((KAFKA_SESSION_TIMEOUT_MS >= 2000)) ||
    die "CLV_INFRA_KAFKA_SESSION_TIMEOUT_MS=$KAFKA_SESSION_TIMEOUT_MS must be a number >= 2000"
  [[ $KAFKA_SASL == 0 || $KAFKA_SASL == 1 ]] || die "CLV_INFRA_KAFKA_SASL=$KAFKA_SASL must be 0 or 1"
  [[ $TIMEOUT_S =~ ^[1-9][0-9]*$ ]] || die "CLV_INFRA_TIMEOUT_S=$TIMEOUT_S must be a positive integer"
  [[ $STOP_TIMEOUT_S =~ ^[1-9][0-9]*$ ]] || die "CLV_INFRA_STOP_TIMEOUT_S=$STOP_TIMEOUT_S must be a positive integer"
  local ports=("$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$REDIS_PORT" "$PROM_PORT")
  [[ $KAFKA_SASL == 1 ]] && ports+=("$KAFKA_SASL_PORT")
  local dup
  dup=$(printf '%s\n' "${ports[@]}" | sort | uniq -d)
  [[ -z $dup ]] || die "port $dup is used by two services; give each CLV_INFRA_*_PORT its own value"
  if [[ $KAFKA_SASL == 1 ]]; then
    [[ $KAFKA_SASL_USER =~ ^[A-Za-z0-9_.-]+$ ]] ||
      die "CLV_INFRA_KAFKA_SASL_USER may only hold letters, digits, '_', '.', '-'"
    [[ -n $KAFKA_SASL_PASSWORD && $KAFKA_SASL_PASSWORD != *[\"\\$'\n']* ]] ||
      die "CLV_INFRA_KAFKA_SASL_PASSWORD must be non-empty, without '\"', '\\' or newlines"
  fi
  [[ $REDIS_PASSWORD != *[\"\\$'\n']* ]] ||
    die "CLV_INFRA_REDIS_PASSWORD must not contain '\"', '\\' or newlines"
}

# --- helpers ---------------------------------------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

require_port_free() { # port what
  if port_open "$1"; then
    die "127.0.0.1:$1 ($2) is already taken by another process. Stop it, or pick another port" \
      "with the matching CLV_INFRA_*_PORT variable (see: ss -ltnp 'sport = :$1')"
  fi
}

render() { # template out key=value...
  local tmpl=$1 out=$2 text kv
  shift 2
  text=$(<"$tmpl")
  for kv in "$@"; do
    text=${text//"@${kv%%=*}@"/"${kv#*=}"}
  done
  (umask 077 && printf '%s\n' "$text" >"$out.tmp") && mv -f "$out.tmp" "$out"
}

# True while process $1 exists and is not a zombie (an exited child not yet reaped).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [[ $(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# Prints the pid of service $1 when its pid file points at a live process that is ours.
pid_of() {
  local svc=$1 pidfile=$RUN/$1.pid pid
  [[ -r $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  case $svc in
    kafka) tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "kafka.Kafka $KAFKA_PROPS" || return 1 ;;
    redis) [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$(readlink -f "$REDIS_DATA")" ]] || return 1 ;;
    prometheus) tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--config.file=$PROM_CONF" || return 1 ;;
  esac
  echo "$pid"
}

log_of() {
  case $1 in
    kafka) echo "$KAFKA_LOGS/server.log (JVM stdout/stderr: $KAFKA_LOGS/kafka.out)" ;;
    redis) echo "$LOGS/redis.log" ;;
    prometheus) echo "$LOGS/prometheus.log" ;;
  esac
}

fail_start() { # svc message logfile
  local f
  {
    printf 'services.sh: error: %s did not come up: %s\n' "$1" "$2"
    printf '  log: %s\n' "$(log_of "$1")"
    for f in "${@:3}"; do
      [[ -s $f ]] || continue
      printf -- '--- last lines of %s ---\n' "$f"
      tail -n 25 "$f"
    done
  } >&2
  if pid_of "$1" >/dev/null; then # half-started: do not leave it behind
    stop_service "$1" 2>/dev/null || true
    printf '  (stopped the half-started %s; its logs are kept)\n' "$1" >&2
  fi
  exit 1
}

ensure_dirs() { mkdir -p "$CONF" "$DATA" "$LOGS" "$RUN" "$KAFKA_DATA" "$KAFKA_LOGS" "$REDIS_DATA" "$PROM_DATA"; }

as_root() { if ((EUID == 0)); then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

ensure_debian_pkg() { # binary package
  command -v "$1" >/dev/null && return 0
  say "$1 not found: installing Debian package $2"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >&2 ||
    die "could not install $2; install it yourself (apt-get install $2) and rerun"
  command -v "$1" >/dev/null || die "$2 installed but $1 is still not on PATH"
}

# --- kafka -----------------------------------------------------------------------------------
ensure_kafka_libs() {
  local marker=$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar
  [[ -f $marker && -f $KAFKA_LIBS/slf4j-reload4j-1.7.36.jar ]] && return 0
  command -v mvn >/dev/null || die "Kafka jars missing in $KAFKA_LIBS and mvn is not installed." \
    "Install Maven (apt-get install maven) or point CLV_INFRA_KAFKA_LIBS at a folder with the jars."
  mkdir -p "$(dirname "$KAFKA_LIBS")"
  (
    # several sessions may start at once: one fetches, the others wait for it
    exec 8>"$(dirname "$KAFKA_LIBS")/.fetch.lock"
    flock -w 600 8 || die "timed out waiting for another jar fetch into $KAFKA_LIBS"
    [[ -f $marker ]] && exit 0
    local tmp=$KAFKA_LIBS.tmp.$$
    rm -rf "$tmp"
    say "fetching Kafka $KAFKA_VERSION jars with Maven into $KAFKA_LIBS (once)"
    local mlog
    mlog=$(dirname "$KAFKA_LIBS")/maven.log
    mvn -q -B -f "$SCRIPT_DIR/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime >"$mlog" 2>&1 ||
      { rm -rf "$tmp"; tail -n 30 "$mlog" >&2
        die "Maven could not fetch the Kafka jars (network? ~/.m2 settings?); full log: $mlog"; }
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "Maven ran but $tmp has no kafka jar"
    rm -rf "$KAFKA_LIBS" && mv "$tmp" "$KAFKA_LIBS"
  )
}

new_cluster_id() { # Kafka Uuid: 16 random bytes, url-safe base64 without padding, not starting '-'
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ $id != -* ]] && { echo "$id"; return; }
  done
}

render_kafka_props() {
  local listeners="PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT"
  local advertised="PLAINTEXT://127.0.0.1:$KAFKA_PORT"
  local pmap="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  local sasl=""
  if [[ $KAFKA_SASL == 1 ]]; then
    listeners+=",SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT"
    advertised+=",SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT"
    pmap+=",SASL_PLAINTEXT:SASL_PLAINTEXT"
    # Server-side JAAS for the PLAIN mechanism on that listener only: user_<name>="<password>"
    # declares an account. Brokers talk to each other (and the controller) over PLAINTEXT.
    sasl="# SASL/PLAIN listener (CLV_INFRA_KAFKA_SASL=1)
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER=\"$KAFKA_SASL_PASSWORD\";"
  fi
  render "$SCRIPT_DIR/kafka/server.properties.tmpl" "$KAFKA_PROPS" \
    "CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT" "LISTENERS=$listeners" \
    "ADVERTISED_LISTENERS=$advertised" "PROTOCOL_MAP=$pmap" "LOG_DIRS=$KAFKA_DATA" \
    "NUM_PARTITIONS=$KAFKA_PARTITIONS" "OFFSETS_PARTITIONS=$KAFKA_OFFSETS_PARTITIONS" \
    "SESSION_TIMEOUT_MS=$KAFKA_SESSION_TIMEOUT_MS" "SASL_CONFIG=$sasl"
}

kafka_cmd() { # sets KCMD: java + flags + classpath + "$@"; shared by the broker and the tools
  # shellcheck disable=SC2206  # KAFKA_HEAP_OPTS is a list of JVM flags
  KCMD=(java $KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_LOGS"
    -Dlog4j.configuration="file:$SCRIPT_DIR/kafka/log4j.properties"
    -cp "$KAFKA_LIBS/*" "$@")
}
kafka_java() { kafka_cmd "$@" && "${KCMD[@]}"; }

format_kafka_storage() {
  [[ -f $KAFKA_DATA/meta.properties ]] && return 0
  local id
  id=$(new_cluster_id)
  say "formatting Kafka storage in $KAFKA_DATA (cluster id $id)"
  kafka_java kafka.tools.StorageTool format --ignore-formatted -t "$id" -c "$KAFKA_PROPS" \
    >"$KAFKA_LOGS/format.log" 2>&1 9>&- ||
    fail_start kafka "storage format failed" "$KAFKA_LOGS/format.log"
}

# Waits until the broker answers a metadata request (TCP accept alone is not enough: the socket
# opens before the broker has joined the KRaft quorum and been unfenced).
wait_kafka() {
  local pid=$1
  if [[ -x $PYTHON ]] && "$PYTHON" -c 'import aiokafka' 2>/dev/null; then
    local out
    if out=$("$PYTHON" - "127.0.0.1:$KAFKA_PORT" "$pid" "$TIMEOUT_S" <<'PY' 2>&1
import asyncio, logging, os, sys, time
from aiokafka.client import AIOKafkaClient

logging.disable(logging.CRITICAL)
bootstrap, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

async def main() -> int:
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            zombie = True
        if zombie:
            print("the broker process exited")
            return 2
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await client.bootstrap()
            if client.cluster.brokers() and client.cluster.controller is not None:
                return 0
            last = "metadata has no broker/controller yet"
        except Exception as exc:  # broker not up yet: retry until the deadline
            last = f"{type(exc).__name__}: {exc}"
        finally:
            await client.close()
        if time.monotonic() > deadline:
            print(f"no metadata answer after {timeout:.0f}s ({last})")
            return 1
        await asyncio.sleep(0.5)

sys.exit(asyncio.run(main()))
PY
    ); then
      return 0
    fi
    fail_start kafka "$out" "$KAFKA_LOGS/kafka.out" "$KAFKA_LOGS/server.log"
  fi
  # No python with aiokafka: ask the broker for its API versions with the Kafka tools (slower).
  local deadline=$((SECONDS + TIMEOUT_S))
  while :; do
    alive "$pid" ||
      fail_start kafka "the broker process exited" "$KAFKA_LOGS/kafka.out" "$KAFKA_LOGS/server.log"
    if port_open "$KAFKA_PORT" &&
      kafka_java kafka.admin.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
        >/dev/null 2>&1 9>&-; then
      return 0
    fi
    ((SECONDS < deadline)) ||
      fail_start kafka "no metadata answer after ${TIMEOUT_S}s" "$KAFKA_LOGS/kafka.out" "$KAFKA_LOGS/server.log"
    sleep 1
  done
}

start_kafka() {
  local pid
  if pid=$(pid_of kafka); then
    say "kafka already running (pid $pid)"
    wait_kafka "$pid"
    return 0
  fi
  rm -f "$RUN/kafka.pid"
  command -v java >/dev/null || die "java not found: install a JRE >= 17 (apt-get install openjdk-17-jre-headless)"
  ensure_kafka_libs
  require_port_free "$KAFKA_PORT" "Kafka PLAINTEXT, CLV_INFRA_KAFKA_PORT"
  require_port_free "$KAFKA_CONTROLLER_PORT" "Kafka controller, CLV_INFRA_KAFKA_CONTROLLER_PORT"
  [[ $KAFKA_SASL == 1 ]] && require_port_free "$KAFKA_SASL_PORT" "Kafka SASL, CLV_INFRA_KAFKA_SASL_PORT"
  render_kafka_props
  format_kafka_storage
  say "starting kafka on 127.0.0.1:$KAFKA_PORT$([[ $KAFKA_SASL == 1 ]] && echo " (+SASL_PLAINTEXT :$KAFKA_SASL_PORT)")"
  local t0=$SECONDS
  # Own session (setsid), so a Ctrl-C in the calling terminal does not reach the broker.
  # The subshell execs setsid, which execs java (no fork: not a group leader): $! is the JVM.
  kafka_cmd kafka.Kafka "$KAFKA_PROPS"
  [[ -s $KAFKA_LOGS/kafka.out ]] && mv -f "$KAFKA_LOGS/kafka.out" "$KAFKA_LOGS/kafka.out.1"
  (cd "$KAFKA_DATA" && exec setsid "${KCMD[@]}") </dev/null >>"$KAFKA_LOGS/kafka.out" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$RUN/kafka.pid"
  wait_kafka "$pid"
  say "kafka ready in $((SECONDS - t0))s (pid $pid)"
}

# --- redis -----------------------------------------------------------------------------------
redis_cli() {
  if [[ -n $REDIS_PASSWORD ]]; then
    REDISCLI_AUTH=$REDIS_PASSWORD redis-cli --no-auth-warning -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  else
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  fi
}

start_redis() {
  local pid
  if pid=$(pid_of redis); then
    say "redis already running (pid $pid)"
  else
    rm -f "$RUN/redis.pid"
    ensure_debian_pkg redis-server redis-server
    require_port_free "$REDIS_PORT" "Redis, CLV_INFRA_REDIS_PORT"
    local auth=""
    [[ -n $REDIS_PASSWORD ]] && auth="requirepass \"$REDIS_PASSWORD\""
    [[ $REDIS_APPENDFSYNC == always || $REDIS_APPENDFSYNC == everysec ]] ||
      die "CLV_INFRA_REDIS_APPENDFSYNC must be 'always' or 'everysec', not '$REDIS_APPENDFSYNC'"
    render "$SCRIPT_DIR/redis/redis.conf.tmpl" "$REDIS_CONF" "PORT=$REDIS_PORT" "DIR=$REDIS_DATA" \
      "PIDFILE=$RUN/redis.pid" "LOGFILE=$LOGS/redis.log" "AUTH=$auth" "APPENDFSYNC=$REDIS_APPENDFSYNC"
    say "starting redis on 127.0.0.1:$REDIS_PORT"
    redis-server "$REDIS_CONF" </dev/null >>"$LOGS/redis.log" 2>&1 9>&- ||
      fail_start redis "redis-server refused to start" "$LOGS/redis.log"
  fi
  local t0=$SECONDS reply=""
  while :; do
    reply=$(redis_cli ping 2>&1 || true)
    [[ $reply == PONG ]] && break
    # the daemon writes its pid file right after forking: a missing process after 3 s is fatal
    if ((SECONDS - t0 >= 3)) && ! pid_of redis >/dev/null; then
      fail_start redis "the redis-server process is gone (last reply: ${reply:-none})" "$LOGS/redis.log"
    fi
    ((SECONDS - t0 < TIMEOUT_S)) ||
      fail_start redis "no PONG from 127.0.0.1:$REDIS_PORT after ${TIMEOUT_S}s (last reply: ${reply:-none})" "$LOGS/redis.log"
    sleep 0.2
  done
  say "redis ready (pid $(pid_of redis))"
}

# --- prometheus ------------------------------------------------------------------------------
start_prometheus() {
  local pid
  if pid=$(pid_of prometheus); then
    say "prometheus already running (pid $pid)"
  else
    rm -f "$RUN/prometheus.pid"
    ensure_debian_pkg prometheus prometheus
    require_port_free "$PROM_PORT" "Prometheus, CLV_INFRA_PROM_PORT"
    local targets="" t
    IFS=',' read -ra _targets <<<"$SCRAPE_TARGETS"
    for t in "${_targets[@]}"; do
      t=${t//[[:space:]]/}
      [[ -z $t ]] && continue
      [[ $t =~ ^[A-Za-z0-9_.-]+:[0-9]+$ ]] || die "CLV_INFRA_SCRAPE_TARGETS: '$t' is not host:port"
      targets+="${targets:+, }\"$t\""
    done
    local timeout=$SCRAPE_INTERVAL
    render "$SCRIPT_DIR/prometheus/prometheus.yml.tmpl" "$PROM_CONF" "TARGETS=$targets" \
      "SCRAPE_INTERVAL=$SCRAPE_INTERVAL" "SCRAPE_TIMEOUT=$timeout" "METRICS_PATH=$METRICS_PATH" \
      "PROM_PORT=$PROM_PORT"
    say "starting prometheus on 127.0.0.1:$PROM_PORT scraping [${targets}]"
    setsid prometheus --config.file="$PROM_CONF" --storage.tsdb.path="$PROM_DATA" \
      --storage.tsdb.retention.time=2d --web.listen-address="127.0.0.1:$PROM_PORT" \
      --web.enable-lifecycle </dev/null >>"$LOGS/prometheus.log" 2>&1 9>&- &
    echo "$!" >"$RUN/prometheus.pid"
  fi
  local deadline=$((SECONDS + TIMEOUT_S))
  until curl -fsS -m 2 "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null 2>&1; do
    pid_of prometheus >/dev/null || fail_start prometheus "the process exited" "$LOGS/prometheus.log"
    ((SECONDS < deadline)) || fail_start prometheus "/-/ready not OK after ${TIMEOUT_S}s" "$LOGS/prometheus.log"
    sleep 0.3
  done
  say "prometheus ready (pid $(pid_of prometheus))"
}

# --- stop / kill / status ----------------------------------------------------------------------
stop_service() { # svc [signal]
  local svc=$1 sig=${2:-TERM} pid
  if ! pid=$(pid_of "$svc"); then
    rm -f "$RUN/$svc.pid"
    say "$svc not running"
    return 0
  fi
  say "stopping $svc (pid $pid, SIG$sig)"
  kill -"$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      say "$svc did not exit within ${STOP_TIMEOUT_S}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
      break
    fi
    sleep 0.1
  done
  alive "$pid" && die "$svc (pid $pid) survived SIGKILL"
  rm -f "$RUN/$svc.pid"
  say "$svc stopped"
}

status_service() {
  local svc=$1 pid port addr
  case $svc in
    kafka)
      port=$KAFKA_PORT
      addr="PLAINTEXT 127.0.0.1:$KAFKA_PORT, controller :$KAFKA_CONTROLLER_PORT"
      [[ $KAFKA_SASL == 1 ]] && addr+=", SASL_PLAINTEXT :$KAFKA_SASL_PORT"
      ;;
    redis) port=$REDIS_PORT addr="redis://127.0.0.1:$REDIS_PORT/0" ;;
    prometheus) port=$PROM_PORT addr="http://127.0.0.1:$PROM_PORT" ;;
  esac
  if pid=$(pid_of "$svc"); then
    local state=listening
    port_open "$port" || state="not listening yet"
    printf '%-10s running (pid %s, %s)  %s\n           log: %s\n' "$svc" "$pid" "$state" "$addr" "$(log_of "$svc")"
    return 0
  fi
  printf '%-10s stopped\n' "$svc"
  return 3
}

print_env() { # for the app: eval "$(infra/services.sh env)"; secrets stay variable references
  echo "export CLV_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
  [[ -n $REDIS_PASSWORD ]] && echo 'export CLV_REDIS_PASSWORD="$CLV_INFRA_REDIS_PASSWORD"'
  if [[ $KAFKA_SASL == 1 ]]; then
    echo "export CLV_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_SASL_PORT"
    echo "export CLV_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT CLV_KAFKA_SASL_MECHANISM=PLAIN"
    echo "export CLV_KAFKA_SASL_USERNAME=$KAFKA_SASL_USER"
    echo 'export CLV_KAFKA_SASL_PASSWORD="${CLV_INFRA_KAFKA_SASL_PASSWORD:-clv-secret}"'
  else
    echo "export CLV_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
  fi
  return 0
}

# --- main ------------------------------------------------------------------------------------
expand_services() { # cmd names... -> unique ordered list on stdout
  local cmd=$1 n
  shift
  local names=("$@")
  if ((${#names[@]} == 0)); then
    case $cmd in
      start | restart) names=(all) ;;
      stop | status) names=(full) ;;
      kill) die "kill needs the services to kill, e.g.: infra/services.sh kill kafka" ;;
    esac
  fi
  local out=()
  for n in "${names[@]}"; do
    case $n in
      kafka | redis | prometheus) out+=("$n") ;;
      prom) out+=(prometheus) ;;
      all) out+=(kafka redis) ;;
      full | all+prom) out+=(kafka redis prometheus) ;;
      *) die "unknown service '$n' (kafka, redis, prometheus|prom, all = kafka+redis, full = all+prometheus)" ;;
    esac
  done
  printf '%s\n' "${out[@]}" | awk '!seen[$0]++'
}

main() {
  local cmd=${1:-}
  [[ -n $cmd ]] || { usage >&2; exit 2; }
  shift
  case $cmd in
    -h | --help | help) usage; exit 0 ;;
    start | stop | restart | status | kill) ;;
    env) validate; print_env; exit 0 ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
  validate
  local svcs svc rc=0
  mapfile -t svcs < <(expand_services "$cmd" "$@")
  ((${#svcs[@]})) || exit 2 # expand_services died

  if [[ $cmd == status ]]; then
    echo "infra dir: $INFRA_DIR"
    for svc in "${svcs[@]}"; do status_service "$svc" || rc=3; done
    exit "$rc"
  fi
  if [[ $cmd == stop || $cmd == kill ]] && [[ ! -d $RUN ]]; then
    for svc in "${svcs[@]}"; do say "$svc not running"; done
    exit 0
  fi

  ensure_dirs
  # One start/stop at a time per infra dir. Children get `9>&-` so they do not inherit the lock.
  exec 9>"$RUN/lock"
  flock -w "$((TIMEOUT_S + STOP_TIMEOUT_S))" 9 || die "another services.sh is busy with $INFRA_DIR"

  for svc in "${svcs[@]}"; do
    case $cmd in
      start) "start_$svc" ;;
      stop) stop_service "$svc" ;;
      kill) stop_service "$svc" KILL ;;
      restart) stop_service "$svc" && "start_$svc" ;;
    esac
  done
  if [[ $cmd == start || $cmd == restart ]]; then
    say "logs: $LOGS   (status: $0 status)"
  fi
}

main "$@"
