// v4::Engine (see v4engine.h): manifest checks, cache allocation, prefill/decode through AOTInductor.
#include "v4engine.h"

#include <ATen/core/ivalue.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/tensor.h>
#include <caffe2/serialize/inline_container.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <limits>
#include <map>
#include <unordered_map>

// Declared here rather than through <torch/csrc/jit/serialization/pickle.h>, which alone costs ~12 s of
// compile time (2 cores); a stable libtorch export (loads bytes written by Python's torch.save).
namespace torch::jit {
TORCH_API c10::IValue pickle_load(const std::vector<char>& data);
}

namespace v4 {

namespace {

c10::ScalarType parse_dtype(const std::string& name, const std::string& tensor) {
  static const std::map<std::string, c10::ScalarType> kTypes = {
      {"float32", c10::kFloat},          {"float16", c10::kHalf},
      {"bfloat16", c10::kBFloat16},      {"float64", c10::kDouble},
      {"int64", c10::kLong},             {"int32", c10::kInt},
      {"int16", c10::kShort},            {"int8", c10::kChar},
      {"uint8", c10::kByte},             {"bool", c10::kBool},
      {"float8_e4m3fn", c10::ScalarType::Float8_e4m3fn},
      {"float8_e5m2", c10::ScalarType::Float8_e5m2},
      {"float8_e8m0fnu", c10::ScalarType::Float8_e8m0fnu},
  };
  auto it = kTypes.find(name);
  if (it == kTypes.end())
    throw EngineError("manifest.json: cache tensor " + tensor + " has dtype \"" + name + "\", which v4run does not know");
  return it->second;
}

// Compute capability of CUDA device 0 through the driver API, loaded at run time so that a CPU-only
// build needs no CUDA headers or libraries. Returns "" when there is no usable driver or device.
std::string cuda_device_arch() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return "";
  using InitFn = int (*)(unsigned);
  using GetFn = int (*)(int*, int);
  using AttrFn = int (*)(int*, int, int);
  auto cu_init = reinterpret_cast<InitFn>(dlsym(lib, "cuInit"));
  auto cu_get = reinterpret_cast<GetFn>(dlsym(lib, "cuDeviceGet"));
  auto cu_attr = reinterpret_cast<AttrFn>(dlsym(lib, "cuDeviceGetAttribute"));
  constexpr int kMajor = 75, kMinor = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
  int dev = 0, major = 0, minor = 0;
  std::string arch;
  if (cu_init && cu_get && cu_attr && cu_init(0) == 0 && cu_get(&dev, 0) == 0 && cu_attr(&major, kMajor, dev) == 0 &&
      cu_attr(&minor, kMinor, dev) == 0)
    arch = "sm_" + std::to_string(major) + std::to_string(minor);
  dlclose(lib);
  return arch;
}

void check_arch(const Manifest& m) {
  if (m.arch == "cpu") return;
  if (m.arch.rfind("sm_", 0) != 0)
    throw EngineError("manifest.json: arch \"" + m.arch + "\" is neither \"cpu\" nor \"sm_XY\"");
  std::string here = machine_arch();
  if (here != m.arch)
    throw EngineError("engine built for arch " + m.arch + " (target " + m.target + "), this machine is " +
                      (here == "cpu" ? std::string("cpu (no CUDA GPU usable by this libtorch)") : here));
}

void check_torch(const Manifest& m) {
  auto built = major_minor(m.torch_version);
  if (built.first != TORCH_VERSION_MAJOR || built.second != TORCH_VERSION_MINOR)
    throw EngineError("engine built with torch " + std::to_string(built.first) + "." + std::to_string(built.second) +
                      " (" + m.torch_version + "), v4run is linked against libtorch " + TORCH_VERSION +
                      "; rebuild the engine or v4run");
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// Weights packaged outside the model .so (aot_inductor.package_constants_in_so=False with
// package_constants_on_disk_format="pickle_weights"): data/weights/<file> holds one torch.save'd tensor,
// data/aotinductor/<model>/weights_config.json maps each constant to [file, shape, stride, offset].
// AOTIModelPackageLoader does not load them (Python's load_pt2 does it after loading), so we do it the same
// way: each file is read once and shared by both models as user-managed constants (weights stored once).
using WeightFiles = std::unordered_map<std::string, at::Tensor>;

void load_package_weights(caffe2::serialize::PyTorchStreamReader& archive, const std::string& model,
                          torch::inductor::AOTIModelPackageLoader& loader, const c10::Device& device,
                          WeightFiles& files) {
  std::string config_name = "data/aotinductor/" + model + "/weights_config.json";
  if (!archive.hasRecord(config_name)) return;  // constants are inside the .so
  auto [cfg_ptr, cfg_size] = archive.getRecord(config_name);
  json::Value config;
  try {
    config = json::parse(std::string(static_cast<const char*>(cfg_ptr.get()), cfg_size));
  } catch (const json::ParseError& e) {
    throw EngineError("model.pt2: " + config_name + ": " + e.what());
  }
  if (!config.is(json::Type::Object)) throw EngineError("model.pt2: " + config_name + " is not a JSON object");
  if (config.members.empty()) return;  // package_aoti writes {} for a model whose constants are in its .so
  std::unordered_map<std::string, at::Tensor> constants;
  for (const auto& member : config.members) {
    const json::Value& w = member.second;
    auto bad = [&]() { return EngineError("model.pt2: " + config_name + ": bad entry for " + member.first); };
    if (!w.is(json::Type::Array) || w.items.size() != 4 || !w.items[0].is(json::Type::String)) throw bad();
    auto ints = [&](const json::Value& v) {
      std::vector<int64_t> out;
      if (!v.is(json::Type::Array)) throw bad();
      for (const auto& x : v.items) {
        if (!x.is(json::Type::Number)) throw bad();
        out.push_back(static_cast<int64_t>(x.number));
      }
      return out;
    };
    const std::string& file = w.items[0].text;
    auto it = files.find(file);
    if (it == files.end()) {
      std::string record = "data/weights/" + file;
      if (!archive.hasRecord(record)) throw EngineError("model.pt2: " + config_name + " names missing " + record);
      auto [ptr, size] = archive.getRecord(record);
      const char* bytes = static_cast<const char*>(ptr.get());
      at::Tensor t = torch::jit::pickle_load(std::vector<char>(bytes, bytes + size)).toTensor();
      it = files.emplace(file, t.detach().to(device)).first;
    }
    if (!w.items[3].is(json::Type::Number)) throw bad();
    constants[member.first] =
        it->second.as_strided(ints(w.items[1]), ints(w.items[2]), static_cast<int64_t>(w.items[3].number));
  }
  loader.load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
}

// Running a model whose constants were never bound crashes, so refuse such a package up front. (Only "none
// bound" is checked: constants folded at run time are not listed as bound, and load_constants above binds
// all or nothing.)
void check_constants_bound(torch::inductor::AOTIModelPackageLoader& loader, const std::string& model) {
  size_t expected = loader.get_constant_fqns().size();
  size_t bound = 0;
  for (const auto& kv : loader.get_runner()->extract_constants_map(/*use_inactive=*/false))
    bound += kv.second.defined() ? 1 : 0;
  if (expected > 0 && bound == 0)
    throw EngineError("model.pt2: model \"" + model + "\" has " + std::to_string(expected) +
                      " constants and none is bound (weights kept outside the package in a form v4run does not read)");
}

}  // namespace

std::string machine_arch() {
  if (!torch::cuda::is_available()) return "cpu";
  std::string arch = cuda_device_arch();
  return arch.empty() ? "cpu" : arch;
}

std::unique_ptr<Engine> Engine::load(const std::string& dir) {
  std::unique_ptr<Engine> e(new Engine());
  e->dir_ = dir;
  e->manifest_ = read_manifest(dir);
  verify_files(e->manifest_, dir);
  check_arch(e->manifest_);
  check_torch(e->manifest_);
  for (const auto& spec : e->manifest_.cache) parse_dtype(spec.dtype, spec.name);
  e->device_ = e->manifest_.arch == "cpu" ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, 0);
  std::string package = dir + "/model.pt2";
  WeightFiles weights;  // shared by both models
  for (const char* name : {"prefill", "decode"}) {
    try {
      auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package, name);
      caffe2::serialize::PyTorchStreamReader archive(package);
      load_package_weights(archive, name, *loader, e->device_, weights);
      check_constants_bound(*loader, name);
      (std::string(name) == "prefill" ? e->prefill_ : e->decode_) = std::move(loader);
    } catch (const EngineError&) {
      throw;
    } catch (const std::exception& ex) {
      std::string what = ex.what();
      throw EngineError("model.pt2: cannot load model \"" + std::string(name) + "\": " + what.substr(0, what.find('\n')));
    }
  }
  return e;
}

Engine::~Engine() = default;

const std::vector<at::Tensor>& Engine::allocate(int64_t batch) {
  if (batch < 1 || batch > manifest_.max_batch)
    throw InputError("batch " + std::to_string(batch) + " outside 1.." + std::to_string(manifest_.max_batch) +
                     " (the engine's max_batch)");
  cache_.clear();
  for (const auto& spec : manifest_.cache) {
    std::vector<int64_t> shape = spec.shape;
    shape[0] = batch;
    auto dtype = parse_dtype(spec.dtype, spec.name);
    double init = spec.init == "neg_inf" ? -std::numeric_limits<double>::infinity() : 0.0;
    cache_.push_back(at::full(shape, init, at::TensorOptions().dtype(dtype).device(device_)));
  }
  return cache_;
}

void Engine::check_inputs(const at::Tensor& tokens, const at::Tensor& start_pos, const char* entry) const {
  if (cache_.empty()) throw InputError(std::string(entry) + " before allocate(batch)");
  int64_t batch = cache_[0].size(0);
  if (tokens.scalar_type() != c10::kLong || tokens.dim() != 2 || tokens.size(0) != batch || tokens.size(1) < 1)
    throw InputError(std::string(entry) + ": tokens must be int64 [" + std::to_string(batch) + ", T>=1], found " +
                     std::string(c10::toString(tokens.scalar_type())) + " " + shape_str(tokens));
  if (start_pos.scalar_type() != c10::kLong || start_pos.dim() != 1 || start_pos.size(0) != batch)
    throw InputError(std::string(entry) + ": start_pos must be int64 [" + std::to_string(batch) + "], found " +
                     std::string(c10::toString(start_pos.scalar_type())) + " " + shape_str(start_pos));
  at::Tensor tok = tokens.cpu(), pos = start_pos.cpu();
  int64_t lo = tok.min().item<int64_t>(), hi = tok.max().item<int64_t>();
  if (lo < 0 || hi >= manifest_.vocab_size)
    throw InputError("token id " + std::to_string(lo < 0 ? lo : hi) + " outside [0, " +
                     std::to_string(manifest_.vocab_size) + ") (vocab_size)");
  int64_t first = pos.min().item<int64_t>(), last = pos.max().item<int64_t>() + tokens.size(1);
  if (first < 0 || last > manifest_.max_len)
    throw InputError(std::string(entry) + ": positions up to " + std::to_string(last) + " (start_pos " +
                     std::to_string(first < 0 ? first : last - tokens.size(1)) + " + " +
                     std::to_string(tokens.size(1)) + " tokens) exceed the engine's max_len " +
                     std::to_string(manifest_.max_len));
}

at::Tensor Engine::run(torch::inductor::AOTIModelPackageLoader& model, const at::Tensor& tokens,
                       const at::Tensor& start_pos, const char* entry) {
  check_inputs(tokens, start_pos, entry);
  std::vector<at::Tensor> inputs = {tokens.to(device_).contiguous(), start_pos.to(device_).contiguous()};
  inputs.insert(inputs.end(), cache_.begin(), cache_.end());
  std::vector<at::Tensor> out = model.run(inputs);
  if (out.size() != 1 || out[0].dim() != 3 || out[0].size(0) != tokens.size(0) || out[0].size(1) != tokens.size(1) ||
      out[0].size(2) != manifest_.vocab_size)
    throw EngineError(std::string(entry) + " returned " + std::to_string(out.size()) + " outputs" +
                      (out.empty() ? std::string() : ", the first " + shape_str(out[0])) + "; expected logits [" +
                      std::to_string(tokens.size(0)) + ", " + std::to_string(tokens.size(1)) + ", " +
                      std::to_string(manifest_.vocab_size) + "]");
  return out[0];
}

at::Tensor Engine::prefill(const at::Tensor& tokens, const at::Tensor& start_pos) {
  return run(*prefill_, tokens, start_pos, "prefill");
}

at::Tensor Engine::decode(const at::Tensor& tokens, const at::Tensor& start_pos) {
  if (tokens.dim() != 2 || tokens.size(1) != 1)
    throw InputError("decode takes one token per sequence, found tokens " + shape_str(tokens));
  return run(*decode_, tokens, start_pos, "decode");
}

std::vector<std::vector<int64_t>> Engine::generate(const std::vector<std::vector<int64_t>>& prompts,
                                                   int64_t max_new_tokens, int64_t stop_token) {
  auto batch = static_cast<int64_t>(prompts.size());
  if (batch < 1 || batch > manifest_.max_batch)
    throw InputError(std::to_string(batch) + " prompts, the engine serves 1.." + std::to_string(manifest_.max_batch) +
                     " (max_batch)");
  if (max_new_tokens < 0) throw InputError("max_new_tokens must be >= 0, found " + std::to_string(max_new_tokens));
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto n = static_cast<int64_t>(prompts[i].size());
    if (n < 1) throw InputError("prompt " + std::to_string(i) + " is empty");
    // Same bound as the Python runtime (the last new token is never fed back, but both refuse alike).
    if (n + max_new_tokens > manifest_.max_len)
      throw InputError("prompt " + std::to_string(i) + " of " + std::to_string(n) + " tokens + " +
                       std::to_string(max_new_tokens) + " new tokens exceeds the engine's max_len " +
                       std::to_string(manifest_.max_len));
  }
  std::vector<std::vector<int64_t>> out(prompts.size());
  if (max_new_tokens == 0) return out;
  auto i64 = at::TensorOptions().dtype(c10::kLong);
  std::vector<std::vector<at::Tensor>> rows;  // per prompt: its batch-1 cache after prefill
  std::vector<int64_t> next(prompts.size()), pos(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto n = static_cast<int64_t>(prompts[i].size());
    allocate(1);
    at::Tensor logits = prefill(at::tensor(prompts[i], i64).view({1, n}), at::tensor(std::vector<int64_t>{0}, i64));
    next[i] = logits[0][n - 1].argmax().item<int64_t>();
    pos[i] = n;
    out[i].push_back(next[i]);
    rows.push_back(cache_);
  }
  for (size_t k = 0; k < manifest_.cache.size(); ++k) {  // stack the rows into one batch cache
    std::vector<at::Tensor> parts;
    for (const auto& r : rows) parts.push_back(r[k]);
    cache_[k] = at::cat(parts, 0);
  }
  rows.clear();
  auto done = [&](size_t i) {
    return static_cast<int64_t>(out[i].size()) >= max_new_tokens || out[i].back() == stop_token;
  };
  while (true) {
    bool all_done = true;
    for (size_t i = 0; i < out.size(); ++i) all_done = all_done && done(i);
    if (all_done) break;
    // A finished sequence keeps decoding its last token at a valid position; its row is never read again.
    std::vector<int64_t> feed_pos(pos);
    for (size_t i = 0; i < out.size(); ++i)
      if (done(i)) feed_pos[i] = std::min(pos[i], manifest_.max_len - 1);
    at::Tensor logits = decode(at::tensor(next, i64).view({batch, 1}), at::tensor(feed_pos, i64));
    at::Tensor ids = logits.select(1, 0).argmax(-1).cpu();
    for (size_t i = 0; i < out.size(); ++i) {
      if (done(i)) continue;
      next[i] = ids[static_cast<int64_t>(i)].item<int64_t>();
      out[i].push_back(next[i]);
      ++pos[i];
    }
  }
  return out;
}

}  // namespace v4
