// Finite scalar quantisation on the CPU: one pass over the rows (parallel), each row's D values
// bounded, rounded, scaled and folded into the row's code index.
#include "fsq.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace omnifast {
namespace {

void check_constants(const at::Tensor& z, std::initializer_list<const at::Tensor*> constants) {
  TORCH_CHECK(z.dim() == 2, "z must be (N, D)");
  for (const at::Tensor* c : constants) {
    TORCH_CHECK(c->dim() == 1 && c->numel() == z.size(1), "FSQ constants must be (D,)");
  }
}

std::vector<float> as_vector(const at::Tensor& t) {
  const at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fsq_forward(const at::Tensor& z_in, const at::Tensor& half_level,
                                               const at::Tensor& offset, const at::Tensor& shift,
                                               const at::Tensor& half_width, const at::Tensor& basis_in) {
  check_constants(z_in, {&half_level, &offset, &shift, &half_width, &basis_in});
  const at::Tensor z = z_in.contiguous();
  const int64_t N = z.size(0), D = z.size(1);
  auto codes = at::empty_like(z);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  const std::vector<float> hl = as_vector(half_level), off = as_vector(offset), sh = as_vector(shift),
                           hw = as_vector(half_width);
  const at::Tensor basis = basis_in.to(at::kLong).contiguous();
  const int64_t* b = basis.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "omnifast_fsq_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = z.data_ptr<scalar_t>();
    scalar_t* out = codes.data_ptr<scalar_t>();
    int64_t* idx = indices.data_ptr<int64_t>();
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        int64_t index = 0;
        bool nan = false;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t bounded = std::tanh(acc_t(src[n * D + d]) + acc_t(sh[d])) * acc_t(hl[d]) - acc_t(off[d]);
          const acc_t q = std::nearbyint(bounded);  // the default rounding mode: half to even
          out[n * D + d] = scalar_t(q / acc_t(hw[d]));
          if (std::isnan(q)) {  // NaN has no integer value: the row's index is -1
            nan = true;
            continue;
          }
          index += (int64_t(q) + int64_t(hw[d])) * b[d];
        }
        idx[n] = nan ? -1 : index;
      }
    });
  });
  return {codes, indices};
}

at::Tensor fsq_backward(const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& half_level,
                        const at::Tensor& shift, const at::Tensor& half_width) {
  check_constants(z_in, {&half_level, &shift, &half_width});
  const at::Tensor z = z_in.contiguous(), grad = grad_in.contiguous();
  const int64_t N = z.size(0), D = z.size(1);
  auto grad_z = at::empty_like(z);
  const std::vector<float> hl = as_vector(half_level), sh = as_vector(shift), hw = as_vector(half_width);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "omnifast_fsq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = z.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* out = grad_z.data_ptr<scalar_t>();
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t d = 0; d < D; ++d) {
          const acc_t t = std::tanh(acc_t(src[n * D + d]) + acc_t(sh[d]));
          out[n * D + d] = scalar_t(acc_t(g[n * D + d]) * acc_t(hl[d]) * (1 - t * t) / acc_t(hw[d]));
        }
      }
    });
  });
  return grad_z;
}

}  // namespace omnifast
