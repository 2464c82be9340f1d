#!/usr/bin/env bash
# Install the Debian packages the test suite needs when they are missing:
#   nginx     tests/test_deploy.py checks `comfy-parallel deploy nginx` with `nginx -t` and proxies through it
#   chromium  the browser test drives the web UI under /gpuN/
# Usage: scripts/system-deps.sh [nginx] [chromium]   (no argument: both)
# Idempotent: when every tool is already there it only says so. Installs only as root (CI and the
# development machines run as root); otherwise it prints what is missing and leaves it to the caller.
set -euo pipefail

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(nginx chromium)

missing=()
for tool in "${wanted[@]}"; do
    case "$tool" in
        nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx) ;;
        chromium) command -v chromium >/dev/null 2>&1 || missing+=(chromium) ;;
        *) echo "system-deps: unknown tool '$tool' (known: nginx chromium)" >&2; exit 2 ;;
    esac
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: ${wanted[*]} present, nothing to do"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing ${missing[*]}; not root, so not installing (the tests that need them will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]}; no apt-get on this machine, install them by hand" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "system-deps: apt-get update"
apt-get update -qq

packages=()
for tool in "${missing[@]}"; do
    case "$tool" in
        nginx)
            # nginx-light is the smallest build with map, limit_req and the proxy module (Debian 12);
            # newer releases dropped it, where plain nginx is the same small build.
            if apt-cache show nginx-light >/dev/null 2>&1; then packages+=(nginx-light); else packages+=(nginx); fi
            ;;
        chromium)
            packages+=(chromium)
            ;;
    esac
done

echo "system-deps: installing ${packages[*]}"
apt-get install -y -qq --no-install-recommends "${packages[@]}"
# The packaged nginx service is of no use to the tests, which start nginx with a config of their own, and
# where the package's install script started it (systemd, or the init.d script in a container) it holds port 80.
if [[ " ${missing[*]} " == *" nginx "* ]]; then
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
        systemctl stop nginx || true
        systemctl disable nginx >/dev/null 2>&1 || true
        echo "system-deps: stopped and disabled the packaged nginx service"
    elif [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
        /usr/sbin/nginx -s quit || true
        echo "system-deps: stopped the nginx the package started"
    fi
fi
echo "system-deps: installed ${packages[*]}"
