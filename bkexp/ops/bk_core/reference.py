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


def _cmm(ar: Tensor, ai: Tensor, br: Tensor, bi: Tensor) -> tuple[Tensor, Tensor]:
    """Complex batched matmul on separate real and imaginary parts (complex bmm is very slow on CPU)."""
    return ar @ br - ai @ bi, ar @ bi + ai @ br


def leading_block_inverse_diagonal(A: Tensor) -> Tensor:
    """``[(A[:i+1,:i+1])^-1]_{ii}`` for every i, by dense bordering over a batch (rows, N, N) of matrices.

    Step i grows ``inv = A_{i-1}^-1`` to ``A_i^-1`` with the Schur complement
    ``s = A_ii - A[i,:i] inv A[:i,i]``: ``[[inv + inv c r inv / s, -inv c / s], [-r inv / s, 1/s]]``.
    Complex arithmetic is spelled out on contiguous real/imaginary parts so it runs on real BLAS.
    """
    n = A.shape[-1]
    if n == 0:
        return A.new_zeros(A.shape[:-1])
    a_r, a_i = A.real.contiguous(), A.imag.contiguous()
    d = a_r[:, :1, :1] ** 2 + a_i[:, :1, :1] ** 2
    inv_r, inv_i = a_r[:, :1, :1] / d, -a_i[:, :1, :1] / d
    diag = [torch.complex(inv_r[:, 0, 0], inv_i[:, 0, 0])]
    for i in range(1, n):
        col_r, col_i = a_r[:, :i, i : i + 1], a_i[:, :i, i : i + 1]  # A[:i, i]
        row_r, row_i = a_r[:, i : i + 1, :i], a_i[:, i : i + 1, :i]  # A[i, :i]
        ic_r, ic_i = _cmm(inv_r, inv_i, col_r, col_i)  # inv c
        ri_r, ri_i = _cmm(row_r, row_i, inv_r, inv_i)  # r inv
        q_r, q_i = _cmm(row_r, row_i, ic_r, ic_i)  # r inv c
        s_r = a_r[:, i : i + 1, i : i + 1] - q_r
        s_i = a_i[:, i : i + 1, i : i + 1] - q_i
        d = s_r**2 + s_i**2
        t_r, t_i = s_r / d, -s_i / d  # 1/s
        diag.append(torch.complex(t_r[:, 0, 0], t_i[:, 0, 0]))
        if i + 1 < n:
            ics_r, ics_i = ic_r * t_r - ic_i * t_i, ic_r * t_i + ic_i * t_r  # inv c / s
            o_r, o_i = _cmm(ics_r, ics_i, ri_r, ri_i)
            top_r = torch.cat([inv_r + o_r, -ics_r], dim=-1)
            top_i = torch.cat([inv_i + o_i, -ics_i], dim=-1)
            ris_r, ris_i = ri_r * t_r - ri_i * t_i, ri_r * t_i + ri_i * t_r  # r inv / s
            inv_r = torch.cat([top_r, torch.cat([-ris_r, t_r], dim=-1)], dim=-2)
            inv_i = torch.cat([top_i, torch.cat([-ris_i, t_i], dim=-1)], dim=-2)
    return torch.stack(diag, dim=-1)


def bk_core_reference(v: Tensor, k: Tensor, z: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of y, float64, for v (rows, N), k (rows, N-1), complex z (rows,)."""
    A = dense_matrix(v, k, z)
    if causal:
        y = leading_block_inverse_diagonal(A)
    else:
        y = torch.linalg.inv(A).diagonal(dim1=-2, dim2=-1)
    return y.real, y.imag
