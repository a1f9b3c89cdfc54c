"""Weight (and optional activation) quantization driven by the top-level ``bits``: QAT and PTQ (``bkexp eval-quant`` is bkexp.eval.quant).

See docs/quantization.md. ``QuantSpec`` is what ``conf/quant/*.yaml`` instantiates.
"""

from bkexp.quant.fake_quant import (
    QuantConv1d,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    fake_quantize,
    fake_quantize_activation,
    qmax,
    quantize_activation,
)
from bkexp.quant.policy import policy_targets, quantized_modules
from bkexp.quant.spec import (
    ACT_BITS,
    EVAL_BITS,
    METHODS,
    TRAIN_BITS,
    QuantConfigError,
    QuantSpec,
)

__all__ = [
    "ACT_BITS",
    "EVAL_BITS",
    "METHODS",
    "TRAIN_BITS",
    "QuantConfigError",
    "QuantConv1d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantizer",
    "fake_quantize",
    "fake_quantize_activation",
    "policy_targets",
    "qmax",
    "quantize_activation",
    "quantized_modules",
]
