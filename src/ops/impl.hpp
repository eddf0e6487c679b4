// The two implementations of the ops (ops.hpp documents each): cpu:: (ops/cpu, always built) and
// cuda:: (ops/cuda, built with the CUDA backend). ops.cpp dispatches on the context's device.
#pragma once
#include "ops/ops.hpp"

namespace cca::ops {

// Builds and tears down contexts: the one place that sets Context's fields.
struct ContextFactory {
  static Context make(Device device, int threads, void* stream, void* blas, void* workspace,
                      int64_t workspace_bytes) {
    Context c;
    c.device_ = device;
    c.threads_ = threads;
    c.stream_ = stream;
    c.blas_ = blas;
    c.workspace_ = workspace;
    c.workspace_bytes_ = workspace_bytes;
    c.profile_ = std::make_unique<Profile>(device, stream);
    return c;
  }
};

namespace cpu {
void linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
            const TensorView& y, bool accumulate);
void rms_norm(const Context& ctx, const TensorView& x, const TensorView& w, float eps,
              const TensorView& out);
void rope(const Context& ctx, const TensorView& x, int64_t heads, const int32_t* positions,
          const TensorView& inv_freq);
void swiglu(const Context& ctx, const TensorView& gate, const TensorView& up,
            const TensorView& out);
void embed(const Context& ctx, const int32_t* ids, const TensorView& table, const TensorView& out);
void gather_rows(const Context& ctx, const TensorView& src, const int32_t* rows,
                 const TensorView& dst);
void argmax_rows(const Context& ctx, const TensorView& logits, int32_t* out);
void sample_rows(const Context& ctx, const TensorView& logits, const SampleParams* params,
                 const int32_t* counters, int32_t* out);
void convert(const Context& ctx, const TensorView& src, const TensorView& dst);
void set_threads(int threads);  // the OpenMP team of the cpu ops (and the attention backend)
int resolve_threads(int threads);  // 0 -> OMP_NUM_THREADS, else all cores
}  // namespace cpu

#ifdef CCA_WITH_CUDA
namespace cuda {
void linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
            const TensorView& y, bool accumulate);
void tune_linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
                 const TensorView& y, bool accumulate);
void rms_norm(const Context& ctx, const TensorView& x, const TensorView& w, float eps,
              const TensorView& out);
void rope(const Context& ctx, const TensorView& x, int64_t heads, const int32_t* positions,
          const TensorView& inv_freq);
void swiglu(const Context& ctx, const TensorView& gate, const TensorView& up,
            const TensorView& out);
void embed(const Context& ctx, const int32_t* ids, const TensorView& table, const TensorView& out);
void gather_rows(const Context& ctx, const TensorView& src, const int32_t* rows,
                 const TensorView& dst);
void argmax_rows(const Context& ctx, const TensorView& logits, int32_t* out);
void sample_rows(const Context& ctx, const TensorView& logits, const SampleParams* params,
                 const int32_t* counters, int32_t* out);
void convert(const Context& ctx, const TensorView& src, const TensorView& dst);
Context make_context();  // Context::cuda()
void release(void* stream, void* blas, void* workspace) noexcept;
void* alloc(int64_t bytes, const char* what);
void free(void* ptr) noexcept;
void upload(const Context& ctx, void* dst, const void* src, int64_t bytes);
void download(const Context& ctx, void* dst, const void* src, int64_t bytes);
void synchronize(const Context& ctx);
void memory_info(int64_t* free_bytes, int64_t* total_bytes);  // memory_info.cpp
std::string device_name();                                    // memory_info.cpp
// graph.cpp: pinned staging, async downloads and CUDA graphs of the context's stream.
void* alloc_host(int64_t bytes, const char* what);
void free_host(void* ptr) noexcept;
void download_async(const Context& ctx, void* dst, const void* src, int64_t bytes);
void begin_capture(const Context& ctx);
void* end_capture(const Context& ctx);
void abort_capture(const Context& ctx) noexcept;
void launch_graph(const Context& ctx, void* graph);
void destroy_graph(void* graph) noexcept;
// graph.cpp: CUDA events for ops::Profile.
void* event_create();
void event_record(void* event, void* stream);
float event_elapsed_ms(void* start, void* stop);  // waits for `stop`
void event_destroy(void* event) noexcept;
}  // namespace cuda
#endif

}  // namespace cca::ops
