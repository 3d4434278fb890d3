#!/usr/bin/env bash
# System tools the tests use that do not come from PyPI: docker-compose (validates docker-compose.yml);
# chromium, Java 17, rclone, bubblewrap, patchelf, socat and promtool (see below).
# A no-op when they are already installed; installs with apt-get (CI runs as root) otherwise.
set -euo pipefail

say() { echo "system-packages: $*"; }

# Chromium for the browser tests (Playwright drives /usr/bin/chromium; `playwright install` is never run) and
# Java 17 for the Spark Thrift Server the Hive tests start. Each is installed only when missing, with one
# apt-get update before the install.
debian_packages=()
[[ -x /usr/bin/chromium ]] || debian_packages+=(chromium)
command -v java >/dev/null || debian_packages+=(openjdk-17-jre-headless)
# rclone: the Kubernetes test operator fetches staged models with it, as Seldon Core v1 and v2 do.
command -v rclone >/dev/null || debian_packages+=(rclone)
# bubblewrap: the sandbox model code runs in (RETRO_MODEL_SANDBOX, app/integrations/environments/sandbox.py).
command -v bwrap >/dev/null || debian_packages+=(bubblewrap)
# patchelf: the environment packer makes a copied interpreter relocatable (app/integrations/environments/tarball.py).
command -v patchelf >/dev/null || debian_packages+=(patchelf)
# socat: the test operator's pods reach their ports through it from their own network namespace (tests/k8s_operator.py).
command -v socat >/dev/null || debian_packages+=(socat)
# promtool (Debian's prometheus package): checks the alert rules and the dashboard's queries (deploy/prometheus/alerts.yml, deploy/grafana/retrotest.json).
command -v promtool >/dev/null || debian_packages+=(prometheus)
if ((${#debian_packages[@]} == 0)); then
    say "chromium, java, rclone, bubblewrap, patchelf, socat and promtool are installed"
elif command -v apt-get >/dev/null && { [[ "$(id -u)" -eq 0 ]] || command -v sudo >/dev/null; }; then
    as_root=""
    [[ "$(id -u)" -eq 0 ]] || as_root="sudo"
    say "installing ${debian_packages[*]} with apt-get"
    $as_root apt-get update
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y --no-install-recommends "${debian_packages[@]}"
else
    say "missing ${debian_packages[*]} and cannot install them (needs apt-get and root); the browser or Hive tests will fail" >&2
fi

if command -v docker-compose >/dev/null; then
    say "docker-compose is installed"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    say "docker-compose is missing and apt-get is not available; the compose test will be skipped" >&2
    exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        SUDO="sudo"
    else
        say "docker-compose is missing and installing it needs root; the compose test will be skipped" >&2
        exit 0
    fi
fi

say "installing docker-compose with apt-get"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends docker-compose
