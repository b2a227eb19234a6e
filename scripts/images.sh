#!/usr/bin/env bash
# Build the four service images with Podman (`make images`). On a machine where no base image can be
# pulled, the base is made from Debian's packages with debootstrap (python3 3.11 + venv). torch's CPU wheel
# comes from /opt/wheels when the machine has it, else from torch's CPU index.
#
#   scripts/images.sh [SERVICE...]        default: the four services and redis; tags
#                                         manufacturing-copilot/<name>:$TAG (dev)
#   BASE=python:3.11-slim-bookworm scripts/images.sh     use a pullable base instead of debootstrap
#
# Writes build times and image sizes to $IMAGES_REPORT (default .copilot-data/images.json).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-dev}
DEBIAN_BASE=localhost/copilot-python:bookworm
BASE=${BASE:-$DEBIAN_BASE}
REPORT=${IMAGES_REPORT:-.copilot-data/images.json}
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(report orchestrator vision knowledge redis)

command -v podman >/dev/null || { echo "podman is not installed: scripts/install-podman.sh (root) installs it" >&2; exit 2; }

if [ "$BASE" = "$DEBIAN_BASE" ] && ! podman image exists "$DEBIAN_BASE"; then
    command -v debootstrap >/dev/null || { echo "debootstrap is needed to make $DEBIAN_BASE" >&2; exit 2; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    echo "making $DEBIAN_BASE with debootstrap (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        "${mirror:-http://deb.debian.org/debian}" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc \
        "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
    tar -C "$rootfs" -c . | podman import --quiet - "$DEBIAN_BASE" >/dev/null
fi

args=(--file deploy/docker/Dockerfile --build-arg "BASE=$BASE" --layers)
# pip inside the build verifies TLS against the host's CA bundle (this machine's registries need it)
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    args+=(--volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then
    args+=(--volume /opt/wheels:/wheels:ro --build-arg TORCH_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=)
fi

mkdir -p "$(dirname "$REPORT")"
echo "{" > "$REPORT.tmp"
first=1
for service in "${services[@]}"; do
    image="manufacturing-copilot/$service:$TAG"
    previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    started=$(date +%s%N)
    podman build "${args[@]}" --target "$service" --tag "$image" . >".copilot-data/build-$service.log" 2>&1 || {
        tail -40 ".copilot-data/build-$service.log" >&2; echo "building $image failed" >&2; exit 1; }
    # the image this tag named before is left untagged by the rebuild: remove it (GBs a rebuild otherwise; one a
    # container still uses, or another image builds on, stays). The build cache of the stages is kept.
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
    millis=$(( ($(date +%s%N) - started) / 1000000 ))
    seconds=$((millis / 1000)).$(( (millis % 1000) / 100 ))
    size=$(podman image inspect --format '{{.Size}}' "$image")
    printf '%-40s built in %6.1f s, %5d MB\n' "$image" "$seconds" $((size / 1000000))
    [ $first -eq 1 ] || echo "," >> "$REPORT.tmp"
    first=0
    printf '  "%s": {"image": "%s", "build_seconds": %.1f, "size_bytes": %d}' "$service" "$image" "$seconds" "$size" >> "$REPORT.tmp"
done
printf '\n}\n' >> "$REPORT.tmp"
mv "$REPORT.tmp" "$REPORT"
