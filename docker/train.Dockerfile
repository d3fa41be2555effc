# Training image: `torchrun --standalone --nproc_per_node=${NPROC_PER_NODE:-8} -m trainer train` on one host.
#
#   docker build -f docker/train.Dockerfile -t pgolf-train .
#
# The base is an official PyTorch CUDA runtime image whose torch is the project's pin (torch==2.13.0; PyPI's
# build of it targets CUDA 13.0 and cuDNN 9), so installing the project downloads no second torch. Any image
# with Python >= 3.11 and torch 2.13.0 in its site-packages will do: docker/smoke.sh passes a local Debian one.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# A virtualenv keeps pip away from the base's own Python (Debian refuses system-wide installs, PEP 668). It sees
# the base's site-packages, so the torch that the base ships satisfies the pin as it is.
#
# Run-time settings come first, with the other metadata, so that nothing but the two installs follows the big
# dependency layer: on storage drivers without overlays (vfs) every later step copies the whole filesystem.
# Defaults: the 8-GPU job on the layout of `python -m trainer data download --out /data`. Reference overrides
# (NUM_LAYERS=11, MATRIX_LR=..., SEED=...) are read by the trainer from the environment.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NPROC_PER_NODE=8 \
    PGOLF_PRESET=pr940 \
    PGOLF_DATA_DIR=/data/datasets/fineweb10B_sp1024 \
    PGOLF_TOKENIZER=/data/tokenizers/fineweb_1024_bpe.model \
    PGOLF_OUT_DIR=/artifacts/pr940
WORKDIR /artifacts

# `python -m torch.distributed.run` is torchrun itself, started by the venv's Python: the base image's torchrun
# script would start the workers with the base's Python, which does not see the project.
CMD exec python -m torch.distributed.run --standalone --nproc_per_node="${NPROC_PER_NODE:-8}" \
    -m trainer train --preset "$PGOLF_PRESET" --data "$PGOLF_DATA_DIR" --tokenizer "$PGOLF_TOKENIZER" \
    --out "$PGOLF_OUT_DIR"

# Dependencies from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml /tmp/pgolf-deps/pyproject.toml
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
 && python -c 'import sys, tomllib; print(*tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"], sep="\n")' \
        /tmp/pgolf-deps/pyproject.toml > /tmp/pgolf-deps/requirements.txt \
 && pip install -r /tmp/pgolf-deps/requirements.txt \
 && rm -rf /tmp/pgolf-deps

COPY . /opt/pgolf
RUN pip install --no-deps /opt/pgolf \
 && mkdir -p /data
