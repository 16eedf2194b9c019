//! The `signet` binary. Subcommands live in `cli/`: `signet serve` runs the appliance; `signet mint`,
//! `signet bundle` and `signet status` are its clients; `signet token ...` manages PKCS#11 tokens and keys;
//! `signet doctor` checks an appliance's configuration and environment offline.

mod cli;

fn main() -> std::process::ExitCode {
    // Keep the embedded simulator's PKCS#11 entry point in the executable (build.rs exports it): it is the module
    // of the embedded default token, loaded from the program itself.
    std::hint::black_box(hsm_sim::C_GetFunctionList as *const ());
    cli::main()
}
