#!/usr/bin/env bash
# The whole test suite, as README.md and .ci/run give it. Installs what the tests need when it
# is missing (OpenSSL headers for the openssl crate, pkg-config), then checks formatting, lints
# (clippy.toml bans the std clocks in favour of tokio's; `incompatible_msrv` holds the code to
# Cargo.toml's rust-version, and tests/msrv.rs the locked dependencies), the docs, and runs
# every test (tests/layers.rs keeps the layer rule). Long soaks and benchmarks are not here: see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || need+=(libssl-dev)
# promtool and prometheus, for tests/alert_rules.rs, tests/dashboard.rs and the live pipeline in
# tests/observability_live.rs, which also runs Alertmanager (amtool checks its example config)
# and renders the status page in headless Chromium
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
{ command -v prometheus-alertmanager && command -v amtool; } >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# chattr, for tests/rollout.rs (a configuration directory the daemon cannot write)
command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)
# systemd-analyze, for tests/systemd.rs (verify and security of the unit)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# the boot test (tests/systemd.rs) and the image test (tests/container.rs): a Debian rootfs made
# by mmdebstrap, booted by systemd-nspawn, and an image built and run by podman with runc
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
# The Home Assistant integration test runs a real broker (tests/mqtt.rs).
{ command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 || need+=(mosquitto)
# The transparent-source test makes a network namespace and its routes (tests/transparent.rs);
# tests/process.rs reads the device listener's accept queue with ss.
{ command -v ip && command -v ss; } >/dev/null 2>&1 || need+=(iproute2)
{ command -v unshare && command -v setpriv; } >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing test dependencies: ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# kubernetes-validate (PyPI), for tests/packaging.rs: the manifests against the official schemas
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "== installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate || python3 -m pip install --quiet --break-system-packages kubernetes-validate
fi

if [ ! -d ../shared/captures ]; then
  echo "error: ../shared/captures (real device traffic used by the tests) is missing beside this checkout" >&2
  exit 2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo doc (warnings are errors: broken intra-doc links, links to private items)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --quiet
echo "== cargo test"
# Test gateways keep their state (latch, SLO state, audit log) here until the next run
# (tests/common/gateway.rs, fresh_state_dir).
rm -rf "${TMPDIR:-/tmp}/cgw-$(printf %s "$PWD" | sha256sum | cut -c1-8)"
cargo test --all-targets --locked
