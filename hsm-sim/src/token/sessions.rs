//! Opening, closing and describing sessions.

use super::*;

impl Device {
    /// C_OpenSession.
    pub fn open_session(&self, rw: bool) -> CkResult<CK_SESSION_HANDLE> {
        self.enter(Some(OpKind::OpenSession))?;
        if self.read().record.is_none() {
            return Err(Rv(CKR_TOKEN_NOT_RECOGNIZED));
        }
        if !rw && self.read().login == LoginState::So {
            return Err(Rv(CKR_SESSION_READ_WRITE_SO_EXISTS));
        }
        let mut map = lock(&self.sessions);
        if self.cfg.max_sessions > 0 && map.len() as u64 >= self.cfg.max_sessions {
            return Err(Rv(CKR_SESSION_COUNT));
        }
        let h = self.handle();
        map.insert(
            h,
            Arc::new(Mutex::new(Session {
                rw,
                find: None,
                sign: None,
            })),
        );
        Ok(h)
    }

    /// C_CloseSession: its session objects go with it; the last session's close logs out.
    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> CkResult<()> {
        self.enter(None)?;
        let remaining = {
            let mut map = lock(&self.sessions);
            map.remove(&h).ok_or(Rv(CKR_SESSION_HANDLE_INVALID))?;
            map.len()
        };
        let mut st = self.write();
        st.objects.retain(|_, e| e.owner != Some(h));
        if remaining == 0 {
            Self::logout_locked(&mut st);
        }
        Ok(())
    }

    /// C_CloseAllSessions.
    pub fn close_all_sessions(&self) -> CkResult<()> {
        self.enter(None)?;
        self.drop_all_sessions();
        Ok(())
    }

    /// C_GetSessionInfo.
    pub fn session_info(&self, h: CK_SESSION_HANDLE) -> CkResult<SessionInfo> {
        self.enter(None)?;
        let s = self.session(h)?;
        let rw = lock(&s).rw;
        let state = match (self.read().login, rw) {
            (LoginState::Public, false) => CKS_RO_PUBLIC_SESSION,
            (LoginState::Public, true) => CKS_RW_PUBLIC_SESSION,
            (LoginState::User, false) => CKS_RO_USER_FUNCTIONS,
            (LoginState::User, true) => CKS_RW_USER_FUNCTIONS,
            (LoginState::So, _) => CKS_RW_SO_FUNCTIONS,
        };
        let flags = CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 };
        Ok(SessionInfo { state, flags })
    }

    /// The login state (for tests and diagnostics).
    pub fn login_state(&self) -> LoginState {
        self.read().login
    }
}
