//! `dps-bench`'s shared parts: the hot-path fixtures its microbenchmarks time, here so the
//! criterion benches (`cargo bench -p dps-bench`) run exactly the same code.

pub mod micro;
