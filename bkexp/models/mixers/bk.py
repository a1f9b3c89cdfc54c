"""ResNet-BK token mixer: per-head diagonals of a tridiagonal resolvent ``(H - z)^-1`` through the BK-Core op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkexp.models.mixers.base import Mixer
from bkexp.ops.bk_core import BACKENDS, bk_core, bk_core_state, bk_core_step, resolve_backend

COUPLING_MODES = ("head", "input")
SPARSE_LOGIT_INIT = 3.0
# the complex dtype of z for the op's compute dtype (dtype.to_complex() breaks a torch.compile graph)
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) == y`` (``y > 0``), computed stably for small and large ``y``."""
    if y <= 0:
        raise ValueError(f"inverse_softplus needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))


class BKMixer(Mixer):
    """One BK-Core per head on a Hamiltonian built from the hidden states.

    For head ``h`` and a sequence ``x_0..x_{N-1}`` the layer builds the tridiagonal ``H`` with diagonal
    ``base_diag + v_t`` (``v = W_v x``, one potential per token per head) and off-diagonal products
    ``k_t >= 0`` between tokens ``t`` and ``t+1``, takes ``y = diag((H - z_h)^-1)`` with the shift
    ``z_h = E_h + i * eps_h`` (causal: the diagonal of the leading block ending at ``t``, see
    ``docs/bk_core.md``), and maps the ``2H`` real features ``(Re y, Im y)`` back with
    ``bk_scale * W_o [Re y; Im y]``.

    Coupling (``coupling``):
      * ``"head"``: one coupling per head, ``k_h = softplus(k_param_h)`` initialised at ``base_coupling``
        (or the constant ``base_coupling`` when ``learn_coupling=False``, as in the original layer).
      * ``"input"``: ``k_{t-1} = softplus(W_k x_t + b_k)``: the coupling of the pair ``(t-1, t)`` is computed
        from token ``t``, the later token of the pair ("how strongly does token t attach to its past",
        like Mamba's input-dependent step size). This keeps the layer causal: in causal mode ``y_t``
        depends on ``v_0..v_t`` and ``k_0..k_{t-1}``, and ``k_{j-1}`` depends only on ``x_j`` with
        ``j <= t``. ``b_k`` starts at ``softplus^-1(base_coupling)`` so the layer starts where the
        per-head variant does.

    Shift: ``eps_h = eps_min + softplus(eps_param_h)`` (initialised at ``eps_init``) and ``E_h`` learned
    (initialised at ``shift_init``), unless ``learn_z=False`` fixes ``z = shift_init + i * eps_init``.
    With ``k >= 0`` and ``eps > 0`` every output obeys ``|y| <= 1/eps`` and ``|dy_t/dv_j| <= 1/eps^2``
    (docs/bk_core.md), so the floor ``eps_min`` bounds the layer's output and gradients by construction
    and keeps the op's ``eps > 0`` precondition true even if ``softplus`` underflows.

    Potential scale: the block's pre-norm already standardises ``x`` per token, and the resolvent bound
    above holds for any real ``v`` (a large ``v`` only makes ``y ~ 1/(v - z)`` small), so ``v`` needs no
    normalisation for stability and by default is left linear (no information is squashed). ``v_bound``
    optionally applies ``v_bound * tanh(v / v_bound)``, the differentiable counterpart of the original
    ResNet-BK's ``clamp(v, -3, 3)``, for reproducing that layer.

    Sparse heads (``sparse_heads``, the ``sparse_bk`` flag): a learned score ``head_logit_h`` per head; only
    the ``ceil(sparse_heads * n_heads)`` heads with the highest scores run the BK-Core (ties go to the lower
    head index), the others contribute zeros. The selection depends on parameters only, never on the input,
    so the layer stays causal and saves BK-Core work in proportion (``core_flops`` counts active heads only).
    Kept heads' features are multiplied by ``sigmoid(head_logit_h)`` so the scores get gradients (the
    discrete selection itself is straight-through: it follows the scores the gradients move).

    Energy (``record_energy``, used by the ``physics_weight`` regulariser): with ``record_energy=True`` each
    forward stores ``self.energy``, the expectation ``<psi|H|psi>`` of the layer's Hamiltonian in the
    uniform state ``psi = (1, ..., 1)/sqrt(N)``, averaged over batch and (active) heads:
    ``E = mean_rows[(sum_t d_t + 2 sum_t sqrt(k_t)) / N]`` with diagonal ``d = base_diag + v`` and the
    symmetric split ``H[t,t+1] = H[t+1,t] = sqrt(k_t)`` of the couplings (a differentiable scalar).
    """

    adjoint_backends = ("auto", "cpu", "torch", "triton")
    autograd_backend = "torch_autograd"
    autograd_op_backends = {"bk_core": ("torch_autograd", "reference")}
    custom_kernel_ops = ("bk_core",)
    has_energy = True
    has_sparse_heads = True

    def __init__(self, d_model: int, n_heads: int = 4, causal: bool = True, coupling: str = "head",
                 base_diag: float = 0.0, base_coupling: float = 1.0, learn_coupling: bool = True,
                 eps_init: float = 1.0, eps_min: float = 1e-2, shift_init: float = 0.0, learn_z: bool = True,
                 v_bound: float | None = None, bk_scale_init: float = 1.0, backend: str = "auto",
                 v_bias: bool = False, out_bias: bool = False, sparse_heads: float | None = None) -> None:
        super().__init__(d_model)
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        if sparse_heads is not None and not 0 < sparse_heads <= 1:
            raise ValueError(f"sparse_heads (fraction of BK heads kept active) must be in (0, 1] or None, "
                             f"got {sparse_heads}")
        if coupling not in COUPLING_MODES:
            raise ValueError(f"unknown coupling {coupling!r}; valid: {list(COUPLING_MODES)}")
        if coupling == "input" and not learn_coupling:
            raise ValueError("coupling='input' is learned by definition; learn_coupling=False needs coupling='head'")
        if base_coupling < 0 or (learn_coupling and base_coupling == 0):
            raise ValueError(f"base_coupling must be > 0 (>= 0 if fixed), got {base_coupling}")
        if eps_min < 0:
            raise ValueError(f"eps_min must be >= 0, got {eps_min}")
        if learn_z and eps_init <= eps_min:
            raise ValueError(f"eps_init must exceed eps_min={eps_min} when z is learned, got {eps_init}")
        if not learn_z and eps_init <= 0:
            raise ValueError(f"eps_init (Im z) must be > 0, got {eps_init}")
        if v_bound is not None and v_bound <= 0:
            raise ValueError(f"v_bound must be > 0 or None, got {v_bound}")
        self.n_heads = n_heads
        self.causal = causal
        self.coupling = coupling
        self.base_diag = float(base_diag)
        self.learn_coupling = learn_coupling
        self.learn_z = learn_z
        self.eps_min = float(eps_min)
        self.v_bound = v_bound
        self.backend = backend
        if backend != "auto" and backend not in BACKENDS:  # availability is checked per device at forward
            raise ValueError(f"unknown bk_core backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
        self._last_device: torch.device | None = None

        self.w_v = nn.Linear(d_model, n_heads, bias=v_bias)
        if coupling == "input":
            self.w_k = nn.Linear(d_model, n_heads, bias=True)
            nn.init.constant_(self.w_k.bias, inverse_softplus(base_coupling))
            self.w_k.bias._no_reinit = True  # type: ignore[attr-defined]  # keeps k ~= base_coupling at init
        elif learn_coupling:
            self.k_param = nn.Parameter(torch.full((n_heads,), inverse_softplus(base_coupling)))
        else:
            self.register_buffer("k_fixed", torch.full((n_heads,), float(base_coupling)))
        if learn_z:
            self.z_real = nn.Parameter(torch.full((n_heads,), float(shift_init)))
            self.eps_param = nn.Parameter(torch.full((n_heads,), inverse_softplus(eps_init - eps_min)))
        else:
            self.register_buffer("z_real", torch.full((n_heads,), float(shift_init)))
            self.register_buffer("z_imag", torch.full((n_heads,), float(eps_init)))
        self.w_o = nn.Linear(2 * n_heads, d_model, bias=out_bias)
        self.bk_scale = nn.Parameter(torch.full((d_model,), float(bk_scale_init)))
        self.sparse_heads = sparse_heads
        if sparse_heads is not None:
            self.n_active_heads = max(1, math.ceil(sparse_heads * n_heads - 1e-9))
            # Starts at sigmoid(3) ~ 0.95 so the kept heads begin almost unscaled.
            self.head_logit = nn.Parameter(torch.full((n_heads,), SPARSE_LOGIT_INIT))
        else:
            self.n_active_heads = n_heads
        self.record_energy = False
        self.energy: Tensor | None = None

    def shift(self) -> Tensor:
        """The complex shift ``z_h`` per head, shape ``(n_heads,)``."""
        imag = self.eps_min + F.softplus(self.eps_param) if self.learn_z else self.z_imag
        return torch.complex(self.z_real, imag)

    def couplings(self, x: Tensor) -> Tensor:
        """``k >= 0`` shaped ``(B, H, N-1)`` (input mode) or ``(H, 1)`` (per head, broadcast along the pairs)."""
        if self.coupling == "input":
            return F.softplus(self.w_k(x[:, 1:])).transpose(1, 2)  # k_{t-1} from token t: causal
        k = F.softplus(self.k_param) if self.learn_coupling else self.k_fixed
        return k.unsqueeze(-1)

    def active_heads(self) -> Tensor | None:
        """Indices of the heads that run the BK-Core (sorted), or None when every head runs."""
        if self.sparse_heads is None:
            return None
        order = torch.argsort(self.head_logit.detach(), descending=True, stable=True)
        return order[: self.n_active_heads].sort().values

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Potentials ``v`` (B, N, H'), couplings (as ``couplings``), shifts ``z`` (H',) of the running heads
        H' (all, or the active ones under ``sparse_heads``, whose indices come fourth)."""
        heads = self.active_heads()
        v = self.w_v(x)
        if self.v_bound is not None:
            v = self.v_bound * torch.tanh(v / self.v_bound)
        k = self.couplings(x)
        z = self.shift()
        if heads is not None:  # only the active heads' rows reach the BK-Core
            v, z = v[..., heads], z[heads]
            k = k[:, heads] if self.coupling == "input" else k[heads]
        return v, k, z, heads

    def _output(self, features: Tensor, heads: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``bk_scale * W_o features`` for features (B, N, 2H'): ``[Re y_h..., Im y_h...]`` of the running heads."""
        if heads is None:
            return self.w_o(features.to(dtype)) * self.bk_scale
        # Skipped heads contribute zeros, so only the active heads' columns of W_o are needed.
        gate = torch.sigmoid(self.head_logit[heads]).repeat(2)
        columns = torch.cat([heads, heads + self.n_heads])
        out = F.linear(features.to(dtype) * gate.to(dtype), self.w_o.weight[:, columns], self.w_o.bias)
        return out * self.bk_scale

    @staticmethod
    def _compute_dtype(v: Tensor) -> torch.dtype:
        # The op computes in float32 (float64 stays float64); feed it that, not autocast's bf16/fp16.
        return torch.float64 if v.dtype == torch.float64 else torch.float32

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)[0]

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Output and the BK-Core's (Re y, Im y), each (B, H', N)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, seq, d_model={self.d_model}), got {tuple(x.shape)}")
        self._last_device = x.device
        v, k, z, heads = self._inputs(x)
        v = v.transpose(1, 2) + self.base_diag  # (B, H, N): one row per (batch, head)
        rows = v.shape[:-1]
        k = k.expand(*rows, max(x.shape[1] - 1, 0))
        z = z.expand(*rows)
        if self.record_energy:
            n = v.shape[-1]
            self.energy = ((v.sum(-1) + 2 * k.sqrt().sum(-1)) / n).mean()
        compute = self._compute_dtype(v)
        re, im = bk_core(v.to(compute), k.to(compute), z.to(_COMPLEX[compute]),
                         causal=self.causal, backend=self.backend)
        features = torch.cat([re, im], dim=1).transpose(1, 2)  # (B, N, 2H): [Re y_h..., Im y_h...]
        return self._output(features, heads, x.dtype), re, im

    @property
    def decode_unsupported(self) -> str | None:
        if self.causal:
            return None
        return ("bidirectional BK-Core (causal=False): every output depends on every later token, so it has no "
                "incremental form; use causal=True for language models")

    def prefill(self, x: Tensor, capacity: int) -> tuple[Tensor, dict[str, Tensor]]:
        out, re, im = self._forward(x)
        return out, {"pivot": bk_core_state(re, im)}

    def step(self, x: Tensor, state: dict[str, Tensor], position: int) -> Tensor:
        """One position. The state is ``{"pivot"}``: ``1/L_t`` of the last position per (batch, running head),
        complex (B, H'); see ``bkexp.ops.bk_core.step``. The coupling ``k_t`` of the new pair is computed
        from the new token alone (input mode) or is the head's parameter, so nothing else is carried."""
        v, k, z, heads = self._inputs(x)
        v = v[:, 0] + self.base_diag  # (B, H')
        if self.coupling == "input":
            k = F.softplus(self.w_k(x[:, 0]))  # k_{t-1} from token t, as in couplings()
            if heads is not None:
                k = k[:, heads]
        else:
            k = k[:, 0]  # (H',): one coupling per head
        compute = self._compute_dtype(v)
        re, im, state["pivot"] = bk_core_step(v.to(compute), k.to(compute), z.to(_COMPLEX[compute]),
                                              state["pivot"])
        features = torch.cat([re, im], dim=-1).unsqueeze(1)  # (B, 1, 2H')
        return self._output(features, heads, x.dtype)

    def flag_stats(self) -> dict[str, float]:
        """Measured effect of the mixer-level flags: the fraction of BK heads that run the BK-Core."""
        return {"active_heads_fraction": self.n_active_heads / self.n_heads}

    def core_flops(self, batch: int, seq_len: int) -> int:
        # Real FLOPs per (row, position) of the BK-Core: a causal pivot step L = a - k/L_prev with y = 1/L is
        # ~10 (complex-by-real product, subtraction, reciprocal); the bidirectional mode adds the right sweep
        # and the combination, ~24.
        per_step = 10 if self.causal else 24
        return per_step * batch * self.n_active_heads * seq_len

    def state_size(self, seq_len: int) -> int:
        if self.causal:
            # A causal decoder keeps only the last pivot L_t per head (one complex number = 2 reals): the
            # next pivot is L_{t+1} = a_{t+1} - k_t / L_t, with a_{t+1} and k_t computed from the new token.
            # Constant in seq_len. Only active heads (sparse_heads) keep a pivot.
            return 2 * self.n_active_heads
        # Bidirectional: every output depends on every token, so the potentials (and input couplings) of
        # the whole sequence must be kept and the right-to-left pivots recomputed.
        per_token = 2 if self.coupling == "input" else 1
        return per_token * self.n_active_heads * seq_len

    def backends(self) -> dict[str, str]:
        device = self._last_device if self._last_device is not None else self.w_v.weight.device
        return {"bk_core": resolve_backend(self.backend, device)}

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, causal={self.causal}, coupling={self.coupling!r}, "
                f"base_diag={self.base_diag}, learn_coupling={self.learn_coupling}, learn_z={self.learn_z}, "
                f"v_bound={self.v_bound}, backend={self.backend!r}, sparse_heads={self.sparse_heads}")
