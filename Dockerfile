# ckpt-service: the checkpoint post-processing API on CPU torch.
#
#   docker build -t ckpt-service .                                    # torch from the PyTorch CPU index
#   docker build -t ckpt-service \
#       --build-arg TORCH_WHEEL=wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl .
#
# TORCH_WHEEL is a path inside the build context (put the file under wheels/); when it is set, the index is
# not used. Either way torch is pinned to constraints.txt, so no CUDA build is ever pulled.
# Two stages: the builder's layers hold the wheel file, pip's downloads and the sources; the final image
# gets only the finished virtualenv.

FROM python:3.11-slim AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /build
# `wheel[s]` is a glob so that the build also works without a wheels/ directory (the index route).
# Its matches (the .whl files) land in /build next to constraints.txt.
COPY constraints.txt wheel[s] /build/

# torch first, in its own layer: it is the large, rarely changing part. What is removed after it: headers
# and CMake files (only for compiling extensions, which this image never does) and torch's own C++ test
# binaries and protoc (about 170 MB together).
# --no-compile everywhere: bytecode would add about 160 MB and save under a second of start-up.
RUN set -eu; \
    if [ -n "$TORCH_WHEEL" ]; then \
        wheel="/build/$(basename "$TORCH_WHEEL")"; \
        [ -f "$wheel" ] || { echo "TORCH_WHEEL=$TORCH_WHEEL is not in the build context" >&2; exit 1; }; \
        pip install --no-compile -c constraints.txt "$wheel"; \
    else \
        pip install --no-compile -c constraints.txt --index-url "$TORCH_INDEX_URL" torch; \
    fi; \
    rm -f /build/*.whl; \
    site="$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    rm -rf "$site/torch/include" "$site/torch/share/cmake" "$site/torch/test" \
           "$site"/torch/bin/test_* "$site"/torch/bin/*Test "$site"/torch/bin/protoc*; \
    python -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__; \
assert not torch.version.cuda, "a CUDA build of torch was installed"'

# The other dependencies, from a stub package, so that editing service/ does not reinstall them. The stub's
# build directory goes too: setuptools would otherwise reuse its files, which look newer than the real ones.
COPY pyproject.toml README.md /build/
RUN mkdir -p service && touch service/__init__.py \
 && pip install --no-compile -c constraints.txt . \
 && pip uninstall -y ckpt-service \
 && rm -rf service build ./*.egg-info

COPY service /build/service
RUN pip install --no-compile --no-deps -c constraints.txt . \
 && ckpt --help >/dev/null \
 && python -c 'import service.api.app' \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +


FROM python:3.11-slim

LABEL org.opencontainers.image.title="ckpt-service" \
      org.opencontainers.image.description="Checkpoint post-processing service for PyTorch" \
      org.opencontainers.image.licenses="Apache-2.0"

# The CKPT_* defaults match the CMD, so that `docker run IMAGE serve --workers 2` still listens on 0.0.0.0.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CKPT_HOST=0.0.0.0 \
    CKPT_PORT=8000 \
    CKPT_DATA_DIR=/data

# A fixed uid, so that host directories bind-mounted at /data can be chowned to it (10001:10001).
RUN groupadd --system --gid 10001 ckpt \
 && useradd --system --uid 10001 --gid ckpt --home-dir /data --no-create-home --shell /usr/sbin/nologin ckpt \
 && mkdir -p /data /etc/ckpt /plugins \
 && chown ckpt:ckpt /data

COPY --from=builder /opt/venv /opt/venv

# A named volume mounted here starts as a copy of this directory, so it is owned by ckpt as well.
VOLUME ["/data"]
USER ckpt
WORKDIR /data
EXPOSE 8000

# No curl needed: the image's own python checks /healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["ckpt"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
