#!/usr/bin/env bash
# The GPU check of issue 17, for a lent GPU machine: torch and torchvision preinstalled, no network. It installs nothing
# and runs the package from this checkout (PYTHONPATH). At most about 8 minutes on one GPU:
#   1. the tests marked `gpu` and the CUDA cases of the other test files;
#   2. Table 2's timing (seconds of influence per test point) on synthetic CIFAR-shaped data for LeNet, ResNet-18 and
#      ResNet-50;
#   3. the `paper` preset's projected GPU-hours (timed SGD steps of every architecture on the GPU, multiplied out).
# Record its output in bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1
python - <<'PY'
import importlib, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "CUDA", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
missing = [m for m in ("numpy", "scipy", "tqdm", "fastcore", "pytest", "matplotlib") if importlib.util.find_spec(m) is None]
print("missing here (tests that need them are skipped or fail):", missing or "none")
PY
status=0
echo "== 1. gpu tests"
timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_deep.py || status=1
timeout 100 python -m pytest -q -p no:cacheprovider -k cuda tests/test_retrain.py tests/test_misuse.py || status=1
echo "== 2. Table 2 timing on synthetic CIFAR-10-shaped data"
timeout 180 python bench/table2_timing.py --device cuda --n-train 10000 --depth 200 || status=1
echo "== 3. the paper preset projected on this GPU"
timeout 90 python - <<'PY' || status=1
from influence_nb.deep import DeepConfig, project
proj = project(DeepConfig.from_preset("paper", device="cuda"))
h = {k: round((v["train"] + v["influence"] + v["retrain"]) / 3600, 2) for k, v in proj.items()}
print("paper preset, projected GPU-hours per unit:", h)
print("total GPU-hours:", round(sum(h.values()), 1))
PY
exit $status
