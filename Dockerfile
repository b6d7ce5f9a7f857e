# CPU image, the one deploy/overlays/cpu runs: the Makefile's steps (make mar = venv, pinned deps,
# model, .mar; CI runs the same steps through `make test`), the w4 kernel built once here, then
# TorchServe in the foreground.
#   docker build -t llm-serve:cpu .
#   docker run -p 127.0.0.1:8080:8080 llm-serve:cpu
# Inside a container the inference and metrics addresses are 0.0.0.0 (TS_* below; config.properties
# binds 127.0.0.1 for `make serve`), so the published port, the kubelet's probes and Prometheus reach
# them. Management stays on the container's loopback.
FROM python:3.11-slim-bookworm

RUN apt-get update && apt-get install -y --no-install-recommends \
        make g++ openjdk-17-jre-headless curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . /app

# torch 2.13.0's CPU build first (the CPU index: PyPI's Linux wheel is the CUDA one), as the
# Makefile's first pip step; then the Makefile itself. The w4 kernel (lowbit_avx2.cpp) is built for
# the build machine's instruction set into TORCH_EXTENSIONS_DIR; a node with other instructions
# builds its own at worker start-up (the build's name says which set it is for).
ENV TORCH_EXTENSIONS_DIR=/app/build/torch_extensions
RUN python3 -m venv .venv \
    && .venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && make mar PY_SYS=python3 \
    && .venv/bin/python -c "from llmserve.quantize import lowbit_kernels; print('w4 kernel built:', lowbit_kernels())"

ENV PATH=/app/.venv/bin:$PATH \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082
EXPOSE 8080 8082
CMD ["torchserve", "--foreground", "--ncs", "--ts-config", "config/config.properties"]
