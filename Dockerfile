# syntax=docker/dockerfile:1
# The pacsbridge server image (README, "Deployment").
#
#   docker build -t pacsbridge .                       # CPU build of PyTorch (the default)
#   docker build -t pacsbridge:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .   # a CUDA build
#
# The CUDA wheels carry their own CUDA runtime, so both variants share the slim base; the host
# needs the NVIDIA driver and the NVIDIA Container Toolkit (docker run --gpus all ...).
# Nothing is downloaded at run time: the builtin brain-mr model's weights ship in the deepbet
# wheel and are checked below.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with pacsbridge and its dependencies -------------------------
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/pacsbridge/bin:$PATH

# Compilers for any dependency without a wheel for this platform; they stay in this stage.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/pacsbridge

# PyTorch first, from the index the build argument names (CPU by default: no multi-GB CUDA
# libraries), then pinned so that installing pacsbridge keeps that build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /opt/pacsbridge/constraints.txt

WORKDIR /src
COPY . .
RUN pip install -c /opt/pacsbridge/constraints.txt . \
    && cd / && python -c "from ai.registry import deepbet_weights; \
missing = [str(p) for p in deepbet_weights() if not p.is_file()]; \
assert not missing, f'brain-mr weights missing: {missing}'"

# --- runtime: the virtual environment on a slim base, as an unprivileged user ------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="pacsbridge" \
      org.opencontainers.image.description="DICOM-native PACS integration server: DIMSE, DICOMweb, AI results and a FHIR R4 bridge on one archive" \
      org.opencontainers.image.licenses="Apache-2.0"

# tzdata: DICOM dates without an offset are read in PACSBRIDGE_DICOM_TIMEZONE (an IANA name)
# or the container's TZ.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pacsbridge \
    && useradd --system --uid 10001 --gid pacsbridge --home-dir /var/lib/pacsbridge \
       --shell /usr/sbin/nologin pacsbridge \
    && install -d -o pacsbridge -g pacsbridge -m 0700 /var/lib/pacsbridge

COPY --from=build /opt/pacsbridge /opt/pacsbridge

# The data dir holds the embedded index and files (when no PostgreSQL / S3 is configured) and
# the token issuer's signing keys. HTTP listens on every interface of the container: with
# PACSBRIDGE_AUTH=auto (the default) serve then refuses to start until PACSBRIDGE_AUTH=required
# (or an explicit PACSBRIDGE_AUTH=off) is set.
ENV PATH=/opt/pacsbridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PACSBRIDGE_DATA_DIR=/var/lib/pacsbridge \
    PACSBRIDGE_HTTP_HOST=0.0.0.0 \
    PACSBRIDGE_HTTP_PORT=8000 \
    PACSBRIDGE_DIMSE_PORT=11112 \
    PACSBRIDGE_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/pacsbridge
VOLUME ["/var/lib/pacsbridge"]

# DICOM (DIMSE) and HTTP (DICOMweb, FHIR, the API)
EXPOSE 11112 8000

# Alive: the index answers and the blob store is writable (GET /health needs no token).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PACSBRIDGE_HTTP_PORT', '8000') + '/health', timeout=8)"]

ENTRYPOINT ["pacsbridge"]
CMD ["serve"]
