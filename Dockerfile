# One image for the API and the workers; the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MODELPRESS_DATA_DIR=/data
WORKDIR /app

# The CPU build of torch keeps the image small; GPU workers use the same file with TORCH_INDEX below.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# bubblewrap is the worker's sandbox for users' model files (namespaces, no network); workers refuse to start
# without it. The container must allow user namespaces: see the worker's security_opt in docker-compose.yml.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY modelpress ./modelpress
COPY migrations ./migrations
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.6,<2.15" \
 && pip install ".[server,worker]"

RUN useradd --create-home --uid 10001 modelpress && mkdir -p /data && chown modelpress /data
USER modelpress
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["modelpress", "serve", "--host", "0.0.0.0", "--port", "8000"]
