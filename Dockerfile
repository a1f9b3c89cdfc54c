# bkexp image: pinned Python base and torch; CPU by default, CUDA with --build-arg TORCH_VARIANT=cu128.
#   docker build -t bkexp:cpu .
#   docker build -t bkexp:cu128 --build-arg TORCH_VARIANT=cu128 .
# The CUDA torch wheels bundle the CUDA runtime, so one slim base serves both variants; the GPU host only
# needs the NVIDIA driver and the NVIDIA Container Toolkit (docs/docker.md). docker-compose.yml builds both.
FROM python:3.11.11-slim-bookworm

# torch wheel index: cpu, or a CUDA build (cu126, cu128, ...) that pytorch.org publishes torch ${TORCH_VERSION} for
ARG TORCH_VARIANT=cpu
# the torch version CI tests with (.ci/run); change both together
ARG TORCH_VERSION=2.13.0
# pip extras of bkexp to install: dev (tests), plus e.g. wandb, hub, gpu
ARG EXTRAS=dev
# the commit the image was built from (the build context has no .git): recorded in every summary.json
ARG GIT_COMMIT=unknown

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    BKEXP_GIT_COMMIT=${GIT_COMMIT}

WORKDIR /bkexp

# torch first, from its own index, so installing bkexp keeps this build instead of pulling another one
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

# dependencies before the code that changes most, so code edits rebuild one thin layer
COPY pyproject.toml README.md ./
COPY bkexp ./bkexp
RUN pip install -e ".[${EXTRAS}]"
COPY conf ./conf
COPY docs ./docs
COPY tests ./tests
COPY train.py ./

# an unprivileged user owns the run folders and the HF cache (a named volume starts with this ownership)
RUN useradd --create-home --uid 1000 bkexp \
    && mkdir -p outputs multirun data /cache/huggingface \
    && chown -R bkexp:bkexp /bkexp /cache
USER 1000:1000

# `docker run IMAGE model=bk seq_len=256`: the arguments are Hydra overrides of the default experiment
ENTRYPOINT ["python", "train.py"]
CMD []
