//! The `tripgate` binary: the CLI's edge, where errors become one line and an exit code.

/// jemalloc rather than the system allocator: a quarter less CPU per proxied request
/// (BENCHMARKS.md §0c run 8).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    tripgate::cli::main()
}
