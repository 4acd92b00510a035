// Engine manifest: a strict JSON reader, SHA-256, and the manifest subset v4run needs.
// No libtorch here, so this translation unit compiles in about a second.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace v4 {

// An engine directory that is missing, modified, or built for another machine / format.
class EngineError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad runtime input: token ids out of range, sequence past max length, wrong batch.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace json {

// Malformed JSON text; the message carries line and column.
class ParseError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Type { Null, Bool, Number, String, Array, Object };

const char* type_name(Type t);

// One JSON value. Numbers keep their literal text so integers stay exact past 2^53.
class Value {
 public:
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string text;  // string contents, or the number's literal
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> members;  // in file order, keys unique

  bool is(Type t) const { return type == t; }
  const Value* find(const std::string& key) const;  // nullptr when absent or not an object
};

// Parses RFC 8259 JSON plus NaN / Infinity / -Infinity (Python's json.dumps writes them).
Value parse(const std::string& text);

}  // namespace json

// Incremental SHA-256 (FIPS 180-4).
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  std::string hexdigest();  // finalises; the object cannot be updated afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
  bool done_ = false;
};

// Hex SHA-256 of a file's bytes; throws EngineError when it cannot be read.
std::string sha256_file(const std::string& path);

// One cache tensor of the calling convention; shape[0] == -1 stands for the batch.
struct CacheTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // "float32", "bfloat16", ...
  std::string init;   // "zeros" | "neg_inf"
};

// One constant of a model: a view (shape, stride, offset) of a tensor stored in the weights file.
struct ConstantView {
  std::string fqn;
  std::string key;  // the stored (flat) tensor's name in the weights file
  std::vector<int64_t> shape;
  std::vector<int64_t> stride;
  int64_t offset = 0;
};

struct Manifest {
  int64_t format_version = 0;
  std::string v4compile_version;
  std::string torch_version;  // e.g. "2.13.0+cpu"
  std::string target;         // "cpu" | "h100" | "h200"
  std::string arch;           // "cpu" | "sm_90"
  std::string precision;
  int64_t vocab_size = 0;
  int64_t eos_token_id = -1;  // -1 when the config has none
  int64_t max_batch = 0;
  int64_t max_len = 0;
  std::vector<CacheTensorSpec> cache;
  std::string weights_file;  // safetensors file in the engine directory holding every model's constants
  std::map<std::string, std::vector<ConstantView>> weights;  // model name -> its constants
  std::vector<std::pair<std::string, std::string>> files;  // relative path -> sha256 hex
};

// The format version this reader understands.
constexpr int64_t kFormatVersion = 2;

// Reads and validates ENGINE_DIR/manifest.json (format version first); throws EngineError.
Manifest read_manifest(const std::string& engine_dir);

// Checks the sha256 of every listed file; throws EngineError naming the first file that differs.
void verify_files(const Manifest& m, const std::string& engine_dir);

// "2.13.0+cpu" -> {2, 13}; throws EngineError when the text has no major.minor.
std::pair<int, int> major_minor(const std::string& version);

}  // namespace v4
