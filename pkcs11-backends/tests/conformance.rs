//! The token conformance suite: the same cases against every token provider, in one test binary (to
//! keep link time down).
//!
//! - `softhsm::*`: a fresh SoftHSM2 token per case (`testing::SoftHsm`).
//! - `hsm_sim::*`: the workspace's simulated HSM (`testing::HsmSim`), one token per process in a
//!   temporary directory, each case with its own key labels.
//! - `tpm::*`: a TPM 2.0 through tpm2-pkcs11 (`testing::Tpm`), when `scripts/tpm-rig` is running and
//!   its environment is exported (the test script does both); without it each case prints SKIP.
//!
//! What a token cannot do is asked of the token (mechanism list, profile) and printed as a SKIP
//! line. `softhsm_only` and `tpm_only` hold what only makes sense on one provider (re-initialising
//! the library, the TPM going away and coming back).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code and its helpers: a failed expectation is a failed test"
)]

#[path = "conformance/cases.rs"]
mod cases;
#[path = "conformance/common.rs"]
mod common;
#[path = "conformance/softhsm_only.rs"]
mod softhsm_only;
#[path = "conformance/tpm_only.rs"]
mod tpm_only;

/// Every case, as one `#[test]` per case for the provider whose fixture is `$fixture`.
macro_rules! conformance {
    ($provider:ident, $fixture:path) => {
        mod $provider {
            use signet_pkcs11::KeyType;

            use crate::cases;

            macro_rules! case {
                ($name:ident, $body:expr) => {
                    #[test]
                    fn $name() {
                        let Some(f) = $fixture() else { return };
                        #[allow(clippy::redundant_closure_call)]
                        ($body)(&f);
                    }
                };
            }

            case!(ec_p256_signs_and_verifies, |f| {
                cases::key_type_signs_and_verifies(f, KeyType::EcP256)
            });
            case!(ec_p384_signs_and_verifies, |f| {
                cases::key_type_signs_and_verifies(f, KeyType::EcP384)
            });
            case!(rsa_2048_signs_and_verifies, |f| {
                cases::key_type_signs_and_verifies(f, KeyType::Rsa2048)
            });
            case!(rsa_3072_signs_and_verifies, |f| {
                cases::key_type_signs_and_verifies(f, KeyType::Rsa3072)
            });
            case!(rsa_4096_signs_and_verifies, |f| {
                cases::key_type_signs_and_verifies(f, KeyType::Rsa4096)
            });
            case!(ed25519_signs_and_verifies, |f| {
                cases::key_type_signs_and_verifies(f, KeyType::Ed25519)
            });
            case!(der_reencoding, cases::der_reencoding);
            case!(
                find_by_label_after_reopen,
                cases::find_by_label_after_reopen
            );
            case!(
                private_key_not_exportable,
                cases::private_key_not_exportable
            );
            case!(
                two_sessions_on_two_threads,
                cases::two_sessions_on_two_threads
            );
            case!(wrong_pin, cases::wrong_pin);
            case!(unknown_token_label, cases::unknown_token_label);
            case!(unknown_key_label, cases::unknown_key_label);
            case!(unsupported_mechanism, cases::unsupported_mechanism);
            case!(destroy, cases::destroy);
            case!(replace, cases::replace);
            case!(
                session_objects_match_the_profile,
                cases::session_objects_match_the_profile
            );
        }
    };
}

conformance!(softhsm, crate::common::softhsm);
conformance!(hsm_sim, crate::common::hsm_sim);
conformance!(tpm, crate::common::tpm);
