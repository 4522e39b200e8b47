#!/usr/bin/env bash
# System packages for the end-to-end tests: Chromium (browser test of the Voila dashboard)
# and SLURM + munge (a real one-node cluster). Installed with apt-get when running as root
# on Debian/Ubuntu; otherwise the tests that need them skip and say why.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "labkit: not root or no apt-get; tests needing ${need[*]} will be skipped"
    exit 0
fi
echo "labkit: installing ${need[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "labkit: apt-get install ${need[*]} failed; tests needing them will be skipped"
