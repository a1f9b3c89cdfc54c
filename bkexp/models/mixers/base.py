"""The token-mixer interface that every architecture plugs into the shared LM backbone through."""

from __future__ import annotations

from torch import Tensor

from bkexp.models.auxloss import AuxLossModule

DecodeLayerState = dict[str, Tensor]  # one layer's decoding state: named tensors, batch first


class Mixer(AuxLossModule):
    """Maps hidden states ``(batch, seq, d_model)`` to ``(batch, seq, d_model)``.

    Subclasses set ``causal`` truthfully (the run-time causality check verifies it for language models),
    report the memory a decoder must keep per sequence through ``state_size`` and which kernel each op
    actually ran through ``backends``. A mixer may set ``self.aux_loss`` (a scalar tensor) during forward;
    the backbone sums those into the training loss.

    Incremental decoding: a mixer that can generate one token at a time says so with
    ``decode_unsupported is None`` (otherwise it is the reason why not) and implements ``prefill`` (the
    parallel forward over a prompt that also returns the state after its last position) and ``step`` (one
    new position from that state, updated in place). Its docstring documents what the state holds.
    """

    causal: bool = True
    # Capabilities, declared by each mixer class so that no layer above asks ``isinstance`` about a mixer.
    # Backends of its recurrent op that differentiate with the exact adjoint ("auto" included), and the one
    # that differentiates with autograd through the recurrence (None: the mixer has no such op).
    adjoint_backends: tuple[str, ...] = ()
    autograd_backend: str | None = None
    # Op -> the backends of that op that are autograd through the recurrence (what the run records).
    autograd_op_backends: dict[str, tuple[str, ...]] = {}
    # Ops whose kernels (numba, Triton, CUDA extensions) torch.compile must not trace: the mixer stays eager.
    custom_kernel_ops: tuple[str, ...] = ()
    # The mixer can record the energy <psi|H|psi> of its Hamiltonian (``record_energy``; the physics term).
    has_energy: bool = False
    # The mixer can keep only a learned fraction of its heads active (``sparse_heads``; the sparse_bk flag).
    has_sparse_heads: bool = False

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model

    def state_size(self, seq_len: int) -> int:
        """Number of scalars a decoder must keep for one sequence after ``seq_len`` tokens (one layer)."""
        raise NotImplementedError

    @property
    def decode_unsupported(self) -> str | None:
        """None when ``prefill``/``step`` are implemented, else why this mixer cannot decode incrementally."""
        return f"{type(self).__name__} has no incremental (prefill/step) form"

    def prefill(self, x: Tensor, capacity: int) -> tuple[Tensor, DecodeLayerState]:
        """``forward(x)`` for ``x`` (batch, seq >= 1, d_model) plus the decoding state after the last position.

        ``capacity`` is the total number of positions the state should hold without growing (a hint; only
        states that grow with the context use it).
        """
        raise NotImplementedError(self.decode_unsupported)

    def step(self, x: Tensor, state: DecodeLayerState, position: int) -> Tensor:
        """Output (batch, 1, d_model) for one new position ``x`` (batch, 1, d_model), the ``position``-th
        (0-based) of the sequence; updates ``state`` in place."""
        raise NotImplementedError(self.decode_unsupported)

    def core_flops(self, batch: int, seq_len: int) -> int:
        """FLOPs of ops PyTorch's FLOP counter cannot see (custom kernels), for one forward pass; 0 if none."""
        return 0

    def backends(self) -> dict[str, str]:
        """Op name -> implementation used in the last forward (e.g. ``{"bk_core": "cpu"}``)."""
        return {}
