# Evaluation service image: `python -m service serve` (FastAPI on uvicorn) as an unprivileged user.
#
#   docker build -f docker/service.Dockerfile -t pgolf-service .
#
# The base is a slim Python; torch==2.13.0 then comes from PyPI, whose build of it is the CUDA one, so the same
# image evaluates on GPUs when the host hands them in and on the CPU otherwise. A base whose site-packages already
# hold torch 2.13.0 (docker/smoke.sh passes a local Debian one with the CPU build) skips that download.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# As in train.Dockerfile: a virtualenv that sees the base's site-packages, and all metadata before the installs.
# Validation data in the layout of `python -m trainer data download --out /data`, mounted read-only; the service
# writes only under PGOLF_STORAGE_DIR (its database, stored artifacts and upload scratch space).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PGOLF_DATA_DIR=/data/datasets/fineweb10B_sp1024 \
    PGOLF_TOKENIZER=/data/tokenizers/fineweb_1024_bpe.model \
    PGOLF_STORAGE_DIR=/var/lib/pgolf \
    PGOLF_HOST=0.0.0.0 \
    PGOLF_PORT=8000
WORKDIR /var/lib/pgolf
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c 'import os, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/healthz" % os.environ.get("PGOLF_PORT", "8000"), timeout=4)'
CMD ["python", "-m", "service", "serve"]

COPY pyproject.toml /tmp/pgolf-deps/pyproject.toml
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
 && python -c 'import sys, tomllib; print(*tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"], sep="\n")' \
        /tmp/pgolf-deps/pyproject.toml > /tmp/pgolf-deps/requirements.txt \
 && pip install -r /tmp/pgolf-deps/requirements.txt \
 && rm -rf /tmp/pgolf-deps

# The code stays root's: the service user can read it, not change it.
COPY . /opt/pgolf
RUN pip install --no-deps /opt/pgolf \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/pgolf --shell /usr/sbin/nologin pgolf \
 && install -d -o pgolf -g pgolf -m 0750 /var/lib/pgolf \
 && mkdir -p /data
USER pgolf
