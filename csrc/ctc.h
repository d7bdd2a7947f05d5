#pragma once

#include <torch/extension.h>

#include <tuple>

namespace omnifast {

// Per-sequence CTC negative log-likelihood (B,) and, when grad_scale (B,) is given, the
// gradient w.r.t. inputs (T, B, C) scaled per sequence: -gamma for log-probs, softmax - gamma
// for logits. Contract: omnifast/ops/_reference.py::ctc_nll_and_grad.
std::tuple<at::Tensor, at::Tensor> ctc_nll_and_grad(
    const at::Tensor& inputs, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, int64_t blank, bool zero_infinity,
    const c10::optional<at::Tensor>& grad_scale, bool from_logits);

}  // namespace omnifast
