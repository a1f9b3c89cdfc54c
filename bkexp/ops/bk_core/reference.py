"""Dense float64 BK-Core reference (O(N^3)): the ground truth every fast backend is tested against.

It never uses the pivot recurrence. It builds the dense tridiagonal matrix ``A = H - zI`` (upper
off-diagonal ``k``, lower off-diagonal 1, so that ``A[i,i+1] * A[i+1,i] = k_i``) and inverts it with
dense linear algebra, so gradients come from plain autograd through ``torch.linalg`` and matmuls.

- bidirectional: ``y = diag(A^-1)`` via ``torch.linalg.inv``;
- causal: ``y_i = [(A[:i+1, :i+1])^-1]_{ii}``, the last diagonal entry of the inverse of each leading
  block. All leading-block inverses are built by dense bordering (block inversion with the Schur
  complement ``s_i = A_ii - A[i,:i] A_{i-1}^-1 A[:i,i]``, ``y_i = 1/s_i``), which treats ``A`` as a full
  matrix: O(N^3) time and, under autograd, O(N^3) memory. Use it for N up to a few hundred.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_matrix(v: Tensor, k: Tensor, z: Tensor) -> Tensor:
    """Complex128 matrices ``A = H - zI``, shape (rows, N, N), from v (rows, N), k (rows, N-1), z (rows,)."""
    a = v.to(torch.complex128) - z.to(torch.complex128).unsqueeze(-1)
    upper = torch.diag_embed(k.to(torch.complex128), offset=1)
    lower = torch.diag_embed(torch.ones_like(k, dtype=torch.complex128), offset=-1)
    return torch.diag_embed(a) + upper + lower


def leading_block_inverse_diagonal(A: Tensor) -> Tensor:
    """``[(A[:i+1,:i+1])^-1]_{ii}`` for every i, by dense bordering over a batch (rows, N, N) of matrices."""
    n = A.shape[-1]
    if n == 0:
        return A.new_zeros(A.shape[:-1])
    inv = A[:, :1, :1].reciprocal()  # inverse of the 1x1 leading block
    diag = [inv[:, 0, 0]]
    for i in range(1, n):
        col = A[:, :i, i : i + 1]  # (rows, i, 1)
        row = A[:, i : i + 1, :i]  # (rows, 1, i)
        inv_col = inv @ col
        row_inv = row @ inv
        schur = A[:, i, i] - (row @ inv_col)[:, 0, 0]
        s_inv = schur.reciprocal()
        diag.append(s_inv)
        if i + 1 < n:
            s = s_inv[:, None, None]
            top = torch.cat([inv + inv_col @ row_inv * s, -inv_col * s], dim=-1)
            bottom = torch.cat([-row_inv * s, s], dim=-1)
            inv = torch.cat([top, bottom], dim=-2)
    return torch.stack(diag, dim=-1)


def bk_core_reference(v: Tensor, k: Tensor, z: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of y, float64, for v (rows, N), k (rows, N-1), complex z (rows,)."""
    A = dense_matrix(v, k, z)
    if causal:
        y = leading_block_inverse_diagonal(A)
    else:
        y = torch.linalg.inv(A).diagonal(dim1=-2, dim2=-1)
    return y.real, y.imag
