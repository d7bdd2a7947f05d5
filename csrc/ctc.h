#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace omnifast {

// Per-sequence CTC negative log-likelihood (B,) and, when grad_scale (B,) is given, the
// gradient w.r.t. inputs (T, B, C) scaled per sequence: -gamma for log-probs, softmax - gamma
// for logits. Contract: omnifast/ops/_reference.py::ctc_nll_and_grad.
std::tuple<at::Tensor, at::Tensor> ctc_nll_and_grad(
    const at::Tensor& inputs, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, int64_t blank, bool zero_infinity,
    const c10::optional<at::Tensor>& grad_scale, bool from_logits);

// Fused linear-CTC building blocks (contracts: omnifast/ops/_reference.py).
// log p(y|x) per sequence from normalised state emissions (B, T, S); with want_occupancy the
// state occupancies overwrite the emissions (rows of infeasible sequences become 0).
at::Tensor ctc_states(at::Tensor emissions, const at::Tensor& targets, const at::Tensor& input_lengths,
                      const at::Tensor& target_lengths, int64_t blank, bool want_occupancy);

// The log_softmax normaliser of each row of a logits chunk (B, t, V) covering frames
// [t0, t0 + t), and the normalised emissions of each target set's states written into
// emissions[k] (B, T, S_k). Rows past an input length are skipped (normaliser 0).
at::Tensor chunk_emissions(const at::Tensor& logits, int64_t t0, const at::Tensor& input_lengths,
                           const std::vector<at::Tensor>& exts, const std::vector<at::Tensor>& target_lengths,
                           std::vector<at::Tensor> emissions);

// Overwrites a logits chunk with its gradient: softmax * softmax_coef[b] minus, for each
// target set k, coefs[k][b] * occupancy scattered to the state labels; 0 past the input
// length, NaN for poisoned sequences.
void chunk_grad(at::Tensor logits, const at::Tensor& lse, int64_t t0, const at::Tensor& input_lengths,
                const at::Tensor& softmax_coef, const std::vector<at::Tensor>& exts,
                const std::vector<at::Tensor>& target_lengths, const std::vector<at::Tensor>& occupancies,
                const std::vector<at::Tensor>& coefs, const at::Tensor& poison);

}  // namespace omnifast
