// The CPU expert MLP of kernels/expert_mlp.py in C++: per expert (or per chunk of a large expert),
// gather -> GEMM -> one fused activation-and-gate-weight pass -> GEMM -> scatter-add, and the
// backward in the same order. The GEMMs are at::mm_out / addmm_ on views, i.e. the BLAS sgemm that
// torch.mm calls; the elementwise passes are single loops over at::vec::Vectorized<float>; the
// gathers and scatters are row copies. Nothing goes back to Python between two GEMMs, and every
// buffer holds one chunk. How the threads share the experts: see Plan.
//
// Layout (row-major, contiguous, fp32): x [M, d]; row_index [N] int64 (grouped row i reads and
// writes x row row_index[i]); row_weight [N]; offsets [E] int32, cumulative group ends;
// w1, w3 [E, d, f]; w2 [E, f, d]. Activation: 0 SwiGLU silu(h1) * h3, 1 GELU (erf), 2 ReLU.
// check_inputs rejects shapes and indices that do not fit; kernels/expert_mlp.py passes only fp32
// contiguous tensors.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/vec.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int kSwiGLU = 0, kGELU = 1, kReLU = 2;

// c = a @ b (beta 0) or c += a @ b (beta 1) on views: the BLAS call torch.mm makes.
void mm(const at::Tensor& a, const at::Tensor& b, float beta, at::Tensor c) {
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b);
  }
}

// dst[i, :] = src[index[i], :] for i < n.
void gather_rows(const float* src, const int64_t* index, int64_t n, int64_t width, float* dst) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + i * width, src + index[i] * width, width * sizeof(float));
    }
  });
}

// dst[index[i], :] += src[i, :] for i < n. Threads split the columns, not the rows, so rows that
// share a destination (the operator allows it even within one expert) never race.
void scatter_add_rows(const float* src, const int64_t* index, int64_t n, int64_t width, float* dst) {
  const int64_t lanes = Vec::size();
  const int64_t pieces = (width + lanes - 1) / lanes;
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * lanes, c1 = std::min(width, end * lanes);
    for (int64_t i = 0; i < n; ++i) {
      float* out = dst + index[i] * width;
      const float* in = src + i * width;
      for (int64_t c = c0; c < c1; c += lanes) {
        const int64_t count = std::min(lanes, c1 - c);
        (Vec::loadu(out + c, count) + Vec::loadu(in + c, count)).store(out + c, count);
      }
    }
  });
}

inline Vec sigmoid(const Vec& v) { return Vec(1.0f) / (Vec(1.0f) + v.neg().exp()); }

// Forward elementwise pass over one chunk [n, f]: act = activation(h1[, h3]) * weight[row].
void activation_forward(int activation, const float* h1, const float* h3, const float* weight, int64_t n,
                        int64_t f, float* act) {
  const int64_t lanes = Vec::size();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Vec w(weight[i]);
      for (int64_t j = 0; j < f; j += lanes) {
        const int64_t count = std::min(lanes, f - j), at = i * f + j;
        const Vec a = Vec::loadu(h1 + at, count);
        Vec out;
        if (activation == kSwiGLU) {
          out = a * sigmoid(a) * Vec::loadu(h3 + at, count);
        } else if (activation == kGELU) {
          out = Vec(0.5f) * a * (Vec(1.0f) + (a * Vec(float(M_SQRT1_2))).erf());
        } else {
          out = at::vec::maximum(a, Vec(0.0f));
        }
        (out * w).store(act + at, count);
      }
    }
  });
}

// Backward elementwise pass over one chunk. In: grad_act [n, f] = d loss / d (weight * act), h1, h3.
// Out: grad_weight[i] = sum_j grad_act * act (if requested), weighted_act = act * weight (if
// requested, for w2's gradient), grad_h1 written over grad_act, grad_h3 (SwiGLU).
void activation_backward(int activation, float* grad_act, const float* h1, const float* h3, const float* weight,
                         int64_t n, int64_t f, float* grad_weight, float* weighted_act, float* grad_h3) {
  const int64_t lanes = Vec::size();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Vec w(weight[i]);
      Vec dot(0.0f);
      for (int64_t j = 0; j < f; j += lanes) {
        const int64_t count = std::min(lanes, f - j), at = i * f + j;
        const Vec a = Vec::loadu(h1 + at, count);
        const Vec g = Vec::loadu(grad_act + at, count);
        Vec act, grad_a;
        if (activation == kSwiGLU) {
          const Vec h = Vec::loadu(h3 + at, count);
          const Vec sig = sigmoid(a);
          const Vec silu = a * sig;
          act = silu * h;
          const Vec gw = g * w;
          (gw * silu).store(grad_h3 + at, count);
          grad_a = gw * h * sig * (Vec(1.0f) + a * (Vec(1.0f) - sig));
        } else if (activation == kGELU) {
          const Vec cdf = Vec(0.5f) * (Vec(1.0f) + (a * Vec(float(M_SQRT1_2))).erf());
          const Vec pdf = (a * a * Vec(-0.5f)).exp() * Vec(float(0.5 * M_2_SQRTPI * M_SQRT1_2));
          act = a * cdf;
          grad_a = g * w * (cdf + a * pdf);
        } else {
          act = at::vec::maximum(a, Vec(0.0f));
          grad_a = Vec::blendv(Vec(0.0f), g * w, a > Vec(0.0f));
        }
        if (grad_weight != nullptr) {
          // Partial loads zero the lanes past count, so the tail adds nothing.
          dot = dot + g * act;
        }
        if (weighted_act != nullptr) {
          (act * w).store(weighted_act + at, count);
        }
        grad_a.store(grad_act + at, count);
      }
      if (grad_weight != nullptr) {
        float lanes_out[Vec::size()];
        dot.store(lanes_out);
        float sum = 0.0f;
        for (int64_t l = 0; l < lanes; ++l) sum += lanes_out[l];
        grad_weight[i] = sum;
      }
    }
  });
}

// Work units: runs of rows of one expert, at most `rows` rows each, experts in order.
struct Chunk {
  int64_t expert, start, end;
  int64_t rows() const { return end - start; }
};

std::vector<Chunk> chunks_of(const at::Tensor& offsets, int64_t rows) {
  std::vector<Chunk> chunks;
  const int32_t* ends = offsets.data_ptr<int32_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < offsets.size(0); ++e) {
    for (int64_t s = start; s < ends[e]; s += rows) chunks.push_back({e, s, std::min<int64_t>(ends[e], s + rows)});
    start = std::max<int64_t>(start, ends[e]);
  }
  return chunks;
}

// How the threads share the work. Unit-parallel: each thread runs whole units on its own
// (single-threaded GEMMs, per-thread buffers, one parallel region per call), and the scattered
// outputs go to per-thread [M, d] accumulators summed at the end in thread order. Otherwise the
// units run one after another and every GEMM and loop uses all threads. Many small experts gain
// most from the first: no fork and join around every GEMM.
//
// Determinism: which thread runs which unit, and in what order, is decided before the parallel
// region from the unit sizes alone (deal_units), never by which thread happens to be free first.
// A token's contributions are therefore summed in the same order on every run at a given thread
// count, and the same inputs give bitwise the same outputs and gradients.
struct Plan {
  int threads;
  bool unit_parallel;
  std::vector<std::vector<int64_t>> units_of_thread;  // unit-parallel only: each thread's units, in order
};

// Deal the units out largest first (ties: lower unit index first), each to the least loaded thread
// (ties: lower thread index). Returns each thread's units in the order it runs them.
std::vector<std::vector<int64_t>> deal_units(const std::vector<int64_t>& sizes, int threads) {
  std::vector<int64_t> order(sizes.size());
  for (size_t u = 0; u < sizes.size(); ++u) order[u] = u;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  std::vector<std::vector<int64_t>> units_of_thread(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t u : order) {
    const int t = int(std::min_element(load.begin(), load.end()) - load.begin());
    load[t] += sizes[u];
    units_of_thread[t].push_back(u);
  }
  return units_of_thread;
}

// mode: 1 unit-parallel, 0 one unit after another, -1 choose. The choice is unit-parallel when
// - dealing the units out (deal_units) leaves no thread more than 1.15 times its share of the rows
//   (with a skewed routing one thread would be left alone with a big expert while the others
//   wait), and
// - the other threads' [M, d] accumulators (accumulator_floats each) together take no more memory
//   than budget_floats, the [N, f] hidden activation the forward keeps anyway (that memory grows
//   with the thread count, so a many-core machine runs each GEMM on all threads instead).
Plan plan_for(const std::vector<int64_t>& sizes, int64_t mode, int64_t accumulator_floats, int64_t budget_floats) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1 || mode == 0) return {1, false, {}};
  auto units_of_thread = deal_units(sizes, threads);
  if (mode != 1) {
    int64_t total = 0, busiest = 0;
    for (const auto& units : units_of_thread) {
      int64_t load = 0;
      for (int64_t u : units) load += sizes[u];
      total += load;
      busiest = std::max(busiest, load);
    }
    const bool balanced = busiest * threads * 100 <= total * 115;
    const bool fits = (threads - 1) * accumulator_floats <= budget_floats;
    if (!(balanced && fits)) return {threads, false, {}};
  }
  return {threads, true, std::move(units_of_thread)};
}

// Runs body(unit, thread) for every unit: each thread its own dealt units, or all in order.
template <typename Body>
void for_each_unit(const Plan& plan, const std::vector<int64_t>& sizes, const Body& body) {
  if (!plan.unit_parallel) {
    for (int64_t u = 0; u < int64_t(sizes.size()); ++u) body(u, 0);
    return;
  }
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_lock;
  const at::ThreadLocalState state;  // grad mode and the rest are per thread: carry the caller's over
#pragma omp parallel num_threads(plan.threads)
  {
    at::ThreadLocalStateGuard guard(state);
    const int thread = omp_get_thread_num();
    // OpenMP may give the region fewer threads than asked: thread t then also runs the units dealt
    // to t + team, t + 2 * team, ... (still a fixed assignment, so still deterministic).
    const int team = omp_get_num_threads();
    for (int owner = thread; owner < plan.threads && !failed; owner += team) {
      for (int64_t u : plan.units_of_thread[owner]) {
        if (failed) break;
        try {
          body(u, owner);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_lock);
          if (!error) error = std::current_exception();
          failed = true;
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// [M, d] per-thread scatter targets: thread 0 writes `out` itself, the others a zeroed buffer each.
struct Accumulators {
  at::Tensor out;
  std::vector<at::Tensor> extra;

  Accumulators(const at::Tensor& out, const Plan& plan) : out(out) {
    if (plan.unit_parallel)
      for (int t = 1; t < plan.threads; ++t) extra.push_back(at::zeros_like(out));
  }
  float* target(int thread) { return thread == 0 ? out.data_ptr<float>() : extra[thread - 1].data_ptr<float>(); }
  void reduce() {
    for (const auto& buffer : extra) out.add_(buffer);
  }
};

// One clear error for inputs the raw-pointer loops would otherwise read out of bounds.
void check_inputs(const at::Tensor& x, const at::Tensor& row_index, const at::Tensor& weight,
                  const at::Tensor& offsets, const at::Tensor& w1, const c10::optional<at::Tensor>& w3,
                  const at::Tensor& w2, int64_t activation, int64_t chunk_rows) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3, "expert_mlp: expected x [M, d], w1 [E, d, f], w2 [E, f, d]");
  const int64_t d = x.size(1), experts = w1.size(0), f = w1.size(2), n = row_index.size(0);
  TORCH_CHECK(w1.size(1) == d && w2.size(0) == experts && w2.size(1) == f && w2.size(2) == d,
              "expert_mlp: w1 ", w1.sizes(), " and w2 ", w2.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK(activation >= kSwiGLU && activation <= kReLU, "expert_mlp: unknown activation code ", activation);
  TORCH_CHECK((activation == kSwiGLU) == w3.has_value(), "expert_mlp: w3 is required for SwiGLU only");
  TORCH_CHECK(!w3.has_value() || w3->sizes() == w1.sizes(), "expert_mlp: w3 ", w3.has_value() ? w3->sizes() : w1.sizes(),
              " differs from w1 ", w1.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "expert_mlp: row_weight must be [N=", n, "]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == experts, "expert_mlp: offsets must be [E=", experts, "]");
  TORCH_CHECK(chunk_rows >= 1, "expert_mlp: chunk_rows must be positive, got ", chunk_rows);
  const int32_t* ends = offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(ends[e] >= (e ? ends[e - 1] : 0) && ends[e] <= n, "expert_mlp: offsets must be non-decreasing "
                "cumulative group ends within 0..N=", n, "; offsets[", e, "] = ", ends[e]);
  }
  const int64_t* index = row_index.data_ptr<int64_t>();
  const int64_t rows = x.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(index[i] >= 0 && index[i] < rows, "expert_mlp: row_index[", i, "] = ", index[i],
                " is outside x's ", rows, " rows");
  }
}

// Returns (out [M, d], h1 [N, f], h3 [N, f] or an empty tensor).
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& row_index, const at::Tensor& weight,
                                const at::Tensor& offsets, const at::Tensor& w1, const c10::optional<at::Tensor>& w3,
                                const at::Tensor& w2, int64_t activation, int64_t chunk_rows, int64_t mode) {
  at::NoGradGuard no_grad;  // the autograd Function around this op differentiates it
  check_inputs(x, row_index, weight, offsets, w1, w3, w2, activation, chunk_rows);
  const int64_t d = x.size(1), f = w1.size(2), n_rows = row_index.size(0);
  const bool swiglu = activation == kSwiGLU;
  auto h1_all = at::empty({n_rows, f}, x.options());
  auto h3_all = swiglu ? at::empty({n_rows, f}, x.options()) : at::empty({0}, x.options());
  const auto chunks = chunks_of(offsets, chunk_rows);
  std::vector<int64_t> sizes;
  int64_t widest = 0;
  for (const auto& c : chunks) sizes.push_back(c.rows()), widest = std::max(widest, c.rows());
  const Plan plan = plan_for(sizes, mode, x.numel(), n_rows * f);
  const int buffers = plan.unit_parallel ? plan.threads : 1;
  auto rows_d = at::empty({buffers, widest, d}, x.options());
  auto rows_f = at::empty({buffers, widest, f}, x.options());
  Accumulators out(at::zeros_like(x), plan);

  const float *px = x.data_ptr<float>(), *pw = weight.data_ptr<float>();
  const int64_t* index = row_index.data_ptr<int64_t>();
  float *h1 = h1_all.data_ptr<float>(), *h3 = swiglu ? h3_all.data_ptr<float>() : nullptr;
  for_each_unit(plan, sizes, [&](int64_t u, int thread) {
    const Chunk& c = chunks[u];
    const int64_t n = c.rows(), e = c.expert;
    const auto x_rows = rows_d[thread].narrow(0, 0, n), act = rows_f[thread].narrow(0, 0, n);
    gather_rows(px, index + c.start, n, d, x_rows.data_ptr<float>());
    mm(x_rows, w1[e], 0.0f, h1_all.narrow(0, c.start, n));
    if (swiglu) mm(x_rows, (*w3)[e], 0.0f, h3_all.narrow(0, c.start, n));
    activation_forward(activation, h1 + c.start * f, swiglu ? h3 + c.start * f : nullptr, pw + c.start, n, f,
                       act.data_ptr<float>());
    mm(act, w2[e], 0.0f, x_rows);
    scatter_add_rows(x_rows.data_ptr<float>(), index + c.start, n, d, out.target(thread));
  });
  out.reduce();
  return {out.out, h1_all, h3_all};
}

// Called by _ExtensionExpertMLP.backward with the tensors forward saved. Writes the weight gradients
// of experts with rows into grad_w1/grad_w3/grad_w2 (the caller zeroes experts without rows); returns (grad_x or an empty tensor, grad_row_weight or an empty tensor).
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_index,
                                 const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& w1,
                                 const c10::optional<at::Tensor>& w3, const at::Tensor& w2, const at::Tensor& h1_all,
                                 const at::Tensor& h3_all, int64_t activation, bool need_x, bool need_weight,
                                 const c10::optional<at::Tensor>& grad_w1, const c10::optional<at::Tensor>& grad_w3,
                                 const c10::optional<at::Tensor>& grad_w2, int64_t chunk_rows, int64_t mode) {
  at::NoGradGuard no_grad;
  // Every other input is what forward saved after check_inputs passed; only grad_out is new.
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "expert_mlp: grad_out ", grad_out.sizes(), " differs from x ", x.sizes());
  const int64_t d = x.size(1), f = w1.size(2), n_rows = row_index.size(0);
  const bool swiglu = activation == kSwiGLU;
  const bool need_w1 = grad_w1.has_value(), need_w3 = grad_w3.has_value(), need_w2 = grad_w2.has_value();
  auto grad_weight = need_weight ? at::empty({n_rows}, x.options()) : at::empty({0}, x.options());
  // A unit is one expert (its chunks in order, later chunks accumulating into its weight gradients),
  // so no two threads ever write the same expert's gradients.
  const auto chunks = chunks_of(offsets, chunk_rows);
  std::vector<int64_t> first, sizes;
  int64_t widest = 0;
  for (int64_t i = 0; i < int64_t(chunks.size()); ++i) {
    if (i == 0 || chunks[i].expert != chunks[i - 1].expert) first.push_back(i), sizes.push_back(0);
    sizes.back() += chunks[i].rows();
    widest = std::max(widest, chunks[i].rows());
  }
  first.push_back(chunks.size());
  const Plan plan = plan_for(sizes, mode, need_x ? x.numel() : 0, n_rows * f);
  const int buffers = plan.unit_parallel ? plan.threads : 1;
  auto grad_rows = at::empty({buffers, widest, d}, x.options());  // gathered grad_out, then grad_x rows
  auto x_rows = at::empty({buffers, (need_w1 || need_w3) ? widest : 0, d}, x.options());  // gathered x
  auto grad_h1 = at::empty({buffers, widest, f}, x.options());
  auto grad_h3 = at::empty({buffers, swiglu ? widest : 0, f}, x.options());
  auto weighted_act = at::empty({buffers, need_w2 ? widest : 0, f}, x.options());
  Accumulators grad_x(need_x ? at::zeros_like(x) : at::empty({0}, x.options()), need_x ? plan : Plan{1, false, {}});

  const float *pgo = grad_out.data_ptr<float>(), *px = x.data_ptr<float>(), *pw = weight.data_ptr<float>();
  const float *h1 = h1_all.data_ptr<float>(), *h3 = swiglu ? h3_all.data_ptr<float>() : nullptr;
  const int64_t* index = row_index.data_ptr<int64_t>();
  float* pgw = need_weight ? grad_weight.data_ptr<float>() : nullptr;
  for_each_unit(plan, sizes, [&](int64_t u, int thread) {
    for (int64_t i = first[u]; i < first[u + 1]; ++i) {
      const Chunk& c = chunks[i];
      const int64_t n = c.rows(), e = c.expert;
      const float beta = i == first[u] ? 0.0f : 1.0f;  // later chunks of an expert accumulate
      const auto gy = grad_rows[thread].narrow(0, 0, n), gh1 = grad_h1[thread].narrow(0, 0, n);
      const auto gh3 = grad_h3[thread].narrow(0, 0, swiglu ? n : 0);
      const auto wact = weighted_act[thread].narrow(0, 0, need_w2 ? n : 0);
      gather_rows(pgo, index + c.start, n, d, gy.data_ptr<float>());
      mm(gy, w2[e].t(), 0.0f, gh1);  // the gradient of weight * act
      activation_backward(activation, gh1.data_ptr<float>(), h1 + c.start * f, swiglu ? h3 + c.start * f : nullptr,
                          pw + c.start, n, f, need_weight ? pgw + c.start : nullptr,
                          need_w2 ? wact.data_ptr<float>() : nullptr, swiglu ? gh3.data_ptr<float>() : nullptr);
      if (need_w2) mm(wact.t(), gy, beta, (*grad_w2)[e]);
      if (need_x) {
        mm(gh1, w1[e].t(), 0.0f, gy);  // gy is spent: the rows' input gradient goes there
        if (swiglu) mm(gh3, (*w3)[e].t(), 1.0f, gy);
        scatter_add_rows(gy.data_ptr<float>(), index + c.start, n, d, grad_x.target(thread));
      }
      if (need_w1 || need_w3) {
        const auto xr = x_rows[thread].narrow(0, 0, n);
        gather_rows(px, index + c.start, n, d, xr.data_ptr<float>());
        if (need_w1) mm(xr.t(), gh1, beta, (*grad_w1)[e]);
        if (need_w3) mm(xr.t(), gh3, beta, (*grad_w3)[e]);
      }
    }
  });
  grad_x.reduce();
  return {grad_x.out, grad_weight};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL: other Python threads (data loading, logging) go on while the experts run.
  m.def("forward", &forward, "expert MLP forward (CPU, fp32)", py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "expert MLP backward (CPU, fp32)", py::call_guard<py::gil_scoped_release>());
  m.def("chooses_unit_parallel",
        [](const std::vector<int64_t>& unit_rows, int64_t accumulator_floats, int64_t budget_floats) {
          return plan_for(unit_rows, -1, accumulator_floats, budget_floats).unit_parallel;
        },
        "whether the kernel would run units of these row counts in parallel, at torch's current thread count");
}
