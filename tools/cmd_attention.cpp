// `cca attention`: run one attention variant over q/k/v .npy files [B, T, H, D] and write the
// output (and optionally the LSE). Prefill runs attn_fwd; decode and chunked:N feed the tokens
// through a KvCache, which must reproduce the prefill output. With --backend cuda the arrays are
// copied to the GPU and the results back.
#include <CLI/CLI.hpp>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backend.hpp"
#include "cca/cca.hpp"
#include "cca/device.hpp"
#include "commands.hpp"
#include "flag_limits.hpp"
#include "model/output_file.hpp"
#include "npy.hpp"
#include "output_path.hpp"
#include "variant_flags.hpp"

namespace cca {
namespace {

struct AttentionArgs : VariantFlags {
  std::string q, k, v, out, lse;
  std::string scale;  // empty: 1/sqrt(D)
  std::string backend = "cpu";
  std::string mode = "prefill";
  int threads = 0;
};

// prefill (chunk = 0), decode (chunk = 1) or chunked:N (chunk = N).
int64_t parse_mode(const std::string& s) {
  if (s == "prefill") return 0;
  if (s == "decode") return 1;
  const std::string prefix = "chunked:";
  if (s.rfind(prefix, 0) == 0) {
    const char* b = s.data() + prefix.size();
    const char* e = s.data() + s.size();
    int64_t n = 0;
    auto [ptr, ec] = std::from_chars(b, e, n);
    if (b != e && ec == std::errc() && ptr == e && n >= 1) return n;
    throw Error("invalid --mode '" + s +
                "': the chunk size N of chunked:N must be an integer >= 1");
  }
  throw Error("invalid --mode '" + s + "' (expected prefill, decode or chunked:N)");
}

double parse_scale(const std::string& s) {
  char* end = nullptr;
  double x = std::strtod(s.c_str(), &end);
  check(!s.empty() && end == s.c_str() + s.size(), "invalid scale '" + s + "': not a number");
  // NaN means "default" inside VariantSpec, so it must be rejected here.
  check(!std::isnan(x), "invalid scale = " + s + ": must be finite and > 0");
  return x;
}

// A GPU copy of a contiguous host view (an input, uploaded, or an output), freed on scope exit.
class GpuCopy {
 public:
  GpuCopy(const TensorView& host, bool upload)
      : host_(host),
        bytes_(host.numel() * dtype_size(host.dtype)),
        ptr_(device_alloc(bytes_)),
        output_(!upload) {
    if (!upload) return;
    try {
      copy_to_device(ptr_, host.data, bytes_);
    } catch (...) {  // the destructor does not run for a throwing constructor
      device_free(ptr_);
      throw;
    }
  }
  GpuCopy(GpuCopy&& o) noexcept
      : host_(o.host_),
        bytes_(o.bytes_),
        ptr_(std::exchange(o.ptr_, nullptr)),
        output_(o.output_) {}
  GpuCopy(const GpuCopy&) = delete;
  GpuCopy& operator=(const GpuCopy&) = delete;
  GpuCopy& operator=(GpuCopy&&) = delete;
  ~GpuCopy() {
    try {
      if (ptr_) device_free(ptr_);
    } catch (const Error&) {  // freeing cannot fail usefully; never throw from a destructor
    }
  }
  TensorView view() const {
    TensorView v = host_;
    v.data = ptr_;
    v.device = Device::cuda;
    return v;
  }
  // Copies an output back to its host array; inputs stay as they are.
  void download_output() const {
    if (output_) copy_to_host(host_.data, ptr_, bytes_);
  }

 private:
  TensorView host_;
  int64_t bytes_;
  void* ptr_;
  bool output_;
};

// Reads one input and checks it is [B, T, H, D].
NpyArray read_input(const std::string& path, const char* name) {
  NpyArray a = read_npy(path);
  check(a.shape.size() == 4, std::string(name) + " ('" + path +
                                 "') must be a 4-D array [B, T, H, D], got shape " +
                                 a.shape_string());
  return a;
}

void run_attention(const AttentionArgs& a) {
  // Every check runs before any computation or output.
  VariantSpec spec = a.spec();
  if (!a.scale.empty()) spec.scale = parse_scale(a.scale);
  spec.validate();
  const int64_t chunk = parse_mode(a.mode);
  check_threads_flag(a.threads);
  RunOptions run;
  run.backend = parse_backend(a.backend);
  run.threads = a.threads;

  check_outputs({{"--q", a.q}, {"--k", a.k}, {"--v", a.v}}, {{"--out", a.out}, {"--lse", a.lse}});

  NpyArray q = read_input(a.q, "q"), k = read_input(a.k, "k"), v = read_input(a.v, "v");
  const TensorView qv = q.view(), kv = k.view(), vv = v.view();
  check_qkv(qv, kv, vv);
  const int64_t B = qv.shape[0], T = qv.shape[1], Hq = qv.shape[2], Hkv = kv.shape[2],
                D = qv.shape[3];

  // Throws "backend ... unavailable: ..." (e.g. cuda without a GPU) before any work.
  const Device device = run.backend == BackendKind::cuda ? Device::cuda : Device::cpu;
  get_backend(run.backend, device);

  NpyArray out = make_npy_array(q.dtype, q.shape);
  std::optional<NpyArray> lse;
  if (!a.lse.empty()) lse = make_npy_array(DType::f32, {B, Hq, T});
  const TensorView ov = out.view(), lv = lse ? lse->view() : TensorView{};

  // The views the backend runs on: the host arrays, or GPU copies of them.
  std::vector<GpuCopy> gpu;
  gpu.reserve(5);
  auto on_device = [&](const TensorView& host, bool upload) {
    if (device == Device::cpu || host.empty()) return host;
    return gpu.emplace_back(host, upload).view();
  };
  const TensorView dq = on_device(qv, true), dk = on_device(kv, true), dv = on_device(vv, true),
                   dout = on_device(ov, false), dlse = on_device(lv, false);

  const auto start = std::chrono::steady_clock::now();
  if (chunk == 0) {
    attn_fwd(AttnFwdParams{dq, dk, dv, dout, dlse, spec, run});
  } else {
    KvCache cache(spec, B, Hq, Hkv, D, q.dtype, run);
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t n = std::min(chunk, T - t0);
      cache.append(dq.slice(1, t0, n), dk.slice(1, t0, n), dv.slice(1, t0, n), dout.slice(1, t0, n),
                   lse ? dlse.slice(2, t0, n) : TensorView{});
    }
  }
  if (device == Device::cuda) {
    device_synchronize();  // the time covers the kernels, not just their launch
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  for (const GpuCopy& g : gpu) g.download_output();

  // Both outputs are complete in temporary files before either is renamed into place.
  model::PendingFile out_file(a.out, encode_npy(ov));
  std::optional<model::PendingFile> lse_file;
  if (lse) lse_file.emplace(a.lse, encode_npy(lv));
  out_file.commit();
  if (lse_file) lse_file->commit();

  std::printf("%s, %s, backend %s, q %s k %s %s: %.3f ms -> %s%s%s\n", spec.describe().c_str(),
              a.mode.c_str(), backend_name(run.backend), qv.shape_string().c_str(),
              kv.shape_string().c_str(), dtype_name(q.dtype), ms, a.out.c_str(),
              a.lse.empty() ? "" : ", ", a.lse.c_str());
}

}  // namespace

void register_attention_command(CLI::App& app) {
  auto args = std::make_shared<AttentionArgs>();
  CLI::App* cmd = app.add_subcommand(
      "attention", "Attention over q/k/v .npy arrays [B, T, H, D] (float32 or float16)");
  cmd->add_option("--q", args->q, "queries [B, T, Hq, D] (post-RoPE)")->required();
  cmd->add_option("--k", args->k, "keys [B, T, Hkv, D] (post-RoPE)")->required();
  cmd->add_option("--v", args->v, "values [B, T, Hkv, D]")->required();
  cmd->add_option("--out", args->out, "output [B, T, Hq, D], dtype of q")->required();
  cmd->add_option("--lse", args->lse, "also write the log-sum-exp, float32 [B, Hq, T]");
  add_variant_flags(cmd, *args, /*with_variant=*/true);
  cmd->add_option("--scale", args->scale, "softmax scale (default 1/sqrt(D))");
  cmd->add_option("--backend", args->backend, "ref, cpu or cuda")->capture_default_str();
  cmd->add_option("--mode", args->mode,
                  "prefill, decode (token by token through the KV cache) or chunked:N")
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "CPU threads (0 = all)")->capture_default_str();
  cmd->callback([args] { run_attention(*args); });
}

}  // namespace cca
