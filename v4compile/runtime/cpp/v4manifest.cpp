// Strict JSON reader, SHA-256 and manifest validation (see v4manifest.h).
#include "v4manifest.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

namespace v4 {

// ---------------------------------------------------------------- JSON

namespace json {

const char* type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "?";
}

const Value* Value::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& kv : members)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

namespace {

constexpr int kMaxDepth = 200;  // deeper nesting is refused instead of overflowing the stack

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  Value document() {
    skip_ws();
    Value v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < i_ && k < s_.size(); ++k) {
      if (s_[k] == '\n') { ++line; col = 1; } else { ++col; }
    }
    throw ParseError(what + " at line " + std::to_string(line) + " column " + std::to_string(col));
  }

  bool eof() const { return i_ >= s_.size(); }
  char peek() const { return eof() ? '\0' : s_[i_]; }

  void skip_ws() {
    while (!eof() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  void expect_word(const char* w) {
    size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) fail(std::string("invalid literal (expected '") + w + "')");
    i_ += n;
  }

  Value value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
    if (eof()) fail("unexpected end of input");
    Value v;
    char c = peek();
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') { v.type = Type::String; v.text = string(); return v; }
    if (c == 't') { expect_word("true"); v.type = Type::Bool; v.boolean = true; return v; }
    if (c == 'f') { expect_word("false"); v.type = Type::Bool; v.boolean = false; return v; }
    if (c == 'n') { expect_word("null"); return v; }
    if (c == 'N') { expect_word("NaN"); return special(std::numeric_limits<double>::quiet_NaN(), "NaN"); }
    if (c == 'I') { expect_word("Infinity"); return special(HUGE_VAL, "Infinity"); }
    if (c == '-' && s_.compare(i_, 9, "-Infinity") == 0) {
      i_ += 9;
      return special(-HUGE_VAL, "-Infinity");
    }
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail(std::string("unexpected character '") + c + "'");
  }

  static Value special(double d, const char* literal) {
    Value v;
    v.type = Type::Number;
    v.number = d;
    v.text = literal;
    return v;
  }

  Value object(int depth) {
    Value v;
    v.type = Type::Object;
    ++i_;  // '{'
    skip_ws();
    if (peek() == '}') { ++i_; return v; }
    std::set<std::string> seen;
    while (true) {
      skip_ws();
      if (peek() != '"') fail("expected a string key");
      std::string key = string();
      if (!seen.insert(key).second) fail("duplicate key \"" + key + "\"");
      skip_ws();
      if (peek() != ':') fail("expected ':'");
      ++i_;
      skip_ws();
      v.members.emplace_back(key, value(depth + 1));
      skip_ws();
      if (peek() == ',') { ++i_; continue; }
      if (peek() == '}') { ++i_; return v; }
      fail("expected ',' or '}'");
    }
  }

  Value array(int depth) {
    Value v;
    v.type = Type::Array;
    ++i_;  // '['
    skip_ws();
    if (peek() == ']') { ++i_; return v; }
    while (true) {
      skip_ws();
      v.items.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') { ++i_; continue; }
      if (peek() == ']') { ++i_; return v; }
      fail("expected ',' or ']'");
    }
  }

  Value number() {
    size_t start = i_;
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++i_;
    } else {
      fail("invalid number");
    }
    if (peek() == '.') {
      ++i_;
      if (!(peek() >= '0' && peek() <= '9')) fail("invalid number: digit expected after '.'");
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!(peek() >= '0' && peek() <= '9')) fail("invalid number: digit expected in exponent");
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    Value v;
    v.type = Type::Number;
    v.text = s_.substr(start, i_ - start);
    v.number = std::strtod(v.text.c_str(), nullptr);
    return v;
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      u <<= 4;
      if (c >= '0' && c <= '9') u |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') u |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') u |= unsigned(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape");
    }
    return u;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (eof()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character inside a string");
      if (c != '\\') { out += c; continue; }
      if (eof()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
            if (s_.compare(i_, 2, "\\u") != 0) fail("unpaired surrogate in \\u escape");
            i_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("invalid low surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate in \\u escape");
          }
          put_utf8(out, cp);
          break;
        }
        default: fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

}  // namespace

Value parse(const std::string& text) { return Parser(text).document(); }

}  // namespace json

// ---------------------------------------------------------------- SHA-256

namespace {

constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

}  // namespace

Sha256::Sha256()
    : h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19} {}

void Sha256::block(const uint8_t* p) {
  uint32_t w[64];
  for (int t = 0; t < 16; ++t)
    w[t] = uint32_t(p[4 * t]) << 24 | uint32_t(p[4 * t + 1]) << 16 | uint32_t(p[4 * t + 2]) << 8 | p[4 * t + 3];
  for (int t = 16; t < 64; ++t) {
    uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
    uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
    w[t] = w[t - 16] + s0 + w[t - 7] + s1;
  }
  uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
  for (int t = 0; t < 64; ++t) {
    uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kK[t] + w[t];
    uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g; h_[7] += h;
}

void Sha256::update(const void* data, size_t len) {
  if (done_) throw std::logic_error("Sha256::update after hexdigest");
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += len;
  if (buf_len_ > 0) {
    size_t take = std::min(len, sizeof(buf_) - buf_len_);
    std::memcpy(buf_ + buf_len_, p, take);
    buf_len_ += take; p += take; len -= take;
    if (buf_len_ < sizeof(buf_)) return;
    block(buf_);
    buf_len_ = 0;
  }
  for (; len >= 64; p += 64, len -= 64) block(p);
  std::memcpy(buf_, p, len);
  buf_len_ = len;
}

std::string Sha256::hexdigest() {
  if (!done_) {
    uint64_t bits = total_ * 8;
    uint8_t pad[72] = {0x80};
    size_t pad_len = (buf_len_ < 56) ? 56 - buf_len_ : 120 - buf_len_;
    for (int k = 0; k < 8; ++k) pad[pad_len + k] = uint8_t(bits >> (56 - 8 * k));
    update(pad, pad_len + 8);
    done_ = true;
  }
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (uint32_t v : h_)
    for (int k = 28; k >= 0; k -= 4) out += hex[(v >> k) & 0xF];
  return out;
}

namespace {

// OpenSSL's SHA-256 (SHA-NI / AVX2 code paths), looked up at run time so v4run needs no OpenSSL headers or link:
// 0.97 s per GB against 3.9 s for the portable code above (1 GB file in the page cache, `v4run --sha256` with
// and without V4RUN_SHA256=builtin, CI machine). Engines of tens of GB (the bench preset's weights file) are
// hashed on every load. V4RUN_SHA256=builtin forces the portable code (tests compare both against hashlib).
struct OpenSsl {
  void* (*ctx_new)() = nullptr;
  void (*ctx_free)(void*) = nullptr;
  const void* (*sha256)() = nullptr;
  int (*init)(void*, const void*, void*) = nullptr;
  int (*update)(void*, const void*, size_t) = nullptr;
  int (*final)(void*, unsigned char*, unsigned int*) = nullptr;
  bool ok = false;
};

const OpenSsl& openssl() {
  static const OpenSsl lib = [] {
    OpenSsl o;
    const char* force = std::getenv("V4RUN_SHA256");
    if (force && std::string(force) == "builtin") return o;
    void* h = nullptr;
    for (const char* name : {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"})
      if ((h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) return o;
    o.ctx_new = reinterpret_cast<void* (*)()>(dlsym(h, "EVP_MD_CTX_new"));
    o.ctx_free = reinterpret_cast<void (*)(void*)>(dlsym(h, "EVP_MD_CTX_free"));
    o.sha256 = reinterpret_cast<const void* (*)()>(dlsym(h, "EVP_sha256"));
    o.init = reinterpret_cast<int (*)(void*, const void*, void*)>(dlsym(h, "EVP_DigestInit_ex"));
    o.update = reinterpret_cast<int (*)(void*, const void*, size_t)>(dlsym(h, "EVP_DigestUpdate"));
    o.final = reinterpret_cast<int (*)(void*, unsigned char*, unsigned int*)>(dlsym(h, "EVP_DigestFinal_ex"));
    o.ok = o.ctx_new && o.ctx_free && o.sha256 && o.init && o.update && o.final;
    return o;
  }();
  return lib;
}

}  // namespace

std::string sha256_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw EngineError(path + ": cannot be read (" + std::strerror(errno) + ")");
  std::vector<char> buf(1 << 22);
  size_t n;
  const OpenSsl& ssl = openssl();
  void* ctx = ssl.ok ? ssl.ctx_new() : nullptr;
  std::string digest;
  if (ctx && ssl.init(ctx, ssl.sha256(), nullptr) == 1) {
    bool good = true;
    while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) good = good && ssl.update(ctx, buf.data(), n) == 1;
    unsigned char md[32];
    unsigned int len = 0;
    if (good && ssl.final(ctx, md, &len) == 1 && len == 32) {
      static const char* hex = "0123456789abcdef";
      for (unsigned char c : md) digest += {hex[c >> 4], hex[c & 0xF]};
    }
  }
  if (ctx) ssl.ctx_free(ctx);
  if (digest.empty()) {  // no usable OpenSSL: the portable implementation
    std::rewind(f);
    Sha256 sha;
    while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) sha.update(buf.data(), n);
    digest = sha.hexdigest();
  }
  bool bad = std::ferror(f);
  std::fclose(f);
  if (bad) throw EngineError(path + ": read error");
  return digest;
}

// ---------------------------------------------------------------- manifest

namespace {

const json::Value& field(const json::Value& obj, const std::string& key, json::Type t, const std::string& where) {
  const json::Value* v = obj.find(key);
  if (!v) throw EngineError("manifest.json: " + where + " has no \"" + key + "\"");
  if (!v->is(t))
    throw EngineError("manifest.json: " + where + "." + key + " must be a " + json::type_name(t) + ", found " +
                      json::type_name(v->type));
  return *v;
}

int64_t as_int(const json::Value& v, const std::string& what) {
  if (!v.is(json::Type::Number) || v.text.find_first_of(".eEIN") != std::string::npos)
    throw EngineError("manifest.json: " + what + " must be an integer, found " +
                      (v.is(json::Type::Number) ? v.text : json::type_name(v.type)));
  errno = 0;
  long long x = std::strtoll(v.text.c_str(), nullptr, 10);
  if (errno == ERANGE) throw EngineError("manifest.json: " + what + " out of range: " + v.text);
  return x;
}

int64_t int_field(const json::Value& obj, const std::string& key, const std::string& where) {
  return as_int(field(obj, key, json::Type::Number, where), where + "." + key);
}

std::string str_field(const json::Value& obj, const std::string& key, const std::string& where) {
  return field(obj, key, json::Type::String, where).text;
}

std::vector<CacheTensorSpec> read_cache_tensors(const json::Value& cache) {
  std::vector<CacheTensorSpec> out;
  const json::Value& tensors = field(cache, "tensors", json::Type::Array, "cache");
  for (size_t k = 0; k < tensors.items.size(); ++k) {
    const json::Value& t = tensors.items[k];
    std::string where = "cache.tensors[" + std::to_string(k) + "]";
    if (!t.is(json::Type::Object)) throw EngineError("manifest.json: " + where + " must be an object");
    CacheTensorSpec spec;
    spec.name = str_field(t, "name", where);
    spec.dtype = str_field(t, "dtype", where);
    spec.init = str_field(t, "init", where);
    if (spec.init != "zeros" && spec.init != "neg_inf")
      throw EngineError("manifest.json: " + where + ".init is \"" + spec.init + "\", expected \"zeros\" or \"neg_inf\"");
    const json::Value& shape = field(t, "shape", json::Type::Array, where);
    for (size_t d = 0; d < shape.items.size(); ++d) {
      int64_t n = as_int(shape.items[d], where + ".shape[" + std::to_string(d) + "]");
      bool ok = d == 0 ? n == -1 : n >= 0;
      if (!ok)
        throw EngineError("manifest.json: " + where + ".shape[" + std::to_string(d) + "] = " + std::to_string(n) +
                          (d == 0 ? ", expected -1 (the batch dimension)" : ", expected a size >= 0"));
      spec.shape.push_back(n);
    }
    if (spec.shape.empty()) throw EngineError("manifest.json: " + where + ".shape is empty (needs a batch dim)");
    out.push_back(std::move(spec));
  }
  return out;
}

std::vector<int64_t> int_list(const json::Value& v, const std::string& what) {
  if (!v.is(json::Type::Array)) throw EngineError("manifest.json: " + what + " must be an array of integers");
  std::vector<int64_t> out;
  for (size_t k = 0; k < v.items.size(); ++k) out.push_back(as_int(v.items[k], what + "[" + std::to_string(k) + "]"));
  return out;
}

// "weights": {"file": NAME, "models": {MODEL: {FQN: [KEY, SHAPE, STRIDE, OFFSET], ...}, ...}}
void read_weights_section(const json::Value& root, Manifest& m) {
  const json::Value& w = field(root, "weights", json::Type::Object, "manifest");
  m.weights_file = str_field(w, "file", "weights");
  if (m.weights_file.empty() || m.weights_file.find('/') != std::string::npos || m.weights_file == "." ||
      m.weights_file == ".." || m.weights_file == "manifest.json")
    throw EngineError("manifest.json: weights.file \"" + m.weights_file + "\" is not a file name in the engine directory");
  const json::Value& models = field(w, "models", json::Type::Object, "weights");
  for (const auto& model : models.members) {
    std::string where = "weights.models." + model.first;
    if (!model.second.is(json::Type::Object)) throw EngineError("manifest.json: " + where + " must be an object");
    auto& views = m.weights[model.first];
    for (const auto& c : model.second.members) {
      std::string at = where + "[\"" + c.first + "\"]";
      const json::Value& e = c.second;
      if (!e.is(json::Type::Array) || e.items.size() != 4 || !e.items[0].is(json::Type::String))
        throw EngineError("manifest.json: " + at + " must be [key, shape, stride, offset]");
      ConstantView v{c.first, e.items[0].text, int_list(e.items[1], at + ".shape"), int_list(e.items[2], at + ".stride"),
                     as_int(e.items[3], at + ".offset")};
      if (v.shape.size() != v.stride.size() || v.offset < 0)
        throw EngineError("manifest.json: " + at + ": shape and stride differ in length, or a negative offset");
      views.push_back(std::move(v));
    }
  }
}

bool safe_relative_path(const std::string& p) {
  if (p.empty() || p[0] == '/' || p == "manifest.json") return false;
  std::stringstream ss(p);
  std::string part;
  while (std::getline(ss, part, '/'))
    if (part.empty() || part == "." || part == "..") return false;
  return true;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw EngineError(path + ": cannot be read (not an engine directory?)");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

std::pair<int, int> major_minor(const std::string& version) {
  int major = 0, minor = 0;
  char dot = 0;
  std::istringstream in(version);
  if (!(in >> major >> dot >> minor) || dot != '.')
    throw EngineError("manifest.json: torch version \"" + version + "\" has no major.minor");
  return {major, minor};
}

Manifest read_manifest(const std::string& engine_dir) {
  std::string path = engine_dir + "/manifest.json";
  json::Value root;
  try {
    root = json::parse(read_text(path));
  } catch (const json::ParseError& e) {
    throw EngineError(path + ": invalid JSON: " + e.what());
  }
  if (!root.is(json::Type::Object)) throw EngineError(path + ": top level must be an object");
  Manifest m;
  m.format_version = int_field(root, "format_version", "manifest");
  if (m.format_version != kFormatVersion)
    throw EngineError("format version " + std::to_string(m.format_version) + ", this v4run reads " +
                      std::to_string(kFormatVersion));
  const json::Value* ver = root.find("v4compile");
  m.v4compile_version = ver && ver->is(json::Type::String) ? ver->text : "";
  m.torch_version = str_field(root, "torch", "manifest");
  m.target = str_field(root, "target", "manifest");
  m.arch = str_field(root, "arch", "manifest");
  m.precision = str_field(root, "precision", "manifest");

  const json::Value& config = field(root, "config", json::Type::Object, "manifest");
  m.vocab_size = int_field(config, "vocab_size", "config");
  if (m.vocab_size <= 0) throw EngineError("manifest.json: config.vocab_size must be > 0");
  const json::Value* eos = config.find("eos_token_id");
  if (eos && !eos->is(json::Type::Null)) m.eos_token_id = as_int(*eos, "config.eos_token_id");

  const json::Value& cache = field(root, "cache", json::Type::Object, "manifest");
  m.max_batch = int_field(cache, "max_batch", "cache");
  m.max_len = int_field(cache, "max_len", "cache");
  if (m.max_batch < 1 || m.max_len < 1) throw EngineError("manifest.json: cache.max_batch and max_len must be >= 1");
  m.cache = read_cache_tensors(cache);
  read_weights_section(root, m);

  const json::Value& files = field(root, "files", json::Type::Object, "manifest");
  for (const auto& kv : files.members) {
    if (!safe_relative_path(kv.first))
      throw EngineError("manifest.json: files lists \"" + kv.first + "\", not a path inside the engine directory");
    if (!kv.second.is(json::Type::String) || kv.second.text.size() != 64 ||
        kv.second.text.find_first_not_of("0123456789abcdef") != std::string::npos)
      throw EngineError("manifest.json: files[\"" + kv.first + "\"] must be a lowercase sha256 hex string");
    m.files.emplace_back(kv.first, kv.second.text);
  }
  bool has_model = false;
  for (const auto& kv : m.files) has_model = has_model || kv.first == "model.pt2";
  if (!has_model) throw EngineError("manifest.json: files has no checksum for model.pt2");
  bool has_weights = false;
  for (const auto& kv : m.files) has_weights = has_weights || kv.first == m.weights_file;
  if (!has_weights) throw EngineError("manifest.json: files has no checksum for " + m.weights_file);
  return m;
}

void verify_files(const Manifest& m, const std::string& engine_dir) {
  for (const auto& kv : m.files) {
    std::string path = engine_dir + "/" + kv.first;
    std::string got = sha256_file(path);
    if (got != kv.second)
      throw EngineError("checksum mismatch for " + kv.first + ": manifest says sha256 " + kv.second + ", file has " +
                        got + " (the engine was modified or damaged)");
  }
}

}  // namespace v4
