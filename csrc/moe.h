#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace omnifast {

// Top-k routing of N tokens from float32 gate logits (N, E), in one pass per token plus a
// counting sort over the N * k slots. Returns probs (N, E) softmax, weights (N, k) (renormalised
// to sum to 1 when normalize), experts (N, k) int64 (descending probability, ties to the lower
// index), lse (N,) logsumexp of the logits, counts (E,), offsets (E + 1,), order (N * k,) the
// slot ids n * k + j sorted by expert (stable) and position (N * k,) its inverse.
// Contract: omnifast/ops/moe.py::_route_reference.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_route(const at::Tensor& logits, int64_t top_k, bool normalize);

// out[n] = sum_j weights[n, j] * y[position[n * k + j]] (weights 1 when not given): the combine
// of each token's k expert outputs, by gather, so deterministic. y (M, O) -> (N, O).
at::Tensor moe_unpermute(const at::Tensor& y, const at::Tensor& position, const c10::optional<at::Tensor>& weights,
                         int64_t top_k);

// Gradients of moe_unpermute: grad_y[position[n * k + j]] = weights[n, j] * grad_out[n] and,
// when want_weight_grad, grad_weights[n, j] = <grad_out[n], y[position[n * k + j]]> (float32).
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& position,
    const c10::optional<at::Tensor>& weights, int64_t top_k, bool want_weight_grad);

}  // namespace omnifast
