//! The `signet` binary. Subcommands live in `cli/` (`signet token ...` manages PKCS#11 tokens and
//! keys).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
