//! signet's benchmarks. The criterion micro-benchmarks live in `benches/`; see the README's
//! "Performance" section for how to run them and what they measured.
#![forbid(unsafe_code)]
