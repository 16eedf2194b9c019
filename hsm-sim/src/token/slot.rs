//! The slot and the token: token information, mechanisms, C_InitToken.

use super::*;

impl Device {
    /// CK_TOKEN_INFO.
    pub fn token_info(&self) -> CkResult<TokenInfo> {
        self.enter(None)?;
        let (sessions, rw_sessions) = {
            let map = lock(&self.sessions);
            let rw = map.values().filter(|s| lock(s).rw).count() as u64;
            (map.len() as u64, rw)
        };
        let st = self.read();
        let mut flags = CKF_RNG | CKF_LOGIN_REQUIRED;
        let (label, serial) = match &st.record {
            Some(r) => {
                flags |= CKF_TOKEN_INITIALIZED;
                if let Some(u) = &r.user {
                    flags |= CKF_USER_PIN_INITIALIZED;
                    flags |= self.pin_flags(
                        u.failures,
                        CKF_USER_PIN_COUNT_LOW,
                        CKF_USER_PIN_FINAL_TRY,
                        CKF_USER_PIN_LOCKED,
                    );
                }
                flags |= self.pin_flags(
                    r.so.failures,
                    CKF_SO_PIN_COUNT_LOW,
                    CKF_SO_PIN_FINAL_TRY,
                    CKF_SO_PIN_LOCKED,
                );
                (r.label.clone(), r.serial.clone())
            }
            None => (String::new(), String::new()),
        };
        Ok(TokenInfo {
            label,
            serial,
            flags,
            sessions,
            rw_sessions,
            max_sessions: self.cfg.max_sessions,
        })
    }

    pub(super) fn pin_flags(
        &self,
        failures: u32,
        low: CK_FLAGS,
        final_try: CK_FLAGS,
        locked: CK_FLAGS,
    ) -> CK_FLAGS {
        let max = self.cfg.max_pin_failures;
        if max == 0 || failures == 0 {
            0
        } else if failures >= max {
            locked
        } else if failures + 1 == max {
            low | final_try
        } else {
            low
        }
    }

    pub(super) fn pin_locked(&self, rec: &PinRecord) -> bool {
        self.cfg.max_pin_failures > 0 && rec.failures >= self.cfg.max_pin_failures
    }

    /// The mechanisms offered.
    pub fn mechanisms(&self) -> CkResult<Vec<CK_MECHANISM_TYPE>> {
        self.enter(None)?;
        Ok(MECHANISMS.iter().map(|m| m.0).collect())
    }

    /// CK_MECHANISM_INFO of one mechanism: (min key size, max key size, flags).
    pub fn mechanism_info(&self, m: CK_MECHANISM_TYPE) -> CkResult<(CK_ULONG, CK_ULONG, CK_FLAGS)> {
        self.enter(None)?;
        MECHANISMS
            .iter()
            .find(|x| x.0 == m)
            .map(|x| (x.1, x.2, x.3))
            .ok_or(Rv(CKR_MECHANISM_INVALID))
    }

    /// C_InitToken: (re)initialises the token, destroying every object.
    pub fn init_token(&self, so_pin: &[u8], label: &str) -> CkResult<()> {
        self.enter(None)?;
        check_pin_len(so_pin)?;
        if !lock(&self.sessions).is_empty() {
            return Err(Rv(CKR_SESSION_EXISTS));
        }
        let existing = self.read().record.clone();
        if let Some(rec) = &existing {
            if self.pin_locked(&rec.so) {
                return Err(Rv(CKR_PIN_LOCKED));
            }
            if rec.so.unlock(so_pin).is_none() {
                self.count_failure(false)?;
                return Err(Rv(CKR_PIN_INCORRECT));
            }
        }
        let token_key: AeadKey = Zeroizing::new(random_bytes::<32>()?);
        let so = PinRecord::new(so_pin, &token_key, self.cfg.pin_kdf_iterations)?;
        let record = TokenRecord {
            version: 1,
            label: label.trim_end().to_string(),
            serial: hex::encode(random_bytes::<8>()?),
            so,
            user: None,
        };
        let mut st = self.write();
        self.store.delete_all_objects()?;
        self.store.save_token(&record)?;
        st.objects.clear();
        st.record = Some(record);
        st.login = LoginState::Public;
        st.token_key = None;
        Ok(())
    }

    pub(super) fn count_failure(&self, user: bool) -> CkResult<()> {
        let mut st = self.write();
        let Some(rec) = st.record.as_mut() else {
            return Ok(());
        };
        let pin = if user {
            rec.user.as_mut()
        } else {
            Some(&mut rec.so)
        };
        if let Some(p) = pin {
            p.failures = p.failures.saturating_add(1);
        }
        let rec = rec.clone();
        self.store.save_token(&rec)?;
        Ok(())
    }
}
