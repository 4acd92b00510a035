// v4::Engine: loads an engine directory written by `v4compile build` and runs its AOTInductor models
// "prefill" and "decode" from C++ (no Python). Calling convention (engine contract):
//   inputs  = [tokens int64 [B, T], start_pos int64 [B], *cache tensors in manifest order]
//   outputs = [logits float32 [B, T, vocab]]; the cache tensors are updated in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "v4manifest.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace v4 {

// The machine this process runs on, as the manifest's "arch" spells it ("cpu" or "sm_XY").
std::string machine_arch();

class Engine {
 public:
  // Verifies format version, sha256 of every listed file, arch vs machine and torch major.minor vs the
  // linked libtorch (in that order), then loads both models; throws EngineError naming what differs.
  static std::unique_ptr<Engine> load(const std::string& dir);
  ~Engine();

  const Manifest& manifest() const { return manifest_; }
  c10::Device device() const { return device_; }

  // Creates the cache tensors for `batch` sequences (1..max_batch) with their init values; replaces any
  // previous cache.
  const std::vector<at::Tensor>& allocate(int64_t batch);
  const std::vector<at::Tensor>& cache() const { return cache_; }

  // tokens int64 [B, T], start_pos int64 [B] (B == allocated batch) -> logits float32 [B, T, vocab].
  at::Tensor prefill(const at::Tensor& tokens, const at::Tensor& start_pos);
  // Same with T == 1.
  at::Tensor decode(const at::Tensor& tokens, const at::Tensor& start_pos);

  // Greedy generation: each prompt is prefilled alone (so no pad token is ever written to a cache), the
  // caches are stacked into one batch and decoded together, each sequence at its own position. A sequence
  // stops after `stop_token` (when >= 0, included in its ids) or after max_new_tokens; each prompt length +
  // max_new_tokens must fit max_len. Returns the generated ids only.
  std::vector<std::vector<int64_t>> generate(const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
                                             int64_t stop_token);

 private:
  Engine() = default;
  void check_inputs(const at::Tensor& tokens, const at::Tensor& start_pos, const char* entry) const;
  at::Tensor run(torch::inductor::AOTIModelPackageLoader& model, const at::Tensor& tokens,
                 const at::Tensor& start_pos, const char* entry);

  std::string dir_;
  Manifest manifest_;
  c10::Device device_{c10::kCPU};
  // the stored tensors the models' constants view, bound user-managed: declared first, destroyed last
  std::unordered_map<std::string, at::Tensor> weights_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> prefill_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> decode_;
  std::vector<at::Tensor> cache_;
};

}  // namespace v4
