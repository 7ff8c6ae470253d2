#!/usr/bin/env bash
# GMT on one CUDA GPU, in one command (under 8 minutes on one GPU):
#
#     bash benchmarks/gpu_check.sh          # on a machine with one CUDA GPU
#     bash benchmarks/gpu_check.sh --cpu    # the same script on the CPU, small (what the test runs)
#
# Runs benchmarks/gpu_check.py: (a) the torch.compile kernels against the eager ones, bit for bit, on
# the selection test cases (fp32, bf16, fp16 gradients), (b) benchmarks/mask_overhead.py --device cuda
# beside fused AdamW, (c) a bf16 training step of a small Llama with and without GMT; ends with one
# line `gpu_check device=... kernels=ok ...`. Exit status 1 if a kernel check failed.
#
# Needs nothing from the network and installs nothing: it uses the project's .venv if that works
# here, else the system python3, and finds gmt_align through PYTHONPATH (the checkout itself). It
# needs torch, transformers, accelerate and numpy, which a GPU image with PyTorch has (trl and
# deepspeed are not used); a missing one is named and the script stops (exit 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=cuda
case "${1:-}" in
  "") ;;
  --cpu) MODE=cpu ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac

PY=""
for candidate in "$ROOT/.venv/bin/python" python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no python with torch found (.venv/bin/python, python3, python)" >&2; exit 2
fi
missing="$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "transformers", "accelerate", "numpy") if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ]; then
  echo "gpu_check: $PY lacks $missing (pip install $missing, or carry wheels)" >&2; exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Compiled kernels and the C++ extension go under .cache/ (git-ignored), made on first use.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/torchinductor}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"

if [ "$MODE" = cpu ]; then
  exec "$PY" benchmarks/gpu_check.py --device cpu --quick --rounds 1 --steps 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch ($PY) sees no CUDA device; use --cpu for the CPU mode" >&2; exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout 470 "$PY" benchmarks/gpu_check.py --device cuda
