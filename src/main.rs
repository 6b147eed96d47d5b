//! The `gatehouse` binary: parses the command line and hands over to the library.

/// mimalloc instead of the system allocator: the ingress allocates per request (headers,
/// forms, JSON, metrics labels), and glibc's malloc was ~16 % of its CPU samples under load
/// (BENCHMARKS.md, figure 4). Built without transparent huge pages (`no_thp`): mimalloc would
/// `madvise` its arenas for them, and each range it returned to the kernel and touched again
/// cost a fresh 2 MiB page to zero, ~0.4–0.8 µs per webhook in the kernel (BENCHMARKS §16).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
