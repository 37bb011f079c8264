#!/usr/bin/env bash
# Build containers/Dockerfile without a registry or a Docker engine, as CI does.
#
#   containers/build-local.sh            # prints the image tag on its last line
#
# What differs from a `docker build` of the published image, and why:
#   * base image: a Debian root filesystem made here with mmdebstrap from the Debian
#     mirror and imported into podman (no registry base image can be pulled offline);
#     the Dockerfile takes it as BASE_IMAGE instead of nvidia/cuda.
#   * torch: the CPU wheel of the same version (TORCH_CUDA=cpu), served to the build from a
#     local index made with `pip download` (PyTorch's own index is not reachable here).
# Everything else is the Dockerfile as users build it: same stages, same instructions.
#
# Needs root (podman as root, apt-get for missing tools). State lives under
# $SAR3D_CONTAINER_CACHE (default ~/.cache/sar3d-container): podman's image store, the
# torch wheels, the pip cache. The store uses the overlay driver (SAR3D_CONTAINER_DRIVER=vfs
# works on any filesystem, but copies the whole tree for every build step). Podman's own
# layer cache makes a rebuild after a source change redo only the project's install.
# containers/podman-local runs podman against that store (tests/test_container_image.py uses it).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$REPO/containers"
# shellcheck source=containers/local-env.sh
source "$HERE/local-env.sh"
SUITE="${SAR3D_BASE_SUITE:-bookworm}"
PYTHON_VERSION="${SAR3D_BASE_PYTHON:-3.11}"   # the python3 of $SUITE: the torch wheel must match it
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' "$HERE/Dockerfile")"
TAG="${1:-$SAR3D_LOCAL_IMAGE}"
BASE="localhost/sar3d-base:$SUITE"

step() { printf '[build-local] %-34s %4d s\n' "$1" "$(($(date +%s) - $2))" >&2; }

t=$(date +%s)
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
step "tools (${missing[*]:-none missing})" "$t"

mkdir -p "$SAR3D_CONTAINER_CACHE"/{pip,torch-index}
# This machine's sandbox refuses raising RLIMIT_NPROC/NOFILE to podman's defaults (crun and
# runc fail "setrlimit: operation not permitted") and mounts cgroups in hybrid mode, which
# crun rejects: run with runc and the ulimits the calling shell already has.
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "$SAR3D_CONTAINER_DRIVER"
graphroot = "$SAR3D_CONTAINER_CACHE/storage"
runroot = "$SAR3D_CONTAINER_RUNROOT"
EOF

t=$(date +%s)
if ! podman image exists "$BASE"; then
  tarball="$SAR3D_CONTAINER_CACHE/$SUITE-minbase.tar"
  rm -f "$tarball.part"
  # The base trusts what this machine trusts: local CAs (a TLS-inspecting proxy's, say) are
  # copied in, so pip and apt inside the build reach the registries the host reaches.
  mmdebstrap --quiet --variant=minbase --include=ca-certificates --format=tar \
    --customize-hook='[ ! -d /usr/local/share/ca-certificates ] || cp -r /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
    "$SUITE" "$tarball.part" http://deb.debian.org/debian
  podman import --quiet "$tarball.part" "$BASE" >/dev/null
  rm -f "$tarball.part"
fi
step "base image $BASE" "$t"

# A PEP 503 index of one torch wheel and its dependencies: a folder per project, each
# with the index.html that pip reads for a file:// index.
t=$(date +%s)
index="$SAR3D_CONTAINER_CACHE/torch-index"
wheels="$SAR3D_CONTAINER_CACHE/torch-wheels-$TORCH_VERSION"
if [ ! -d "$wheels" ]; then
  "$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --platform manylinux_2_28_x86_64 --implementation cp -d "$wheels.part" "torch==$TORCH_VERSION"
  mv "$wheels.part" "$wheels"
fi
rm -rf "$index" && mkdir -p "$index"
for whl in "$wheels"/*.whl; do
  name="$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')"
  mkdir -p "$index/$name" && ln -f "$whl" "$index/$name/"
  printf '<a href="%s">%s</a>\n' "$(basename "$whl")" "$(basename "$whl")" >>"$index/$name/index.html"
done
step "torch $TORCH_VERSION wheel index" "$t"

# Everything the image is made of; an image already built from exactly this is kept as is
# (podman's layer cache would give the same result, but re-hashes gigabytes to find out).
digest="$(cd "$REPO" && {
  podman image inspect --format '{{.Id}}' "$BASE"
  ls "$wheels"
  find containers/Dockerfile pyproject.toml README.md src -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
    ! -path '*.egg-info/*' -print0 \
    | sort -z | xargs -0 sha256sum
} | sha256sum | cut -d' ' -f1)"
built="$(podman image inspect --format '{{index .Labels "sar3d.source-digest"}}' "$TAG" 2>/dev/null || true)"
if [ "$built" = "$digest" ]; then
  step "image $TAG is current" "$(date +%s)"
  echo "$TAG"
  exit 0
fi

build() {
  podman build --isolation chroot --layers \
    --volume "$index:/torch-index:ro" --volume "$SAR3D_CONTAINER_CACHE/pip:/root/.cache/pip" \
    --build-arg "BASE_IMAGE=$BASE" --build-arg TORCH_CUDA=cpu --build-arg TORCH_INDEX_URL=file:///torch-index \
    -f "$HERE/Dockerfile" "$@" "$REPO" >&2
}
t=$(date +%s)
# The dependencies stage gets a tag of its own, so that pruning what older builds left
# (gigabytes per pyproject.toml change) keeps the layers the next build reuses.
build --target deps -t "$SAR3D_LOCAL_IMAGE-deps"
build --label "sar3d.source-digest=$digest" -t "$TAG"
podman image prune -f >/dev/null
step "podman build $TAG" "$t"
echo "$TAG"
