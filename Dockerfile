# Qwen-Image-Edit + Lightning LoRA as a RunPod serverless worker, with the model baked in.
#
#   docker build --platform linux/amd64 --build-arg MODEL_VARIANT=edit-2511 \
#     [--build-arg FUSE_LIGHTNING=1 --build-arg PRECISION=int8 --build-arg TEXT_ENCODER_PRECISION=int8] \
#     --secret id=hf_token,env=HF_TOKEN -t <you>/qwen-image-edit:2511 .
#
# Both images bake the safety checker (Falconsai/nsfw_image_detection, 343 MB, at the pinned
# SAFETY_CHECKER_REVISION) into /models/<variant>/safety_checker/; --build-arg SAFETY_CHECKER=off bakes none
# and makes off the worker's default (request and always bake it; the worker's SAFETY_CHECKER defaults to it).
# The slim image (--build-arg BAKE_MODEL=0) bakes only the Lightning LoRA, the checker and a manifest; the base model
# comes from RunPod's cached models (set the endpoint's Model field to the variant's repo, e.g.
# Qwen/Qwen-Image-Edit-2511); the worker finds it under /runpod-volume/huggingface-cache/hub/ on its own.
# No `# syntax=` line: Docker's built-in Dockerfile frontend (BuildKit) handles the secret mount, and
# no frontend image has to be pulled.  HF_ENDPOINT points the bake at a mirror (the tests: a loopback
# hub with a tiny model); TORCH_CUDA is the CUDA major torch must be built for (the build stops otherwise).
#
# Layers, slowest-changing first: system Python, pinned libraries, the baked model (tens of GB),
# then the worker code, so a code change never re-downloads the weights.
# FUSE_LIGHTNING=1 fuses the Lightning LoRA into the stored transformer (no LoRA work at start);
# PRECISION / TEXT_ENCODER_PRECISION=int8|fp8 store those components quantised (about 1 byte a weight;
# both fp8: 30.2 GB read at start instead of 57.7).  All run on the build machine's CPU, no GPU needed,
# shard by shard as the shards download (a few GB of RAM whatever the model's size; the disk holds the
# final folder plus 3 shards; measured in docs/benchmarks.md, and whether RunPod's 30-minute build step
# fits each option in docs/deploy.md); fp8 is torchao's own quantisation with its GPU check answered
# inside that call (weights/fp8_cpu.py), and an fp8 image then runs on Ada/Hopper GPUs only.
# The run-time settings default to what was baked.
# The base carries no CUDA libraries of its own: torch's nvidia-* wheels bring cuBLAS, cuDNN, NCCL and the
# rest (3.36 GB measured in the built image), so a cudnn-runtime base would carry them twice; see the size
# budget in docs/deploy.md.  RunPod's container runtime injects the driver (NVIDIA_* below ask for it).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG MODEL_VARIANT=edit-2511
ARG MODEL_REVISION=main
ARG LORA_REVISION=main
# PyPI's torch 2.14.1 is built for CUDA 13; this index has the CUDA 12.8 build of the same release.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_CUDA=12

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

COPY builder/requirements.txt /builder/requirements.txt
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r /builder/requirements.txt \
    && python -c "import sys, torch; cuda = torch.version.cuda or 'none'; want = sys.argv[1]; sys.exit(0 if cuda.split('.')[0] == want else f'torch is built for CUDA {cuda}, not {want}.x: check TORCH_INDEX_URL (or TORCH_CUDA)')" "${TORCH_CUDA}"

# The bake (bake.py, with fetch.py: the downloads overlapping the preparation, and verify.py) imports one
# self-contained subpackage of the worker, qwen_edit_worker.weights (variants, the Lightning LoRA,
# precision, the streamed fuse/quantise step), copied beside bake.py rather than installing
# the whole package first: a change to it re-runs the bake (download included), which is right since
# the stored weights depend on it; a change anywhere else in the worker keeps the weights layer.
# tests/test_bake.py pins that the subpackage imports nothing else of the worker.
COPY builder/bake.py builder/fetch.py builder/verify.py /builder/
COPY src/qwen_edit_worker/weights/ /builder/qwen_edit_worker/weights/
ARG FUSE_LIGHTNING=0
ARG PRECISION=bf16
ARG TEXT_ENCODER_PRECISION=bf16
ARG BAKE_MODEL=1
ARG SAFETY_CHECKER=request
ARG SAFETY_CHECKER_REVISION=main
ARG HF_ENDPOINT=https://huggingface.co
RUN --mount=type=secret,id=hf_token,required=false \
    fuse=""; if [ "${FUSE_LIGHTNING}" = "1" ]; then fuse="--fuse-lightning"; fi \
    && case "${SAFETY_CHECKER}" in request|always) checker="--safety-checker-revision=${SAFETY_CHECKER_REVISION}";; \
        off) checker="--no-safety-checker";; \
        *) echo "SAFETY_CHECKER must be request, always or off, not ${SAFETY_CHECKER}" >&2; exit 2;; esac \
    && case "${BAKE_MODEL}" in 1) slim="";; 0) slim="--lora-only";; \
        *) echo "BAKE_MODEL must be 1 (bake the model) or 0 (the Lightning LoRA only), not ${BAKE_MODEL}" >&2; exit 2;; esac \
    && HF_ENDPOINT="${HF_ENDPOINT}" python /builder/bake.py --variant "${MODEL_VARIANT}" \
        --model-revision "${MODEL_REVISION}" --lora-revision "${LORA_REVISION}" --dest /models \
        ${fuse:+"$fuse"} ${slim:+"$slim"} "${checker}" \
        --precision "${PRECISION}" --text-encoder-precision "${TEXT_ENCODER_PRECISION}"

ENV MODEL_VARIANT=${MODEL_VARIANT} \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LIGHTNING=1 \
    PRECISION=${PRECISION} \
    TEXT_ENCODER_PRECISION=${TEXT_ENCODER_PRECISION} \
    SAFETY_CHECKER=${SAFETY_CHECKER} \
    ATTENTION_BACKEND=auto \
    MEMORY_SAVING=auto \
    OFFLOAD=auto \
    WARMUP=1 \
    CONCURRENCY=2 \
    LOG_LEVEL=INFO

WORKDIR /app
COPY pyproject.toml README.md handler.py test_input.json ./
COPY builder/requirements.txt builder/requirements.txt
COPY src/ src/
RUN pip install --no-deps .

CMD ["python", "-u", "handler.py"]
