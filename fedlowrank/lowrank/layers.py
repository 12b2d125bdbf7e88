"""Factorized layers: ``W ≈ U @ V`` with an explicit, changeable rank.

Both layers store two 2-D factors so every rank operation (spectrum, truncation,
aggregation) is shared:

* ``LowRankLinear``: U (out, r), V (r, in); ``y = x Vᵀ Uᵀ + b``.
* ``LowRankConv2d``: U (out, r), V (r, in·kh·kw); a k×k conv with r filters followed by
  a 1×1 conv to ``out`` channels.

Rank changes are explicit calls (``set_rank``/``truncate``/``grow``); ``forward`` never
changes state. Callers owning an optimizer must remap its state afterwards
(see :func:`fedlowrank.training.optim.remap_optimizer_state`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spectrum import balanced_factors, factored_svdvals, truncate_factors


def rank_from_budget(full_rank: int, rank: int | None = None, ratio: float | None = None,
                     params: float | None = None, dims: tuple[int, int] | None = None) -> int:
    """Resolve a rank budget, in [1, full_rank]: an absolute ``rank``; a ``ratio`` of ``full_rank`` (FedLMT's
    rank ratio); or ``params``, a fraction of the dense m×n layer's parameters that the factors (m + n)·r may
    hold (``dims`` = (m, n)): r = floor(params·m·n / (m + n))."""
    if sum(x is not None for x in (rank, ratio, params)) != 1:
        raise ValueError("give exactly one of rank=, ratio= or params=")
    if rank is not None:
        if int(rank) != rank or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        return min(int(rank), full_rank)
    share = float(ratio if ratio is not None else params)  # type: ignore[arg-type]
    if not 0.0 < share <= 1.0:
        raise ValueError(f"rank ratio must be in (0, 1], got {share!r}")
    if params is not None:
        if dims is None:
            raise ValueError("params= needs the layer's dims=(m, n)")
        m, n = dims
        return max(1, min(full_rank, int(math.floor(share * m * n / (m + n) + 1e-9))))
    return max(1, min(full_rank, int(math.ceil(share * full_rank - 1e-9))))


def growth_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator for new rank slots of layer number ``index`` (layers sorted by name) made at ``step``
    (an optimizer step, or a federated round): the same on every process and after a resume."""
    return torch.Generator().manual_seed(seed * 7919 + step * 104729 + index)


def grow_factors(U: Tensor, V: Tensor, rank: int, std: float | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """U (m, r), V (r, n) padded to ``rank`` slots: new V rows random (std 1/sqrt(n) by default), new U
    columns zero, so U·V is unchanged while both get gradients (as in LoRA). The rows are drawn on the
    CPU, so a seeded generator gives identical rows on every process and device."""
    extra = rank - U.shape[1]
    std = (1.0 / math.sqrt(V.shape[1])) if std is None else std
    newV = (torch.randn(extra, V.shape[1], generator=generator) * std).to(V.device, V.dtype)
    newU = torch.zeros(U.shape[0], extra, device=U.device, dtype=U.dtype)
    return torch.cat([U, newU], 1), torch.cat([V, newV], 0)


class LowRankMixin(nn.Module):
    """Shared factor algebra. Subclasses define ``forward`` and ``weight_shape``."""

    U: nn.Parameter  # (out, r)
    V: nn.Parameter  # (r, fan_in)
    bias: nn.Parameter | None

    def _init_factors(self, out_dim: int, fan_in: int, rank: int, bias: bool, init: str, device=None,
                      dtype=None) -> None:
        """Create U (out, r), V (r, fan_in) and the bias, initialised by ``init`` (spectral|random)."""
        full = min(out_dim, fan_in)
        if not 1 <= rank <= full:
            raise ValueError(f"rank must be in [1, {full}] for a {out_dim}x{fan_in} weight, got {rank}")
        if init not in ("spectral", "random"):
            raise ValueError(f"unknown init {init!r} (spectral|random)")
        self.U = nn.Parameter(torch.empty(out_dim, rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(rank, fan_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_dim, device=device, dtype=dtype)) if bias else None
        if init == "spectral":
            self.spectral_init_()
        else:
            self.random_init_()
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    active_rank: int | None = None  # nested sub-model: forward uses only the first k slots (None: all)

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def set_active_rank(self, k: int | None) -> None:
        """Ordered dropout (FjORD): forward with the first ``k`` rank slots only, until reset with None.
        An explicit call from a training hook; parameters keep their full shape."""
        if k is not None and not 1 <= k <= self.rank:
            raise ValueError(f"active rank must be in [1, {self.rank}], got {k}")
        self.active_rank = k

    def _factors(self) -> tuple[Tensor, Tensor]:
        """(U, V) restricted to the active rank: (out, k), (k, fan_in)."""
        k = self.active_rank
        return (self.U, self.V) if k is None else (self.U[:, :k], self.V[:k])

    @property
    def full_rank(self) -> int:
        return min(self.U.shape[0], self.V.shape[1])

    def weight_2d(self) -> Tensor:
        """Dense (out, fan_in) product. For merging/tests only; training never needs it."""
        return self.U @ self.V

    # ------------------------------------------------------------------ init
    def spectral_init_(self, dense_2d: Tensor | None = None) -> None:
        """Set factors to the balanced rank-r truncated SVD of ``dense_2d`` (default: a
        fresh Kaiming-uniform dense init, i.e. spectral initialisation)."""
        out_dim, fan_in = self.U.shape[0], self.V.shape[1]
        if dense_2d is None:
            dense_2d = torch.empty(out_dim, fan_in, device=self.U.device)
            nn.init.kaiming_uniform_(dense_2d, a=math.sqrt(5))
        if tuple(dense_2d.shape) != (out_dim, fan_in):
            raise ValueError(f"dense weight shape {tuple(dense_2d.shape)} != {(out_dim, fan_in)}")
        work = dense_2d.detach().double() if dense_2d.dtype == torch.float64 else dense_2d.detach().float()
        P, S, Qh = torch.linalg.svd(work, full_matrices=False)
        U, V = balanced_factors(P, S, Qh, self.rank)
        with torch.no_grad():
            self.U.copy_(U)
            self.V.copy_(V)

    def random_init_(self) -> None:
        """Independent Gaussian factors, U ~ N(0, 1/r), V ~ N(0, 1/fan_in) (no SVD; the ablation of spectral
        initialisation)."""
        with torch.no_grad():
            nn.init.normal_(self.U, std=(1.0 / self.rank) ** 0.5)
            nn.init.normal_(self.V, std=(1.0 / self.V.shape[1]) ** 0.5)

    # ------------------------------------------------------------------ spectrum / regularisation
    def spectrum(self) -> Tensor:
        """Singular values (descending, length ≤ r) of U·V from the thin factors."""
        return factored_svdvals(self.U, self.V)

    def frobenius_decay(self) -> Tensor:
        """‖U V‖_F² = tr((UᵀU)(VVᵀ)) — differentiable, O((m+n) r²), no dense product."""
        return ((self.U.T @ self.U) * (self.V @ self.V.T)).sum()

    # ------------------------------------------------------------------ rank changes
    def set_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Truncate (optimal, via factored SVD) or grow (function unchanged) to ``rank``."""
        if rank < self.rank:
            self.truncate(rank)
        elif rank > self.rank:
            self.grow(rank, generator=generator)

    def truncate(self, rank: int) -> None:
        """Best rank-``rank`` approximation of U·V (Eckart–Young), balanced factors."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"truncate needs 1 <= rank <= {self.rank}, got {rank}")
        self._replace_factors(*truncate_factors(self.U, self.V, rank))

    def grow(self, rank: int, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Append ``rank - r`` components: new V rows random, new U columns zero, so the
        layer's function is unchanged while both get gradients (as in LoRA)."""
        if not self.rank <= rank <= self.full_rank:
            raise ValueError(f"grow needs {self.rank} <= rank <= {self.full_rank}, got {rank}")
        if rank > self.rank:
            self._replace_factors(*grow_factors(self.U.detach(), self.V.detach(), rank, std, generator))

    def _replace_factors(self, U: Tensor, V: Tensor) -> None:
        req = self.U.requires_grad
        self.U = nn.Parameter(U.to(self.U.dtype).contiguous(), requires_grad=req)
        self.V = nn.Parameter(V.to(self.V.dtype).contiguous(), requires_grad=req)

    # ------------------------------------------------------------------ accounting
    def dense_params(self) -> int:
        return self.U.shape[0] * self.V.shape[1]

    def factor_params(self) -> int:
        return self.U.numel() + self.V.numel()


class LowRankLinear(LowRankMixin):
    """Linear layer ``y = x Vᵀ Uᵀ + b``. x: (..., in) → y: (..., out)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True,
        device=None, dtype=None, init: str = "spectral",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_factors(out_features, in_features, rank, bias, init, device, dtype)
        self.use_kernel = False  # set by fedlowrank.kernels.enable_kernels

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        U, V = self._factors()
        if self.use_kernel and x.is_cuda:
            from fedlowrank.kernels import lowrank_linear

            return lowrank_linear(x, U, V, self.bias)
        return F.linear(F.linear(x, V), U, self.bias)  # (..., r) → (..., out)

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | None = None, ratio: float | None = None,
                   spectral: bool = True) -> "LowRankLinear":
        """SVD-initialised factorization of a dense ``nn.Linear`` (best rank-r approximation); ``spectral=False``:
        random factors (a skeleton whose factors are about to be replaced: no SVD)."""
        r = rank_from_budget(min(layer.out_features, layer.in_features), rank, ratio)
        new = cls(layer.in_features, layer.out_features, r, bias=layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype, init="random")
        if spectral:
            new.spectral_init_(layer.weight.data)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.data)  # type: ignore[union-attr]
        return new

    def merge(self) -> nn.Linear:
        """Dense ``nn.Linear`` computing the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_2d())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}/{self.full_rank}, bias={self.bias is not None}"


class LowRankConv2d(LowRankMixin):
    """Conv2d as a k×k conv to r channels (V) then a 1×1 conv to ``out`` (U).

    x: (N, C_in, H, W) → (N, C_out, H', W').
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], rank: int,
        stride=1, padding=0, dilation=1, bias: bool = True, padding_mode: str = "zeros",
        device=None, dtype=None, init: str = "spectral",
    ) -> None:
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError("LowRankConv2d supports padding_mode='zeros' only")
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride, self.padding, self.dilation = stride, padding, dilation
        fan_in = in_channels * ks[0] * ks[1]
        self._init_factors(out_channels, fan_in, rank, bias, init, device, dtype)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        U, V = self._factors()
        r = U.shape[1]
        h = F.conv2d(x, V.reshape(r, self.in_channels, *self.kernel_size), None,
                     self.stride, self.padding, self.dilation)  # (N, r, H', W')
        return F.conv2d(h, U.reshape(self.out_channels, r, 1, 1), self.bias)  # (N, out, H', W')

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rank: int | None = None, ratio: float | None = None,
                   spectral: bool = True) -> "LowRankConv2d":
        if layer.groups != 1:
            raise ValueError("grouped convolutions cannot be factorized")
        if isinstance(layer.padding, str):
            raise ValueError("string padding is not supported; use explicit padding")
        out_c, in_c, kh, kw = layer.weight.shape
        r = rank_from_budget(min(out_c, in_c * kh * kw), rank, ratio)
        new = cls(in_c, out_c, (kh, kw), r, layer.stride, layer.padding, layer.dilation,
                  bias=layer.bias is not None, padding_mode=layer.padding_mode,
                  device=layer.weight.device, dtype=layer.weight.dtype, init="random")
        if spectral:
            new.spectral_init_(layer.weight.data.reshape(out_c, -1))
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.data)  # type: ignore[union-attr]
        return new

    def merge(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight_2d().view(self.weight_shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def flops_per_position(self) -> int:
        return 2 * self.rank * (self.V.shape[1] + self.out_channels)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, rank={self.rank}/{self.full_rank}")
