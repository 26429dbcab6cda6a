# rewardq image: API, worker and beat all run from it (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app

# torch first so its CUDA wheel is chosen once and the project's `torch>=` range is already met.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY api ./api
COPY workers ./workers
COPY storage ./storage
COPY kernels ./kernels
RUN pip install ".[server]" && useradd --create-home rewardq && mkdir -p /data/artifacts && chown rewardq /data/artifacts
USER rewardq

EXPOSE 8000
CMD ["rewardq", "api", "--host", "0.0.0.0", "--port", "8000"]
