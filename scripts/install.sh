#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian machine (idempotent).
#   scripts/install.sh            serving + training + test extras
#   CLV_EXTRAS=test scripts/install.sh   (any pip extras list; default "train,test")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${CLV_EXTRAS:-train,test}"
say() { printf '\033[1;34m==> %s\033[0m\n' "$*"; }

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
if ((${#need_apt[@]})); then
  say "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # the Debian packages start their own daemons; this project starts its own on its own ports
  for svc in redis-server prometheus prometheus-node-exporter; do
    (service "$svc" stop >/dev/null 2>&1 || true)
  done
fi

if ! command -v uv >/dev/null; then
  say "pip install uv"
  python3 -m pip install -q uv
fi
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv (Python 3.11)"
  uv venv -q .venv --python 3.11
fi
say "installing the project with extras [$EXTRAS] into .venv (uv; cached after the first time)"
VIRTUAL_ENV=.venv uv pip install -q -e ".[${EXTRAS}]"

say "install done: .venv/bin/clv --help"
