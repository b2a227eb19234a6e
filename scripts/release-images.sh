#!/usr/bin/env bash
# Release the images to a registry and pin the prod overlay on what was pushed:
#
#   scripts/images.sh                                   build the four images (tag dev)
#   scripts/release-images.sh registry.copilot.internal   push them (and redis) as <registry>/manufacturing-copilot/
#                                                       <name>:<version>, mirror the collector and Jaeger into <registry>/mirror/,
#                                                       and write every pushed digest into the prod overlay
#   git diff deploy/k8s/overlays/prod                   review, commit: that commit is the release
#
# Log in first (`podman login <registry>`). PUSH_ARGS passes options to `podman push` (e.g. --tls-verify=false
# for a registry on plain HTTP). Third-party images are pulled when not present (where the internet is);
# MIRROR=0 leaves them out. KUSTOMIZATION names another overlay's file.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${1:?usage: scripts/release-images.sh REGISTRY   (e.g. registry.copilot.internal or localhost:5000)}
REGISTRY=${REGISTRY%/}
TAG=${TAG:-dev}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
KUSTOMIZATION=${KUSTOMIZATION:-deploy/k8s/overlays/prod/kustomization.yaml}
read -r -a push_args <<< "${PUSH_ARGS:-}"
read -r -a SERVICES <<< "${SERVICES:-orchestrator vision knowledge report redis}"
THIRD_PARTY=(
    "otel/opentelemetry-collector-contrib:0.115.1"
    "jaegertracing/jaeger:2.1.0"
)
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

push() {  # push() SOURCE DESTINATION NAME_IN_KUSTOMIZATION NEW_NAME
    podman tag "$1" "$2"
    podman push --quiet "${push_args[@]}" --digestfile "$workdir/digest" "$2"
    python3 scripts/pin_images.py "$KUSTOMIZATION" "$3" "$4" "$(cat "$workdir/digest")"
}

for service in "${SERVICES[@]}"; do
    name="manufacturing-copilot/$service"
    podman image exists "$name:$TAG" || { echo "$name:$TAG is not built: scripts/images.sh first" >&2; exit 1; }
    push "$name:$TAG" "$REGISTRY/$name:$VERSION" "$name" "$REGISTRY/$name"
done
if [ "${MIRROR:-1}" = 1 ]; then
    for image in "${THIRD_PARTY[@]}"; do
        repository=${image%:*}
        podman image exists "$image" || podman pull --quiet "docker.io/$image" >/dev/null
        push "$image" "$REGISTRY/mirror/${repository##*/}:${image##*:}" "$repository" "$REGISTRY/mirror/${repository##*/}"
    done
fi
echo "pinned in $KUSTOMIZATION; review with: git diff $KUSTOMIZATION"
