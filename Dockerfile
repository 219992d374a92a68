# syntax=docker/dockerfile:1
#
# actserve images, chosen by build target (docs/deployment.md):
#
#   docker build -t actserve:cpu .                        # target cpu (the default, last stage):
#                                                         #   python:3.11-slim + PyTorch CPU wheels
#   docker build --target cuda -t actserve:cuda .         # NVIDIA CUDA runtime + PyTorch CUDA wheels
#   docker build --target loadtest -t actserve:loadtest . # Locust + loadtest/ (compose "load")
#
# Both variants install with scripts/container_install.sh and start with
# scripts/container_entrypoint.sh; CI runs those same two scripts outside a container
# (tests/test_deploy_install.py). Settings: ACTSERVE_* environment variables
# (docs/deployment.md). The server drains on SIGTERM for ACTSERVE_GRACEFUL_SHUTDOWN_S; give the
# container a longer stop grace period than that (compose: stop_grace_period, Kubernetes:
# terminationGracePeriodSeconds, docker run: --stop-timeout).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

# ---- build stages: a virtual environment at /opt/actserve --------------------------------
FROM ${PYTHON_IMAGE} AS build-cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY scripts/container_install.sh scripts/
COPY pyproject.toml README.md ./
COPY service service
RUN TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    sh scripts/container_install.sh /opt/actserve /src

FROM ${CUDA_IMAGE} AS cuda-python
# The CUDA base has no Python; Ubuntu's python3 (3.12) runs the service in the cuda variant.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-python AS build-cuda
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
WORKDIR /src
COPY scripts/container_install.sh scripts/
COPY pyproject.toml README.md ./
COPY service service
RUN TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    sh scripts/container_install.sh /opt/actserve /src

# ---- load generator: the same environment plus Locust, and loadtest/ (compose profile "load")
FROM ${PYTHON_IMAGE} AS loadtest
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The pin of pyproject.toml's test extra (tests/test_deploy.py checks that they agree).
ARG LOCUST_VERSION=2.47.0
WORKDIR /src
COPY scripts/container_install.sh scripts/
COPY pyproject.toml README.md ./
COPY service service
RUN TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    EXTRA_PACKAGES="locust==${LOCUST_VERSION}" \
    sh scripts/container_install.sh /opt/actserve /src \
    && groupadd --system --gid 10001 actserve \
    && useradd --system --uid 10001 --gid actserve --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin actserve
COPY loadtest /opt/loadtest/loadtest
# PYTHONPATH: the locustfile imports its payloads from the loadtest package
ENV PATH=/opt/actserve/bin:$PATH \
    PYTHONPATH=/opt/loadtest \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8089
ENTRYPOINT ["locust", "-f", "/opt/loadtest/loadtest/locustfile.py"]

# ---- runtime stages: the venv, the entrypoint, a non-root user (cpu last: the default) ---
FROM cuda-python AS cuda
RUN groupadd --system --gid 10001 actserve \
    && useradd --system --uid 10001 --gid actserve --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin actserve
COPY --from=build-cuda /opt/actserve /opt/actserve
COPY scripts/container_entrypoint.sh /usr/local/bin/actserve-entrypoint
# the front end's limits keeper (deploy/k8s/overlays/nginx-front; standard library only)
COPY scripts/nginx_limits.py /opt/actserve/nginx_limits.py
# ACTSERVE_DEVICE=all: one executor per visible GPU behind one queue (least-loaded dispatch).
# ACTSERVE_WORKERS: HTTP worker processes on the port (auto: the container's cores; see
# docs/deployment.md for workers per container against more replicas).
ENV PATH=/opt/actserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ACTSERVE_HOST=0.0.0.0 \
    ACTSERVE_PORT=8000 \
    ACTSERVE_DEVICE=all \
    ACTSERVE_WORKERS=1 \
    ACTSERVE_GRACEFUL_SHUTDOWN_S=25
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# KServe v2 gRPC (ACTSERVE_GRPC_PORT; 0 turns it off)
EXPOSE 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=4s --start-period=120s --retries=3 \
    CMD ["actserve-entrypoint", "healthcheck"]
ENTRYPOINT ["actserve-entrypoint"]
CMD ["serve"]

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 actserve \
    && useradd --system --uid 10001 --gid actserve --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin actserve
COPY --from=build-cpu /opt/actserve /opt/actserve
COPY scripts/container_entrypoint.sh /usr/local/bin/actserve-entrypoint
# the front end's limits keeper (deploy/k8s/overlays/nginx-front; standard library only)
COPY scripts/nginx_limits.py /opt/actserve/nginx_limits.py
ENV PATH=/opt/actserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ACTSERVE_HOST=0.0.0.0 \
    ACTSERVE_PORT=8000 \
    ACTSERVE_DEVICE=cpu \
    ACTSERVE_WORKERS=1 \
    ACTSERVE_GRACEFUL_SHUTDOWN_S=25
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# KServe v2 gRPC (ACTSERVE_GRPC_PORT; 0 turns it off)
EXPOSE 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s --retries=3 \
    CMD ["actserve-entrypoint", "healthcheck"]
ENTRYPOINT ["actserve-entrypoint"]
CMD ["serve"]
