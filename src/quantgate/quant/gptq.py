"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a weight column by column against its Hessian.

For a linear layer with weight ``W`` (out, in) and calibration inputs ``X`` (in, n), GPTQ
minimizes ``||W X - Q X||²`` row by row. With ``H = 2 X Xᵀ`` (what
``quantgate.quant.calibration.Hessian`` accumulates), it quantizes one input column at a time
and spreads that column's rounding error over the columns not yet quantized, using the rows
of the upper Cholesky factor of ``H⁻¹`` (the paper's Algorithm 1):

- dead inputs (``H[i, i] == 0``: never active during calibration) get ``H[i, i] = 1``, so
  they are plainly rounded and feed no error forward (the reference code also zeroes their
  weights; we keep them, for inputs the calibration set did not cover);
- dampening: ``λ = damp · mean(diag H)`` is added to the diagonal (raised tenfold, up to
  three times, where a Cholesky factorization still fails);
- optional activation order: columns by decreasing ``H[i, i]``; with groups the group
  parameters are then fixed up front from the unquantized weight ("static groups"), so every
  group still covers contiguous input columns and the storage layout stays that of RTN;
- lazy block updates: the error feedback inside a block of ``block_size`` columns is applied
  at once to the rest of the matrix, one matmul per block (exactly the same result as
  column-by-column updates, cheaper in memory traffic);
- group parameters without activation order are taken from the error-updated weights when
  the group's first column is reached, as in the reference implementation; where a group
  crosses a lazy block's end, the block's pending updates are applied to its columns first
  (the reference reads them stale), so the result never depends on the block size.

Every function takes a single weight (out, in) with its Hessian (in, in), or a stack of
same-shaped layers (L, out, in) with their Hessians (L, in, in): a stack runs the sequential
column loop once for all of them, which is what makes quantizing hundreds of layers fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from quantgate.quant.int4 import GroupSpec, expand_groups, group_params, int_dtype, int_range


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's settings: the grid, lazy block width, dampening, activation order."""

    spec: GroupSpec = field(default_factory=lambda: GroupSpec(bits=4, group_size=None, symmetric=False))
    block_size: int = 128
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    act_order: bool = True

    def as_dict(self) -> dict:
        """Plain facts for records and cache keys."""
        return {**asdict(self), "spec": asdict(self.spec)}


@dataclass
class QuantizedWeight:
    """Integer weights on the grid of ``spec`` with per-(row, group) scale and zero point.

    ``q`` holds the integer values (int8 storage, int16 for 8-bit asymmetric; in [-(2^(b-1)-1), 2^(b-1)-1] symmetric,
    [0, 2^b-1] asymmetric), ``scale``/``zero`` are (..., out, groups); ``zero`` is None when
    symmetric. ``loss`` is GPTQ's own estimate of the layer's error ``Σ (w - q)² / [H⁻¹]_ii² / 2``
    per layer (None for round-to-nearest).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: GroupSpec
    loss: torch.Tensor | None = None
    damp: torch.Tensor | None = None  # the dampening λ used per layer

    def dequantize(self) -> torch.Tensor:
        """The quantized weight in float32, same shape as ``q``."""
        cols = self.q.shape[-1]
        scale = expand_groups(self.scale.reshape(-1, self.scale.shape[-1]), cols).reshape(self.q.shape)
        w = self.q.float()
        if self.zero is not None:
            w = w - expand_groups(self.zero.reshape(-1, self.zero.shape[-1]), cols).reshape(self.q.shape)
        return w * scale


def _params(w: torch.Tensor, spec: GroupSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (zeros when symmetric) per (..., row, group) of ``w`` (..., out, in)."""
    *lead, cols = w.shape
    scale, zero = group_params(w.reshape(-1, cols), spec)
    groups = scale.shape[-1]
    zero = torch.zeros_like(scale) if zero is None else zero
    return scale.reshape(*lead, groups), zero.reshape(*lead, groups)


def rtn_quantize(weight: torch.Tensor, spec: GroupSpec) -> QuantizedWeight:
    """Round-to-nearest on the same grid as GPTQ (the baseline GPTQ is measured against)."""
    w = weight.float()
    scale, zero = _params(w, spec)
    q = _round(w, expand_last(scale, w.shape[-1]), expand_last(zero, w.shape[-1]), spec)
    return QuantizedWeight(q.to(int_dtype(spec.bits, spec.symmetric)), scale, None if spec.symmetric else zero, spec)


def expand_last(params: torch.Tensor, cols: int) -> torch.Tensor:
    """Per-group values (..., groups) repeated to one per column (..., cols)."""
    return params.repeat_interleave(cols // params.shape[-1], dim=-1)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    low, high = int_range(spec.bits, spec.symmetric)
    return torch.clamp(torch.round(w / scale) + zero, low, high)


def prepare_hessian(hessian: torch.Tensor, damp: float, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``hessian`` (L, in, in) with dead inputs fixed and ``damp`` · mean diagonal added.

    Returns (H, λ per layer).
    """
    h = hessian.to(dtype).clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)
    lam = damp * diag.mean(dim=-1)
    diag.add_(lam[..., None])
    return h, lam


def inverse_cholesky(h: torch.Tensor, lam: torch.Tensor, retries: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``) for a stack (L, in, in).

    Where a factorization fails (H not numerically positive definite), that layer's dampening
    is raised tenfold and retried. Returns (U, the dampening finally used per layer).
    """
    lam = lam.clone()
    for attempt in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(h)
        bad = info != 0
        if not bad.any():
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            bad = info != 0
            if not bad.any():
                return upper, lam
        if attempt == retries:
            break
        extra = lam[bad] * 9  # λ -> 10 λ
        h[bad] += extra[:, None, None] * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
        lam[bad] += extra
    raise torch.linalg.LinAlgError(f"GPTQ: the Hessian of {int(bad.sum())} layer(s) is not positive definite even "
                                   f"with dampening {lam[bad].tolist()}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig = GPTQConfig(),
                  dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) or a stack (L, out, in) given its Hessian(s) ``2 X Xᵀ``.

    ``dtype`` is the arithmetic's precision (float32; float64 for exact comparisons in tests).
    Returns integer values in the original column order with their group scales (and zeros).
    """
    single = weight.dim() == 2
    w = (weight[None] if single else weight).to(dtype).clone()
    h = hessian[None] if single else hessian
    layers, rows, cols = w.shape
    spec = config.spec
    groups = spec.groups(cols)
    size = cols // groups
    h, lam = prepare_hessian(h, config.damp, dtype)

    dynamic = spec.group_size is not None and not config.act_order
    if dynamic:  # filled in as each group's first column is reached
        scale = torch.zeros(layers, rows, groups, dtype=dtype, device=w.device)
        zero = torch.zeros_like(scale)
    else:  # per channel, or static groups under activation order: from the unquantized weight
        scale, zero = _params(w, spec)
        scale, zero = scale.to(dtype), zero.to(dtype)
    col_scale, col_zero = expand_last(scale, cols), expand_last(zero, cols)

    perm = None
    if config.act_order:
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        w = torch.take_along_dim(w, perm[:, None, :], dim=2)
        h = torch.take_along_dim(torch.take_along_dim(h, perm[:, :, None], dim=1), perm[:, None, :], dim=2)
        col_scale = torch.take_along_dim(col_scale, perm[:, None, :], dim=2)
        col_zero = torch.take_along_dim(col_zero, perm[:, None, :], dim=2)

    hinv, lam = inverse_cholesky(h, lam)
    del h
    low, high = int_range(spec.bits, spec.symmetric)
    q = torch.empty_like(w)
    loss = torch.zeros(layers, dtype=dtype, device=w.device)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic and c % size == 0:
                g = c // size
                current = w1[:, :, i:i + size]
                if current.shape[-1] < size:  # the group runs past this block: apply its pending updates first
                    rest = w[:, :, i2:c + size] - torch.bmm(err1[:, :, :i], hinv[:, i1:c, i2:c + size])
                    current = torch.cat((current, rest), dim=2)
                s, z = _params(current, GroupSpec(spec.bits, None, spec.symmetric))
                scale[:, :, g], zero[:, :, g] = s[..., 0], z[..., 0]
                col_scale[:, :, c:c + size] = s
                col_zero[:, :, c:c + size] = z
            col = w1[:, :, i]
            s, z = col_scale[:, :, c], col_zero[:, :, c]
            qc = torch.clamp(torch.round(col / s) + z, low, high)
            q[:, :, c] = qc
            d = hinv1[:, i, i][:, None]
            err = (col - (qc - z) * s) / d
            loss += (err * err).sum(dim=-1) / 2
            w1[:, :, i:] -= err[:, :, None] * hinv1[:, None, i, i:]
            err1[:, :, i] = err
        w[:, :, i2:] -= torch.bmm(err1, hinv[:, i1:i2, i2:])

    if perm is not None:
        q = torch.take_along_dim(q, torch.argsort(perm, dim=-1)[:, None, :], dim=2)
    q = q.to(int_dtype(spec.bits, spec.symmetric))
    scale = scale.float()
    zero_out = None if spec.symmetric else zero.float()
    if single:
        return QuantizedWeight(q[0], scale[0], None if zero_out is None else zero_out[0], spec, loss[0], lam[0])
    return QuantizedWeight(q, scale, zero_out, spec, loss, lam)


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)``: with ``H = 2 X Xᵀ / n`` this is ``2/n · ||W X - Ŵ X||²``."""
    delta = (weight.double() - approx.double())
    return torch.einsum("...oi,...ij,...oj->...", delta, hessian.double(), delta)
