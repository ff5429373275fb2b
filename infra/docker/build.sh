#!/usr/bin/env bash
# Build (and with --push, push) the two geco images from the repository root:
#   REGISTRY/geco:TAG-gpu  Ray GPU workers (rayproject/ray:2.60.0-py311-gpu, torch from PyPI)
#   REGISTRY/geco:TAG-cpu  Ray head and the MLflow server (rayproject/ray:2.60.0-py311-cpu,
#                          torch's CPU build)
#
#   infra/docker/build.sh REGISTRY [TAG] [--push]     e.g. 111122223333.dkr.ecr.us-east-1.amazonaws.com/geco 0.1.0
#   infra/docker/build.sh geco dev                    local images geco:dev-cpu / geco:dev-gpu (kind)
#
# Knobs: RAY_IMAGE (default rayproject/ray:2.60.0-py311), VARIANTS (default "cpu gpu").
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
registry=$1
tag=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
push=${3:-}
ray_image=${RAY_IMAGE:-rayproject/ray:2.60.0-py311}
for variant in ${VARIANTS:-cpu gpu}; do
    case $variant in
        cpu) index=https://download.pytorch.org/whl/cpu ;;
        gpu) index=https://pypi.org/simple ;;
        *) echo "unknown variant $variant (cpu|gpu)" >&2; exit 2 ;;
    esac
    image="$registry:$tag-$variant"
    echo "building $image"
    DOCKER_BUILDKIT=1 docker build -f infra/docker/Dockerfile \
        --build-arg "BASE_IMAGE=$ray_image-$variant" --build-arg "TORCH_INDEX_URL=$index" \
        -t "$image" .
    if [ "$push" = "--push" ]; then docker push "$image"; fi
done
