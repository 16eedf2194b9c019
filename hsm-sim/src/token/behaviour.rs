//! The fault engine, the control file, the latency model and the rate limit around every call.

use super::*;

impl Device {
    /// Reads the control file if it is due, and applies a changed plan.
    pub fn poll(&self) {
        let Some(control) = &self.control else { return };
        // Another thread polling right now is as good as polling ourselves.
        let Ok(mut watch) = control.try_lock() else {
            return;
        };
        let now = Instant::now();
        if let Some(result) = watch.poll(now) {
            let applied = {
                let mut f = lock(&self.faults);
                match result {
                    Ok(plan) => {
                        f.set_error(None);
                        f.apply(plan, now)
                    }
                    Err(msg) => {
                        f.set_error(Some(msg));
                        Applied::default()
                    }
                }
            };
            if applied.drop_sessions {
                self.drop_all_sessions();
            }
            if applied.renumber_objects {
                self.renumber_objects();
            }
        }
        let counters = {
            let mut f = lock(&self.faults);
            f.take_dirty().then(|| f.counters().clone())
        };
        if let Some(c) = counters {
            watch.write_status(now, &c);
        }
    }

    /// Writes the status now if something changed and a write is due (`force`: regardless of the interval).
    pub(super) fn flush_status(&self, force: bool) {
        let Some(control) = &self.control else { return };
        let Ok(mut watch) = control.try_lock() else {
            return;
        };
        let now = Instant::now();
        if !watch.status_due(now, force) {
            return;
        }
        let counters = {
            let mut f = lock(&self.faults);
            f.take_dirty().then(|| f.counters().clone())
        };
        if let Some(c) = counters {
            watch.write_status(now, &c);
        }
    }

    /// Called when the library is finalised: the last counters reach the status file.
    pub fn shutdown(&self) {
        self.flush_status(true);
    }

    /// Takes the fault engine out (leaving a fresh one), to carry it over a re-initialisation of the library in the
    /// same process: a device does not forget that it was unplugged, nor re-arm a one-shot fault, because its
    /// driver was finalised and initialised again.
    pub fn take_faults(&self) -> Faults {
        let (fresh, _) = Faults::new(FaultPlan::default(), Instant::now());
        std::mem::replace(&mut *lock(&self.faults), fresh)
    }

    /// Puts back a fault engine taken from the previous device of this process (see [`Device::take_faults`]).
    pub fn carry_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }

    /// The counters of injected faults.
    pub fn counters(&self) -> Counters {
        lock(&self.faults).counters().clone()
    }

    /// Drops every session and the login, as a device reset does.
    /// Gives every object a new handle (the old ones become invalid); sessions, login and objects stay.
    pub(super) fn renumber_objects(&self) {
        {
            let mut st = self.write();
            let objects = std::mem::take(&mut st.objects);
            for (_, entry) in objects {
                let h = self.handle();
                st.objects.insert(h, entry);
            }
        }
        // A search in progress would hand out the old handles: end it (the state lock is released first, and each
        // session is locked on its own).
        let sessions: Vec<_> = lock(&self.sessions).values().cloned().collect();
        for s in sessions {
            lock(&s).find = None;
        }
    }

    pub(super) fn drop_all_sessions(&self) {
        lock(&self.sessions).clear();
        let mut st = self.write();
        st.objects.retain(|_, e| e.owner.is_none());
        Self::logout_locked(&mut st);
    }

    /// Whether the token is present (slot calls report it; they never fail for an unplugged token).
    pub fn token_present(&self) -> bool {
        self.poll();
        lock(&self.faults).present(Instant::now())
    }

    /// Entry of every call that needs the token: control poll, unplug check, the fault for `op`, call latency.
    pub(super) fn enter(&self, op: Option<OpKind>) -> CkResult<()> {
        self.poll();
        let result = {
            let mut f = lock(&self.faults);
            let r = f.check_present(Instant::now());
            match (r, op) {
                (Ok(()), Some(op)) => f.check_op(op),
                (r, _) => r,
            }
        };
        if result.is_err() {
            self.flush_status(false);
        }
        result?;
        if self.cfg.call_latency_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.cfg.call_latency_ms));
        }
        Ok(())
    }

    /// A round trip to the device for a signature or a key generation: rate limit, latency, injected failure.
    pub(super) fn round_trip(&self, op: OpKind) -> CkResult<()> {
        if op == OpKind::Sign
            && let Some(limiter) = &self.limiter
        {
            match self.cfg.rate_limit {
                RateLimitMode::Wait => {
                    let wait = lock(limiter).reserve(Instant::now());
                    if !wait.is_zero() {
                        lock(&self.faults).count_rate_limited();
                        std::thread::sleep(wait);
                    }
                }
                RateLimitMode::Reject => {
                    if !lock(limiter).try_take(Instant::now()) {
                        lock(&self.faults).count_rate_limited();
                        self.flush_status(false);
                        return Err(self.cfg.rate_limit_rv);
                    }
                }
            }
        }
        let mut latency = self.cfg.latency();
        if self.cfg.jitter_ms > 0 {
            latency += Duration::from_millis(rand::thread_rng().gen_range(0..=self.cfg.jitter_ms));
        }
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        let result = {
            let mut f = lock(&self.faults);
            f.check_present(Instant::now())
                .and_then(|()| f.check_op(op))
        };
        if result.is_err() {
            self.flush_status(false);
        }
        result
    }

    pub(super) fn session(&self, h: CK_SESSION_HANDLE) -> CkResult<Arc<Mutex<Session>>> {
        lock(&self.sessions)
            .get(&h)
            .cloned()
            .ok_or(Rv(CKR_SESSION_HANDLE_INVALID))
    }
}
