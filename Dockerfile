# The duplexline image, built from this package. One Dockerfile, two variants:
#
#   docker build --build-arg VARIANT=cpu  -t duplexline:cpu  .   torch's CPU build (the bridge,
#                                                                and the worker on a CPU host)
#   docker build --build-arg VARIANT=cuda -t duplexline:cuda .   torch with CUDA (the worker on
#                                                                an NVIDIA GPU)
#
# The CUDA variant needs no CUDA base image: torch's CUDA wheels carry the CUDA runtime
# libraries; the host needs only the NVIDIA driver and the NVIDIA container toolkit
# (`deploy.resources.reservations.devices` in docker-compose.yml, `nvidia.com/gpu` in
# deploy/k8s/). docker-compose.yml builds both tags.
#
# The image runs `duplexline serve` as an unprivileged user; every setting is a flag or a
# DUPLEXLINE_* variable (README, "Settings"). Listening on 0.0.0.0 is the one default that
# differs from a bare `duplexline serve` (which listens on 127.0.0.1): a container is only
# useful reachable. With a wildcard SIP address the SIP leg needs the address to advertise
# (and bind its stack to): `-e DUPLEXLINE_SIP_PUBLIC_ADDRESS=<host address>`, with
# `--network host` (docker-compose.yml explains why).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE}

# cpu or cuda; anything else stops the build with a message.
ARG VARIANT=cpu
# The torch version setup.sh pins for development; override to match the host's driver.
ARG TORCH_VERSION=2.13.0
# Where each variant's torch wheel comes from. The CPU build comes from PyTorch's CPU
# index (the default index's Linux wheels are CUDA builds, several GB larger).
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/duplexline \
    PATH=/opt/duplexline/bin:$PATH

RUN python -m venv /opt/duplexline

# torch first and alone: it is the largest layer and changes least often, so a code change
# rebuilds only the layers below.
RUN case "$VARIANT" in \
        cpu)  index="$TORCH_INDEX_CPU" ;; \
        cuda) index="$TORCH_INDEX_CUDA" ;; \
        *)    echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install "torch==${TORCH_VERSION}" --index-url "$index"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY agent ./agent
COPY model ./model
# Editable on purpose: the package declares no package data yet, so a wheel would leave out
# bridge/static/ (the softphone page); an editable install runs from /app, where it is.
RUN pip install -e . \
    && duplexline serve --help >/dev/null \
    && useradd --system --uid 10001 --create-home --home-dir /home/duplexline \
               --shell /usr/sbin/nologin duplexline

USER duplexline
ENV DUPLEXLINE_SIP_LISTEN=0.0.0.0:5060 \
    DUPLEXLINE_HTTP_LISTEN=0.0.0.0:8080

# SIP (UDP and TCP) and HTTP (/metrics /healthz /readyz /calls, the softphone page).
# RTP uses --rtp-ports (default 20000-29999/udp), left out here on purpose: `docker run -P`
# would publish ten thousand ports one proxy each. docker-compose.yml uses the host's
# network instead (the reasons are in a comment there), Kubernetes the node's.
EXPOSE 5060/udp 5060/tcp 8080/tcp

# /healthz answers once the model is loaded (the HTTP server starts after it): a large model
# takes minutes, hence the long start period. A bridge's HTTP port or a worker's port.
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD python -m bridge.healthcheck

# SIGTERM drains: new calls are refused (SIP 503 + Retry-After), live calls go on for up to
# --drain-timeout seconds; give the container a longer stop timeout than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["duplexline"]
CMD ["serve"]
