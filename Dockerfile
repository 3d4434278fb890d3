# retrotest API, worker and migrations: one image, the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RETRO_VAR_DIR=/data/var

WORKDIR /app

# bubblewrap: the sandbox model code runs in (RETRO_MODEL_SANDBOX=auto uses it where user namespaces are allowed).
# patchelf: packing a model environment for Kubernetes makes its copied interpreter relocatable (env_artifacts.py).
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap patchelf && rm -rf /var/lib/apt/lists/*

# Pinned dependencies first, so code changes do not reinstall them.
COPY requirements.lock requirements-server.lock ./
RUN pip install -r requirements.lock
# MLServer pins a fastapi the API cannot use (docs/security.md): RETRO_MODEL_ENV=worker serves from this venv.
RUN python -m venv /opt/mlserver && /opt/mlserver/bin/pip install -r requirements-server.lock
ENV RETRO_MLSERVER_EXECUTABLE=/opt/mlserver/bin/mlserver

# The Pythons a model's own environment can be built with (app/integrations/environments.py): the image's 3.11
# and, from python-build-standalone through uv, the versions older and newer models were logged with.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    RETRO_ENV_PYTHONS='["/usr/local/bin/python3.11", "/opt/python/*/bin/python3"]'
RUN uv python install 3.9 3.10 3.12 && chmod -R a+rX /opt/python

# Editable install: `retrotest migrate` finds alembic.ini and migrations/ next to the app package.
COPY pyproject.toml alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-deps -e .

RUN useradd --create-home --uid 10001 retro \
    && mkdir -p /data/var/envs /data/results /data/history \
    && chown -R retro:retro /data
USER retro

EXPOSE 8000
CMD ["retrotest", "serve", "--host", "0.0.0.0", "--port", "8000"]
