#!/usr/bin/env bash
# The real servers the tests run (never fakes of them), from Debian packages where apt is there and we are root:
# redis-server (the shared rate limit), prometheus + promtool and prometheus-alertmanager (the SRE signals),
# docker-registry (the image release test). Where they cannot be installed the tests that need them skip and say
# why. Idempotent.
set -euo pipefail
PACKAGES=()
command -v redis-server >/dev/null || PACKAGES+=(redis-server)
command -v promtool >/dev/null && command -v prometheus >/dev/null || PACKAGES+=(prometheus)
command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null || PACKAGES+=(prometheus-alertmanager)
# an OCI registry (CNCF distribution) for the release test: images pushed, pinned by digest, pulled back
command -v docker-registry >/dev/null || PACKAGES+=(docker-registry)
if [ ${#PACKAGES[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not installed (needs root and apt): ${PACKAGES[*]}; the tests that use them will be skipped" >&2
    exit 0
fi
apt-get update -qq
# no daemon is started for the tests' sake: policy-rc.d-less containers may try; that is harmless
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
