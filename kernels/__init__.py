"""Block-scaled FP8 Triton kernels (DeepSeek-V3 recipe), each with a pure-torch reference beside it.

Importing this package never needs Triton; calling a kernel where FP8 cannot run raises a
RuntimeError that says why (`require_fp8`). TRITON_INTERPRET=1 runs every kernel on the CPU.
On compute capability 9.0 the GEMM (forward, dgrad) and the transposed quantisations dispatch to
Gluon kernels (fp8_gemm_gluon.py, quant.py). Under torch.compile the FP8 layers reach the kernels
through opaque custom ops (compile_ops.py), so a layer traces as one graph.
"""

from ._triton import Capabilities, capabilities, interpreting, require_fp8
from .fp8_gemm import (
    fp8_gemm,
    fp8_gemm_dgrad,
    fp8_gemm_dgrad_ref,
    fp8_gemm_ref,
    fp8_gemm_wgrad,
    fp8_gemm_wgrad_ref,
)
from .fp8_gemv import fp8_gemv
from .fp8_grouped_gemm import (
    fp8_grouped_gemm,
    fp8_grouped_gemm_dgrad,
    fp8_grouped_gemm_dgrad_ref,
    fp8_grouped_gemm_ref,
    fp8_grouped_gemm_wgrad,
    fp8_grouped_gemm_wgrad_ref,
)
from .fp8_linear import (
    FP8GroupedLinearFunction,
    FP8GroupedLinearRefFunction,
    FP8InferenceLinear,
    FP8Linear,
    FP8LinearFunction,
    FP8LinearRefFunction,
    QuantizedWeightCache,
    experts_forward_ref,
    fp8_experts_forward,
    fp8_experts_inference,
)
from .quant import (
    FP8_MAX,
    dequantize_act_ref,
    dequantize_weight,
    dequantize_weight_ref,
    quantize_act,
    quantize_act_ref,
    quantize_act_t,
    quantize_act_t_ref,
    quantize_weight,
    quantize_weight_ref,
)

__all__ = [
    "FP8_MAX",
    "Capabilities",
    "FP8GroupedLinearFunction",
    "FP8GroupedLinearRefFunction",
    "FP8InferenceLinear",
    "FP8Linear",
    "FP8LinearFunction",
    "FP8LinearRefFunction",
    "QuantizedWeightCache",
    "capabilities",
    "dequantize_act_ref",
    "dequantize_weight",
    "dequantize_weight_ref",
    "experts_forward_ref",
    "fp8_experts_inference",
    "fp8_experts_forward",
    "fp8_gemm",
    "fp8_gemm_dgrad",
    "fp8_gemm_dgrad_ref",
    "fp8_gemm_ref",
    "fp8_gemm_wgrad",
    "fp8_gemm_wgrad_ref",
    "fp8_gemv",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_dgrad",
    "fp8_grouped_gemm_dgrad_ref",
    "fp8_grouped_gemm_ref",
    "fp8_grouped_gemm_wgrad",
    "fp8_grouped_gemm_wgrad_ref",
    "interpreting",
    "quantize_act",
    "quantize_act_ref",
    "quantize_act_t",
    "quantize_act_t_ref",
    "quantize_weight",
    "quantize_weight_ref",
    "require_fp8",
]
from .mla_decode import mla_decode, mla_decode_ref  # noqa: E402  (absorbed-MLA decode attention)

__all__ += ["mla_decode", "mla_decode_ref"]
