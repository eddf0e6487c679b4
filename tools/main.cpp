// The `cca` command-line tool: one subcommand per tools/cmd_<name>.cpp.
// Exit status: 0 success, 1 runtime error (bad file, bad parameter value, failed check),
// 2 usage error (unknown flag, missing option, malformed number).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cca/error.hpp"
#include "commands.hpp"

#ifndef CCA_VERSION
#define CCA_VERSION "0.1.0"
#endif

int main(int argc, char** argv) {
  CLI::App app{"cca: Core Context Aware attention (CCA) kernels and tools", "cca"};
  app.set_version_flag("--version", "cca " CCA_VERSION);
  app.require_subcommand(1);
  cca::register_attention_command(app);
  cca::register_bench_command(app);
  cca::register_random_command(app);
  cca::register_compare_command(app);
  cca::register_generate_command(app);
  cca::register_perplexity_command(app);
  cca::register_info_command(app);
  cca::register_logits_command(app);
  cca::register_tokenize_command(app);
  cca::register_serve_command(app);
  cca::register_bench_model_command(app);  // adds `model` under `bench`
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "cca: error: %s\nRun with --help for usage.\n", e.what());
    return 2;
  } catch (const cca::Error& e) {
    std::fprintf(stderr, "cca: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "cca: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cca: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
