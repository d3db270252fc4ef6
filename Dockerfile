# syntax=docker/dockerfile:1.7
#
# The ctr-serve scoring image: onnxruntime, the FeatureSpec code and FastAPI. No torch.
#
#   CPU (default):  docker build -t ctr-serve:cpu .
#   CUDA:           docker build --build-arg DEVICE=cuda -t ctr-serve:cuda .
#
# DEVICE picks both the base image (python slim, or NVIDIA's CUDA + cuDNN runtime) and the
# onnxruntime wheel (onnxruntime, or onnxruntime-gpu). The serving dependencies are the
# `serve` extra of pyproject.toml; the project itself is installed with --no-deps so the
# training stack (torch, scikit-learn) never enters the image.

ARG DEVICE=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- bases, one per device
FROM ${CPU_BASE} AS base-cpu
ENV ORT_PACKAGE=onnxruntime

FROM ${CUDA_BASE} AS base-cuda
ENV ORT_PACKAGE=onnxruntime-gpu \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The CUDA runtime images carry no Python; Ubuntu 24.04's python3 is 3.12 (>= 3.11).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${DEVICE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/ctr \
    PATH=/opt/ctr/bin:$PATH

# ---------------------------------------------------------------- build: venv + wheel
FROM base AS build
WORKDIR /src
RUN python3 -m venv /opt/ctr
COPY pyproject.toml README.md ./
# Serving dependencies first, in their own layer, so a code change does not reinstall them.
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['serve']))" > /tmp/serve.txt \
 && pip install -r /tmp/serve.txt "${ORT_PACKAGE}>=1.18"
COPY ctr ./ctr
COPY model ./model
COPY export ./export
COPY service ./service
# Fail the build if anything dragged torch in, and prove the entry point imports without it.
RUN pip install --no-deps . \
 && python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && ctr serve --help > /dev/null

# ---------------------------------------------------------------- runtime
FROM base AS runtime
LABEL org.opencontainers.image.title="ctr-serve" \
      org.opencontainers.image.description="Online CTR scoring service (onnxruntime + FastAPI)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ctr \
 && useradd --system --uid 10001 --gid ctr --home-dir /srv/ctr --create-home --shell /usr/sbin/nologin ctr \
 && mkdir -p /models /etc/ctr \
 && chown ctr:ctr /models
COPY --from=build /opt/ctr /opt/ctr
WORKDIR /srv/ctr
USER 10001:10001
EXPOSE 8000
# Liveness only: /readyz also checks Redis and warm-up, which belongs to the orchestrator.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request as r; sys.exit(r.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ctr", "serve"]
CMD ["--repo", "/models", "--host", "0.0.0.0", "--port", "8000"]
