//! The `llama32` command-line tool.
fn main() {}
