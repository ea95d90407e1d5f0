# mllpd container image: the built wheel on a slim Python, run as nobody
# (65534:65534) with a read-only root filesystem.
#
#   docker build -t mllpd:0.1.0.dev0 .
#   docker run --read-only --tmpfs /tmp -v mllpd-data:/data -p 2575:2575 mllpd:0.1.0.dev0

# -- build: the project's wheel and the wheels it depends on ------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY mllpd ./mllpd
COPY twisted ./twisted
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip wheel --wheel-dir /wheels /wheels/mllpd-*.whl

# -- runtime -------------------------------------------------------------------
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0.dev0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mllpd" \
      org.opencontainers.image.description="Durable HL7 v2 MLLP gateway on Twisted" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim-bookworm"

# The root filesystem is read-only at run time: Python must not try to write
# bytecode (it is compiled below) and output must not sit in a buffer at exit.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Install from the wheels only (no index, no source tree), compile every
# module's bytecode, and build Twisted's plugin cache (dropin.cache): twistd
# would otherwise try to write both at its first start.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/mllpd-*.whl \
    && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    && twistd mllp --help > /dev/null \
    && install -d -o 65534 -g 65534 -m 0770 /data

# The outbox (MLLP_DB_PATH) lives on the volume mounted at /data.
WORKDIR /data
ENV MLLP_DB_PATH=/data/outbox.db

USER 65534:65534
EXPOSE 2575

# Exec form: twistd is PID 1 and receives SIGTERM itself, which starts the
# staged shutdown. No HEALTHCHECK: Kubernetes' tcpSocket probes do that job.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "mllp"]
