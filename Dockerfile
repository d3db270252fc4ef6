# syntax=docker/dockerfile:1.7
#
# The ctr-serve scoring image: onnxruntime, the FeatureSpec code and FastAPI. No torch.
#
#   CPU (default):  docker build -t ctr-serve:cpu .
#   CUDA:           docker build --build-arg DEVICE=cuda -t ctr-serve:cuda .
#
# Both images start from the same pinned Python 3.11 base, so CPU and CUDA run one Python.
# DEVICE picks only the onnxruntime wheel: `onnxruntime`, or `onnxruntime-gpu` with the CUDA
# and cuDNN libraries it needs as NVIDIA's pip wheels (onnxruntime preloads them; the driver
# comes from the host through the NVIDIA Container Toolkit). The serving dependencies are
# the project's base dependencies (pyproject.toml), with the onnxruntime line replaced by
# DEVICE's; the project itself goes in with --no-deps, so the training stack never enters.

ARG DEVICE=cpu
# An exact tag: Python 3.11.13 on Debian 12. Bump it (and ORT_VERSION) deliberately.
ARG PYTHON_BASE=python:3.11.13-slim-bookworm
ARG ORT_VERSION=1.31.1

# ---------------------------------------------------------------- bases, one per device
FROM ${PYTHON_BASE} AS base-cpu
ENV ORT_PACKAGE=onnxruntime \
    ORT_EXTRA=""

FROM ${PYTHON_BASE} AS base-cuda
# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9; its `cuda` extra leaves out cuBLAS.
ENV ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]" \
    ORT_EXTRA="nvidia-cublas~=13.0" \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

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
ARG ORT_VERSION
WORKDIR /src
RUN python3 -m venv /opt/ctr
COPY pyproject.toml README.md ./
# Serving dependencies first, in their own layer, so a code change does not reinstall them.
RUN ORT_VERSION="${ORT_VERSION}" python3 -c "import os, re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; keep = [d for d in deps if re.split(r'[<>=!~\[; ]', d, maxsplit=1)[0] != 'onnxruntime']; print('\n'.join(keep + [os.environ['ORT_PACKAGE'] + '==' + os.environ['ORT_VERSION']] + os.environ['ORT_EXTRA'].split()))" > /tmp/serve.txt \
 && pip install -r /tmp/serve.txt
COPY ctr ./ctr
COPY model ./model
COPY export ./export
COPY service ./service
COPY testtime ./testtime
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
