//! Fuzz targets of the filter core. The properties live in `checks`, which
//! the root crate's `tests/fuzz_regressions.rs` also compiles, so every
//! committed crash input is replayed by `cargo test`.

pub mod checks;
