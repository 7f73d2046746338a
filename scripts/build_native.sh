#!/usr/bin/env bash
# Build native llama.cpp tools (llama-bench, llama-completion, llama-server,
# llama-batched-bench) from the llama.cpp source vendored in the installed
# llama-cpp-python's sdist, so benchmarks compare against the very same version.
# Output: .cache/native/llama.cpp-<version>/build/bin/.  Takes ~5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
version=$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
root=.cache/native
src=$root/llama_cpp_python-$version
build=$src/build
targets=${TARGETS:-llama-bench llama-completion llama-server llama-batched-bench}
mkdir -p "$root"
if [ ! -d "$src/vendor/llama.cpp" ]; then
  "$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$root"
  tar -xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
# Same configuration as llama-cpp-python's own build: Release, shared libraries,
# GGML_NATIVE left at llama.cpp's default, no curl.
cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build" --config Release -j "$(nproc 2>/dev/null || echo 2)" --target $targets >/dev/null
echo "$build/bin"
