# Sourced by containers/build-local.sh and containers/podman-local: where the locally
# built image and podman's store live, so every caller sees the same images.
SAR3D_CONTAINER_CACHE="${SAR3D_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sar3d-container}"
SAR3D_CONTAINER_DRIVER="${SAR3D_CONTAINER_DRIVER:-overlay}"
SAR3D_CONTAINER_RUNROOT="${SAR3D_CONTAINER_RUNROOT:-/run/sar3d-container-$(id -u)}"
SAR3D_LOCAL_IMAGE="${SAR3D_LOCAL_IMAGE:-localhost/sar3d:$(sed -n 's/^version = "\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../pyproject.toml")-cpu}"
CONTAINERS_CONF="$SAR3D_CONTAINER_CACHE/containers.conf"
CONTAINERS_STORAGE_CONF="$SAR3D_CONTAINER_CACHE/storage.conf"
export SAR3D_CONTAINER_CACHE SAR3D_CONTAINER_DRIVER SAR3D_CONTAINER_RUNROOT SAR3D_LOCAL_IMAGE CONTAINERS_CONF CONTAINERS_STORAGE_CONF
