#!/usr/bin/env bash
# System packages for the end-to-end tests: Chromium (browser test of the Voila dashboard),
# SLURM + munge (a real one-node cluster), and Node.js with configurable-http-proxy (the
# proxy JupyterHub needs, for the hub on the local cluster: cluster/local-hub.sh).
# Installed with apt-get (and npm) when running as root on Debian/Ubuntu; otherwise the tests
# that need them skip and say why.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
proxy_missing=0
command -v configurable-http-proxy >/dev/null 2>&1 || proxy_missing=1
[ ${#need[@]} -eq 0 ] && [ $proxy_missing = 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    missing="${need[*]}"
    [ $proxy_missing = 1 ] && missing="$missing configurable-http-proxy"
    echo "labkit: not root or no apt-get; tests needing ${missing# } will be skipped"
    exit 0
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "labkit: installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || echo "labkit: apt-get install ${need[*]} failed; tests needing them will be skipped"
fi
if [ $proxy_missing = 1 ] && command -v npm >/dev/null 2>&1; then
    echo "labkit: installing configurable-http-proxy (npm install -g)"
    npm install -g --no-fund --no-audit --loglevel=error configurable-http-proxy >/dev/null \
        || echo "labkit: npm install -g configurable-http-proxy failed; the hub test will be skipped"
fi
exit 0
