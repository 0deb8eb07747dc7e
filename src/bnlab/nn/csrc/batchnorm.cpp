// Fused CPU kernels for bnlab's batch normalization (Ioffe & Szegedy 2015, Alg. 1).
//
// The input is viewed as (N, C, S): N examples, C channels, S = product of the spatial sizes
// (S = 1 for dense layers). Statistics are per channel, over N*S values.
//
//   forward:  mean, biased var (two passes over x: exact, no cancellation), invstd = 1/sqrt(var+eps)
//             y = (x - mean) * scale + beta, with scale = gamma*invstd                     (one pass)
//   backward: sum_dy = sum(dy), dot = sum(dy * (x - mean))                             (one pass)
//             dgamma = dot * invstd, dbeta = sum_dy
//             dx = gamma*invstd/M * (M*dy - sum_dy - xhat*dot*invstd)
//                = a*dy + b*(x - mean) + k                                               (one pass)
//             with a = gamma*invstd, b = -a*invstd^2*dot/M, k = -a*sum_dy/M.
//
// Channel-major inputs (S > 1) are split across threads by channel; dense inputs (S = 1) by
// blocks of channels for the statistics and by rows for the element-wise passes. Partial sums
// within a row are float/double SIMD lanes, sums across rows are double: the order is fixed for
// a given thread count, so results are deterministic.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 16;  // channels per task in the dense statistics passes
constexpr int64_t kMinTaskWork = 65536;  // elements below which a task is not worth a thread

// Grain for at::parallel_for over items of `work` elements each: small inputs run inline,
// because waking the thread pool costs more than it saves.
inline int64_t grain(int64_t work) { return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(work, 1)); }

template <typename T>
void collect_stats(const T* x, int64_t N, int64_t C, int64_t S, double* mean, double* var) {
  const double M = static_cast<double>(N * S);
  if (S == 1) {
    at::parallel_for(0, C, std::max(kChannelBlock, grain(N)), [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0;
      std::vector<double> sum(w, 0.0), sq(w, 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const T* row = x + n * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) sum[j] += row[j];
      }
      for (int64_t j = 0; j < w; ++j) sum[j] /= M;
      for (int64_t n = 0; n < N; ++n) {
        const T* row = x + n * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          const double d = row[j] - sum[j];
          sq[j] += d * d;
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        mean[c0 + j] = sum[j];
        var[c0 + j] = sq[j] / M;
      }
    });
    return;
  }
  at::parallel_for(0, C, grain(N * S), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double total = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t s = 0; s < S; ++s) acc += p[s];
        total += acc;
      }
      const double m = total / M;
      const T mt = static_cast<T>(m);
      double sq = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t s = 0; s < S; ++s) {
          const T d = p[s] - mt;
          acc += d * d;
        }
        sq += acc;
      }
      mean[c] = m;
      var[c] = sq / M;
    }
  });
}

// out = (x - m[c]) * a[c] + b[c]             (when dy == nullptr: the forward transform)
// out = dy * a[c] + (x - m[c]) * b[c] + k[c]  (the input gradient)
// Centring before scaling keeps full precision when |mean| >> std (no b*x vs b*mean cancellation).
template <typename T>
void affine_pass(const T* x, const T* dy, const T* m, const T* a, const T* b, const T* k, T* out,
                 int64_t N, int64_t C, int64_t S) {
  if (S == 1) {
    at::parallel_for(0, N, grain(C), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const T* xr = x + n * C;
        T* o = out + n * C;
        if (dy == nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = (xr[c] - m[c]) * a[c] + b[c];
        } else {
          const T* g = dy + n * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = g[c] * a[c] + (xr[c] - m[c]) * b[c] + k[c];
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * C, grain(S), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      const T* xp = x + p * S;
      T* o = out + p * S;
      const T mc = m[c], ac = a[c], bc = b[c];
      if (dy == nullptr) {
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) o[s] = (xp[s] - mc) * ac + bc;
      } else {
        const T* g = dy + p * S;
        const T kc = k[c];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) o[s] = g[s] * ac + (xp[s] - mc) * bc + kc;
      }
    }
  });
}

template <typename T>
void grad_sums(const T* dy, const T* x, const double* mean, int64_t N, int64_t C, int64_t S,
               double* sum_dy, double* dot) {
  if (S == 1) {
    at::parallel_for(0, C, std::max(kChannelBlock, grain(N)), [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0;
      std::vector<double> s1(w, 0.0), s2(w, 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const T* g = dy + n * C + c0;
        const T* xr = x + n * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          s1[j] += g[j];
          s2[j] += g[j] * (xr[j] - mean[c0 + j]);
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        sum_dy[c0 + j] = s1[j];
        dot[c0 + j] = s2[j];
      }
    });
    return;
  }
  at::parallel_for(0, C, grain(N * S), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T mt = static_cast<T>(mean[c]);
      double t1 = 0.0, t2 = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const T* g = dy + (n * C + c) * S;
        const T* xp = x + (n * C + c) * S;
        T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t s = 0; s < S; ++s) {
          a1 += g[s];
          a2 += g[s] * (xp[s] - mt);
        }
        t1 += a1;
        t2 += a2;
      }
      sum_dy[c] = t1;
      dot[c] = t2;
    }
  });
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "bnlab batch_norm kernel: CPU tensors only");
  TORCH_CHECK(x.dim() >= 2, "bnlab batch_norm kernel: input needs at least 2 dimensions");
}

}  // namespace

template <typename T>
const T* optional_ptr(const c10::optional<torch::Tensor>& t, torch::Tensor& holder, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return nullptr;
  holder = t->to(dtype).contiguous();
  return holder.data_ptr<T>();
}

// Returns y, mean, biased var, invstd (the statistics in the input's dtype).
// The per-channel coefficients are computed in double in plain loops: C is small, and a chain of
// tiny ATen ops would cost more than the kernels themselves on dense layers.
// When running_mean/var are given they are updated in place (Alg. 1, plus the moving averages):
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)
std::vector<torch::Tensor> forward_train(torch::Tensor x, c10::optional<torch::Tensor> weight,
                                         c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> running_mean,
                                         c10::optional<torch::Tensor> running_var, double momentum, double eps) {
  check_input(x);
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(N * C, 1);
  auto y = torch::empty_like(x);
  auto opts = x.options();
  auto mean = torch::empty({C}, opts), var = torch::empty({C}, opts), invstd = torch::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_bn_forward", [&] {
    std::vector<double> m(C), v(C);
    collect_stats<scalar_t>(x.data_ptr<scalar_t>(), N, C, S, m.data(), v.data());
    torch::Tensor wh, bh;
    const scalar_t* w = optional_ptr<scalar_t>(weight, wh, x.scalar_type());
    const scalar_t* b = optional_ptr<scalar_t>(bias, bh, x.scalar_type());
    std::vector<scalar_t> scale(C), shift(C);
    auto* mp = mean.data_ptr<scalar_t>();
    auto* vp = var.data_ptr<scalar_t>();
    auto* ip = invstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double is = 1.0 / std::sqrt(v[c] + eps);
      scale[c] = static_cast<scalar_t>(w ? w[c] * is : is);
      shift[c] = static_cast<scalar_t>(b ? b[c] : 0.0);
      mp[c] = static_cast<scalar_t>(m[c]);
      vp[c] = static_cast<scalar_t>(v[c]);
      ip[c] = static_cast<scalar_t>(is);
    }
    affine_pass<scalar_t>(x.data_ptr<scalar_t>(), nullptr, mp, scale.data(), shift.data(), nullptr,
                          y.data_ptr<scalar_t>(), N, C, S);
    const double M = static_cast<double>(N * S);
    if (running_mean.has_value() && running_mean->defined()) {
      TORCH_CHECK(running_mean->scalar_type() == x.scalar_type() && running_mean->is_contiguous(),
                  "running_mean must be a contiguous tensor of the input's dtype");
      auto* rm = running_mean->data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) rm[c] = static_cast<scalar_t>((1.0 - momentum) * rm[c] + momentum * m[c]);
    }
    if (running_var.has_value() && running_var->defined()) {
      TORCH_CHECK(running_var->scalar_type() == x.scalar_type() && running_var->is_contiguous(),
                  "running_var must be a contiguous tensor of the input's dtype");
      auto* rv = running_var->data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c)
        rv[c] = static_cast<scalar_t>((1.0 - momentum) * rv[c] + momentum * v[c] * M / (M - 1.0));
    }
  });
  return {y, mean, var, invstd};
}

// Inference (Alg. 2): y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, one pass.
torch::Tensor forward_eval(torch::Tensor x, torch::Tensor running_mean, torch::Tensor running_var,
                           c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias, double eps) {
  check_input(x);
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(N * C, 1);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_bn_forward_eval", [&] {
    auto rm = running_mean.to(x.scalar_type()).contiguous(), rv = running_var.to(x.scalar_type()).contiguous();
    const scalar_t* mp = rm.data_ptr<scalar_t>();
    const scalar_t* vp = rv.data_ptr<scalar_t>();
    torch::Tensor wh, bh;
    const scalar_t* w = optional_ptr<scalar_t>(weight, wh, x.scalar_type());
    const scalar_t* b = optional_ptr<scalar_t>(bias, bh, x.scalar_type());
    std::vector<scalar_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = static_cast<scalar_t>((w ? w[c] : 1.0) / std::sqrt(static_cast<double>(vp[c]) + eps));
      shift[c] = static_cast<scalar_t>(b ? b[c] : 0.0);
    }
    affine_pass<scalar_t>(x.data_ptr<scalar_t>(), nullptr, mp, scale.data(), shift.data(), nullptr,
                          y.data_ptr<scalar_t>(), N, C, S);
  });
  return y;
}

// Shared backward. With batch statistics (through_stats) the gradient also flows through the
// batch mean and variance: dx = a*dy + b*(x - mean) + k, b = -a*invstd^2*dot/M, k = -a*sum_dy/M.
// With running statistics (inference) they are constants: b = k = 0, dx = a*dy.
// Either way a = gamma*invstd, dgamma = dot*invstd, dbeta = sum_dy, dot = sum(dy*(x - mean)).
// Returns dx (undefined if !need_dx), dgamma, dbeta.
std::vector<torch::Tensor> backward_common(torch::Tensor dy, torch::Tensor x, c10::optional<torch::Tensor> weight,
                                           torch::Tensor mean, torch::Tensor invstd, bool need_dx, bool through_stats) {
  check_input(x);
  x = x.contiguous();
  dy = dy.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(N * C, 1);
  const double M = static_cast<double>(N * S);
  auto opts = x.options();
  auto dgamma = torch::empty({C}, opts), dbeta = torch::empty({C}, opts);
  torch::Tensor dx;
  if (need_dx) dx = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_bn_backward", [&] {
    auto meanc = mean.to(x.scalar_type()).contiguous();
    auto invc = invstd.to(torch::kFloat64).contiguous();
    const scalar_t* mp = meanc.data_ptr<scalar_t>();
    const double* ip = invc.data_ptr<double>();
    std::vector<double> m(mp, mp + C), sum_dy(C), dot(C);
    grad_sums<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), m.data(), N, C, S, sum_dy.data(), dot.data());
    torch::Tensor wh;
    const scalar_t* w = optional_ptr<scalar_t>(weight, wh, x.scalar_type());
    auto* dg = dgamma.data_ptr<scalar_t>();
    auto* db = dbeta.data_ptr<scalar_t>();
    std::vector<scalar_t> a(C), b(C, 0), k(C, 0);
    for (int64_t c = 0; c < C; ++c) {
      const double is = ip[c];
      dg[c] = static_cast<scalar_t>(dot[c] * is);
      db[c] = static_cast<scalar_t>(sum_dy[c]);
      const double ac = w ? w[c] * is : is;
      a[c] = static_cast<scalar_t>(ac);
      if (through_stats) {
        b[c] = static_cast<scalar_t>(-ac * is * is * dot[c] / M);
        k[c] = static_cast<scalar_t>(-ac * sum_dy[c] / M);
      }
    }
    if (need_dx) {
      affine_pass<scalar_t>(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), mp, a.data(), b.data(), k.data(),
                            dx.data_ptr<scalar_t>(), N, C, S);
    }
  });
  return {dx, dgamma, dbeta};
}

std::vector<torch::Tensor> backward_train(torch::Tensor dy, torch::Tensor x, c10::optional<torch::Tensor> weight,
                                          torch::Tensor mean, torch::Tensor invstd, bool need_dx) {
  return backward_common(dy, x, weight, mean, invstd, need_dx, true);
}

std::vector<torch::Tensor> backward_eval(torch::Tensor dy, torch::Tensor x, c10::optional<torch::Tensor> weight,
                                         torch::Tensor running_mean, torch::Tensor running_var, double eps,
                                         bool need_dx) {
  auto invstd = (running_var.to(torch::kFloat64) + eps).rsqrt();
  return backward_common(dy, x, weight, running_mean, invstd, need_dx, false);
}

// ---------------------------------------------------------------------------------------------
// The same two steps as autograd Functions in C++ (functional.py has the Python twins): calling
// them skips Python's per-call autograd overhead, which dominates on small dense layers.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Function::apply needs defined tensors, so an absent weight/bias/running stat travels as an
// empty tensor and becomes nullopt again here.
inline c10::optional<torch::Tensor> opt(const torch::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}

struct BatchNormTrainFn : public torch::autograd::Function<BatchNormTrainFn> {
  // returns {y, batch mean, biased batch var}; the statistics are not differentiable
  static variable_list forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                               torch::Tensor running_mean, torch::Tensor running_var, double momentum, double eps) {
    auto out = forward_train(x, opt(weight), opt(bias), opt(running_mean), opt(running_var), momentum, eps);
    ctx->save_for_backward({x, weight, out[1], out[3]});
    ctx->mark_non_differentiable({out[1], out[2]});
    return {out[0], out[1], out[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto r = backward_train(grads[0], saved[0], opt(saved[1]), saved[2], saved[3], ctx->needs_input_grad(0));
    return {r[0], ctx->needs_input_grad(1) ? r[1] : torch::Tensor(), ctx->needs_input_grad(2) ? r[2] : torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

struct BatchNormEvalFn : public torch::autograd::Function<BatchNormEvalFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor running_mean,
                               torch::Tensor running_var, torch::Tensor weight, torch::Tensor bias, double eps) {
    ctx->save_for_backward({x, weight, running_mean, running_var});
    ctx->saved_data["eps"] = eps;
    return forward_eval(x, running_mean, running_var, opt(weight), opt(bias), eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto r = backward_eval(grads[0], saved[0], opt(saved[1]), saved[2], saved[3], ctx->saved_data["eps"].toDouble(),
                           ctx->needs_input_grad(0));
    return {r[0], torch::Tensor(), torch::Tensor(), ctx->needs_input_grad(3) ? r[1] : torch::Tensor(),
            ctx->needs_input_grad(4) ? r[2] : torch::Tensor(), torch::Tensor()};
  }
};

inline torch::Tensor or_empty(const c10::optional<torch::Tensor>& t, const torch::Tensor& like) {
  return t.has_value() && t->defined() ? *t : torch::empty({0}, like.options());
}

variable_list train_autograd(torch::Tensor x, c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias,
                             c10::optional<torch::Tensor> running_mean, c10::optional<torch::Tensor> running_var,
                             double momentum, double eps) {
  return BatchNormTrainFn::apply(x, or_empty(weight, x), or_empty(bias, x), or_empty(running_mean, x),
                                 or_empty(running_var, x), momentum, eps);
}

torch::Tensor eval_autograd(torch::Tensor x, torch::Tensor running_mean, torch::Tensor running_var,
                            c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias, double eps) {
  return BatchNormEvalFn::apply(x, running_mean, running_var, or_empty(weight, x), or_empty(bias, x), eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train_autograd", &train_autograd, "batch norm with batch statistics, differentiable (C++ autograd)");
  m.def("eval_autograd", &eval_autograd, "batch norm with running statistics, differentiable (C++ autograd)");
  m.def("forward_train", &forward_train, "batch norm forward with batch statistics");
  m.def("backward_train", &backward_train, "batch norm backward with batch statistics");
  m.def("forward_eval", &forward_eval, "batch norm forward with running statistics");
  m.def("backward_eval", &backward_eval, "batch norm backward with running statistics");
}
