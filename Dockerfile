# zoo on a CUDA GPU, installed in the README's order: torch first (the PyTorch base image brings it with CUDA and
# cuDNN; torch>=2.8 is then satisfied, so pip keeps the image's build), then the project and its other dependencies
# (without the dev and docs extras), then the optional C++ build of the fused loops.
#   docker build -t zoo .
#   docker run --gpus all -v /path/to/data:/workspace/data -v $PWD/runs:/workspace/zoo/runs \
#       -e WANDB_API_KEY zoo fit --config configs/ptb_char/bn_lstm.yaml
# Arguments after the image name go to train.py. The W&B key comes only from the environment at run time.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The data root (zoo.data.root): the configs' relative data paths are read under ZOO_DATA, mounted at /workspace/data.
ENV ZOO_DATA=/workspace/data
WORKDIR /workspace/zoo

# Dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY pyproject.toml README.md ./
COPY zoo ./zoo
# The fused recurrences' C++ loops (CPU only), one build per instruction-set level (x86-64 baseline, AVX2, AVX-512):
# the image runs the best one on whatever CPU it lands on. A runtime image without a compiler runs the Python loop.
ENV ZOO_EXT_DIR=/opt/zoo-ext
RUN pip install . \
    && (python -m zoo.nn.build || echo "zoo.nn.build failed: the fused LSTM and GRU run their Python loops") \
    && python -c "import torch, lightning, zoo.nn; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY train.py ./
COPY configs ./configs

RUN useradd --create-home --uid 1000 --shell /bin/bash zoo \
    && mkdir -p /workspace/data /workspace/zoo/runs \
    && chown -R zoo:zoo /workspace/zoo/runs /workspace/data
USER 1000:1000

# Data (read) and outputs: checkpoints, logs, offline W&B runs (runs/ is train.py's default root).
VOLUME ["/workspace/data", "/workspace/zoo/runs"]

ENTRYPOINT ["python", "train.py"]
CMD ["fit", "--help"]
