"""Mamba-1 mixer: the selective-SSM block of ``mamba_ssm.modules.mamba_simple.Mamba``, same parameters and names.

``x -> in_proj -> (x, z)``; ``x -> causal depthwise conv1d -> SiLU -> x_proj -> (dt, B, C)``;
``dt -> dt_proj`` (its bias enters the scan as ``delta_bias`` with softplus);
``y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)`` (gated by ``silu(z)``); ``out_proj(y)``.
Parameter names and shapes equal ``mamba_ssm``'s (in_proj.weight, conv1d.weight/bias, x_proj.weight,
dt_proj.weight/bias, A_log, D, out_proj.weight), so a state dict loads into either module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkexp.models.mixers.base import Mixer
from bkexp.ops.causal_conv1d import causal_conv1d
from bkexp.ops.selective_scan import BACKENDS as SCAN_BACKENDS
from bkexp.ops.selective_scan import resolve_backend, selective_scan, selective_state_update

DT_INITS = ("random", "constant")


class MambaMixer(Mixer):
    """Causal selective state-space mixer; ``backend`` selects the selective-scan implementation."""

    causal = True
    # The scan function the forward calls (``selective_scan``'s signature); benchmarks swap in baselines.
    scan = staticmethod(selective_scan)

    adjoint_backends = ("auto", "cpu", "cuda")
    autograd_backend = "ref"
    autograd_op_backends = {"selective_scan": ("ref",)}
    custom_kernel_ops = ("selective_scan", "causal_conv1d")

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(d_model)
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not expand > 0:
            raise ValueError(f"expand must be > 0, got {expand!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init not in DT_INITS:
            raise ValueError(f"unknown dt_init {dt_init!r}; valid: {', '.join(DT_INITS)}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {dt_rank!r}")
        if backend not in ("auto", *SCAN_BACKENDS):
            raise ValueError(f"unknown selective_scan backend {backend!r}; valid: auto, {', '.join(SCAN_BACKENDS)}")
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.backend = backend
        self._backend_used: str | None = None

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # dt_proj keeps the variance-preserving weight init and a bias such that softplus(bias) is a
        # log-uniform step size in [dt_min, dt_max]; both are flagged so LanguageModel's re-init skips them.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.weight._no_reinit = True
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.out_proj.weight._residual_out = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self._forward(hidden_states, keep_state=False)[0]

    def _in_proj(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """``in_proj(hidden_states).chunk(2, dim=-1)``: x and z, (..., d_inner) each.

        A plain ``nn.Linear`` runs as two matmuls on the halves of its weight instead: x and z then come out
        contiguous (the conv and scan kernels take contiguous position-major arrays; copying a strided half of
        the joint output into that order first costs the mixer 0-2%, docs/kernels.md) and the backward adds two
        input gradients instead of concatenating the halves' gradients into a fresh (b, l, 2 d_inner) tensor.
        Anything else in that slot (a quantized Linear, a module with hooks, e.g. pruning's) is called as a module.
        """
        proj = self.in_proj
        if type(proj) is not nn.Linear or proj._forward_hooks or proj._forward_pre_hooks:
            return proj(hidden_states).chunk(2, dim=-1)
        w_x, w_z = proj.weight.chunk(2, dim=0)
        b_x, b_z = proj.bias.chunk(2, dim=0) if proj.bias is not None else (None, None)
        return F.linear(hidden_states, w_x, b_x), F.linear(hidden_states, w_z, b_z)

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``dt`` (before its bias), ``B``, ``C`` from the conv output ``x`` (..., d_inner); and ``A``."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias enters the scan as delta_bias
        return dt, B, C, -torch.exp(self.A_log.float())

    def _forward(self, hidden_states: Tensor, keep_state: bool) -> tuple[Tensor, dict[str, Tensor] | None]:
        # Activations stay position-major (b, l, channels); the scan receives (b, channels, l) *views*
        # of them (its documented layout), which is the layout the CPU kernel walks, so nothing is copied.
        x, z = self._in_proj(hidden_states)  # (b, l, d_inner) each
        conv_in = x
        name = resolve_backend(self.backend, hidden_states.device)
        self._backend_used = name
        # The conv runs numba kernels exactly when the scan does (a ref scan keeps the whole mixer PyTorch).
        x = causal_conv1d(x.transpose(1, 2), self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu",
                          backend=self._conv_backend(name)).transpose(1, 2)  # (b, l, d_inner)
        dt, B, C, A = self._ssm_inputs(x)
        # keep_state: the scan also returns its state after the last position (mamba_ssm's return_last_state).
        y = self.scan(x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                      self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
                      delta_softplus=True, backend=name, **({"return_last_state": True} if keep_state else {}))
        if not keep_state:
            return self.out_proj(y.transpose(1, 2)), None
        y, ssm = y
        # The last d_conv - 1 conv inputs (zeros before the sequence start).
        window = F.pad(conv_in, (0, 0, max(self.d_conv - 1 - conv_in.shape[1], 0), 0))
        conv = window[:, window.shape[1] - (self.d_conv - 1):].transpose(1, 2).contiguous()
        return self.out_proj(y.transpose(1, 2)), {"conv": conv, "ssm": ssm}

    @property
    def decode_unsupported(self) -> str | None:
        return None

    def prefill(self, x: Tensor, capacity: int) -> tuple[Tensor, dict[str, Tensor]]:
        out, state = self._forward(x, keep_state=True)
        return out, state

    def step(self, x: Tensor, state: dict[str, Tensor], position: int) -> Tensor:
        """One position (mamba_ssm's ``Mamba.step``). The state is ``{"conv": (b, d_inner, d_conv - 1)`` -- the
        last conv inputs, oldest first -- ``, "ssm": (b, d_inner, d_state)}``, both of constant size."""
        x, z = self._in_proj(x[:, 0])  # (b, d_inner) each
        window = torch.cat([state["conv"], x.unsqueeze(-1)], dim=-1)  # (b, d_inner, d_conv), newest last
        state["conv"] = window[..., 1:]
        weight = self.conv1d.weight[:, 0, :]
        conv = x * weight[:, -1]  # the taps in causal_conv1d_reference's order
        for tap in range(self.d_conv - 1):
            conv = conv + window[..., tap] * weight[:, tap]
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x = F.silu(conv)
        dt, B, C, A = self._ssm_inputs(x)
        y = selective_state_update(state["ssm"], x, dt, A, B, C, self.D.float(), z=z,
                                   dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
        return self.out_proj(y).unsqueeze(1)

    @staticmethod
    def _conv_backend(scan_backend: str) -> str:
        """``causal_conv1d``'s backend: its numba kernels beside the numba scan, PyTorch otherwise."""
        return "cpu" if scan_backend == "cpu" else "ref"

    def core_flops(self, batch: int, seq_len: int) -> int:
        # The selective scan as mamba_ssm counts it (flops_selective_scan_ref: 9 x B x L x D x N), plus the
        # causal depthwise conv, written here as shifted multiply-adds the FLOP counter does not see.
        tokens = batch * seq_len
        return 9 * tokens * self.d_inner * self.d_state + 2 * tokens * self.d_inner * self.d_conv

    def state_size(self, seq_len: int) -> int:
        # SSM state plus the last d_conv - 1 conv inputs, per channel; independent of the sequence length.
        return self.d_inner * self.d_state + self.d_inner * (self.d_conv - 1)

    def backends(self) -> dict[str, str]:
        used = self._backend_used or resolve_backend(self.backend, self.out_proj.weight.device)
        return {"selective_scan": used, "causal_conv1d": self._conv_backend(used)}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, d_inner={self.d_inner}, "
                f"dt_rank={self.dt_rank}, backend={self.backend!r}")
