//! The `gatehouse` binary: parses the command line and hands over to the library.

/// mimalloc instead of the system allocator: the ingress allocates per request (headers,
/// forms, JSON, metrics labels), and glibc's malloc was ~16 % of its CPU samples under load
/// (BENCHMARKS.md, figure 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
