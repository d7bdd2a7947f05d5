// MoE routing and combine on the CPU. Routing: per token (parallel) a float32 softmax over the
// experts and k passes of argmax (k is small; ties go to the lower index), then a counting sort
// of the N * k slots by expert, which is stable and O(N * k). Combine: one output row per token
// gathered from its k expert rows, so no two threads write the same row.
#include "moe.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace omnifast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_route(const at::Tensor& logits_in, int64_t top_k, bool normalize) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat, "logits must be (N, E) float32");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(0), E = logits.size(1), k = top_k;
  TORCH_CHECK(k >= 1 && k <= E, "top_k must be in [1, E]");
  auto probs = at::empty({N, E}, logits.options());
  auto weights = at::empty({N, k}, logits.options());
  auto lse = at::empty({N}, logits.options());
  auto experts = at::empty({N, k}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  float* p = probs.data_ptr<float>();
  float* w = weights.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  int64_t* ex = experts.data_ptr<int64_t>();

  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> remaining(E);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = x + n * E;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) top = std::max(top, row[e]);
      float total = 0.f;
      for (int64_t e = 0; e < E; ++e) total += (p[n * E + e] = std::exp(row[e] - top));
      // NaN (a NaN or infinite logit makes the whole row NaN) ranks below every probability and
      // above a chosen expert, so a NaN row still picks k distinct experts, the lowest first
      for (int64_t e = 0; e < E; ++e) {
        const float prob = (p[n * E + e] /= total);
        remaining[e] = std::isnan(prob) ? -1.f : prob;
      }
      l[n] = top + std::log(total);
      float chosen = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = 0;
        for (int64_t e = 1; e < E; ++e) {
          if (remaining[e] > remaining[best]) best = e;  // strict: ties keep the lower index
        }
        ex[n * k + j] = best;
        chosen += (w[n * k + j] = p[n * E + best]);
        remaining[best] = -2.f;  // below every probability and every NaN
      }
      if (normalize) {
        for (int64_t j = 0; j < k; ++j) w[n * k + j] /= chosen;
      }
    }
  });

  auto counts = at::zeros({E}, experts.options());
  auto offsets = at::empty({E + 1}, experts.options());
  auto order = at::empty({N * k}, experts.options());
  auto position = at::empty({N * k}, experts.options());
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t slot = 0; slot < N * k; ++slot) ++c[ex[slot]];
  o[0] = 0;
  for (int64_t e = 0; e < E; ++e) o[e + 1] = o[e] + c[e];
  std::vector<int64_t> next(o, o + E);
  int64_t* ord = order.data_ptr<int64_t>();
  int64_t* pos = position.data_ptr<int64_t>();
  for (int64_t slot = 0; slot < N * k; ++slot) {
    const int64_t at = next[ex[slot]]++;
    ord[at] = slot;
    pos[slot] = at;
  }
  return {probs, weights, experts, lse, counts, offsets, order, position};
}

namespace {

void check_combine_args(const at::Tensor& rows, const at::Tensor& position,
                        const c10::optional<at::Tensor>& weights, int64_t k) {
  TORCH_CHECK(rows.dim() == 2, "expert outputs must be 2-D");
  TORCH_CHECK(position.dim() == 1 && position.scalar_type() == at::kLong, "position must be 1-D int64");
  TORCH_CHECK(k >= 1 && position.numel() % k == 0, "position must hold N * top_k slots");
  if (weights.has_value()) {
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->numel() == position.numel(),
                "weights must be (N, top_k) float32");
  }
}

// A dot product the compiler may vectorise (pragmas cannot sit inside the dispatch macro).
template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t size) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < size; ++i) total += acc_t(a[i]) * acc_t(b[i]);
  return total;
}

}  // namespace

at::Tensor moe_unpermute(const at::Tensor& y_in, const at::Tensor& position_in,
                         const c10::optional<at::Tensor>& weights_in, int64_t top_k) {
  check_combine_args(y_in, position_in, weights_in, top_k);
  const at::Tensor y = y_in.contiguous(), position = position_in.contiguous();
  const at::Tensor weights = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  const int64_t k = top_k, N = position.numel() / k, O = y.size(1);
  auto out = at::empty({N, O}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "omnifast_moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = y.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t* pos = position.data_ptr<int64_t>();
    const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(O);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* row = src + pos[n * k + j] * O;
          const acc_t scale = w ? acc_t(w[n * k + j]) : acc_t(1);
          for (int64_t i = 0; i < O; ++i) acc[i] += scale * acc_t(row[i]);
        }
        for (int64_t i = 0; i < O; ++i) dst[n * O + i] = scalar_t(acc[i]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& position_in,
    const c10::optional<at::Tensor>& weights_in, int64_t top_k, bool want_weight_grad) {
  check_combine_args(grad_in, position_in, weights_in, top_k);
  const at::Tensor grad = grad_in.contiguous(), position = position_in.contiguous();
  const at::Tensor weights = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  const at::Tensor y = want_weight_grad ? y_in.contiguous() : at::Tensor();
  const int64_t k = top_k, N = position.numel() / k, O = grad.size(1);
  auto grad_y = at::empty({N * k, O}, grad.options());
  auto grad_w = want_weight_grad ? at::empty({N, k}, grad.options().dtype(at::kFloat)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "omnifast_moe_unpermute_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const int64_t* pos = position.data_ptr<int64_t>();
    const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
    const scalar_t* src = want_weight_grad ? y.data_ptr<scalar_t>() : nullptr;
    float* gw = want_weight_grad ? grad_w.data_ptr<float>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* g_row = g + n * O;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t at = pos[n * k + j];
          const acc_t scale = w ? acc_t(w[n * k + j]) : acc_t(1);
          scalar_t* out_row = gy + at * O;
          for (int64_t i = 0; i < O; ++i) out_row[i] = scalar_t(scale * acc_t(g_row[i]));
          if (gw) {
            const scalar_t* y_row = src + at * O;
            gw[n * k + j] = float(dot<scalar_t, acc_t>(g_row, y_row, O));
          }
        }
      }
    });
  });
  return {grad_y, grad_w};
}

}  // namespace omnifast
