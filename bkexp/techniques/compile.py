"""``compile``: ``torch.compile`` of every backbone block in place (state-dict keys unchanged).

Mixers that run custom kernels (``custom_kernel_ops``: the BK-Core's numba/Triton kernels, the selective
scan) stay eager inside their compiled block (``torch.compiler.disable``): Dynamo cannot trace numba or
CUDA-extension calls and would otherwise break the graph at many points inside them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bkexp.techniques.base import FlagError, RunContext, Technique

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Settings:
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None


def _check_compiler(backend: str, device_type: str) -> None:
    if backend != "inductor" or device_type != "cpu":
        return
    compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise FlagError("flags.compile with compile_backend=inductor generates C++ on CPU, but no C++ compiler was "
                        "found (CXX, c++, g++, clang++); install one (e.g. apt-get install g++), or use "
                        "flags.compile_backend=aot_eager, or flags.compile=false")


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                   device_type: str = "cpu") -> dict[str, Any]:
    """``torch.compile`` every backbone block in place; custom-kernel mixers stay eager.

    Call this after any deepcopy of the model (causality check, FLOP count): the disabled forward is bound
    to this model's mixers.
    """
    _check_compiler(backend, device_type)
    eager: list[str] = []
    for index, block in enumerate(model.blocks):
        mixer = block.mixer
        ops = [op for op in mixer.backends() if op in mixer.custom_kernel_ops]
        if ops:
            mixer.forward = torch.compiler.disable(mixer.forward)
            eager.append(f"blocks.{index}.mixer ({', '.join(ops)})")
        block.compile(backend=backend, mode=mode)
    return {"backend": backend, "mode": mode, "compiled_blocks": len(model.blocks), "eager_mixers": eager}


class Compile(Technique):
    name = "compile"
    settings = Settings
    summary = "torch.compile each backbone block (custom-kernel mixers stay eager)"
    always_describe = True  # every run records whether it was compiled

    def __init__(self, flags: Any) -> None:
        super().__init__(flags)
        self.result: dict[str, Any] | bool = False

    def validate(self) -> None:
        if self.flags.compile_backend not in COMPILE_BACKENDS:
            raise FlagError(f"flags.compile_backend={self.flags.compile_backend!r}; valid: "
                            f"{', '.join(COMPILE_BACKENDS)}")
        if self.flags.compile_mode not in COMPILE_MODES:
            raise FlagError(f"flags.compile_mode={self.flags.compile_mode!r}; valid: null, "
                            f"{', '.join(m for m in COMPILE_MODES if m)}")

    def before_fit(self, ctx: RunContext) -> None:
        self.result = compile_blocks(ctx.model, self.flags.compile_backend, self.flags.compile_mode, ctx.device_type)

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {"compile": self.result}
