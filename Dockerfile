# consistency-lens image: `lens train|dump|eval|explain`, run by the Helm chart under torchrun.
#
#   docker build -t consistency-lens:0.1.0 .
#   docker build --build-arg BASE_IMAGE=... .   (any base with python3 >= 3.11, its venv module and useradd;
#                                                CI uses a debootstrapped Debian bookworm)
#
# Needs BuildKit (DOCKER_BUILDKIT=1 or buildx) for the secret mount; no `# syntax=` line, so no frontend is pulled.
# Behind a proxy (the predefined HTTPS_PROXY / NO_PROXY build args work) or air-gapped: put wheels in wheelhouse/
# (installed first, as they are, e.g. a CPU or custom torch wheel; the rest resolves from there plus the index) and
# pass the CA bundle pip should trust as a build secret:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
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
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A venv that still sees the base image's packages (the CUDA torch of pytorch/pytorch), so it is not reinstalled.
RUN python3 -m venv --system-site-packages "${VIRTUAL_ENV}" \
    && useradd --create-home --uid "${LENS_UID}" --user-group --shell /bin/sh lens

# Dependencies first, from pyproject.toml alone: editing the source reuses this layer.
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml /opt/lens/
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
         pip install --no-cache-dir --find-links /wheelhouse /wheelhouse/*.whl; fi \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('/opt/lens/pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install --no-cache-dir --find-links /wheelhouse -r /tmp/requirements.txt "setuptools>=68" wheel \
    && rm /tmp/requirements.txt

# The package (no network: dependencies and the build backend are installed above) and the scripts.
COPY lens/ /opt/lens/lens/
COPY scripts/ /opt/lens/scripts/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/lens \
    && lens --help >/dev/null

USER ${LENS_UID}:${LENS_UID}
WORKDIR /home/lens
ENTRYPOINT ["lens"]
CMD ["--help"]
