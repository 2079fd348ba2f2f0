// kvq: one binary, one subcommand per job (run, perplexity, info, bench, passkey, calibrate).
// Every failure ends here as one line, "kvq: error: <message>": exit code 2 for
// usage errors (bad flags or values), 1 for everything else.
#include <fmt/format.h>

#include <csignal>
#include <cstdio>
#include <algorithm>
#include <map>
#include <new>

#include "common.h"

namespace {

int usage_error(const std::string& message, const std::string& help_hint) {
  fmt::print(stderr, "kvq: error: {} (see '{} --help')\n", message, help_hint);
  return 2;
}

// CLI11 messages sometimes span lines; the tool promises one.
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  // A closed pipe (kvq run ... | head) is reported as a write error, not a signal.
  std::signal(SIGPIPE, SIG_IGN);

  CLI::App app{fmt::format("kvq {}: LLM inference with a quantized KV cache (GGUF llama-family models, CPU)",
                           kvq::version()),
               "kvq"};
  app.set_version_flag("--version", std::string(kvq::version()));
  app.require_subcommand(1);
  app.fallthrough(false);
  app.footer("Run 'kvq SUBCOMMAND --help' for the flags of each subcommand.");

  std::map<const CLI::App*, kvq::cli::Command> commands;
  std::string help_hint = "kvq";
  try {
    for (auto reg : {kvq::cli::register_run, kvq::cli::register_perplexity, kvq::cli::register_info,
                     kvq::cli::register_bench, kvq::cli::register_passkey, kvq::cli::register_calibrate}) {
      auto command = reg(app);
      commands.emplace(app.get_subcommands({}).back(), std::move(command));
    }

    if (argc < 2) {
      fmt::print(stderr, "{}", app.help());
      return 2;
    }
    auto args = kvq::cli::normalize_args(argc, argv);
    // The subcommand named first decides which --help the error message points at.
    if (!args.empty() && !args.front().empty() && args.front()[0] != '-') {
      std::string names;
      for (const auto* sub : app.get_subcommands({})) {
        names += (names.empty() ? "" : ", ") + sub->get_name();
        if (sub->get_name() == args.front()) help_hint = "kvq " + args.front();
      }
      if (help_hint == "kvq")
        return usage_error(fmt::format("unknown subcommand '{}' (valid: {})", args.front(), names), "kvq");
    }
    std::reverse(args.begin(), args.end());  // CLI11 takes the vector back to front
    app.parse(args);

    for (const auto& [sub, command] : commands)
      if (sub->parsed()) return command();
    return usage_error("no subcommand given", "kvq");
  } catch (const CLI::Success& e) {  // --help, --help-all, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return usage_error(one_line(e.what()), help_hint);
  } catch (const kvq::cli::UsageError& e) {
    return usage_error(one_line(e.what()), help_hint);
  } catch (const kvq::Error& e) {
    fmt::print(stderr, "kvq: error: {}\n", one_line(e.what()));
    return 1;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "kvq: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvq: error: {}\n", one_line(e.what()));
    return 1;
  }
}
