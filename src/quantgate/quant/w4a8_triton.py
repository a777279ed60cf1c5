"""Triton kernels for W4A8: a fused per-token INT8 activation quantizer and an INT4-weight x
INT8-activation GEMM that unpacks the weight inside its loads (issue 23).

Hopper has INT8 tensor cores at twice the bf16 rate and no INT4 ones. W4A8 engines (QServe,
Marlin-QQQ) get their speed by keeping the weight 4-bit in memory, widening it to INT8 in
registers, multiplying on the INT8 tensor cores into INT32, and applying the scales in the
epilogue. These kernels do that for the layout :class:`quantgate.quant.w4a8.W4A8Linear` stores:

- ``qweight`` uint8 (N, K/2), two codes a byte, the even column in the low nibble;
- ``scale`` float32 (N, groups) and, for an asymmetric grid, ``zero`` uint8 (N, groups); the
  weight is ``(code - zero) * scale`` (symmetric: ``(code - 8) * scale``);
- activations quantized per token to INT8, ``x ~= q * s`` with ``s = max|x| / 127`` and
  round-half-to-even, as :func:`quantgate.quant.sparse24.quantize_rows` does.

With per-group scales the INT32 sum is one dot product per group: the GEMM accumulates each
group in INT32 (exact), scales it into a float32 accumulator, and moves on, so groups cost no
extra pass over memory.

The kernels are built on first use, so ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, how the
CPU tier checks them) can be set by the caller before that. Nothing here runs unless Triton is
importable; :func:`unavailable` says why not.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

MIN_CAPABILITY = (8, 0)  # INT8 tensor-core MMA in Triton: Ampere and later
_BLOCK_K_CHOICES = (128, 64, 32)  # tl.dot on int8 needs K tiles of at least 32
_MAX_ROW = 16384  # the quantizer holds one row in registers


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device`` (None: they can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (torch's CUDA wheels ship it; pip install triton elsewhere)"
    device = torch.device(device)
    if interpreting():
        return None if device.type == "cpu" else "TRITON_INTERPRET=1 runs the kernels on CPU tensors only"
    if device.type != "cuda":
        return f"the kernels need a CUDA GPU (got {device.type}; TRITON_INTERPRET=1 runs them on the CPU)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"INT8 tensor-core GEMMs in Triton need compute capability sm_80 or later; this GPU is "
                f"sm_{capability[0]}{capability[1]}")
    return None


def block_k(group_size: int) -> int | None:
    """The K tile for a group of ``group_size`` input columns: the largest choice dividing it."""
    return next((b for b in _BLOCK_K_CHOICES if group_size % b == 0), None)


def unsupported_shape(in_features: int, out_features: int, groups: int) -> str | None:
    """Why a layer of this shape cannot use the GEMM kernel (None: it can)."""
    if in_features % groups:
        return f"in_features {in_features} is not divisible into {groups} groups"
    group_size = in_features // groups
    if block_k(group_size) is None:
        return f"group size {group_size} is not a multiple of 32 (the smallest INT8 tl.dot tile)"
    if in_features > _MAX_ROW:
        return f"in_features {in_features} exceeds the quantizer's one-row tile ({_MAX_ROW})"
    return None


def _configs(triton: Any) -> list[Any]:
    if interpreting():  # the interpreter is slow: one small configuration
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
                               (32, 64, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3), (128, 256, 8, 3))]


def _autotune(triton: Any, key: list[str]) -> Any:
    """triton.autotune over :func:`_configs`, keeping the winners on disk where this Triton can
    (``cache_results``, Triton >= 3.2), so a second session does not tune again."""
    import inspect

    kwargs: dict[str, Any] = {"configs": _configs(triton), "key": key}
    if "cache_results" in inspect.signature(triton.autotune).parameters and not interpreting():
        kwargs["cache_results"] = True
    return triton.autotune(**kwargs)


@functools.cache
def _kernels(interpret: bool) -> dict[str, Any]:
    """Compile-on-first-call kernels for the current mode (interpreted or not), built once each."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 127.0)
        v = tl.math.div_rn(x, scale)
        r = tl.floor(v + 0.5)
        # torch.round rounds half to even: a tie that floor(v + 0.5) sent to an odd value goes down
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + row * stride_q + offs, r.to(tl.int8), mask=mask)
        tl.store(s_ptr + row, scale)

    @_autotune(triton, ["M", "N", "K", "GROUP_K"])
    @triton.jit
    def gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, c_ptr, M, N, K, GROUPS, GROUP_K,
                    stride_am, stride_wn, stride_cm,
                    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, RAW_INT32: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        shift = ((offs_k % 2) * 4).to(tl.uint8)  # even column: low nibble
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        raw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for g in range(0, GROUPS):
            group_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            if HAS_ZERO:
                zero = tl.load(wz_ptr + offs_n * GROUPS + g, mask=mask_n, other=0).to(tl.int16)
            else:
                zero = tl.full((BLOCK_N,), 8, tl.int16)  # quantgate.quant.w4a8.SYMMETRIC_OFFSET
            for kk in range(0, GROUP_K, BLOCK_K):
                k = g * GROUP_K + kk + offs_k
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=mask_m[:, None], other=0)
                # The weight tile is loaded as (K, N), the dot's own orientation: no tl.trans of an
                # 8-bit tile, which Triton has miscompiled on Hopper (triton-lang/triton#6124; 8-bit
                # tl.trans corruption reported against 3.7).
                packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k // 2)[:, None], mask=mask_n[None, :],
                                 other=0)
                code = ((packed >> shift[:, None]) & 0xF).to(tl.int16)
                w = (code - zero[None, :]).to(tl.int8)  # in [-15, 15]: INT8 exactly
                group_acc += tl.dot(a, w, out_dtype=tl.int32)
            if RAW_INT32:
                raw += group_acc
            else:
                scale = tl.load(ws_ptr + offs_n * GROUPS + g, mask=mask_n, other=0.0)
                acc += group_acc.to(tl.float32) * scale[None, :]
        c_offs = offs_m[:, None] * stride_cm + offs_n[None, :]
        c_mask = mask_m[:, None] & mask_n[None, :]
        if RAW_INT32:
            tl.store(c_ptr + c_offs, raw, mask=c_mask)
        else:
            token_scale = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
            acc = acc * token_scale[:, None]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    return {"quantize_rows": quantize_rows_kernel, "gemm": gemm_kernel}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 in one read of ``x`` (M, K): (int8 values (M, K), float32 scales (M, 1)),
    the same numbers as :func:`quantgate.quant.sparse24.quantize_rows`."""
    import triton

    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, k = rows.shape
    if k > _MAX_ROW:
        raise ValueError(f"rows of {k} values exceed the quantizer's one-row tile ({_MAX_ROW})")
    q = torch.empty((m, k), dtype=torch.int8, device=rows.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=rows.device)
    if m:
        block = triton.next_power_of_2(k)
        warps = 1 if interpreting() else max(1, min(16, block // 1024))
        _kernels(interpreting())["quantize_rows"][(m,)](rows, q, scale, k, rows.stride(0), q.stride(0),
                                                         BLOCK=block, num_warps=warps)
    return q, scale


def gemm(q_x: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
         zero: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
         raw_int32: bool = False) -> torch.Tensor:
    """``(q_x * x_scale) @ W.T + bias`` for the packed 4-bit ``W`` (see the module doc): (M, N) in
    ``out_dtype``. ``raw_int32`` returns the INT32 sums before any scale instead (one group only),
    which must equal an integer matmul exactly."""
    import triton

    m, k = q_x.shape
    n, groups = scale.shape
    if qweight.shape != (n, k // 2):
        raise ValueError(f"qweight {tuple(qweight.shape)} does not match {n} outputs x {k} inputs")
    if (why := unsupported_shape(k, n, groups)) is not None:
        raise ValueError(why)
    if raw_int32 and groups != 1:
        raise ValueError("raw INT32 sums exist for one group per row only")
    group_k = k // groups
    out = torch.empty((m, n), dtype=torch.int32 if raw_int32 else out_dtype, device=q_x.device)
    if m == 0:
        return out
    q_x, x_scale = q_x.contiguous(), x_scale.reshape(-1).float().contiguous()
    qweight, scale = qweight.contiguous(), scale.float().contiguous()
    zero_arg = zero.contiguous() if zero is not None else scale  # never read without HAS_ZERO
    bias_arg = bias.contiguous() if bias is not None else scale

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

    _kernels(interpreting())["gemm"][grid](
        q_x, x_scale, qweight, scale, zero_arg, bias_arg, out, m, n, k, groups, group_k,
        q_x.stride(0), qweight.stride(0), out.stride(0),
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, RAW_INT32=raw_int32, BLOCK_K=block_k(group_k))
    return out
