#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace omnifast {

// Finite scalar quantisation of rows z (N, D), per dimension d: bounded = tanh(z + shift) *
// half_level - offset, q = round(bounded) (half to even), codes = q / half_width and the index
// sum_d (q + half_width) * basis (-1 for a row holding NaN). Constants are (D,) float32 (basis
// int64). Contract:
// omnifast/ops/_reference.py::fsq_forward.
std::tuple<at::Tensor, at::Tensor> fsq_forward(const at::Tensor& z, const at::Tensor& half_level,
                                               const at::Tensor& offset, const at::Tensor& shift,
                                               const at::Tensor& half_width, const at::Tensor& basis);

// Straight-through gradient: grad_z = grad_codes * half_level * (1 - tanh(z + shift)^2) / half_width.
at::Tensor fsq_backward(const at::Tensor& grad_codes, const at::Tensor& z, const at::Tensor& half_level,
                        const at::Tensor& shift, const at::Tensor& half_width);

}  // namespace omnifast
