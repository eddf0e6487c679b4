// `cca bench attention`: wall time and useful GFLOP/s of attn_fwd for each variant over a list of
// sequence lengths, on random inputs. Useful FLOPs = 4 D Hq B (visible keys summed over queries),
// counted with the same policy (visible_keys) the kernels use, so masked-out work never counts.
// cca times include pooling (attn_fwd pools, then attends). With --bwd it also times attn_bwd
// (pooling recomputed and differentiated included), whose useful FLOPs count as 2.5x the
// forward's (the convention of FlashAttention's benchmarks: 5 matrix products against 2). With
// --backend cuda the inputs are copied to the GPU once and every timed call ends with a device
// synchronisation, so the times are the calls' whole cost (workspace allocation included).
#include <time.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cca/cca.hpp"
#include "cca/device.hpp"
#include "commands.hpp"
#include "cpu/cpu_simd.hpp"
#include "flag_limits.hpp"
#include "variant_flags.hpp"

namespace cca {
namespace {

struct BenchArgs : VariantFlags {
  int threads = 0;
  bool json = false;
  std::string backend = "cpu";
  std::vector<int64_t> t_list = {1024, 2048, 4096, 8192, 16384, 32768};
  std::vector<std::string> variants = {"full", "sliding", "streaming", "lminfinite", "cca"};
  int64_t batch = 1, heads = 8, kv_heads = 8, dim = 64;
  std::string dtype = "float32";
  int reps = 3;
  bool bwd = false;
};

DType parse_bench_dtype(const std::string& s) {
  for (DType t : {DType::f32, DType::f16, DType::bf16})
    if (s == dtype_name(t)) return t;
  throw Error("invalid --dtype '" + s + "' (expected float32, float16 or bfloat16)");
}

// 4 D Hq B times the number of (query, visible key) pairs.
double useful_flops(const VariantSpec& v, int64_t B, int64_t T, int64_t Hq, int64_t D) {
  double pairs = 0;
  for (int64_t t = 0; t < T; ++t) pairs += double(visible_keys(v, t).count());
  return 4.0 * double(D) * double(Hq) * double(B) * pairs;
}

// A [B, T, H, D] tensor of uniform values in [-1, 1), never all zeros; `seed` picks the stream
// (seed 0: zeros, for outputs).
struct RandomTensor {
  std::vector<char> bytes;
  TensorView view;
  RandomTensor(DType dt, int64_t B, int64_t T, int64_t H, int64_t D, uint64_t seed) {
    bytes.resize(size_t(B * T * H * D * dtype_size(dt)));
    view = make_view(bytes.data(), dt, {B, T, H, D});
    if (seed == 0) return;
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    const int64_t n = view.numel();
    for (int64_t i = 0; i < n; ++i) {  // splitmix64: fast, and plenty for benchmark inputs
      uint64_t z = (s += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      view.store(i, float(double(z >> 40) * 0x1.0p-23 - 1.0));
    }
  }
};

// A RandomTensor where the backend reads it: the host tensor itself, or a copy in GPU memory.
struct BenchTensor {
  RandomTensor host;
  std::shared_ptr<void> gpu;
  TensorView view;
  BenchTensor(RandomTensor h, bool on_gpu) : host(std::move(h)), view(host.view) {
    if (!on_gpu) return;
    const int64_t bytes = int64_t(host.bytes.size());
    gpu = std::shared_ptr<void>(device_alloc(bytes), [](void* p) { device_free(p); });
    copy_to_device(gpu.get(), host.bytes.data(), bytes);
    view.data = gpu.get();
    view.device = Device::cuda;
  }
  // The current values on the host (copied back from the GPU where they live there).
  const TensorView& fetch() {
    if (gpu) copy_to_host(host.bytes.data(), gpu.get(), int64_t(host.bytes.size()));
    return host.view;
  }
};

// CPU seconds used by this process so far (all threads).
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  const size_t n = x.size();
  return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

void check_args(const BenchArgs& a) {
  auto need = [](bool ok, const std::string& what) { check(ok, "invalid " + what); };
  check_threads_flag(a.threads);
  need(a.reps >= 1, "--reps " + std::to_string(a.reps) + ": must be >= 1");
  need(a.batch >= 1, "--batch " + std::to_string(a.batch) + ": must be >= 1");
  need(a.heads >= 1, "--heads " + std::to_string(a.heads) + ": must be >= 1");
  need(a.kv_heads >= 1 && a.heads % a.kv_heads == 0, "--kv-heads " + std::to_string(a.kv_heads) +
                                                         ": must be >= 1 and divide --heads " +
                                                         std::to_string(a.heads));
  need(a.dim >= 1, "--dim " + std::to_string(a.dim) + ": must be >= 1");
  need(!a.t_list.empty(), "--t-list: needs at least one length");
  for (int64_t T : a.t_list) need(T >= 1, "--t-list entry " + std::to_string(T) + ": must be >= 1");
  need(!a.variants.empty(), "--variants: needs at least one variant");
}

void run_bench_attention(const BenchArgs& a) {
  check_args(a);
  const DType dt = parse_bench_dtype(a.dtype);
  const BackendKind backend = parse_backend(a.backend);
  std::vector<VariantKind> kinds;
  for (const std::string& name : a.variants) kinds.push_back(parse_variant(name));
  for (VariantKind k : kinds) a.spec_for(k);  // validates
  const std::string why = backend_unavailable_reason(backend);
  check(why.empty(), std::string("backend ") + backend_name(backend) + " unavailable: " + why);
  const bool gpu = backend == BackendKind::cuda;
  // The cpu backend's SIMD target (AVX3, AVX2, ...: cca info --system).
  const std::string backend_desc =
      backend == BackendKind::cpu ? a.backend + " (" + cpu::simd_target() + ")" : a.backend;

  if (!a.json) {
    std::printf(
        "%s: backend %s, threads %s, B=%lld Hq=%lld Hkv=%lld D=%lld %s, "
        "cca g=%lld s=%lld, sliding/streaming/lminfinite window=%lld sinks=%lld, "
        "median of %d after 1 warm-up\n",
        a.bwd ? "attn_fwd and attn_bwd" : "attn_fwd", backend_desc.c_str(),
        a.threads ? std::to_string(a.threads).c_str() : "all", (long long)a.batch,
        (long long)a.heads, (long long)a.kv_heads, (long long)a.dim, dtype_name(dt),
        (long long)a.group, (long long)a.window, (long long)a.window, (long long)a.sinks, a.reps);
    if (a.bwd)
      std::printf("%-11s %7s %11s %9s %11s %9s %8s %10s\n", "variant", "T", "fwd_ms", "GFLOP/s",
                  "bwd_ms", "GFLOP/s", "bwd/fwd", "cores_busy");
    else
      std::printf("%-11s %7s %11s %9s %15s %10s\n", "variant", "T", "ms", "GFLOP/s",
                  "speedup_vs_full", "cores_busy");
  }
  for (int64_t T : a.t_list) {
    auto tensor = [&](DType t, int64_t H, uint64_t seed) {
      return BenchTensor(RandomTensor(t, a.batch, T, H, a.dim, seed), gpu);
    };
    BenchTensor q = tensor(dt, a.heads, 1), k = tensor(dt, a.kv_heads, 2),
                v = tensor(dt, a.kv_heads, 3), out = tensor(dt, a.heads, 0);
    // Backward only: the forward's LSE, an output gradient and the input gradients.
    std::unique_ptr<BenchTensor> lse, dout, dq, dk, dv;
    if (a.bwd) {
      RandomTensor l(DType::f32, 1, a.batch, a.heads, T, 0);
      l.view = make_view(l.bytes.data(), DType::f32, {a.batch, a.heads, T});
      lse = std::make_unique<BenchTensor>(std::move(l), gpu);
      dout = std::make_unique<BenchTensor>(tensor(dt, a.heads, 6));
      dq = std::make_unique<BenchTensor>(tensor(dt, a.heads, 0));
      dk = std::make_unique<BenchTensor>(tensor(dt, a.kv_heads, 0));
      dv = std::make_unique<BenchTensor>(tensor(dt, a.kv_heads, 0));
    }
    double full_ms = NAN;
    for (VariantKind kind : kinds) {
      AttnFwdParams p;
      p.q = q.view;
      p.k = k.view;
      p.v = v.view;
      p.out = out.view;
      if (a.bwd) p.lse = lse->view;
      p.variant = a.spec_for(kind);
      p.run.backend = backend;
      p.run.threads = a.threads;
      double cpu_s = 0, wall_s = 0;
      // Median wall time of `reps` runs of f after one warm-up; adds up CPU and wall seconds.
      auto time_ms = [&](const auto& f) {
        std::vector<double> ms;
        for (int rep = 0; rep <= a.reps; ++rep) {  // rep 0 is the warm-up
          const double c0 = process_cpu_seconds();
          const auto t0 = std::chrono::steady_clock::now();
          f();
          if (gpu) device_synchronize();
          const auto t1 = std::chrono::steady_clock::now();
          const double c1 = process_cpu_seconds();
          if (rep == 0) continue;
          ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
          cpu_s += c1 - c0;
          wall_s += std::chrono::duration<double>(t1 - t0).count();
        }
        return median(ms);
      };
      // A broken kernel must not pass for a fast one: every value must be finite.
      auto check_finite = [&](BenchTensor& x, const char* what) {
        const TensorView& t = x.fetch();
        for (int64_t i = 0, n = t.numel(); i < n; ++i)
          if (!std::isfinite(t.load(i)))
            throw Error(std::string("bench: ") + variant_name(kind) + " produced a non-finite " +
                        what);
      };
      const double t_ms = time_ms([&] { attn_fwd(p); });
      check_finite(out, "output");
      double bwd_ms = NAN;
      if (a.bwd) {
        AttnBwdParams bp;
        bp.q = q.view;
        bp.k = k.view;
        bp.v = v.view;
        bp.out = out.view;
        bp.lse = lse->view;
        bp.dout = dout->view;
        bp.dq = dq->view;
        bp.dk = dk->view;
        bp.dv = dv->view;
        bp.variant = p.variant;
        bp.run = p.run;
        bwd_ms = time_ms([&] { attn_bwd(bp); });
        for (BenchTensor* g : {dq.get(), dk.get(), dv.get()}) check_finite(*g, "gradient");
      }
      // Cores busy on average: below the thread count means the threads waited for the CPU
      // (other processes on the machine), so the time is not a clean measurement.
      const double cores = cpu_s / wall_s;
      const double flops = useful_flops(p.variant, a.batch, T, a.heads, a.dim);
      const double gflops = flops / (t_ms * 1e6);
      const double bwd_gflops = 2.5 * flops / (bwd_ms * 1e6);
      if (kind == VariantKind::full) full_ms = t_ms;
      const double speedup = kind == VariantKind::cca ? full_ms / t_ms : NAN;
      if (a.json) {
        nlohmann::json j = {{"bench", "attention"},
                            {"backend", a.backend},
                            {"variant", variant_name(kind)},
                            {"describe", p.variant.describe()},
                            {"T", T},
                            {"B", a.batch},
                            {"Hq", a.heads},
                            {"Hkv", a.kv_heads},
                            {"D", a.dim},
                            {"dtype", dtype_name(dt)},
                            {"threads", a.threads},
                            {"reps", a.reps},
                            {"ms", t_ms},
                            {"useful_gflop", flops * 1e-9},
                            {"gflops", gflops},
                            {"cores_busy", cores}};
        if (!std::isnan(speedup)) j["speedup_vs_full"] = speedup;
        if (backend == BackendKind::cpu) j["simd_target"] = cpu::simd_target();
        if (a.bwd) {
          j["bwd_ms"] = bwd_ms;
          j["bwd_gflops"] = bwd_gflops;
          j["bwd_over_fwd"] = bwd_ms / t_ms;
        }
        std::printf("%s\n", j.dump().c_str());
      } else if (a.bwd) {
        std::printf("%-11s %7lld %11.2f %9.2f %11.2f %9.2f %8.2f %10.2f\n", variant_name(kind),
                    (long long)T, t_ms, gflops, bwd_ms, bwd_gflops, bwd_ms / t_ms, cores);
      } else {
        char sp[32] = "";
        if (!std::isnan(speedup)) std::snprintf(sp, sizeof sp, "%.2fx", speedup);
        std::printf("%-11s %7lld %11.2f %9.2f %15s %10.2f\n", variant_name(kind), (long long)T,
                    t_ms, gflops, sp, cores);
      }
      std::fflush(stdout);
    }
  }
}

}  // namespace

void register_bench_command(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  CLI::App* cmd = bench->add_subcommand(
      "attention", "Time attn_fwd for each variant over sequence lengths (random inputs)");
  cmd->add_option("--threads", args->threads, "CPU threads (0 = all)")->capture_default_str();
  cmd->add_flag("--json", args->json, "print one JSON object per measurement");
  cmd->add_option("--backend", args->backend, "ref, cpu or cuda")->capture_default_str();
  cmd->add_option("--t-list", args->t_list, "sequence lengths T, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--variants", args->variants, "variants to time, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--batch", args->batch, "batch size B")->capture_default_str();
  cmd->add_option("--heads", args->heads, "query heads Hq")->capture_default_str();
  cmd->add_option("--kv-heads", args->kv_heads, "key/value heads Hkv")->capture_default_str();
  cmd->add_option("--dim", args->dim, "head dim D")->capture_default_str();
  add_variant_flags(cmd, *args, /*with_variant=*/false);
  cmd->add_option("--dtype", args->dtype, "float32, float16 or bfloat16")->capture_default_str();
  cmd->add_option("--reps", args->reps, "timed repetitions (median reported)")
      ->capture_default_str();
  cmd->add_flag("--bwd", args->bwd,
                "also time the backward (attn_bwd: gradients of q, k, v) and its ratio to the "
                "forward");
  cmd->callback([args] { run_bench_attention(*args); });
}

}  // namespace cca
