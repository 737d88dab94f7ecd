//! The `tripgate` binary: the CLI's edge, where errors become one line and an exit code.

fn main() -> std::process::ExitCode {
    tripgate::cli::main()
}
