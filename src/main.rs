//! The `dag` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    dag::cli::main()
}
