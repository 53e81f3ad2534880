"""bf16 matrix products as a GPU computes them (bf16 inputs, fp32 accumulation, bf16 result), at fp32 speed on a
CPU without bf16 instructions.

On such a CPU (AVX2 only, as the CI machines) torch's own bf16 GEMM is about 50 times slower than the fp32 one, which
makes a bf16 training run of the demo task take hours. Inside :class:`Bf16ProductsInFp32`, each matrix product whose
inputs are bf16 (``F.linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``einsum``, scaled dot-product
attention) runs on the inputs cast to fp32 and rounds its result to bf16: exact bf16 inputs, an fp32 sum, a bf16
output, as tensor cores do. Everything else (the weights, gradients, optimizer state, element-wise ops) stays as it
is. The backward pass goes through the same casts, so gradient products are fp32 sums rounded to bf16 as well.

Example:
    >>> with Bf16ProductsInFp32():
    ...     loss = bf16_model(**batch).loss  # products in fp32, results in bf16
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ['Bf16ProductsInFp32']

_PRODUCTS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.linear,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.einsum,
    }
)


def _up(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_up(item) for item in value)
    return value


def _has_bf16(values: Any) -> bool:
    return any(
        (isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16) or (isinstance(v, (list, tuple)) and _has_bf16(v))
        for v in values
    )


class Bf16ProductsInFp32(TorchFunctionMode):
    """While active, matrix products of bf16 tensors are computed in fp32 and rounded to bf16 (see the module)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _PRODUCTS and _has_bf16((*args, *kwargs.values())):
            result = func(*_up(args), **{key: _up(value) for key, value in kwargs.items()})
            return result.to(torch.bfloat16)
        return func(*args, **kwargs)
