#!/usr/bin/env bash
# Source this at the start of a GPU-machine call (see bench/README.md): installs the carried wheels
# (.whl/, made by ../shared/device/prepare.sh), sets the one-process DeepSpeed environment, and starts
# building DeepSpeed's CUDA/CPU Adam ops in the background (1-2 min) while other work runs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || return 1
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=9.0 DS_BUILD_OPS=0
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions MAX_JOBS=16
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511
(python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder, CPUAdamBuilder; FusedAdamBuilder().load(); CPUAdamBuilder().load()" \
  > /tmp/op_build.log 2>&1; echo "ops built rc=$?" >> /tmp/op_build.log) &
export OP_BUILD_PID=$!
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count())"
