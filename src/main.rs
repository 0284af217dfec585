//! The `cusa-pipe` binary: parse flags, hand over to the library, map errors to exit codes.

fn main() {
    std::process::exit(cusa_pipe::cli::main());
}
