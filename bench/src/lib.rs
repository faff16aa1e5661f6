//! What the benchmark harness shares with the integration tests: reading a process's memory.

pub mod memory;
