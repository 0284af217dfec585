//! The `cusa-pipe` binary: parse flags, hand over to the library, map errors to exit codes.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(cusa_pipe::cli::main());
}
