//! [`PipelineKey`]: an [`AuthorityKey`] whose signatures go through the pipeline.
//!
//! `sign(scheme, message)` hashes on the calling thread, submits the digest (Ed25519: the message) and blocks that
//! thread until the reply arrives or the deadline passes. It is meant for CPU-pool threads (rcgen's synchronous
//! `SigningKey::sign(tbs)`), never for an async task: from async code use
//! [`Pipeline::submit_digest`](super::Pipeline::submit_digest). The deadline is the one set with
//! [`with_deadline`](super::with_deadline), else now + the pipeline's `default_timeout`. `sign_then` submits the same
//! job without waiting: its continuation runs on the HSM worker that answers (direct-mode X509-SVIDs).
//!
//! The issuance core checks every X.509 and JWT signature after signing and reports the outcome with
//! [`AuthorityKey::post_sign_checked`]. To count a failed check against the token that made the signature, the
//! thread that receives a signature notes which token made it ([`note_signer`]): `sign` on its own thread; for
//! `sign_then`, the continuation's thread, and the direct-mode completion carries the note to the CPU thread that
//! runs the check ([`take_signer`] / [`restore_signer`]). A note is matched to the checked signature by a
//! fingerprint of its bytes, so a stale note is never blamed for another signature.

use std::cell::RefCell;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Instant;

use signet_pkcs11::SignAlgorithm;

use super::error::PipelineError;
use super::job::{Continuation, Signed, current_deadline};
use super::{Pipeline, RegisteredKey, TokenState};
use crate::keys::KeySchemes as _;
use crate::keys::token::sign_algorithm;
use crate::keys::{AuthorityKey, KeyError, KeyType, SignThen, SignatureScheme};

/// Which token made the signature this thread received last, and a fingerprint of that signature.
#[derive(Clone)]
pub(crate) struct SignerNote {
    token: Arc<TokenState>,
    fingerprint: u64,
}

thread_local! {
    static SIGNER: RefCell<Option<SignerNote>> = const { RefCell::new(None) };
}

fn fingerprint(sig: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sig.hash(&mut h);
    h.finish()
}

/// Notes on this thread that `token` made `sig`.
fn note_signer(token: Arc<TokenState>, sig: &[u8]) {
    let note = SignerNote {
        token,
        fingerprint: fingerprint(sig),
    };
    SIGNER.with(|s| *s.borrow_mut() = Some(note));
}

/// Takes this thread's note (to carry it to the thread that will check the signature).
pub(crate) fn take_signer() -> Option<SignerNote> {
    SIGNER.with(|s| s.borrow_mut().take())
}

/// Puts a note taken with [`take_signer`] on this thread.
pub(crate) fn restore_signer(note: Option<SignerNote>) {
    SIGNER.with(|s| *s.borrow_mut() = note);
}

/// A key on the pipeline's tokens, as an [`AuthorityKey`] (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct PipelineKey {
    pipeline: Pipeline,
    index: u32,
    reg: Arc<RegisteredKey>,
}

impl std::fmt::Debug for PipelineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineKey")
            .field("label", &self.reg.label)
            .field("key_type", &self.reg.key_type)
            .finish_non_exhaustive()
    }
}

impl PipelineKey {
    pub(crate) fn new(pipeline: Pipeline, index: u32, reg: Arc<RegisteredKey>) -> Self {
        Self {
            pipeline,
            index,
            reg,
        }
    }

    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// The key's label on the tokens.
    pub fn label(&self) -> &str {
        &self.reg.label
    }

    /// The pipeline this key signs through.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Checks that `alg` fits the key and `data` has the digest length `alg` needs.
    pub(crate) fn check_request(
        &self,
        alg: SignAlgorithm,
        data: &[u8],
    ) -> Result<Arc<RegisteredKey>, PipelineError> {
        let fits = match self.reg.key_type {
            KeyType::EcP256 => alg == SignAlgorithm::EcdsaSha256,
            KeyType::EcP384 => alg == SignAlgorithm::EcdsaSha384,
            KeyType::Ed25519 => alg == SignAlgorithm::Ed25519,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => matches!(
                alg,
                SignAlgorithm::RsaPkcs1Sha256
                    | SignAlgorithm::RsaPkcs1Sha384
                    | SignAlgorithm::RsaPkcs1Sha512
                    | SignAlgorithm::RsaPssSha256
                    | SignAlgorithm::RsaPssSha384
                    | SignAlgorithm::RsaPssSha512
            ),
        };
        if !fits {
            return Err(PipelineError::InvalidRequest(format!(
                "a {} key cannot make a {alg:?} signature",
                self.reg.key_type
            )));
        }
        match alg.hash() {
            Some(h) if h.output_len() != data.len() => Err(PipelineError::InvalidRequest(format!(
                "a {h:?} digest has {} bytes, got {}",
                h.output_len(),
                data.len()
            ))),
            None if data.is_empty() => Err(PipelineError::InvalidRequest(
                "an Ed25519 signature needs the message".into(),
            )),
            _ => Ok(self.reg.clone()),
        }
    }

    /// Submits `message` (hashed here) and returns the reply without waiting.
    pub fn submit_message(
        &self,
        scheme: SignatureScheme,
        message: &[u8],
        deadline: Instant,
    ) -> Result<super::Reply, PipelineError> {
        if !self.reg.key_type.supports(scheme) {
            return Err(PipelineError::InvalidRequest(format!(
                "a {} key cannot sign with {scheme:?}",
                self.reg.key_type
            )));
        }
        let (alg, data) = job_data(scheme, message);
        self.pipeline.submit(self.index, alg, data, deadline)
    }
}

/// What a job for `message` carries: its algorithm, and the digest (for Ed25519, the message).
pub(super) fn job_data(scheme: SignatureScheme, message: &[u8]) -> (SignAlgorithm, Vec<u8>) {
    let alg = sign_algorithm(scheme);
    let data = match alg.hash() {
        Some(h) => h.digest(message).as_ref().to_vec(),
        None => message.to_vec(),
    };
    (alg, data)
}

fn to_key_error(e: PipelineError) -> KeyError {
    KeyError::Signing {
        message: format!("the signing pipeline: {e}"),
        transient: e.is_retryable(),
        source: Some(Box::new(e)),
    }
}

impl AuthorityKey for PipelineKey {
    fn key_type(&self) -> KeyType {
        self.reg.key_type
    }

    fn spki_der(&self) -> &[u8] {
        &self.reg.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        if !self.reg.key_type.supports(scheme) {
            return Err(KeyError::UnsupportedScheme {
                key_type: self.reg.key_type,
                scheme,
            });
        }
        let deadline = current_deadline()
            .unwrap_or_else(|| Instant::now() + self.pipeline.config().default_timeout);
        let Signed { sig, token, .. } = self
            .submit_message(scheme, message, deadline)
            .and_then(|reply| reply.wait_signed_until(deadline))
            .map_err(to_key_error)?;
        note_signer(token, &sig);
        Ok(sig)
    }

    /// Counts a signature that failed the issuance core's check against the token that made it (see the module
    /// docs); a passed check just drops the note.
    fn post_sign_checked(&self, signature: &[u8], passed: bool) {
        let Some(note) = take_signer() else {
            return;
        };
        if !passed && note.fingerprint == fingerprint(signature) {
            self.pipeline.shared.post_sign_failed(&note.token);
        }
    }

    /// Queues the signature and returns at once; `then` runs on the HSM worker that answers (or here, with the
    /// error, when the job is refused). The deadline is the one [`sign`](AuthorityKey::sign) would use.
    fn sign_then(&self, scheme: SignatureScheme, message: &[u8], then: Box<dyn SignThen>) {
        if !self.reg.key_type.supports(scheme) {
            then.resume(Err(KeyError::UnsupportedScheme {
                key_type: self.reg.key_type,
                scheme,
            }));
            return;
        }
        let deadline = current_deadline()
            .unwrap_or_else(|| Instant::now() + self.pipeline.config().default_timeout);
        let (alg, data) = job_data(scheme, message);
        self.pipeline.submit_then(
            self.index,
            alg,
            data,
            deadline,
            Box::new(KeyContinuation(then)),
        );
    }
}

/// A [`SignThen`] as the pipeline's job continuation: pipeline errors become key errors, as `sign` reports them.
struct KeyContinuation(Box<dyn SignThen>);

impl Continuation for KeyContinuation {
    fn abandoned(&self) -> bool {
        self.0.abandoned()
    }
    fn resume(self: Box<Self>, result: Result<Signed, PipelineError>) {
        let result = result.map(|Signed { sig, token, .. }| {
            note_signer(token, &sig);
            sig
        });
        self.0.resume(result.map_err(to_key_error));
    }
}
