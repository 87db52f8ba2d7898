# doppelbot in a container: CPU torch, the data directory (database, session, models) as a
# volume, a non-root user.
#
#   docker build -t doppelbot .
#   docker compose run --rm doppelbot login            # once: phone, code, 2FA → /data
#   docker compose run --rm doppelbot model download   # once: ~7.5 GB into /data/models
#   docker compose up -d                               # the bot; restarts on failure
#
# Layers: torch, then the dependencies (read from pyproject.toml alone), then the source, so
# changing the code rebuilds only the last, small layer.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DOPPELBOT_DATA_DIR=/data \
    HF_HOME=/data/hf

RUN useradd --create-home --uid 1000 doppelbot && mkdir -p /data && chown doppelbot /data
WORKDIR /app

# CPU wheels of torch keep the image small; for CUDA use an nvidia/cuda base instead.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

# The dependencies alone, from pyproject.toml: cached until the dependencies change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself (no dependency resolution: they are all in the layer above).
COPY README.md ./
COPY migrations ./migrations
COPY doppelbot ./doppelbot
RUN pip install --no-deps . && doppelbot --version

USER doppelbot
VOLUME ["/data"]
ENTRYPOINT ["doppelbot"]
CMD ["run"]
