# One image for the feature job, the init step and the API.
FROM python:3.11-slim-bookworm
# a JDK: `freshrec setup` compiles freshrec's Flink SQL functions (streaming/java)
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY connectors connectors
COPY streaming streaming
COPY jobs jobs
COPY features features
COPY online_learning online_learning
COPY serving serving
COPY freshrec freshrec
# torch==2.13.0 resolves to the CPU build only with the CPU index; never pull the CUDA build.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
    && FRESHREC_JAR_DIR=/opt/freshrec/jars freshrec setup
ENV FRESHREC_JAR_DIR=/opt/freshrec/jars FRESHREC_STATE_DIR=/state
