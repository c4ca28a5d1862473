#!/usr/bin/env bash
# The add-on's entry point: turns /data/options.json (the add-on's options) into the gateway's
# configuration, once, then runs it. Each `option KEY OPTION` line maps one option to one
# configuration key; tests/packaging.rs checks every option has one and every key is real.
# The file lives in /config (addon_config) so set-canary and automatic promotion can edit it;
# options only seed it when it does not exist yet.
set -euo pipefail
umask 077
OPTIONS=${OPTIONS:-/data/options.json}
CONFIG=${CONFIG:-/config/gateway.toml}
GATEWAY=${GATEWAY:-/usr/bin/cync-gateway}
STATE_DIR=${STATE_DIR:-/data/state}
get() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print(str(v).lower() if isinstance(v,bool) else v)' "$OPTIONS" "$1"; }
quote() { case "$1" in true|false|[0-9]*) printf '%s' "$1" ;; *) printf '"%s"' "$1" ;; esac; }

declare -A section
option() { # option KEY OPTION
  local key="$1" opt="$2" table="${1%.*}" leaf="${1##*.}"
  section[$table]+="${leaf} = $(quote "$(get "$opt")")"$'\n'
}
option upstream.legacy.address addon_address
option upstream.legacy.tls addon_tls
option routing.canary_percent canary_percent
option dark_launch.mode dark_launch
option rollout.auto_promote auto_promote
option logging.level log_level
# The dark launch shadows every legacy device when it is on.
section[dark_launch]+="percent = 100"$'\n'

if [ ! -f "$CONFIG" ]; then
  {
    echo "state_dir = \"$STATE_DIR\""
    echo
    echo '[listen]'
    echo 'devices = "0.0.0.0:23779"'
    echo 'metrics = "0.0.0.0:9400"'
    for table in "${!section[@]}"; do
      echo
      echo "[$table]"
      printf '%s' "${section[$table]}"
    done
  } > "$CONFIG.new"
  "$GATEWAY" check-config "$CONFIG.new"
  mv "$CONFIG.new" "$CONFIG"
fi
# DRY_RUN=1: write and check the configuration only (tests/packaging.rs).
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec "$GATEWAY" run --config "$CONFIG"
