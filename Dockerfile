# secret-init as the ENTRYPOINT of an application image. Built with BuildKit:
#
#   pip wheel . -w wheels && DOCKER_BUILDKIT=1 docker build .   # offline: installs only from ./wheels
#   DOCKER_BUILDKIT=1 docker build .                             # installs from the default package index
#   DOCKER_BUILDKIT=1 docker build --secret id=pip_index_url,src=$HOME/.secrets/pip_index_url .
#                                  # a private index: the file, outside the context, holds its URL
#
# The index URL is a secret mount, never a build argument: it is read for the one RUN that
# installs, and is in no layer, no image config and no `docker history` (docs/build-secrets.md).
# BASE must provide python3 with the venv module; it is kept as the image's Python.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
WORKDIR /src
COPY . /src
# From ./wheels with --no-index when the context has wheels; else from the index in the
# pip_index_url secret when one is mounted; else from the default index.
RUN --mount=type=secret,id=pip_index_url \
    python3 -m venv /opt/secret-init \
 && if ls wheels/secret_init-*.whl >/dev/null 2>&1; then \
        /opt/secret-init/bin/pip install --no-cache-dir --no-index --find-links wheels wheels/secret_init-*.whl; \
    elif [ -s /run/secrets/pip_index_url ]; then \
        PIP_INDEX_URL="$(cat /run/secrets/pip_index_url)" /opt/secret-init/bin/pip install --no-cache-dir /src; \
    else \
        /opt/secret-init/bin/pip install --no-cache-dir /src; \
    fi

FROM ${BASE}
# The unprivileged app user, written directly: minimal bases have no useradd.
RUN echo 'app:x:10001:10001:app:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'app:x:10001:' >> /etc/group \
 && mkdir -p /etc/secret-init /usr/local/share/secret-init
# Only the installed venv leaves the build stage.
COPY --from=build /opt/secret-init /opt/secret-init
RUN ln -s /opt/secret-init/bin/secret-init /usr/local/bin/secret-init
COPY scripts/demo-app.py /usr/local/share/secret-init/demo-app.py
COPY compose/image-config.toml /etc/secret-init/config.toml

ENTRYPOINT ["secret-init", "run", "--"]
CMD ["python3", "/usr/local/share/secret-init/demo-app.py", "/run/app-secrets"]
HEALTHCHECK --interval=30s --timeout=5s CMD ["secret-init", "health"]
