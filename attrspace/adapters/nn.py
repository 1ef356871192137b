"""Adapter modules that replace nn.Linear / nn.Conv2d of a frozen model.

Each module is a subclass of the layer it replaces and holds the SAME weight and bias Parameter objects
(shared, never copied), so state-dict keys of the base layer stay `<name>.weight` / `<name>.bias` and an
official checkpoint still loads after injection. The adapters only wire tensors to attrspace.adapters.functional.

State dicts, by design:
- the frozen bases U, V of SubspaceLinear are Parameters with requires_grad=False, not buffers, so DDP
  never re-broadcasts them (it syncs buffers before every forward) and FSDP2's mixed precision casts them
  with the weight; their keys are `<name>.U` / `<name>.V` either way;
- a plain checkpoint (base weights only) loads into an adapted model with strict=True: a layer whose
  adapter keys are ALL absent keeps its adapter as it is (some absent and some present is still a
  missing-key error);
- a merged SubspaceLinear writes its unmerged weight into state dicts, so a state dict always means
  "W0 plus the adapter" and is never applied twice; loading into a merged layer is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrspace import backends
from attrspace.adapters.functional import subspace_linear
from attrspace.util.checks import positive_finite, positive_int, probability

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _share_base(new: nn.Module, old: nn.Module) -> None:
    """Give `new` the very Parameter objects of `old` (weight, bias) and freeze them."""
    new.weight = old.weight
    new.bias = old.bias
    new.weight.requires_grad_(False)
    if new.bias is not None:
        new.bias.requires_grad_(False)


def conv_arguments(conv: nn.Conv2d) -> dict:
    """The constructor arguments that rebuild `conv`'s geometry (no weights)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _check_basis(name: str, t: Tensor, rows: int, rank: int | None, layer: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.ndim != 2 or t.shape[0] != rows or (rank is not None and t.shape[1] != rank):
        want = f"({rows}, {'K' if rank is None else rank})"
        raise ValueError(f"{name} must have shape {want} for {layer}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    # A meta tensor has no values to check (whole-model memory accounting builds layers there).
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} for {layer} holds NaN or Inf")


def _refuse_sharded(module: nn.Module, what: str) -> None:
    """merge / delta_weight need whole tensors; FSDP2 holds shards (DTensor) of them."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters(recurse=True)):
        raise RuntimeError(
            f"{what} needs whole tensors, but this layer is sharded by FSDP2 (DTensor parameters); "
            "use attrspace.distributed.merged_state_dict(model) or save_adapter(model, folder), "
            "which gather them first"
        )


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _keep_adapter_if_absent(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
) -> None:
    """Load-state-dict pre-hook: a state dict holding none of the module's adapter keys (a plain
    checkpoint of the base layer) leaves the adapter as it is, so plain checkpoints load strictly."""
    names = module.adapter_state_keys
    if prefix + "weight" in state_dict and not any(prefix + n in state_dict for n in names):
        current = module.state_dict()
        for n in names:
            state_dict[prefix + n] = current[n]


def _refuse_load_while_merged(module, state_dict, prefix, *args) -> None:
    if module.merged:
        raise RuntimeError(
            f"cannot load a state dict into the merged SubspaceLinear {prefix.rstrip('.')!r}; "
            "unmerge() it first"
        )


class SubspaceLinear(nn.Linear):
    """y = x W0^T + b + scale * x V M^T U^T with W0, b, U, V frozen and only M (K x K) trained.

    U: (out_features, K) and V: (in_features, K) are Parameters with requires_grad=False, in the
    weight's dtype; M: (K, K) is zero at start (so the layer starts as the frozen one), float32 unless
    the weight is float64. Module-wide casts (`.to(torch.bfloat16)`, `.half()`) move M but never narrow
    it below float32, so its updates keep full precision; set `layer.M.data` yourself to train it in
    low precision. Only z = x V (T x K) is kept for backward, never x. Build it with `from_linear`.
    """

    adapter_state_keys = ("U", "V", "M")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        scale: float = 1.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        rank = positive_int("rank K", rank)
        scale = positive_finite("scale", scale)
        backends.preload(backend)  # rejects an unknown name before anything is built
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.U = _frozen(torch.zeros(out_features, rank, **factory))
        self.V = _frozen(torch.zeros(in_features, rank, **factory))
        m_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.M = nn.Parameter(torch.zeros(rank, rank, device=self.weight.device, dtype=m_dtype))
        self.scale = scale
        self.backend = backend
        self._weight_before_merge: Tensor | None = None
        self.register_state_dict_post_hook(_unmerged_weight_in_state_dict)
        self._register_load_state_dict_pre_hook(_refuse_load_while_merged, with_module=True)
        self._register_load_state_dict_pre_hook(_keep_adapter_if_absent, with_module=True)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, U: Tensor, V: Tensor, scale: float = 1.0, backend: str = "auto"
    ) -> SubspaceLinear:
        """Wrap `linear` (its weight and bias are shared and frozen) with the bases U (out, K), V (in, K)."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, (SubspaceLinear, LoRALinear)):
            raise TypeError(f"from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        layer = f"nn.Linear({linear.in_features}->{linear.out_features})"
        _check_basis("U", U, linear.out_features, None, layer)
        _check_basis("V", V, linear.in_features, U.shape[1], layer)
        module = cls(
            linear.in_features,
            linear.out_features,
            U.shape[1],
            bias=linear.bias is not None,
            scale=scale,
            backend=backend,
            device="meta",
        )
        _share_base(module, linear)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        module.U = _frozen(U.detach().to(**factory).clone(memory_format=torch.contiguous_format))
        module.V = _frozen(V.detach().to(**factory).clone(memory_format=torch.contiguous_format))
        m_dtype = torch.float64 if linear.weight.dtype == torch.float64 else torch.float32
        module.M = nn.Parameter(
            torch.zeros(U.shape[1], U.shape[1], device=factory["device"], dtype=m_dtype)
        )
        return module

    @property
    def rank(self) -> int:
        return self.M.shape[0]

    @property
    def merged(self) -> bool:
        return self._weight_before_merge is not None

    def forward(self, x: Tensor) -> Tensor:
        # No attribute is written here: torch.compile would break the graph on it (and under
        # activation checkpointing the whole checkpointed region would run eagerly).
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        y, _ = subspace_linear(
            x, self.weight, self.bias, self.U, self.V, self.M, self.scale, self.backend
        )
        return y

    def _apply(self, fn, recurse=True):
        M = self._parameters.get("M")

        def keep_m_precision(t):
            out = fn(t)
            is_m = M is not None and (t is M or t is M.grad)
            if is_m and isinstance(out, Tensor) and out.dtype in _LOW_PRECISION:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_m_precision, recurse)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """scale * U M V^T: (out_features, in_features), in float32 (float64 for float64 layers)."""
        _refuse_sharded(self, "delta_weight")
        acc = self.M.dtype if self.M.dtype == torch.float64 else torch.float32
        return self.scale * (self.U.to(acc) @ self.M.to(acc) @ self.V.to(acc).t())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight for inference (rounded once to the weight's dtype).

        A small update merged into bf16/fp16 weights is partly rounded away: that is the price of merging,
        so it is an explicit step. The original weight is kept so `unmerge` restores it bit for bit.
        """
        if self.merged:
            raise RuntimeError("layer is already merged")
        _refuse_sharded(self, "merge")
        original = self.weight.detach().clone()
        delta = self.delta_weight()
        self.weight.copy_((original.to(delta.dtype) + delta).to(original.dtype))
        self._weight_before_merge = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight saved by `merge`, exactly."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, K={self.rank}, "
            f"bias={self.bias is not None}, scale={self.scale}, backend={self.backend}"
            + (", merged" if self.merged else "")
        )


def _unmerged_weight_in_state_dict(module: SubspaceLinear, state_dict, prefix, local_metadata):
    if module.merged and prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = module._weight_before_merge.detach()


class LoRALinear(nn.Linear):
    """Standard LoRA with peft's conventions: y = x W0^T + b + (alpha / r) * dropout(x) A^T B^T.

    lora_A: nn.Linear(in, r) initialised Kaiming-uniform (a = sqrt(5)), lora_B: nn.Linear(r, out) zeros.
    """

    adapter_state_keys = ("lora_A.weight", "lora_B.weight")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        rank = positive_int("LoRA rank", rank)
        alpha = positive_finite("LoRA alpha", alpha)
        dropout = probability("LoRA dropout", dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()
        self._register_load_state_dict_pre_hook(_keep_adapter_if_absent, with_module=True)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.lora_A.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0
    ) -> LoRALinear:
        if not isinstance(linear, nn.Linear) or isinstance(linear, (SubspaceLinear, LoRALinear)):
            raise TypeError(f"from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            bias=linear.bias is not None,
            dropout=dropout,
            device="meta",
        )
        _share_base(module, linear)
        module.lora_A = nn.Linear(linear.in_features, rank, bias=False, **factory)
        module.lora_B = nn.Linear(rank, linear.out_features, bias=False, **factory)
        module.reset_lora_parameters()
        return module

    def forward(self, x: Tensor) -> Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """scaling * B A: (out_features, in_features) in float32."""
        _refuse_sharded(self, "delta_weight")
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.rank}, "
            f"alpha={self.alpha}, bias={self.bias is not None}"
        )


class LoRAConv2d(nn.Conv2d):
    """LoRA of a Conv2d (peft's layout): lora_A = Conv2d(in, r, same kernel/stride/padding/dilation),
    lora_B = Conv2d(r, out, 1); y = conv(x) + (alpha / r) * lora_B(lora_A(dropout(x)))."""

    adapter_state_keys = ("lora_A.weight", "lora_B.weight")

    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> None:
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"LoRAConv2d wraps a plain nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"LoRA of a grouped convolution (groups={conv.groups}) is not supported"
            )
        rank = positive_int("LoRA rank", rank)
        alpha = positive_finite("LoRA alpha", alpha)
        dropout = probability("LoRA dropout", dropout)
        super().__init__(**conv_arguments(conv), device="meta")
        _share_base(self, conv)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Conv2d(
            conv.in_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            **factory,
        )
        self.lora_B = nn.Conv2d(rank, conv.out_channels, 1, bias=False, **factory)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self._register_load_state_dict_pre_hook(_keep_adapter_if_absent, with_module=True)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0
    ) -> LoRAConv2d:
        return cls(conv, rank, alpha, dropout)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """scaling * B A as one kernel (out, in, kh, kw) in float32: B is 1x1, so it composes with A."""
        _refuse_sharded(self, "delta_weight")
        b = self.lora_B.weight.flatten(1).float()
        a = self.lora_A.weight.flatten(1).float()
        return (self.scaling * (b @ a)).reshape(self.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        base = super().forward(x)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # Added in place so the result keeps the base convolution's exact strides: out of place,
        # a channels_last (N, C, 1, 1) map comes back NCHW-strided, and the next convolution may
        # then take another kernel (other rounding) than without the adapter. The convolution's
        # backward needs its input, not its output, so the in-place add is safe for autograd.
        return base.add_(delta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.rank}, alpha={self.alpha}"


ADAPTER_TYPES = (SubspaceLinear, LoRALinear, LoRAConv2d)
