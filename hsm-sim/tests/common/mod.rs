//! What the integration tests share: where cargo put the built module.

use std::path::PathBuf;

/// The cdylib cargo built for this test: next to the test binary in `deps/`, or one level up.
pub fn module() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let deps = exe.parent().expect("the test binary's directory");
    let candidates = [deps.join("libhsm_sim.so"), deps.join("../libhsm_sim.so")];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libhsm_sim.so not found (looked at {candidates:?}); build the hsm-sim cdylib first"
            )
        })
}
