#!/usr/bin/env bash
# Install everything the tests need on a Debian/Ubuntu machine, then EdgeMoE itself (editable)
# with its test extras. Safe to re-run: a system package is installed only when it is missing.
#
#   bash scripts/setup-dev.sh && python -m pytest
#
# System packages: cmake and a C toolchain (the C runtime); qemu-user, gcc-aarch64-linux-gnu and
# libc6-dev-arm64-cross (the Arm targets are tested by cross-compiling the runtime and running it
# under qemu); g++-aarch64-linux-gnu (TVM's minimal RPC server, cross-built for tuning an aarch64 board
# under qemu); gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (the microcontroller
# firmware is built for a Cortex-M55 board and run under qemu's mps3-an547); clang and
# libclang-rt-14-dev (fuzzing and sanitizer builds of the runtime).
# The aarch64 TVM runtime that server links against (libtvm_runtime.so, libtvm_ffi.so) comes from the
# aarch64 wheels of the installed apache-tvm and apache-tvm-ffi versions, unpacked into build/tvm-runtime-aarch64.
# Python packages: torch (pinned, first, so nothing pulls another build in), then the project
# with its [test] extras (the reference models, pytest, and Dask: the [distributed] extra that
# tests/test_distributed_compile.py compiles on a local cluster with). PYTHON selects the
# interpreter (default: python, else python3).
# llama.cpp's converter and llama-quantize (tests/test_gguf_llamacpp.py): scripts/fetch-llamacpp.sh,
# skipped with EDGEMOE_NO_LLAMACPP=1 (those tests are then skipped too).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

# package name, then how to tell it is there: "cmd:NAME" (a command on PATH) or "deb" (dpkg).
REQUIRED=(
  "cmake cmd:cmake"
  "build-essential cmd:cc"
  "build-essential cmd:make"
  "pkg-config cmd:pkg-config"
  "qemu-user cmd:qemu-aarch64"
  "gcc-aarch64-linux-gnu cmd:aarch64-linux-gnu-gcc"
  "g++-aarch64-linux-gnu cmd:aarch64-linux-gnu-g++"
  "libc6-dev-arm64-cross deb"
  "gcc-arm-none-eabi cmd:arm-none-eabi-gcc"
  "libnewlib-arm-none-eabi deb"
  "qemu-system-arm cmd:qemu-system-arm"
  "clang cmd:clang"
  "libclang-rt-14-dev deb"
)

have_deb() {
  command -v dpkg-query >/dev/null &&
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for entry in "${REQUIRED[@]}"; do
  read -r pkg check <<<"$entry"
  case "$check" in
    cmd:*) command -v "${check#cmd:}" >/dev/null && continue ;;
    deb) have_deb "$pkg" && continue ;;
  esac
  [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "setup-dev: missing ${missing[*]} and no apt-get here: install them with your package manager" >&2
    exit 1
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup-dev: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  echo "setup-dev: installing ${missing[*]}"
  # Try without refreshing the package lists first (fast when they are fresh), then refresh.
  $SUDO apt-get install -y -qq "${missing[@]}" ||
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}"; }
fi

PYTHON=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}
"$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -e ".[test]"

ARM_TVM=build/tvm-runtime-aarch64
if [ ! -f "$ARM_TVM/libtvm_runtime.so" ] || [ ! -f "$ARM_TVM/libtvm_ffi.so" ]; then
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  pins=$("$PYTHON" -c 'from importlib.metadata import version as v
print("apache-tvm==" + v("apache-tvm"), "apache-tvm-ffi==" + v("apache-tvm-ffi"))')
  # shellcheck disable=SC2086 # two requirement specifiers
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$pyver" -d "$wheels" $pins
  "$PYTHON" - "$wheels" "$ARM_TVM" <<'EOF'
import pathlib, sys, zipfile
wheels, out = map(pathlib.Path, sys.argv[1:])
out.mkdir(parents=True, exist_ok=True)
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith(("/libtvm_runtime.so", "/libtvm_ffi.so")):
                (out / pathlib.Path(name).name).write_bytes(z.read(name))
EOF
fi

[ "${EDGEMOE_NO_LLAMACPP:-0}" = 1 ] || PYTHON="$PYTHON" bash scripts/fetch-llamacpp.sh
