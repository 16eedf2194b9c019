//! Login and logout, C_InitPIN and C_SetPIN; unsealing private objects at login.

use super::*;

impl Device {
    /// C_Login.
    pub fn login(&self, h: CK_SESSION_HANDLE, user_type: CK_USER_TYPE, pin: &[u8]) -> CkResult<()> {
        self.enter(Some(OpKind::Login))?;
        self.session(h)?;
        let user = match user_type {
            CKU_USER => true,
            CKU_SO => false,
            _ => return Err(Rv(CKR_USER_TYPE_INVALID)),
        };
        let rec = {
            let st = self.read();
            match (st.login, user) {
                (LoginState::User, true) | (LoginState::So, false) => {
                    return Err(Rv(CKR_USER_ALREADY_LOGGED_IN));
                }
                (LoginState::User, false) | (LoginState::So, true) => {
                    return Err(Rv(CKR_USER_ANOTHER_ALREADY_LOGGED_IN));
                }
                _ => {}
            }
            let record = st.record.as_ref().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
            if user {
                record
                    .user
                    .clone()
                    .ok_or(Rv(CKR_USER_PIN_NOT_INITIALIZED))?
            } else {
                record.so.clone()
            }
        };
        if !user && lock(&self.sessions).values().any(|s| !lock(s).rw) {
            return Err(Rv(CKR_SESSION_READ_ONLY_EXISTS));
        }
        if self.pin_locked(&rec) {
            return Err(Rv(CKR_PIN_LOCKED));
        }
        // The slow PIN hash runs without holding the token lock.
        let Some(key) = rec.unlock(pin) else {
            self.count_failure(user)?;
            return Err(Rv(CKR_PIN_INCORRECT));
        };
        let mut st = self.write();
        // Another session may have logged in while the PIN was hashed: the same user is "already
        // logged in" (the application is), only the other user type is refused.
        match (st.login, user) {
            (LoginState::Public, _) => {}
            (LoginState::User, true) | (LoginState::So, false) => {
                return Err(Rv(CKR_USER_ALREADY_LOGGED_IN));
            }
            _ => return Err(Rv(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)),
        }
        if rec.failures > 0
            && let Some(r) = st.record.as_mut()
        {
            let p = if user {
                r.user.as_mut()
            } else {
                Some(&mut r.so)
            };
            if let Some(p) = p {
                p.failures = 0;
            }
            let r = r.clone();
            self.store.save_token(&r)?;
        }
        if user {
            for (h, e) in st.objects.iter_mut() {
                if let (Some(sealed), Some(file)) = (&e.sealed, &e.file) {
                    match open(&key, file.as_bytes(), sealed).and_then(|p| payload_to_object(&p)) {
                        Some(obj) => e.open = Some(Arc::new(obj)),
                        None => {
                            // A damaged or foreign file stays invisible rather than failing the login.
                            let _ = h;
                        }
                    }
                }
            }
            st.login = LoginState::User;
        } else {
            st.login = LoginState::So;
        }
        st.token_key = Some(key);
        Ok(())
    }

    pub(super) fn logout_locked(st: &mut TokenState) {
        st.login = LoginState::Public;
        st.token_key = None;
        for e in st.objects.values_mut() {
            if e.sealed.is_some() {
                e.open = None;
            }
        }
    }

    /// C_Logout.
    pub fn logout(&self, h: CK_SESSION_HANDLE) -> CkResult<()> {
        self.enter(None)?;
        self.session(h)?;
        let mut st = self.write();
        if st.login == LoginState::Public {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        Self::logout_locked(&mut st);
        Ok(())
    }

    /// C_InitPIN: the SO sets the user PIN.
    pub fn init_pin(&self, h: CK_SESSION_HANDLE, pin: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        if !lock(&s).rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        check_pin_len(pin)?;
        let mut st = self.write();
        if st.login != LoginState::So {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        let key = st.token_key.clone().ok_or(Rv(CKR_GENERAL_ERROR))?;
        let user = PinRecord::new(pin, &key, self.cfg.pin_kdf_iterations)?;
        let rec = st.record.as_mut().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
        rec.user = Some(user);
        let rec = rec.clone();
        self.store.save_token(&rec)?;
        Ok(())
    }

    /// C_SetPIN: changes the SO PIN in an SO session, the user PIN otherwise.
    pub fn set_pin(&self, h: CK_SESSION_HANDLE, old: &[u8], new: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        if !lock(&s).rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        check_pin_len(new)?;
        let (so, rec) = {
            let st = self.read();
            let record = st.record.as_ref().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
            if st.login == LoginState::So {
                (true, record.so.clone())
            } else {
                (
                    false,
                    record
                        .user
                        .clone()
                        .ok_or(Rv(CKR_USER_PIN_NOT_INITIALIZED))?,
                )
            }
        };
        if self.pin_locked(&rec) {
            return Err(Rv(CKR_PIN_LOCKED));
        }
        let Some(key) = rec.unlock(old) else {
            self.count_failure(!so)?;
            return Err(Rv(CKR_PIN_INCORRECT));
        };
        let fresh = PinRecord::new(new, &key, self.cfg.pin_kdf_iterations)?;
        let mut st = self.write();
        let record = st.record.as_mut().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
        if so {
            record.so = fresh;
        } else {
            record.user = Some(fresh);
        }
        let record = record.clone();
        self.store.save_token(&record)?;
        Ok(())
    }
}
