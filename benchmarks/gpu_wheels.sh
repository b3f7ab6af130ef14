#!/bin/bash
# The packages the lent GPU machines' image lacks, carried as wheels for its Python 3.12 (those machines reach no
# package index; the image has torch 2.11, pytorch-lightning, torchmetrics, OpenCV, scikit-image, SciPy, matplotlib,
# ONNX Runtime, accelerate and the Hugging Face hub, seen 2026-11-27):
#   bash benchmarks/gpu_wheels.sh download   # here, from the repository root: .gpu_wheels/core (61 MiB: the
#                                            # project's wheel, its libraries, ffmpeg) and .gpu_wheels/extra (16 MiB:
#                                            # decord, DeepSpeed); run again after code changes to rebuild the
#                                            # project's wheel
#   source benchmarks/gpu_wheels.sh install  # there: whatever of both is carried into /tmp/site, PYTHONPATH set,
#                                            # then an import check that names what is still missing
# A call carries at most 64 MiB, the repository included: core alone runs real_scale.sh (fit from cached latents
# decodes no video). Where decord or DeepSpeed is needed too (prepare, fit from videos, trainer.strategy=deepspeed_*),
# carry .gpu_wheels/extra in a second call on the same warm machine: /tmp/site stays while it is held.
# imageio-ffmpeg 0.5.1: a newer one's ffmpeg is 47 MiB packed.
WHEELS=.gpu_wheels

download() {
  local plat="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64"
  mkdir -p "$WHEELS/core" "$WHEELS/extra"
  python3 -m pip download -q $plat -d "$WHEELS/core" diffusers==0.42.1 transformers==5.23.0 lightning==2.6.6 \
    omegaconf==2.4.0 filelock==4.3.1 insightface==2.1 imageio==2.38.1 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 \
    sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1 cachetools==7.3.3 cloudpickle==3.1.3 \
    databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 gitpython==3.2.1 gitdb==4.0.12 \
    smmap==5.0.3 importlib-metadata==9.1.0 zipp==4.1.2 python-dotenv==1.2.4 click==8.5.1 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 anyio==4.16.0 \
    h11==0.16.0 annotated-doc==0.0.7 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 || return 1
  python3 -m pip download -q $plat -d "$WHEELS/extra" decord==0.6.0 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 \
    py-cpuinfo==9.0.0 einops==0.8.2 || return 1
  # DeepSpeed comes as an sdist whose setup imports torch: built by the project's Python, its kernels left to JIT.
  [ -f "$WHEELS"/extra/deepspeed-0.19.8-*.whl ] || DS_BUILD_OPS=0 "${PYTHON:-.venv/bin/python}" -m pip wheel -q \
    --no-deps --no-build-isolation deepspeed==0.19.8 -w "$WHEELS/extra" || return 1
  if [ ! -f "$WHEELS/core/ffmpeg.tar.xz" ]; then
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q $plat -d "$tmp" imageio-ffmpeg==0.5.1 && (cd "$tmp" && unzip -q imageio_ffmpeg-*.whl \
      && rm imageio_ffmpeg-*.whl && tar cf - ./* | xz -9 -T0) > "$WHEELS/core/ffmpeg.tar.xz" || return 1
    rm -rf "$tmp"
  fi
  rm -f "$WHEELS"/core/mm_lightning-*.whl
  python3 -m pip wheel -q --no-deps . -w "$WHEELS/core" || return 1
  du -sh "$WHEELS"/*
}

install() {
  local carried
  carried=$(ls "$WHEELS"/*/*.whl 2> /dev/null)
  [ -n "$carried" ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $carried || return 1; }
  [ -f "$WHEELS/core/ffmpeg.tar.xz" ] && { tar xJf "$WHEELS/core/ffmpeg.tar.xz" -C /tmp/site || return 1; }
  export PYTHONPATH=/tmp/site
  # From /tmp: the installed mm_lightning (with callbacks/ and evaluation/ inside), not the repository's folder.
  (cd /tmp && python3 -c '
import importlib
names = ["diffusers", "transformers", "lightning", "omegaconf", "mlflow.store.tracking.sqlalchemy_store",
         "insightface", "cv2", "imageio_ffmpeg", "mm_lightning.commands.fit", "mm_lightning.reliance"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
print("missing: " + "; ".join(missing) if missing else "every import of fit at 5B is there")
raise SystemExit(1 if missing else 0)')
}

case "$1" in
download) download ;;
install) install ;;
*) echo "usage: bash $0 download | source $0 install"; return 2 2> /dev/null || exit 2 ;;
esac
