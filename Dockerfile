# syntax=docker/dockerfile:1
# TGI-compatible server image:
#   docker run --gpus all --shm-size 1g -p 8080:8080 -v $PWD/data:/data \
#       -e MODEL_ID=... -e NUM_SHARD=... -e HF_TOKEN=... IMAGE
# Every launcher flag can also be given as its environment variable or as arguments after IMAGE.
#
# The Python distributions are docker/requirements.txt: the set the GPU tests and benchmarks ran on,
# pinned by docker/lock.py there, installed with --no-deps so nothing else gets in. PyTorch brings its
# own CUDA 13.0 libraries (the nvidia-* wheels); the host needs only the NVIDIA driver (580 or newer)
# and the NVIDIA container toolkit.

# The interpreter the lock was made with (its "# python" line): a final CPython release, with headers.
ARG PYTHON_VERSION=3.12.3
FROM python:${PYTHON_VERSION}-slim-bookworm

# Triton builds a small C launcher for each kernel the first time it runs: it needs a C compiler
# and Python.h (the official python images ship the headers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies before the source, so a source change reuses this layer: exactly the lock, nothing else.
COPY docker/requirements.txt docker/requirements.txt
RUN pip install --no-cache-dir --no-deps -r docker/requirements.txt
COPY pyproject.toml README.md ./
COPY proto proto
COPY router router
COPY server server
COPY launcher launcher
RUN pip install --no-cache-dir --no-deps . && pip check

# /info's docker_label, e.g. --build-arg DOCKER_LABEL=sha-$(git rev-parse --short HEAD).
ARG DOCKER_LABEL=""
# Weights and the hub cache live in /data: mount a volume there (-v) to keep them between runs.
# HOSTNAME is set because Docker would otherwise export the container id, which the launcher reads.
ENV HF_HOME=/data HUGGINGFACE_HUB_CACHE=/data/hub PORT=8080 HOSTNAME=0.0.0.0 DOCKER_LABEL=${DOCKER_LABEL}
EXPOSE 8080
# /health answers 200 once the model is loaded and warmed up; a first start may download and load
# for many minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1200s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]
# SIGTERM drains in-flight requests for up to --graceful-termination-timeout (90 s): give `docker stop`
# as long (docker run --stop-timeout 100, or docker stop -t 100).
STOPSIGNAL SIGTERM
ENTRYPOINT ["text-generation-launcher"]
