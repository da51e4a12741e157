# Image of the feature flow for docker-compose.yml: the project installed on Python 3.11. By default
# it runs `flows.run` against the compose broker, with the warehouse and state on the /data volume.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install .

VOLUME /data
CMD ["python", "-m", "flows.run", "--kafka", "kafka:9092", "--warehouse", "/data/warehouse", "--state", "/data/state"]
