// The `cca` subcommands: each tools/cmd_<name>.cpp defines one register_<name>_command, which adds
// its subcommand (options and callback) to the app. Callbacks report failures by throwing
// cca::Error; tools/main.cpp prints them as `cca: error: <message>` and exits 1.
#pragma once

namespace CLI {
class App;
}

namespace cca {

void register_attention_command(CLI::App& app);  // cmd_attention.cpp
void register_bench_command(CLI::App& app);      // cmd_bench.cpp
void register_random_command(CLI::App& app);     // cmd_random.cpp
void register_compare_command(CLI::App& app);    // cmd_compare.cpp

void register_generate_command(CLI::App& app);    // cmd_generate.cpp
void register_perplexity_command(CLI::App& app);  // cmd_perplexity.cpp
void register_info_command(CLI::App& app);        // cmd_info.cpp
void register_logits_command(CLI::App& app);      // cmd_logits.cpp
void register_tokenize_command(CLI::App& app);    // cmd_tokenize.cpp
void register_serve_command(CLI::App& app);       // cmd_serve.cpp
// cmd_bench_model.cpp: `bench model`; register after register_bench_command.
void register_bench_model_command(CLI::App& app);

}  // namespace cca
