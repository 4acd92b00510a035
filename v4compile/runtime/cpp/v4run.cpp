// v4run: greedy generation from a v4compile engine directory, without Python.
//   v4run ENGINE_DIR --prompt-ids 1,2,3 [--prompt-ids 4,5 ...] [--max-new-tokens N (16)] [--stop-token ID | --no-stop]
//   v4run --sha256 FILE...      (the checksums the manifest uses, like sha256sum)
// Prints the generated token ids of each prompt on one line, comma-separated (as `v4compile run` without
// --json); several --prompt-ids are generated as one batch.
// Errors are one line on stderr; exit 0 ok, 2 usage / input / engine error, 1 anything else.
#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "v4engine.h"

namespace {

constexpr const char* kUsage =
    "usage: v4run ENGINE_DIR --prompt-ids 1,2,3 [--prompt-ids ...] [--max-new-tokens N] [--stop-token ID | --no-stop]\n"
    "       v4run --sha256 FILE...\n"
    "Greedy generation from a v4compile engine; prints each prompt's generated token ids on one line,\n"
    "comma-separated. Several --prompt-ids are decoded together as one batch. --max-new-tokens: 16.\n"
    "By default generation stops after the config's eos_token_id.\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t parse_int(const std::string& text, const std::string& what) {
  if (text.empty()) throw UsageError(what + ": empty value");
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (*end != '\0' || errno == ERANGE) throw UsageError(what + ": \"" + text + "\" is not an integer");
  return v;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) ids.push_back(parse_int(part, "--prompt-ids"));
  if (ids.empty() || (!text.empty() && text.back() == ','))
    throw UsageError("--prompt-ids: expected comma-separated token ids, found \"" + text + "\"");
  return ids;
}

struct Args {
  std::string engine;
  std::vector<std::vector<int64_t>> prompts;
  int64_t max_new_tokens = 16;  // as `v4compile run`
  bool stop_given = false, no_stop = false;
  int64_t stop_token = -1;
};

Args parse_args(const std::vector<std::string>& argv) {
  Args a;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& s = argv[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= argv.size()) throw UsageError(s + " needs a value");
      return argv[++i];
    };
    if (s == "--prompt-ids") {
      a.prompts.push_back(parse_ids(value()));
    } else if (s == "--max-new-tokens") {
      a.max_new_tokens = parse_int(value(), s);
      if (a.max_new_tokens < 0) throw UsageError("--max-new-tokens must be >= 0");
    } else if (s == "--stop-token") {
      a.stop_token = parse_int(value(), s);
      a.stop_given = true;
    } else if (s == "--no-stop") {
      a.no_stop = true;
    } else if (!s.empty() && s[0] == '-') {
      throw UsageError("unknown option " + s);
    } else if (a.engine.empty()) {
      a.engine = s;
    } else {
      throw UsageError("unexpected argument \"" + s + "\"");
    }
  }
  if (a.engine.empty()) throw UsageError("missing ENGINE_DIR");
  if (a.prompts.empty()) throw UsageError("missing --prompt-ids");
  if (a.stop_given && a.no_stop) throw UsageError("--stop-token and --no-stop exclude each other");
  return a;
}

int run(const std::vector<std::string>& argv) {
  if (!argv.empty() && (argv[0] == "-h" || argv[0] == "--help")) {
    std::cout << kUsage;
    return 0;
  }
  if (!argv.empty() && argv[0] == "--sha256") {
    if (argv.size() < 2) throw UsageError("--sha256 needs at least one FILE");
    for (size_t i = 1; i < argv.size(); ++i) std::cout << v4::sha256_file(argv[i]) << "  " << argv[i] << "\n";
    return 0;
  }
  Args a = parse_args(argv);
  auto engine = v4::Engine::load(a.engine);
  int64_t stop = a.no_stop ? -1 : a.stop_given ? a.stop_token : engine->manifest().eos_token_id;
  std::string text;
  for (const auto& ids : engine->generate(a.prompts, a.max_new_tokens, stop)) {
    for (size_t i = 0; i < ids.size(); ++i) text += (i ? "," : "") + std::to_string(ids[i]);
    text += "\n";
  }
  std::cout << text << std::flush;
  return 0;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return run(args);
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const v4::EngineError& e) {
    std::cerr << "error: " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const v4::InputError& e) {
    std::cerr << "error: " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}
