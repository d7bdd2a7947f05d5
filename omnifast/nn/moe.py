"""Mixture-of-experts layers: ``MoE`` (routed through ``omnifast.ops.moe``) and ``NaiveMoE``
(a readable per-expert loop with masks, the reference). Both hold the same parameters, so their
state dicts are interchangeable.

OpenOmni's speech-decoder MoE is ``MoE(896, 3584, 3584, experts=4, top_k=None, split_tokens=4)``:
a dense softmax gate over 4 experts Linear(H, 3584) -> ReLU -> Linear(3584, 3584), whose output
is split into 4 tokens of width 896 (the layer upsamples 4x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from omnifast.ops import BACKENDS
from omnifast.ops import moe as moe_ops
from omnifast.ops.checks import check_choice, check_number, check_tensor


@dataclass
class MoEOutput:
    output: torch.Tensor  # (..., O), or (..., N * split, O / split) with split_tokens
    aux_loss: torch.Tensor  # balance_weight * balance_loss + z_weight * z_loss (float32)
    balance_loss: torch.Tensor  # unweighted Switch load-balancing loss
    z_loss: torch.Tensor  # unweighted router z-loss
    routing: moe_ops.Routing


class _MoEBase(torch.nn.Module):
    def __init__(
        self,
        hidden: int,
        ffn: int,
        out: Optional[int] = None,
        experts: int = 4,
        top_k: Optional[int] = None,
        normalize_topk: bool = True,
        activation: str = "relu",
        bias: bool = True,
        jitter: float = 0.0,
        balance_weight: float = 0.0,
        z_weight: float = 0.0,
        split_tokens: int = 1,
        backend: Optional[str] = None,
        gate_bias: bool = False,
        gemm_engine: Optional[str] = None,
    ):
        super().__init__()
        out = hidden if out is None else out
        for name, value in (
            ("hidden", hidden),
            ("ffn", ffn),
            ("out", out),
            ("experts", experts),
            ("split_tokens", split_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts):
            raise ValueError(f"top_k must be None (dense) or an int in [1, {experts}], got {top_k!r}")
        check_choice("activation", activation, moe_ops.ACTIVATIONS)
        if out % split_tokens:
            raise ValueError(f"split_tokens={split_tokens} must divide the output size {out}")
        check_number("jitter", jitter, low=0.0, high=1.0)
        check_number("balance_weight", balance_weight, low=0.0)
        check_number("z_weight", z_weight, low=0.0)
        if backend is not None:
            check_choice("backend", backend, BACKENDS)
        if gemm_engine is not None:
            check_choice("gemm_engine", gemm_engine, moe_ops.GEMM_ENGINES)
        self.backend, self.gemm_engine = backend, gemm_engine
        self.hidden, self.ffn, self.out, self.experts = hidden, ffn, out, experts
        self.top_k, self.normalize_topk, self.activation = top_k, normalize_topk, activation
        self.jitter, self.balance_weight, self.z_weight, self.split_tokens = (
            jitter,
            balance_weight,
            z_weight,
            split_tokens,
        )
        width = 2 * ffn if activation == "swiglu" else ffn
        self.gate = torch.nn.Linear(hidden, experts, bias=gate_bias)
        self.w1 = torch.nn.Parameter(torch.empty(experts, width, hidden))
        self.w2 = torch.nn.Parameter(torch.empty(experts, out, ffn))
        self.b1 = torch.nn.Parameter(torch.empty(experts, width)) if bias else None
        self.b2 = torch.nn.Parameter(torch.empty(experts, out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like a pair of ``nn.Linear`` layers."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1 / math.sqrt(w.shape[2])
            torch.nn.init.uniform_(w, -bound, bound)
            if b is not None:
                torch.nn.init.uniform_(b, -bound, bound)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A clear error naming the tensor and the config it disagrees with, instead of the
        # generic size-mismatch message.
        for name, param in self.named_parameters(recurse=True):
            key = prefix + name
            if key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"{key} has shape {tuple(state_dict[key].shape)}, but this MoE (hidden={self.hidden}, "
                    f"ffn={self.ffn}, out={self.out}, experts={self.experts}, activation={self.activation!r}) "
                    f"expects {tuple(param.shape)}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor("x", x, floating=True)
        if x.dim() == 0 or x.shape[-1] != self.hidden:
            raise ValueError(f"x must end in the hidden size {self.hidden}, got shape {tuple(x.shape)}")

    def _routing(self, flat: torch.Tensor, backend: Optional[str]) -> moe_ops.Routing:
        gate_input = flat
        if self.training and self.jitter > 0:
            gate_input = flat * torch.empty_like(flat).uniform_(1 - self.jitter, 1 + self.jitter)
        return moe_ops.route(
            gate_input,
            self.gate.weight,
            self.top_k,
            gate_bias=self.gate.bias,
            normalize=self.normalize_topk,
            backend=backend,
        )

    def _finish(self, x, y, routing) -> MoEOutput:
        y = y.reshape(*x.shape[:-1], self.out)
        if self.split_tokens > 1:  # (..., N, O) -> (..., N * split, O / split)
            y = (
                y.reshape(*x.shape[:-2], x.shape[-2] * self.split_tokens, self.out // self.split_tokens)
                if x.dim() > 1
                else y.reshape(self.split_tokens, self.out // self.split_tokens)
            )
        aux = self.balance_weight * routing.balance_loss + self.z_weight * routing.z_loss
        return MoEOutput(y, aux, routing.balance_loss, routing.z_loss, routing)

    def expert_parameters(self):
        return self.w1, self.b1, self.w2, self.b2


class NaiveMoE(_MoEBase):
    """The reference: a loop over experts, masks to pick each expert's tokens, ``index_add`` to
    combine. Same arguments and parameters as :class:`MoE`."""

    def forward(self, x: torch.Tensor) -> MoEOutput:
        self._check_input(x)
        flat = x.reshape(-1, self.hidden)
        routing = self._routing(flat, "torch")
        y = None  # in the experts' output dtype (the autocast dtype under autocast)
        for e in range(self.experts):
            hit = routing.experts == e  # (N, k)
            tokens = hit.any(-1).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            weight = (routing.weights * hit).sum(-1)[tokens]
            pre = F.linear(flat[tokens], self.w1[e], None if self.b1 is None else self.b1[e])
            out = F.linear(moe_ops.activate(pre, self.activation), self.w2[e], None if self.b2 is None else self.b2[e])
            y = out.new_zeros(flat.shape[0], self.out) if y is None else y
            y = y.index_add(0, tokens, out * weight[:, None].to(out.dtype))
        y = flat.new_zeros(flat.shape[0], self.out) if y is None else y
        return self._finish(x, y, routing)


class MoE(_MoEBase):
    """Mixture of experts: dense (``top_k=None``: every expert on every token, a dense softmax
    gate, as OpenOmni) or dropless top-k with optional renormalisation; activation relu, gelu,
    silu or swiglu; Switch balance loss and router z-loss (float32) returned with the output;
    ``split_tokens`` splits the output width into that many tokens (OpenOmni: 4); ``backend``
    picks the kernels (None: by device, see ``omnifast.ops.moe``); ``gate_bias`` gives the gate
    a bias (OpenOmni's has one); ``gemm_engine`` names the triton backend's GEMM engine (None: the
    fastest for the dtype and device)."""

    @classmethod
    def from_naive(cls, naive: NaiveMoE, backend: Optional[str] = None, gemm_engine: Optional[str] = None) -> "MoE":
        moe = cls(
            naive.hidden,
            naive.ffn,
            naive.out,
            naive.experts,
            naive.top_k,
            naive.normalize_topk,
            naive.activation,
            naive.b1 is not None,
            naive.jitter,
            naive.balance_weight,
            naive.z_weight,
            naive.split_tokens,
            backend,
            naive.gate.bias is not None,
            gemm_engine,
        )
        moe.load_state_dict(naive.state_dict())
        return moe.to(naive.w1.device, naive.w1.dtype)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        self._check_input(x)
        flat = x.reshape(-1, self.hidden)
        routing = self._routing(flat, self.backend)
        if self.top_k is None:
            y = moe_ops.dense_experts(
                flat, routing.probs, *self.expert_parameters(), self.activation, backend=routing.backend
            )
        else:
            y = moe_ops.routed_experts(
                flat, routing, *self.expert_parameters(), self.activation, engine=self.gemm_engine
            )
        return self._finish(x, y, routing)
