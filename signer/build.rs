//! Exports the embedded hsm-sim's `C_GetFunctionList` from the `signet` executable, so that the token layer can
//! load the simulator linked into the program (`builtin:`, through `Pkcs11::new_from_self`) as the embedded default
//! token: nothing to install to try signet.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=C_GetFunctionList");
}
