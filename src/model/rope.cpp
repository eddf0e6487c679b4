#include "model/rope.hpp"

#include <cmath>

namespace cca::model {

// Every step in float32, in Hugging Face's order (modeling_rope_utils), so the frequencies agree
// to the last bit or two.
Rope::Rope(const RopeConfig& cfg, int64_t head_dim)
    : D_(head_dim), inv_freq_(size_t(head_dim / 2)) {
  const float base = float(cfg.theta), dim = float(head_dim);
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq_[size_t(i)] = 1.0f / std::pow(base, float(2 * i) / dim);

  if (cfg.type == RopeType::linear) {
    for (float& f : inv_freq_) f = f / float(cfg.factor);
  } else if (cfg.type == RopeType::llama3) {
    const float factor = float(cfg.factor), low = float(cfg.low_freq_factor),
                high = float(cfg.high_freq_factor), old_ctx = float(cfg.original_max_positions);
    const float low_freq_wavelen = old_ctx / low, high_freq_wavelen = old_ctx / high;
    for (float& f : inv_freq_) {
      const float wavelen = float(2.0 * M_PI) / f;
      // Long wavelengths (low frequencies) are interpolated by `factor`, short ones kept, and
      // the band between blends the two smoothly.
      float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        const float smooth = (old_ctx / wavelen - low) / (high - low);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
}

}  // namespace cca::model
