//! The ceiling: the raw signature rate of a token with a number of sessions, measured with a bare loop of C_Sign
//! (CKM_ECDSA over a SHA-256 digest computed on the host) on one thread per session, the same token and key type
//! signet signs with. signet's rate over it is the figure that says what the appliance costs on top of the HSM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use signet_pkcs11::cryptoki::mechanism::Mechanism;
use signet_pkcs11::{KeyGenOptions, KeyType, Pin, PinSource, Token, TokenConfig};

/// The token to measure.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The PKCS#11 module (or signet's built-in one).
    pub module: PathBuf,
    /// The token's label.
    pub label: String,
    /// The user PIN (zeroised on drop; `Debug` does not show it).
    pub pin: Pin,
}

/// The label of the key the ceiling signs with (created on the token when missing).
pub const CEILING_KEY: &str = "signet-bench-ceiling";

/// Signatures a second of a bare C_Sign loop on `sessions` sessions (one thread each) for `duration` after a short
/// warm-up.
pub fn token_ceiling(spec: &TokenSpec, sessions: usize, duration: Duration) -> Result<f64, String> {
    let cfg = TokenConfig::new(
        spec.module.clone(),
        spec.label.clone(),
        PinSource::Value(spec.pin.clone()),
    );
    let token = Token::open(&cfg).map_err(|e| format!("opening token {:?}: {e}", spec.label))?;
    let mut s = token.session().map_err(|e| format!("session: {e}"))?;
    if s.find_key(CEILING_KEY).is_err() {
        s.generate_key(CEILING_KEY, KeyType::EcP256, KeyGenOptions::default())
            .map_err(|e| format!("generating the ceiling key: {e}"))?;
    }
    drop(s);
    let mut workers = Vec::with_capacity(sessions);
    for _ in 0..sessions.max(1) {
        let mut s = token.session().map_err(|e| format!("session: {e}"))?;
        let key = s
            .find_key(CEILING_KEY)
            .map_err(|e| format!("ceiling key: {e}"))?;
        workers.push((s, key));
    }
    let warm = Duration::from_millis(300).min(duration / 4);
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let start = Instant::now();
    let measure_from = start + warm;
    let end = measure_from + duration;
    std::thread::scope(|scope| {
        for (s, key) in workers.iter_mut() {
            let (done, failed) = (&done, &failed);
            let (s, key) = (&mut *s, &*key);
            scope.spawn(move || {
                let handle = key.private_handle();
                let r = s.with_raw_session(|raw| {
                    let mut i = 0u64;
                    loop {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        i += 1;
                        let digest = ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes());
                        match raw.sign(&Mechanism::Ecdsa, handle, digest.as_ref()) {
                            Ok(sig) => {
                                std::hint::black_box(sig);
                                if now >= measure_from {
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
                if r.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let secs = Instant::now().duration_since(measure_from).as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(format!("{failed} signatures of the ceiling loop failed"));
    }
    Ok(crate::stats::per_second(done.load(Ordering::Relaxed), secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_pin() {
        let spec = TokenSpec {
            module: "/m.so".into(),
            label: "t".into(),
            pin: Pin::new("s3cret-pin"),
        };
        let shown = format!("{spec:?} {spec:#?}");
        assert!(!shown.contains("s3cret-pin"), "{shown}");
    }
}
