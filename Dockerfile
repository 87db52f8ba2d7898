# doppelbot in a container: CPU torch, data directory as a volume, non-root user.
# Build: docker build -t doppelbot .
# Log in once: docker run -it --rm -v doppelbot-data:/data -e DOPPELBOT_API_ID=... \
#     -e DOPPELBOT_API_HASH=... doppelbot login --print-session-string
# Run: docker run -d -v doppelbot-data:/data --env-file .env doppelbot
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DOPPELBOT_DATA_DIR=/data \
    HF_HOME=/data/hf

RUN useradd --create-home --uid 1000 doppelbot && mkdir -p /data && chown doppelbot /data
WORKDIR /app

# CPU wheels of torch keep the image small; for CUDA use an nvidia/cuda base instead.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY doppelbot ./doppelbot
COPY migrations ./migrations
RUN pip install .

USER doppelbot
VOLUME ["/data"]
ENTRYPOINT ["doppelbot"]
CMD ["run"]
