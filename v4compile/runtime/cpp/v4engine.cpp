// v4::Engine (see v4engine.h): manifest checks, cache allocation, prefill/decode through AOTInductor.
#include "v4engine.h"

#include <ATen/ops/argmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/tensor.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <unordered_map>

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

// The engine's weights file (runtime/weights.py): safetensors, i.e. an 8-byte little-endian header length, a JSON
// header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} and the raw data. Each
// stored tensor the manifest names is read once, moved to the device and shared by every model that names it.
using StoredTensors = std::unordered_map<std::string, at::Tensor>;

c10::ScalarType safetensors_dtype(const std::string& code, const std::string& where) {
  static const std::map<std::string, c10::ScalarType> kCodes = {
      {"F64", c10::kDouble}, {"F32", c10::kFloat},  {"F16", c10::kHalf},  {"BF16", c10::kBFloat16},
      {"I64", c10::kLong},   {"I32", c10::kInt},    {"I16", c10::kShort}, {"I8", c10::kChar},
      {"U8", c10::kByte},    {"BOOL", c10::kBool},  {"F8_E4M3", c10::ScalarType::Float8_e4m3fn},
      {"F8_E5M2", c10::ScalarType::Float8_e5m2},    {"F8_E8M0", c10::ScalarType::Float8_e8m0fnu},
  };
  auto it = kCodes.find(code);
  if (it == kCodes.end()) throw EngineError(where + ": dtype \"" + code + "\", which v4run does not read");
  return it->second;
}

StoredTensors read_stored_tensors(const std::string& path, const Manifest& m, const c10::Device& device) {
  std::set<std::string> wanted;
  for (const auto& model : m.weights)
    for (const auto& v : model.second) wanted.insert(v.key);
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw EngineError(m.weights_file + ": cannot be opened");
  const uint64_t file_size = static_cast<uint64_t>(f.tellg());
  uint64_t header_len = 0;
  unsigned char len_bytes[8];
  f.seekg(0);
  if (file_size < 8 || !f.read(reinterpret_cast<char*>(len_bytes), 8))
    throw EngineError(m.weights_file + ": too short to be a safetensors file");
  for (int k = 7; k >= 0; --k) header_len = (header_len << 8) | len_bytes[k];
  if (header_len > file_size - 8) throw EngineError(m.weights_file + ": header length past the end of the file");
  std::string text(header_len, '\0');
  if (!f.read(text.data(), static_cast<std::streamsize>(header_len)))
    throw EngineError(m.weights_file + ": cannot read its header");
  json::Value header;
  try {
    header = json::parse(text);
  } catch (const json::ParseError& e) {
    throw EngineError(m.weights_file + ": header is not valid JSON: " + e.what());
  }
  if (!header.is(json::Type::Object)) throw EngineError(m.weights_file + ": header is not a JSON object");
  const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;
  StoredTensors out;
  for (const auto& member : header.members) {
    if (member.first == "__metadata__" || !wanted.count(member.first)) continue;
    std::string where = m.weights_file + ": tensor " + member.first;
    const json::Value& e = member.second;
    const json::Value* dtype = e.find("dtype");
    const json::Value* shape = e.find("shape");
    const json::Value* offsets = e.find("data_offsets");
    if (!dtype || !dtype->is(json::Type::String) || !shape || !shape->is(json::Type::Array) || !offsets ||
        !offsets->is(json::Type::Array) || offsets->items.size() != 2)
      throw EngineError(where + ": needs dtype, shape and data_offsets [begin, end]");
    c10::ScalarType st = safetensors_dtype(dtype->text, where);
    std::vector<int64_t> sizes;
    int64_t numel = 1;
    for (const auto& d : shape->items) {
      if (!d.is(json::Type::Number) || d.number < 0) throw EngineError(where + ": bad shape");
      sizes.push_back(static_cast<int64_t>(d.number));
      numel *= sizes.back();
    }
    for (const auto& o : offsets->items)
      if (!o.is(json::Type::Number) || o.number < 0) throw EngineError(where + ": bad data_offsets");
    const uint64_t begin = static_cast<uint64_t>(offsets->items[0].number);
    const uint64_t end = static_cast<uint64_t>(offsets->items[1].number);
    const uint64_t nbytes = static_cast<uint64_t>(numel) * c10::elementSize(st);
    if (end < begin || end - begin != nbytes || end > data_size)
      throw EngineError(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                        ") do not match its dtype and shape or lie past the end of the file (truncated?)");
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(st));
    f.seekg(static_cast<std::streamoff>(data_start + begin));
    if (nbytes && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes)))
      throw EngineError(where + ": read error");
    out.emplace(member.first, device.is_cpu() ? t : t.to(device));
  }
  for (const auto& key : wanted)
    if (!out.count(key)) throw EngineError(m.weights_file + " has no tensor \"" + key + "\" that the manifest names");
  return out;
}

// Binds a model's constants (views of the stored tensors) as user-managed tensors: the Engine keeps them alive.
// Running a model with unbound constants crashes, so a constant the manifest does not list is an error here.
void bind_constants(torch::inductor::AOTIModelPackageLoader& loader, const std::string& model, const Manifest& m,
                    const StoredTensors& stored) {
  std::unordered_map<std::string, at::Tensor> constants;
  auto it = m.weights.find(model);
  if (it != m.weights.end())
    for (const auto& v : it->second) {
      try {
        constants[v.fqn] = stored.at(v.key).as_strided(v.shape, v.stride, v.offset);
      } catch (const c10::Error& e) {
        throw EngineError("manifest.json: constant " + v.fqn + " of model \"" + model + "\" does not fit stored tensor " +
                          v.key);
      }
    }
  std::vector<std::string> missing;
  for (const auto& fqn : loader.get_constant_fqns())
    if (!constants.count(fqn)) missing.push_back(fqn);
  if (!missing.empty())
    throw EngineError("model \"" + model + "\" needs " + std::to_string(missing.size()) + " constants that " +
                      m.weights_file + " lacks (first: " + missing.front() + ")");
  loader.load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
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
  e->weights_ = read_stored_tensors(dir + "/" + e->manifest_.weights_file, e->manifest_, e->device_);
  for (const char* name : {"prefill", "decode"}) {
    try {
      auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package, name);
      bind_constants(*loader, name, e->manifest_, e->weights_);
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
