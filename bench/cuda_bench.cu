// GPU timing driver for the cuda backend (issue 3). Prints one JSON line per measurement:
// cca pooling, cca attend, the whole cca forward (pool + attend), full causal attend, and
// decode steps over the compressed cache; median of CUDA-event-timed repetitions. With --bwd,
// the cca backward too (delta, attention backward, pooling backward; float32 gradients), its
// parts, and forward + backward; useful FLOPs of the backward count 2.5x the forward's.
//   cca_cuda_bench [--t-list 4096,16384] [--heads 32:32,32:8] [--decode-ctx 32768,131072]
//                  [--decode-batch 1,8] [--ragged 131072,98304,...] [--reps 5] [--skip-full]
//                  [--bwd]
// Shapes: B=1 prefill, D=128, bf16, g=16, s=1024 (issue 3's benchmark grid).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cca/cca.hpp"

namespace {

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// Normal-ish bf16 values from a hash (never zeros; no host round trip for GBs of inputs).
__global__ void fill_kernel(__nv_bfloat16* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    // Sum of 4 uniforms: mean 0, variance 1/3 * 4 / 4 ~ roughly normal, std ~0.58 -> scale to 1.
    float s = 0.f;
    for (int k = 0; k < 4; ++k) s += float((z >> (16 * k)) & 0xffff) / 65535.f - 0.5f;
    p[i] = __float2bfloat16(s * 1.732f);
  }
}

struct Buf {
  void* p = nullptr;
  int64_t bytes = 0;
  explicit Buf(int64_t b, uint64_t seed = 0) : bytes(b) {
    CHECK(cudaMalloc(&p, size_t(b)));
    if (seed) fill_kernel<<<2048, 256>>>(static_cast<__nv_bfloat16*>(p), b / 2, seed);
    CHECK(cudaGetLastError());
  }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
};

cca::TensorView view(void* p, int64_t B, int64_t T, int64_t H, int64_t D) {
  return cca::make_view(p, cca::DType::bf16, {B, T, H, D}, cca::Device::cuda);
}

double median_ms(const std::function<void()>& f, int reps) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  f();  // warm-up (module load, attribute setup)
  CHECK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    f();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Sum over query positions t of the keys each sees (the useful work).
double visible_sum(const cca::VariantSpec& v, int64_t T) {
  double s = 0;
  for (int64_t t = 0; t < T; ++t) s += double(cca::visible_keys(v, t).count());
  return s;
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> r;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ','))
    if (!x.empty()) r.push_back(std::stoll(x));  // "," alone: an empty list
  return r;
}

void emit(const std::string& op, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, double ms,
          double flops, double bytes) {
  std::printf(
      "{\"impl\": \"cca_cuda\", \"op\": \"%s\", \"B\": %lld, \"T\": %lld, \"Hq\": %lld, \"Hkv\": "
      "%lld, \"ms\": %.5f, \"tflops\": %.2f, \"gbps\": %.1f}\n",
      op.c_str(), (long long)B, (long long)T, (long long)Hq, (long long)Hkv, ms,
      flops > 0 ? flops / ms / 1e9 : 0.0, bytes > 0 ? bytes / ms / 1e6 : 0.0);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> t_list = {4096, 16384, 32768, 65536, 131072};
  std::vector<std::pair<int64_t, int64_t>> heads = {{32, 32}, {32, 8}};
  std::vector<int64_t> decode_ctx = {32768, 131072}, decode_batch = {1, 8};
  // One decode step of 8 sequences of different lengths (a serving batch).
  std::vector<int64_t> ragged = {131072, 98304, 65536, 32768, 16384, 8192, 4096, 1024};
  int reps = 5;
  bool skip_full = false, bwd = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--t-list")
      t_list = parse_list(next());
    else if (a == "--decode-ctx")
      decode_ctx = parse_list(next());
    else if (a == "--decode-batch")
      decode_batch = parse_list(next());
    else if (a == "--ragged")
      ragged = parse_list(next());
    else if (a == "--reps")
      reps = std::stoi(next());
    else if (a == "--skip-full")
      skip_full = true;
    else if (a == "--bwd")
      bwd = true;
    else if (a == "--heads") {
      heads.clear();
      for (const std::string& hp : [&] {
             std::vector<std::string> r;
             std::stringstream ss(next());
             std::string x;
             while (std::getline(ss, x, ',')) r.push_back(x);
             return r;
           }()) {
        const size_t c = hp.find(':');
        heads.push_back({std::stoll(hp.substr(0, c)), std::stoll(hp.substr(c + 1))});
      }
    } else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  const std::string why = cca::backend_unavailable_reason(cca::BackendKind::cuda);
  if (!why.empty()) {
    std::fprintf(stderr, "no CUDA GPU: %s\n", why.c_str());
    return 1;
  }
  const cca::Backend& be = cca::get_backend(cca::BackendKind::cuda, cca::Device::cuda);
  const int64_t D = 128, B = 1, g = 16, s = 1024;
  const cca::VariantSpec vc = cca::VariantSpec::cca(g, s), vf = cca::VariantSpec::full();

  for (auto [Hq, Hkv] : heads) {
    for (int64_t T : t_list) {
      Buf q(B * T * Hq * D * 2, 1), k(B * T * Hkv * D * 2, 2), v(B * T * Hkv * D * 2, 3),
          o(B * T * Hq * D * 2);
      const int64_t m = cca::core_tokens_needed(vc, T);
      Buf kc(std::max<int64_t>(1, B * m * Hkv * D * 2)),
          vcb(std::max<int64_t>(1, B * m * Hkv * D * 2));
      cca::PoolProblem pp;
      pp.q = view(q.p, B, T, Hq, D);
      pp.raw = cca::KvSegment{view(k.p, B, T, Hkv, D), view(v.p, B, T, Hkv, D), 0};
      pp.group_begin = 0;
      pp.group_end = m;
      pp.k_core = view(kc.p, B, m, Hkv, D);
      pp.v_core = view(vcb.p, B, m, Hkv, D);
      pp.variant = vc;
      pp.scale = vc.scale_for(D);
      cca::AttendProblem ap;
      ap.q = pp.q;
      ap.local = ap.sink = pp.raw;
      if (m > 0) ap.core = cca::KvSegment{pp.k_core, pp.v_core, 0};
      ap.out = view(o.p, B, T, Hq, D);
      ap.variant = vc;
      ap.scale = pp.scale;
      const int r = T >= 65536 ? std::max(3, reps / 2) : reps;
      // Pool reads K, V of m groups once, q's last rows, writes 2 m core rows.
      const double pool_bytes = double(B) * m * g * Hkv * D * 2 * 2 + double(B) * m * Hq * D * 2 +
                                2.0 * B * m * Hkv * D * 2;
      const double t_pool = median_ms([&] { be.pool(pp); }, r);
      emit("cca_pool", B, T, Hq, Hkv, t_pool, 0, pool_bytes);
      const double useful_cca = 4.0 * D * Hq * B * visible_sum(vc, T);
      const double t_att = median_ms([&] { be.attend(ap); }, r);
      emit("cca_attend", B, T, Hq, Hkv, t_att, useful_cca, 0);
      const double t_fwd = median_ms(
          [&] {
            be.pool(pp);
            be.attend(ap);
          },
          r);
      emit("cca_fwd", B, T, Hq, Hkv, t_fwd, useful_cca, 0);
      if (bwd) {
        // The forward once more with its LSE, then the backward from its out and LSE.
        Buf lse(B * Hq * T * 4), delta(B * Hq * T * 4), dout(B * T * Hq * D * 2, 4),
            dq(B * T * Hq * D * 4), dk(B * T * Hkv * D * 4), dv(B * T * Hkv * D * 4),
            dkc(std::max<int64_t>(4, B * m * Hkv * D * 4)),
            dvc(std::max<int64_t>(4, B * m * Hkv * D * 4));
        auto f32 = [](void* p, int64_t b, int64_t t, int64_t h, int64_t d) {
          return cca::make_view(p, cca::DType::f32, {b, t, h, d}, cca::Device::cuda);
        };
        cca::AttendProblem fl = ap;
        fl.lse = cca::make_view(lse.p, cca::DType::f32, {B, Hq, T}, cca::Device::cuda);
        be.pool(pp);
        be.attend(fl);
        cca::AttendBwdProblem ab;
        ab.q = ap.q;
        ab.k = pp.raw.k;
        ab.v = pp.raw.v;
        ab.k_core = pp.k_core;
        ab.v_core = pp.v_core;
        ab.out = ap.out;
        ab.dout = view(dout.p, B, T, Hq, D);
        ab.lse = fl.lse;
        ab.delta = cca::make_view(delta.p, cca::DType::f32, {B, Hq, T}, cca::Device::cuda);
        ab.dq = f32(dq.p, B, T, Hq, D);
        ab.dk = f32(dk.p, B, T, Hkv, D);
        ab.dv = f32(dv.p, B, T, Hkv, D);
        if (m > 0) {
          ab.dk_core = f32(dkc.p, B, m, Hkv, D);
          ab.dv_core = f32(dvc.p, B, m, Hkv, D);
        }
        ab.variant = vc;
        ab.scale = ap.scale;
        cca::PoolBwdProblem pb;
        pb.q = ab.q;
        pb.k = ab.k;
        pb.v = ab.v;
        pb.dk_core = ab.dk_core;
        pb.dv_core = ab.dv_core;
        pb.dq = ab.dq;
        pb.dk = ab.dk;
        pb.dv = ab.dv;
        pb.variant = vc;
        pb.scale = ap.scale;
        auto backward = [&] {
          be.attend_bwd_delta(ab);
          be.attend_bwd(ab);
          if (m > 0) be.pool_bwd(pb);
        };
        const double t_bwd_attend = median_ms([&] { be.attend_bwd(ab); }, r);
        emit("cca_bwd_attend", B, T, Hq, Hkv, t_bwd_attend, 2.5 * useful_cca, 0);
        if (m > 0) {
          const double t_bwd_pool = median_ms([&] { be.pool_bwd(pb); }, r);
          emit("cca_bwd_pool", B, T, Hq, Hkv, t_bwd_pool, 0, 0);
        }
        const double t_bwd = median_ms(backward, r);
        emit("cca_bwd", B, T, Hq, Hkv, t_bwd, 2.5 * useful_cca, 0);
        const double t_fwd_bwd = median_ms(
            [&] {
              be.pool(pp);
              be.attend(fl);
              backward();
            },
            r);
        emit("cca_fwd_bwd", B, T, Hq, Hkv, t_fwd_bwd, 3.5 * useful_cca, 0);
      }
      if (!skip_full) {
        cca::AttendProblem fp = ap;
        fp.core = cca::KvSegment{};
        fp.variant = vf;
        const int rf = T >= 65536 ? 2 : reps;
        const double t_full = median_ms([&] { be.attend(fp); }, rf);
        emit("full_fwd", B, T, Hq, Hkv, t_full, 4.0 * D * Hq * B * visible_sum(vf, T), 0);
      }
      CHECK(cudaGetLastError());
    }
    // Decode: one new token at position ctx-1 over the compressed cache (core tokens + raw
    // window), as KvCache holds it after ctx-1 tokens. Inputs rotate over enough copies to
    // exceed L2 so that the bandwidth is HBM's.
    for (int64_t ctx : decode_ctx)
      for (int64_t Bd : decode_batch) {
        const int64_t t = ctx - 1;
        const cca::Visible vis = cca::visible_keys(vc, t);
        const int64_t n_core = vis.n_core, n_raw = vis.local_end - vis.local_begin;
        const double cache_bytes = double(Bd) * (n_core + n_raw) * Hkv * D * 2 * 2;
        const int copies = int(std::max(1.0, std::ceil(256e6 / cache_bytes)));
        std::vector<std::unique_ptr<Buf>> bufs;
        std::vector<cca::AttendProblem> probs;
        Buf qd(Bd * Hq * D * 2, 5), od(Bd * Hq * D * 2);
        for (int c = 0; c < copies; ++c) {
          bufs.emplace_back(new Buf(Bd * n_core * Hkv * D * 2, 10 + c));
          bufs.emplace_back(new Buf(Bd * n_core * Hkv * D * 2, 100 + c));
          bufs.emplace_back(new Buf(Bd * n_raw * Hkv * D * 2, 200 + c));
          bufs.emplace_back(new Buf(Bd * n_raw * Hkv * D * 2, 300 + c));
          cca::AttendProblem dp;
          dp.q = view(qd.p, Bd, 1, Hq, D);
          dp.q_pos0 = t;
          const size_t i0 = bufs.size() - 4;
          dp.core = cca::KvSegment{view(bufs[i0]->p, Bd, n_core, Hkv, D),
                                   view(bufs[i0 + 1]->p, Bd, n_core, Hkv, D), 0};
          dp.local = cca::KvSegment{view(bufs[i0 + 2]->p, Bd, n_raw, Hkv, D),
                                    view(bufs[i0 + 3]->p, Bd, n_raw, Hkv, D), vis.local_begin};
          dp.out = view(od.p, Bd, 1, Hq, D);
          dp.variant = vc;
          dp.scale = vc.scale_for(D);
          probs.push_back(dp);
        }
        size_t it = 0;
        const int inner = 20;  // several steps per event pair: launch gaps stay in, as in a model
        const double ms = median_ms(
                              [&] {
                                for (int i = 0; i < inner; ++i)
                                  be.attend(probs[it++ % probs.size()]);
                              },
                              reps) /
                          inner;
        emit("cca_decode", Bd, ctx, Hq, Hkv, ms, 4.0 * D * Hq * Bd * (n_core + n_raw), cache_bytes);
        // The same steps replayed from a CUDA graph (as a serving loop would run them): the
        // GPU time without the host's per-call launch cost.
        cudaStream_t st;
        CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        for (auto& pr : probs) pr.stream = st;
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < inner; ++i) be.attend(probs[size_t(i) % probs.size()]);
        CHECK(cudaStreamEndCapture(st, &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        const double gms = median_ms(
                               [&] {
                                 CHECK(cudaGraphLaunch(exec, st));
                                 CHECK(cudaStreamSynchronize(st));
                               },
                               reps) /
                           inner;
        emit("cca_decode_graph", Bd, ctx, Hq, Hkv, gms, 4.0 * D * Hq * Bd * (n_core + n_raw),
             cache_bytes);
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        cudaStreamDestroy(st);
      }
    // Ragged decode: one step of sequences of different lengths, each with its own compressed
    // cache, as one fused attend_batch call against one attend call per sequence. B = number of
    // sequences, T = their total length; the caches together exceed L2.
    if (!ragged.empty()) {
      std::vector<std::unique_ptr<Buf>> bufs;
      std::vector<cca::AttendProblem> probs;
      const int64_t S = int64_t(ragged.size());
      Buf qd(S * Hq * D * 2, 7), od(S * Hq * D * 2);
      double bytes = 0, flops = 0;
      int64_t total_len = 0;
      for (int64_t j = 0; j < S; ++j) {
        const int64_t t = ragged[size_t(j)] - 1;
        const cca::Visible vis = cca::visible_keys(vc, t);
        const int64_t n_core = vis.n_core, n_raw = vis.local_end - vis.local_begin;
        bytes += double(n_core + n_raw) * Hkv * D * 2 * 2;
        flops += 4.0 * D * Hq * double(n_core + n_raw);
        total_len += t + 1;
        cca::AttendProblem dp;
        dp.q = view(static_cast<char*>(qd.p) + j * Hq * D * 2, 1, 1, Hq, D);
        dp.q_pos0 = t;
        if (n_core > 0) {
          bufs.emplace_back(new Buf(n_core * Hkv * D * 2, 20 + j));
          bufs.emplace_back(new Buf(n_core * Hkv * D * 2, 40 + j));
          dp.core = cca::KvSegment{view(bufs[bufs.size() - 2]->p, 1, n_core, Hkv, D),
                                   view(bufs.back()->p, 1, n_core, Hkv, D), 0};
        }
        bufs.emplace_back(new Buf(n_raw * Hkv * D * 2, 60 + j));
        bufs.emplace_back(new Buf(n_raw * Hkv * D * 2, 80 + j));
        dp.local = cca::KvSegment{view(bufs[bufs.size() - 2]->p, 1, n_raw, Hkv, D),
                                  view(bufs.back()->p, 1, n_raw, Hkv, D), vis.local_begin};
        dp.out = view(static_cast<char*>(od.p) + j * Hq * D * 2, 1, 1, Hq, D);
        dp.variant = vc;
        dp.scale = vc.scale_for(D);
        probs.push_back(dp);
      }
      const int inner = 20;
      const double fused = median_ms(
                               [&] {
                                 for (int i = 0; i < inner; ++i) be.attend_batch(probs);
                               },
                               reps) /
                           inner;
      emit("cca_decode_ragged", S, total_len, Hq, Hkv, fused, flops, bytes);
      const double loop = median_ms(
                              [&] {
                                for (int i = 0; i < inner; ++i)
                                  for (const cca::AttendProblem& p : probs) be.attend(p);
                              },
                              reps) /
                          inner;
      emit("cca_decode_ragged_loop", S, total_len, Hq, Hkv, loop, flops, bytes);
    }
  }
  return 0;
}
