# rewardq image: API, worker and beat all run from it (docker-compose.yml picks the command).
# Built from the project's wheel, as tests/test_wheel.py installs it into a fresh venv.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rewardq ./rewardq
RUN pip install --no-cache-dir --upgrade pip && pip wheel --no-deps -w dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app

# torch first so its CUDA wheel is chosen once and the project's `torch>=` range is already met.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}"

# The versions the test suite passed with (constraints.txt), the server extra of the wheel built above.
COPY constraints.txt ./
COPY --from=wheel /src/dist ./dist
RUN pip install -c constraints.txt "$(ls dist/rewardq-*.whl)[server]" && rm -rf dist \
    && useradd --create-home rewardq && mkdir -p /data/artifacts && chown rewardq /data/artifacts
USER rewardq

EXPOSE 8000
CMD ["rewardq", "api", "--host", "0.0.0.0", "--port", "8000"]
