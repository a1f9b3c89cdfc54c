"""The token-mixer interface that every architecture plugs into the shared LM backbone through."""

from __future__ import annotations


from bkexp.models.aux import AuxLossModule


class Mixer(AuxLossModule):
    """Maps hidden states ``(batch, seq, d_model)`` to ``(batch, seq, d_model)``.

    Subclasses set ``causal`` truthfully (the run-time causality check verifies it for language models),
    report the memory a decoder must keep per sequence through ``state_size`` and which kernel each op
    actually ran through ``backends``. A mixer may set ``self.aux_loss`` (a scalar tensor) during forward;
    the backbone sums those into the training loss.
    """

    causal: bool = True

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model

    def state_size(self, seq_len: int) -> int:
        """Number of scalars a decoder must keep for one sequence after ``seq_len`` tokens (one layer)."""
        raise NotImplementedError

    def core_flops(self, batch: int, seq_len: int) -> int:
        """FLOPs of ops PyTorch's FLOP counter cannot see (custom kernels), for one forward pass; 0 if none."""
        return 0

    def backends(self) -> dict[str, str]:
        """Op name -> implementation used in the last forward (e.g. ``{"bk_core": "cpu"}``)."""
        return {}
