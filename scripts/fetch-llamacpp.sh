#!/usr/bin/env bash
# llama.cpp for the tests that read GGUFs written by llama.cpp itself (tests/test_gguf_llamacpp.py)
# and for edgemoe-bench's llama.cpp rows. Safe to re-run: each step is skipped when its result is there.
#
#   bash scripts/fetch-llamacpp.sh
#
# 1. The llama-cpp-python sdist (a PyPI package that vendors llama.cpp's source) into build/.
# 2. Its vendor/llama.cpp extracted to build/llama.cpp (convert_hf_to_gguf.py with its own gguf-py).
# 3. llama-quantize built there (build/llama.cpp/build/bin), portable (-DGGML_NATIVE=OFF), nothing else; with it
#    libllama, which tests/llamacpp_greedy.c links to decode with llama.cpp itself.
# 4. sentencepiece, which the converter imports for every llama-architecture model.
# PYTHON selects the interpreter (default: python, else python3); LLAMACPP_TOOLS adds build targets
# (e.g. "llama-quantize llama-bench" for edgemoe-bench llamacpp). LLAMACPP_NATIVE=1 builds for this CPU
# (-DGGML_NATIVE=ON: AVX2 / AVX-512 / VNNI as it has them), as a speed baseline must; the default is
# portable, which is enough for the converter tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

VERSION=0.3.36  # llama-cpp-python; its sdist vendors the llama.cpp the tests were written against
SDIST=build/llama_cpp_python-$VERSION.tar.gz
TREE=build/llama.cpp
TOOLS=${LLAMACPP_TOOLS:-llama-quantize}
NATIVE=$([ "${LLAMACPP_NATIVE:-0}" = 1 ] && echo ON || echo OFF)
PYTHON=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}

stamp() { echo "fetch-llamacpp: $1 ($SECONDS s)"; }
mkdir -p build

if [ ! -f "$SDIST" ]; then
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d build
  stamp "downloaded $SDIST"
fi

if [ ! -f "$TREE/convert_hf_to_gguf.py" ]; then
  rm -rf "$TREE"
  tar -xzf "$SDIST" --strip-components=3 --one-top-level="$TREE" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  stamp "extracted $TREE"
fi

missing=()
for tool in $TOOLS; do
  [ -x "$TREE/build/bin/$tool" ] || missing+=("$tool")
done
if ((${#missing[@]})); then
  cmake -S "$TREE" -B "$TREE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="$NATIVE" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  for tool in "${missing[@]}"; do
    cmake --build "$TREE/build" -j "$(nproc)" --target "$tool" >/dev/null
  done
  stamp "built ${missing[*]}"
fi

"$PYTHON" -c "import sentencepiece" 2>/dev/null || "$PYTHON" -m pip install -q "sentencepiece>=0.1.98,<0.3.0"
