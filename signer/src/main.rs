//! The `signet` binary. Subcommands live in `cli/`: `signet serve` runs the appliance; `signet mint`,
//! `signet bundle` and `signet status` are its clients; `signet token ...` manages PKCS#11 tokens and keys.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
