//! Single- and multi-part signing.

use super::*;

impl Device {
    /// C_SignInit.
    pub fn sign_init(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: SignMechanism,
        key: CK_OBJECT_HANDLE,
    ) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        if session.sign.is_some() {
            return Err(Rv(CKR_OPERATION_ACTIVE));
        }
        let st = self.read();
        let entry = st.objects.get(&key).ok_or(Rv(CKR_KEY_HANDLE_INVALID))?;
        if entry.private && st.login != LoginState::User {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        let obj = entry.open.clone().ok_or(Rv(CKR_KEY_HANDLE_INVALID))?;
        let material = obj.key.clone().ok_or(Rv(CKR_KEY_TYPE_INCONSISTENT))?;
        if !obj.bool_attr(CKA_SIGN, false) {
            return Err(Rv(CKR_KEY_FUNCTION_NOT_PERMITTED));
        }
        if !material.accepts(&mechanism) {
            return Err(Rv(CKR_KEY_TYPE_INCONSISTENT));
        }
        session.sign = Some(SignOp {
            mechanism,
            key: material,
            buffer: Vec::new(),
            multipart: false,
        });
        Ok(())
    }

    /// C_Sign. `capacity` is the caller's buffer size (`None`: a length query).
    pub fn sign(
        &self,
        h: CK_SESSION_HANDLE,
        data: &[u8],
        capacity: Option<usize>,
    ) -> CkResult<SignOutput> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let op = session
            .sign
            .as_ref()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.multipart {
            return Err(Rv(CKR_OPERATION_ACTIVE));
        }
        let len = op.key.signature_len();
        match capacity {
            None => return Ok(SignOutput::Length(len)),
            Some(c) if c < len => return Ok(SignOutput::TooSmall(len)),
            Some(_) => {}
        }
        let op = session
            .sign
            .take()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        drop(session);
        self.finish_sign(&op, data).map(SignOutput::Signature)
    }

    /// C_SignUpdate.
    pub fn sign_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let op = session
            .sign
            .as_mut()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        op.multipart = true;
        op.buffer.extend_from_slice(data);
        Ok(())
    }

    /// C_SignFinal. `capacity` as for [`Device::sign`].
    pub fn sign_final(
        &self,
        h: CK_SESSION_HANDLE,
        capacity: Option<usize>,
    ) -> CkResult<SignOutput> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let op = session
            .sign
            .as_ref()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let len = op.key.signature_len();
        match capacity {
            None => return Ok(SignOutput::Length(len)),
            Some(c) if c < len => return Ok(SignOutput::TooSmall(len)),
            Some(_) => {}
        }
        let op = session
            .sign
            .take()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        drop(session);
        self.finish_sign(&op, &op.buffer).map(SignOutput::Signature)
    }

    pub(super) fn finish_sign(&self, op: &SignOp, data: &[u8]) -> CkResult<Vec<u8>> {
        self.round_trip(OpKind::Sign)?;
        let mut signature = op.key.sign(&op.mechanism, data)?;
        let corrupted = lock(&self.faults).after_signature(&mut signature);
        if corrupted {
            self.flush_status(false);
        }
        Ok(signature)
    }
}
