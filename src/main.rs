//! The `dag` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    dag::shell::quiet_headless_wayland();
    dag::cli::main()
}
