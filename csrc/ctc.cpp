// CTC forward-backward on the CPU: loss and gradient in one call, parallel over the batch.
//
// Per sequence: gather the emissions of the 2L+1 extended-label states, run the alpha
// recursion over frames (rows padded with two -inf cells in front so that s-1 and s-2 need no
// branch), then run beta backwards one row at a time and, at each frame, turn alpha * beta into
// state occupancies, sum them per distinct label and write that frame's gradient row. Log space
// throughout, with the vectorisable exp/log of fastmath.h; accumulation in float32 (float64 for
// double inputs).
#include "ctc.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "fastmath.h"

namespace omnifast {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Problem {
  int64_t batch, classes, row_stride;  // row_stride: elements between frames t and t+1 (B * C)
  int64_t target_width, blank;
  bool zero_infinity, from_logits;
  bool grad_zeroed;  // the gradient buffer starts out all zeros
};

// A zero-filled tensor for the (T, B, C) gradient. Large ones come straight from mmap, which
// hands out zeroed pages, advised to be transparent huge pages: first-touch page faults on
// 4 KiB pages otherwise cost more than the whole CTC recursion. Returns whether it is zeroed.
at::Tensor zeroed_gradient(const at::Tensor& like, bool* zeroed) {
#ifdef __linux__
  const size_t bytes = like.numel() * like.element_size();
  if (bytes >= (size_t(8) << 20)) {
    void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory != MAP_FAILED) {
      madvise(memory, bytes, MADV_HUGEPAGE);  // a hint: harmless where THP is off
      *zeroed = true;
      return at::from_blob(memory, like.sizes(), [bytes](void* ptr) { munmap(ptr, bytes); }, like.options());
    }
  }
#endif
  *zeroed = false;
  return at::empty_like(like);
}

// Extended labels of one sequence and what the recursions need to know about them.
template <typename acc_t>
struct Labels {
  std::vector<int64_t> ext;       // state -> class
  std::vector<acc_t> jump_in;     // 0 if state s may be entered from s-2, else -inf
  std::vector<acc_t> jump_out;    // 0 if state s may jump to s+2, else -inf
  std::vector<int64_t> distinct;  // the distinct label classes, sorted
  std::vector<int32_t> slot;      // state -> index into distinct (blank: distinct.size())

  Labels(const int64_t* target, int64_t length, int64_t blank) {
    const int64_t S = 2 * length + 1;
    ext.assign(S, blank);
    for (int64_t i = 0; i < length; ++i) ext[2 * i + 1] = target[i];
    jump_in.assign(S, neg_inf<acc_t>());
    jump_out.assign(S + 2, neg_inf<acc_t>());
    for (int64_t s = 2; s < S; ++s)
      if (ext[s] != blank && ext[s] != ext[s - 2]) jump_in[s] = jump_out[s - 2] = 0;
    distinct.assign(target, target + length);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    slot.resize(S);
    for (int64_t s = 0; s < S; ++s)
      slot[s] = s % 2 ? int32_t(std::lower_bound(distinct.begin(), distinct.end(), ext[s]) - distinct.begin())
                      : int32_t(distinct.size());
  }
};

// log-sum-exp of one frame's inputs (the log_softmax normaliser).
template <typename scalar_t, typename acc_t>
acc_t row_logsumexp(const scalar_t* x, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = std::max(m, acc_t(x[c]));
  const acc_t shift = m > neg_inf<acc_t>() ? m : acc_t(0);
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += fast_exp(acc_t(x[c]) - shift);
  return shift + fast_log(sum);
}

template <typename scalar_t>
void fill_row(scalar_t* row, int64_t n, scalar_t value) {
  std::fill(row, row + n, value);
}

// The alpha recursion over one sequence's emissions (frames rows of S states, row stride
// emit_stride) into `alpha`, rows of S + 2 cells whose first two are -inf padding. Returns
// log p(y|x).
template <typename acc_t>
acc_t alpha_pass(const acc_t* emit, int64_t emit_stride, int64_t frames, int64_t length,
                 const Labels<acc_t>& labels, std::vector<acc_t>& alpha) {
  const int64_t S = 2 * length + 1, W = S + 2;
  if (frames == 0) return length == 0 ? acc_t(0) : neg_inf<acc_t>();
  alpha.assign(frames * W, neg_inf<acc_t>());
  alpha[2] = emit[0];
  if (S > 1) alpha[3] = emit[1];
  const acc_t* jump_in = labels.jump_in.data();
  for (int64_t t = 1; t < frames; ++t) {
    const acc_t* __restrict__ prev = alpha.data() + (t - 1) * W + 2;
    acc_t* __restrict__ cur = alpha.data() + t * W + 2;
    const acc_t* __restrict__ e = emit + t * emit_stride;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s)
      cur[s] = logsumexp3(prev[s], prev[s - 1], prev[s - 2] + jump_in[s]) + e[s];
  }
  const acc_t* last = alpha.data() + (frames - 1) * W + 2;
  return logsumexp3(last[S - 1], S > 1 ? last[S - 2] : neg_inf<acc_t>(), neg_inf<acc_t>());
}

// The beta recursion backwards in time (two rows of S + 2 cells, the last two -inf padding).
// At each frame t, from the last down, calls on_frame(t, occupancy) with the S state
// occupancies alpha * beta / (emission * p); on_frame may overwrite emission row t.
template <typename acc_t, typename OnFrame>
void beta_pass(const acc_t* emit, int64_t emit_stride, int64_t frames, int64_t length,
               const Labels<acc_t>& labels, const std::vector<acc_t>& alpha, acc_t ll, OnFrame&& on_frame) {
  const int64_t S = 2 * length + 1, W = S + 2;
  std::vector<acc_t> beta_next(W, neg_inf<acc_t>()), beta(W, neg_inf<acc_t>()), occupancy(S);
  const acc_t* jump_out = labels.jump_out.data();
  for (int64_t t = frames - 1; t >= 0; --t) {
    {
      const acc_t* __restrict__ e = emit + t * emit_stride;
      const acc_t* __restrict__ nxt = beta_next.data();
      acc_t* __restrict__ cur = beta.data();
      if (t == frames - 1) {
        std::fill(beta.begin(), beta.end(), neg_inf<acc_t>());
        cur[S - 1] = e[S - 1];
        if (S > 1) cur[S - 2] = e[S - 2];
      } else {
#pragma omp simd
        for (int64_t s = 0; s < S; ++s)
          cur[s] = logsumexp3(nxt[s], nxt[s + 1], nxt[s + 2] + jump_out[s]) + e[s];
      }
      const acc_t* __restrict__ a = alpha.data() + t * W + 2;
      acc_t* __restrict__ occ = occupancy.data();
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const acc_t path = a[s] + cur[s];
        occ[s] = path == neg_inf<acc_t>() ? acc_t(0) : fast_exp(path - e[s] - ll);
      }
    }
    on_frame(t, occupancy.data());
    std::swap(beta, beta_next);
  }
}

template <typename scalar_t>
void ctc_sequence(const Problem& p, int64_t b, const scalar_t* inputs, const int64_t* targets,
                  int64_t frames, int64_t length, acc_type<scalar_t> grad_scale,
                  acc_type<scalar_t>* nll_out, scalar_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.classes, S = 2 * length + 1;
  const Labels<acc_t> labels(targets + b * p.target_width, length, p.blank);
  auto input_row = [&](int64_t t) { return inputs + t * p.row_stride + b * C; };
  auto grad_row = [&](int64_t t) { return grad + t * p.row_stride + b * C; };

  // Emissions of every state at every frame, log_softmax applied on the fly for logits.
  std::vector<acc_t> lse(frames, acc_t(0)), emit(frames * S), alpha;
  for (int64_t t = 0; t < frames; ++t) {
    const scalar_t* x = input_row(t);
    if (p.from_logits) lse[t] = row_logsumexp<scalar_t, acc_t>(x, C);
    acc_t* e = emit.data() + t * S;
    for (int64_t s = 0; s < S; ++s) e[s] = acc_t(x[labels.ext[s]]) - lse[t];
  }
  const acc_t ll = alpha_pass(emit.data(), S, frames, length, labels, alpha);
  const bool infeasible = ll == neg_inf<acc_t>();
  *nll_out = infeasible && p.zero_infinity ? acc_t(0) : -ll;
  if (!grad) return;
  if (infeasible) {
    const scalar_t value = p.zero_infinity ? scalar_t(0) : scalar_t(std::numeric_limits<float>::quiet_NaN());
    for (int64_t t = 0; t < frames; ++t) fill_row(grad_row(t), C, value);
    return;
  }

  std::vector<acc_t> per_label(labels.distinct.size() + 1);
  const int64_t K = labels.distinct.size();
  beta_pass(emit.data(), S, frames, length, labels, alpha, ll, [&](int64_t t, const acc_t* occ) {
    std::fill(per_label.begin(), per_label.end(), acc_t(0));
    for (int64_t s = 0; s < S; ++s) per_label[labels.slot[s]] += occ[s];
    scalar_t* g = grad_row(t);
    if (p.from_logits) {
      const scalar_t* x = input_row(t);
      const acc_t shift = lse[t];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) g[c] = scalar_t(fast_exp(acc_t(x[c]) - shift) * grad_scale);
      for (int64_t k = 0; k <= K; ++k) {
        const int64_t c = k < K ? labels.distinct[k] : p.blank;
        g[c] = scalar_t((fast_exp(acc_t(x[c]) - shift) - per_label[k]) * grad_scale);
      }
    } else {
      if (!p.grad_zeroed) fill_row(g, C, scalar_t(0));
      for (int64_t k = 0; k <= K; ++k)
        g[k < K ? labels.distinct[k] : p.blank] = scalar_t(-per_label[k] * grad_scale);
    }
  });
}

template <typename scalar_t>
void ctc_batch(const Problem& p, int64_t T, const at::Tensor& inputs, const at::Tensor& targets,
               const at::Tensor& input_lengths, const at::Tensor& target_lengths,
               const at::Tensor& grad_scale, at::Tensor& nll, at::Tensor* grad) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = inputs.data_ptr<scalar_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const int64_t* in_len = input_lengths.data_ptr<int64_t>();
  const int64_t* tgt_len = target_lengths.data_ptr<int64_t>();
  const acc_t* scale = grad ? grad_scale.data_ptr<acc_t>() : nullptr;
  acc_t* out = nll.data_ptr<acc_t>();
  scalar_t* g = grad ? grad->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      ctc_sequence<scalar_t>(p, b, x, tgt, in_len[b], tgt_len[b], scale ? scale[b] : acc_t(0), out + b, g);
      if (g && !p.grad_zeroed)  // frames past the input length get no gradient
        for (int64_t t = in_len[b]; t < T; ++t) fill_row(g + t * p.row_stride + b * p.classes, p.classes, scalar_t(0));
    }
  });
}


// One chunk row: sequence b, frame t (absolute), its V logits and its slot in the chunk.
struct ChunkRow {
  int64_t b, t, index;
};

// row <- exp(row - shift) * scale
template <typename acc_t>
void softmax_in_place(acc_t* row, int64_t n, acc_t shift, acc_t scale) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) row[c] = fast_exp(row[c] - shift) * scale;
}

template <typename F>
void for_chunk_rows(const at::Tensor& logits, int64_t t0, F&& body) {
  const int64_t B = logits.size(0), ct = logits.size(1);
  at::parallel_for(0, B * ct, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(ChunkRow{r / ct, t0 + r % ct, r});
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ctc_nll_and_grad(
    const at::Tensor& inputs, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, int64_t blank, bool zero_infinity,
    const c10::optional<at::Tensor>& grad_scale, bool from_logits) {
  TORCH_CHECK(inputs.device().is_cpu() && inputs.dim() == 3 && inputs.is_contiguous(),
              "inputs must be a contiguous (T, B, C) CPU tensor");
  TORCH_CHECK(targets.dim() == 2 && targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be padded (B, S) int64");
  TORCH_CHECK(input_lengths.scalar_type() == at::kLong && target_lengths.scalar_type() == at::kLong,
              "lengths must be int64");
  const int64_t T = inputs.size(0), B = inputs.size(1), C = inputs.size(2);
  const auto acc = inputs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Problem p{B, C, B * C, targets.size(1), blank, zero_infinity, from_logits, false};
  at::Tensor nll = at::empty({B}, inputs.options().dtype(acc));
  at::Tensor grad, scale;
  const bool want_grad = grad_scale.has_value() && grad_scale->defined();
  if (want_grad) {
    grad = zeroed_gradient(inputs, &p.grad_zeroed);
    scale = grad_scale->to(acc).contiguous();
  }
  const at::Tensor in_len = input_lengths.contiguous(), tgt_len = target_lengths.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs.scalar_type(), "omnifast_ctc", [&] {
    ctc_batch<scalar_t>(p, T, inputs, targets, in_len, tgt_len, scale, nll, want_grad ? &grad : nullptr);
  });
  return {nll, grad};
}

}  // namespace omnifast

namespace omnifast {

at::Tensor ctc_states(at::Tensor emissions, const at::Tensor& targets, const at::Tensor& input_lengths,
                      const at::Tensor& target_lengths, int64_t blank, bool want_occupancy) {
  TORCH_CHECK(emissions.dim() == 3 && emissions.is_contiguous() && emissions.device().is_cpu(),
              "emissions must be a contiguous (B, T, S) CPU tensor");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(), "targets must be int64 (B, W)");
  const int64_t B = emissions.size(0), T = emissions.size(1), S_max = emissions.size(2);
  const int64_t W = targets.size(1);
  at::Tensor ll = at::empty({B}, emissions.options());
  const at::Tensor in_len = input_lengths.contiguous(), tgt_len = target_lengths.contiguous();
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "omnifast_ctc_states", [&] {
    scalar_t* emit = emissions.data_ptr<scalar_t>();
    const int64_t* tgt = targets.data_ptr<int64_t>();
    const int64_t* frames_of = in_len.data_ptr<int64_t>();
    const int64_t* length_of = tgt_len.data_ptr<int64_t>();
    scalar_t* out = ll.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> alpha;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t frames = frames_of[b], length = length_of[b], S = 2 * length + 1;
        const Labels<scalar_t> labels(tgt + b * W, length, blank);
        scalar_t* e = emit + b * T * S_max;
        const scalar_t value = alpha_pass(e, S_max, frames, length, labels, alpha);
        out[b] = value;
        if (!want_occupancy) continue;
        if (value == neg_inf<scalar_t>()) {
          for (int64_t t = 0; t < frames; ++t) std::fill(e + t * S_max, e + t * S_max + S, scalar_t(0));
          continue;
        }
        beta_pass(e, S_max, frames, length, labels, alpha, value, [&](int64_t t, const scalar_t* occ) {
          std::copy(occ, occ + S, e + t * S_max);
        });
      }
    });
  });
  return ll;
}

at::Tensor chunk_emissions(const at::Tensor& logits, int64_t t0, const at::Tensor& input_lengths,
                           const std::vector<at::Tensor>& exts, const std::vector<at::Tensor>& target_lengths,
                           std::vector<at::Tensor> emissions) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "logits must be a contiguous (B, t, V) chunk");
  TORCH_CHECK(exts.size() == target_lengths.size() && exts.size() == emissions.size(), "one ext, length and output per target set");
  const int64_t V = logits.size(2);
  at::Tensor lse = at::zeros({logits.size(0), logits.size(1)}, logits.options());
  const int64_t* frames_of = input_lengths.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "omnifast_chunk_emissions", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* lse_out = lse.data_ptr<scalar_t>();
    for_chunk_rows(logits, t0, [&](ChunkRow r) {
      if (r.t >= frames_of[r.b]) return;
      const scalar_t* row = x + r.index * V;
      const scalar_t norm = row_logsumexp<scalar_t, scalar_t>(row, V);
      lse_out[r.index] = norm;
      for (size_t k = 0; k < exts.size(); ++k) {
        const int64_t S_max = exts[k].size(1), T = emissions[k].size(1);
        const int64_t S = 2 * target_lengths[k].data_ptr<int64_t>()[r.b] + 1;
        const int64_t* ext = exts[k].data_ptr<int64_t>() + r.b * S_max;
        scalar_t* e = emissions[k].data_ptr<scalar_t>() + (r.b * T + r.t) * S_max;
        for (int64_t s = 0; s < S; ++s) e[s] = row[ext[s]] - norm;
      }
    });
  });
  return lse;
}

void chunk_grad(at::Tensor logits, const at::Tensor& lse, int64_t t0, const at::Tensor& input_lengths,
                const at::Tensor& softmax_coef, const std::vector<at::Tensor>& exts,
                const std::vector<at::Tensor>& target_lengths, const std::vector<at::Tensor>& occupancies,
                const std::vector<at::Tensor>& coefs, const at::Tensor& poison) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "logits must be a contiguous (B, t, V) chunk");
  const int64_t V = logits.size(2);
  const int64_t* frames_of = input_lengths.data_ptr<int64_t>();
  const bool* poisoned = poison.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "omnifast_chunk_grad", [&] {
    scalar_t* x = logits.data_ptr<scalar_t>();
    const scalar_t* norm = lse.data_ptr<scalar_t>();
    const scalar_t* softmax_scale = softmax_coef.data_ptr<scalar_t>();
    for_chunk_rows(logits, t0, [&](ChunkRow r) {
      scalar_t* g = x + r.index * V;
      if (r.t >= frames_of[r.b] || poisoned[r.b]) {
        const scalar_t value = r.t >= frames_of[r.b] ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
        fill_row(g, V, value);
        return;
      }
      const scalar_t shift = norm[r.index], scale = softmax_scale[r.b];
      softmax_in_place(g, V, shift, scale);
      for (size_t k = 0; k < exts.size(); ++k) {
        const int64_t S_max = exts[k].size(1), T = occupancies[k].size(1);
        const int64_t S = 2 * target_lengths[k].data_ptr<int64_t>()[r.b] + 1;
        const int64_t* ext = exts[k].data_ptr<int64_t>() + r.b * S_max;
        const scalar_t* occ = occupancies[k].data_ptr<scalar_t>() + (r.b * T + r.t) * S_max;
        const scalar_t coef = coefs[k].data_ptr<scalar_t>()[r.b];
        for (int64_t s = 0; s < S; ++s) g[ext[s]] -= coef * occ[s];
      }
    });
  });
}

}  // namespace omnifast
