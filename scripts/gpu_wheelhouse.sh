#!/usr/bin/env bash
# Make .whl/ (the "wheelhouse") in the repository root: the Python packages that the GPU machine
# lacks and scripts/gpu_check.sh needs, as wheels for CPython 3.12 on manylinux x86_64, because
# that machine has no network. Run it here, on a machine with network to PyPI and the project's
# .venv (scripts/setup.sh):
#
#     bash scripts/gpu_wheelhouse.sh
#
# What it puts there, one version of each:
#   deepspeed==0.19.8   built here as a pure-Python wheel (DS_BUILD_OPS=0: no op is compiled; DeepSpeed
#                       JIT-builds what it needs on the GPU machine); PyPI has only its source
#   hjson pydantic pydantic-core annotated-types typing-inspection typing_extensions
#                       deepspeed's dependencies that the GPU image lacks (or has too old), downloaded
#                       as binary wheels at the versions installed in .venv, which are known to work
#                       with deepspeed 0.19.8 (fallback pins below where .venv lacks one)
#   megatron-core       (2.6 MB) for the gpu test of parallel/megatron.py: our router in Megatron's MoE layer
# Ray is not included: the GPU checks do not need it.
#
# Safe to run again: a wheel already there at the pinned version is kept, a wheel of another
# version of the same package is removed. Fails if the total is over WHEELHOUSE_MAX_MB (20).
#   PYTHON=.venv/bin/python    the interpreter whose pip builds/downloads and whose versions are pinned
#   WHEELHOUSE=.whl            the output folder (ignored by git: /.whl/ in .gitignore)
# Then carry `.whl` to the GPU machine and run `bash scripts/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WHEELHOUSE=${WHEELHOUSE:-.whl}
MAX_MB=${WHEELHOUSE_MAX_MB:-20}
DEEPSPEED_VERSION=0.19.8
# Used only where $PYTHON does not have the package installed (the versions .venv had in 2026-11).
declare -A FALLBACK=(
    [hjson]=3.1.0
    [pydantic]=2.14.4
    [pydantic-core]=2.50.5
    [annotated-types]=0.8.0
    [typing-inspection]=0.4.5
    [typing_extensions]=4.16.0
    [megatron-core]=0.16.1
)
PACKAGES=(hjson pydantic pydantic-core annotated-types typing-inspection typing_extensions megatron-core)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_wheelhouse: $PYTHON not found (make the venv with: bash scripts/setup.sh)" >&2
    exit 1
fi
PIP=("$PYTHON" -m pip --disable-pip-version-check -q)
export PIP_NO_INPUT=1
mkdir -p "$WHEELHOUSE"

# The file-name form of a distribution name (PEP 427/503): lower case, runs of -_. become _.
normalize() { echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }

installed_version() {
    "$PYTHON" - "$1" <<'PY' 2>/dev/null || true
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
PY
}

# Wheels in $WHEELHOUSE of the package (any version), one path per line.
wheels_of() {
    local norm
    norm=$(normalize "$1")
    find "$WHEELHOUSE" -maxdepth 1 -type f -name '*.whl' | while read -r path; do
        local file dist
        file=$(basename "$path")
        dist=$(normalize "${file%%-*}")
        [ "$dist" = "$norm" ] && echo "$path"
    done
    return 0
}

# Keep only wheels of `name` whose version part starts with `version` (exactly, or `version+local`);
# prints "have" if one such wheel remains.
prune_other_versions() {
    local name=$1 version=$2 have=""
    while read -r path; do
        [ -n "$path" ] || continue
        local file rest
        file=$(basename "$path")
        rest=${file#*-}
        local v=${rest%%-*}
        if [ "$v" = "$version" ] || [ "${v%%+*}" = "$version" ]; then
            have=1
        else
            echo "gpu_wheelhouse: removing $file (not $name $version)" >&2
            rm -f -- "$path"
        fi
    done < <(wheels_of "$name")
    [ -n "$have" ] && echo have
    return 0
}

# deepspeed: built here from its sdist, ops left to the JIT on the machine that runs them.
if [ -n "$(prune_other_versions deepspeed "$DEEPSPEED_VERSION")" ]; then
    echo "gpu_wheelhouse: deepspeed $DEEPSPEED_VERSION: already there"
else
    echo "gpu_wheelhouse: building deepspeed $DEEPSPEED_VERSION as a pure-Python wheel (DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "${PIP[@]}" wheel --no-deps --no-build-isolation "deepspeed==$DEEPSPEED_VERSION" -w "$WHEELHOUSE"
fi

for name in "${PACKAGES[@]}"; do
    version=$(installed_version "$name")
    source="as installed in $PYTHON"
    if [ -z "$version" ]; then
        version=${FALLBACK[$name]}
        source="fallback pin: $PYTHON does not have it"
    fi
    if [ -n "$(prune_other_versions "$name" "$version")" ]; then
        echo "gpu_wheelhouse: $name $version: already there"
        continue
    fi
    echo "gpu_wheelhouse: downloading $name==$version ($source)"
    "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$WHEELHOUSE" "$name==$version"
done

# Exactly one wheel per package, nothing else (two versions of one package stop the install there).
status=0
for name in deepspeed "${PACKAGES[@]}"; do
    count=$(wheels_of "$name" | grep -c . || true)
    if [ "$count" != 1 ]; then
        echo "gpu_wheelhouse: expected one wheel of $name in $WHEELHOUSE, found $count" >&2
        status=1
    fi
done
for path in "$WHEELHOUSE"/*.whl; do
    file=$(basename "$path")
    dist=$(normalize "${file%%-*}")
    known=""
    for name in deepspeed "${PACKAGES[@]}"; do
        [ "$dist" = "$(normalize "$name")" ] && known=1
    done
    [ -n "$known" ] || echo "gpu_wheelhouse: note: $file is not one of the wheelhouse's packages (it will be installed too)" >&2
done

echo "gpu_wheelhouse: $WHEELHOUSE/"
total=0
for path in "$WHEELHOUSE"/*.whl; do
    size=$(stat -c %s "$path")
    total=$((total + size))
    awk -v s="$size" -v f="$(basename "$path")" 'BEGIN { printf "  %8.1f KB  %s\n", s / 1000, f }'
done
awk -v s="$total" 'BEGIN { printf "  %8.2f MB  total\n", s / 1000000 }'
if [ "$total" -gt $((MAX_MB * 1000000)) ]; then
    echo "gpu_wheelhouse: $WHEELHOUSE is $total bytes, over the ${MAX_MB} MB budget (it travels with every GPU call)" >&2
    status=1
fi
exit $status
