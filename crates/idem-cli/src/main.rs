//! The `idem` binary: see the `idem_cli` library docs and `idem --help`.

fn main() -> std::process::ExitCode {
    idem_cli::main_with_args(std::env::args_os())
}
