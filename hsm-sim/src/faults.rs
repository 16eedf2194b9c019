//! Injected faults: what a real HSM does on a bad day. A [`FaultPlan`] (from the configuration file or the control
//! file) says what to inject; [`Faults`] is the engine that decides, call by call, whether this one fails, whether
//! the device is unplugged, and whether a signature comes back corrupted, and counts what it injected.
//!
//! One-shot faults (`fail_next`, `corrupt_next`, `unplug_ms`, `invalidate_sessions`, `invalidate_handles`) are armed each time a plan with
//! a new `seq` is applied; the others (`fail_rate`, `corrupt_rate`, `unplugged`) hold for as long as the plan does.
//! Random decisions come from a RNG seeded with `seed`, so a run can be replayed.

use crate::rv::{CkResult, Rv};
use cryptoki_sys::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A family of operations a failure can be aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OpKind {
    /// C_Sign / C_SignFinal (the signature round trip).
    Sign,
    /// C_GenerateKeyPair.
    Keygen,
    /// C_OpenSession.
    OpenSession,
    /// C_Login.
    Login,
    /// Object calls: find, attributes, create, destroy.
    Objects,
    /// C_GenerateRandom.
    Random,
    /// Every operation above.
    All,
}

/// What to inject. Field names are those of the `[faults]` table of the configuration file and of the control file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Generation of this plan: one-shot faults are armed when a plan with a new `seq` is applied.
    pub seq: u64,
    /// One-shot: fail the next N operations of `fail_ops` with `fail_rv`.
    pub fail_next: u64,
    /// Fail this fraction (0.0–1.0) of the operations of `fail_ops` with `fail_rv`.
    pub fail_rate: f64,
    /// The return value injected failures carry.
    pub fail_rv: Rv,
    /// Which operations `fail_next` and `fail_rate` hit.
    pub fail_ops: Vec<OpKind>,
    /// One-shot: corrupt the next N signatures (the call succeeds; the signature does not verify).
    pub corrupt_next: u64,
    /// Corrupt this fraction (0.0–1.0) of signatures.
    pub corrupt_rate: f64,
    /// One-shot: unplug the device for this many milliseconds (0: no).
    pub unplug_ms: u64,
    /// The device is unplugged for as long as this is true.
    pub unplugged: bool,
    /// One-shot: drop every open session (their handles become invalid, the login is lost).
    pub invalidate_sessions: bool,
    /// One-shot: renumber every object, as an HSM cluster that failed over to a member numbering its objects
    /// differently: sessions and login survive, but cached object and key handles answer
    /// `CKR_OBJECT_HANDLE_INVALID` / `CKR_KEY_HANDLE_INVALID` until the objects are found again.
    pub invalidate_handles: bool,
    /// Seed of the RNG behind `fail_rate` and `corrupt_rate`.
    pub seed: u64,
    /// One-shot: forget unconsumed `fail_next` / `corrupt_next` counts and end a timed unplug before arming this
    /// plan's one-shots.
    pub cancel_pending: bool,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            seq: 0,
            fail_next: 0,
            fail_rate: 0.0,
            fail_rv: Rv(CKR_DEVICE_ERROR),
            fail_ops: vec![OpKind::Sign],
            corrupt_next: 0,
            corrupt_rate: 0.0,
            unplug_ms: 0,
            unplugged: false,
            invalidate_sessions: false,
            invalidate_handles: false,
            seed: 1,
            cancel_pending: false,
        }
    }
}

/// Counts of what was injected since the module was loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Counters {
    /// The `seq` of the last plan applied.
    pub applied_seq: u64,
    /// Operations failed on purpose (`fail_next` and `fail_rate`).
    pub failures: u64,
    /// Signatures corrupted on purpose.
    pub corrupted_signatures: u64,
    /// Times the device was unplugged.
    pub unplugs: u64,
    /// Calls answered CKR_DEVICE_REMOVED or CKR_TOKEN_NOT_PRESENT because the device was unplugged.
    pub calls_while_unplugged: u64,
    /// Times every session was dropped (by `invalidate_sessions` or an unplug).
    pub session_invalidations: u64,
    /// Times every object was renumbered (by `invalidate_handles`).
    pub handle_invalidations: u64,
    /// Signatures refused by the rate limiter (in `reject` mode) or made to wait (in `wait` mode).
    pub rate_limited: u64,
    /// Signatures made (including corrupted ones).
    pub signatures: u64,
    /// The last control-file problem, if any (a plan that did not parse is ignored).
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Unplug {
    until: Option<Instant>,
    reported: bool,
}

/// The fault engine.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    applied_seq: Option<u64>,
    fail_next_left: u64,
    corrupt_next_left: u64,
    unplug: Option<Unplug>,
    rng: StdRng,
    counters: Counters,
    dirty: bool,
}

/// What applying a plan asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Every session must be dropped now (and the login lost).
    pub drop_sessions: bool,
    /// Every object must get a new handle now.
    pub renumber_objects: bool,
}

impl Faults {
    /// An engine with the given plan applied.
    pub fn new(plan: FaultPlan, now: Instant) -> (Faults, Applied) {
        let mut f = Faults {
            rng: StdRng::seed_from_u64(plan.seed),
            plan: FaultPlan::default(),
            applied_seq: None,
            fail_next_left: 0,
            corrupt_next_left: 0,
            unplug: None,
            counters: Counters::default(),
            dirty: false,
        };
        let applied = f.apply(plan, now);
        (f, applied)
    }

    /// Applies a plan; one-shot parts are armed only if its `seq` is new.
    pub fn apply(&mut self, plan: FaultPlan, now: Instant) -> Applied {
        let mut applied = Applied::default();
        if plan.seed != self.plan.seed {
            self.rng = StdRng::seed_from_u64(plan.seed);
        }
        let new_seq = self.applied_seq != Some(plan.seq);
        if new_seq {
            if plan.cancel_pending {
                self.fail_next_left = 0;
                self.corrupt_next_left = 0;
                if self.unplug.as_ref().is_some_and(|u| u.until.is_some()) {
                    self.unplug = None;
                }
            }
            // Arming adds nothing up: a non-zero count replaces what was left of the previous one.
            if plan.fail_next > 0 {
                self.fail_next_left = plan.fail_next;
            }
            if plan.corrupt_next > 0 {
                self.corrupt_next_left = plan.corrupt_next;
            }
            if plan.unplug_ms > 0 {
                applied.drop_sessions |=
                    self.start_unplug(Some(now + Duration::from_millis(plan.unplug_ms)));
            }
            if plan.invalidate_sessions {
                applied.drop_sessions = true;
                self.counters.session_invalidations += 1;
            }
            if plan.invalidate_handles {
                applied.renumber_objects = true;
                self.counters.handle_invalidations += 1;
            }
            self.applied_seq = Some(plan.seq);
            self.counters.applied_seq = plan.seq;
            self.dirty = true;
        }
        if plan.unplugged {
            applied.drop_sessions |= self.start_unplug(None);
        } else if self.plan.unplugged {
            // The level-triggered unplug ends with the plan that set it (a timed one runs its course).
            if let Some(u) = &self.unplug
                && u.until.is_none()
            {
                self.unplug = None;
            }
        }
        self.plan = plan;
        applied
    }

    /// Starts an unplug (unless one is under way); true if the device just went away.
    fn start_unplug(&mut self, until: Option<Instant>) -> bool {
        match &mut self.unplug {
            Some(u) => {
                // Extend a running unplug; a level one (None) wins over a timed one.
                u.until = match (u.until, until) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
                false
            }
            None => {
                self.unplug = Some(Unplug {
                    until,
                    reported: false,
                });
                self.counters.unplugs += 1;
                self.counters.session_invalidations += 1;
                self.dirty = true;
                true
            }
        }
    }

    /// Whether the device is present now (an expired unplug ends here).
    pub fn present(&mut self, now: Instant) -> bool {
        if let Some(u) = &self.unplug
            && let Some(until) = u.until
            && now >= until
            && !self.plan.unplugged
        {
            self.unplug = None;
        }
        self.unplug.is_none()
    }

    /// Fails a call that needs the token while it is unplugged: CKR_DEVICE_REMOVED the first time,
    /// CKR_TOKEN_NOT_PRESENT after that.
    pub fn check_present(&mut self, now: Instant) -> CkResult<()> {
        if self.present(now) {
            return Ok(());
        }
        self.counters.calls_while_unplugged += 1;
        self.dirty = true;
        match &mut self.unplug {
            Some(u) if !u.reported => {
                u.reported = true;
                Err(Rv(CKR_DEVICE_REMOVED))
            }
            _ => Err(Rv(CKR_TOKEN_NOT_PRESENT)),
        }
    }

    /// Decides whether this operation fails on purpose.
    pub fn check_op(&mut self, op: OpKind) -> CkResult<()> {
        let aimed = self
            .plan
            .fail_ops
            .iter()
            .any(|o| *o == op || *o == OpKind::All);
        if !aimed {
            return Ok(());
        }
        if self.fail_next_left > 0 {
            self.fail_next_left -= 1;
            self.counters.failures += 1;
            self.dirty = true;
            return Err(self.plan.fail_rv);
        }
        if self.plan.fail_rate > 0.0 && self.rng.gen_bool(self.plan.fail_rate.clamp(0.0, 1.0)) {
            self.counters.failures += 1;
            self.dirty = true;
            return Err(self.plan.fail_rv);
        }
        Ok(())
    }

    /// Counts a signature and corrupts it if the plan says so; true if it was corrupted.
    pub fn after_signature(&mut self, signature: &mut [u8]) -> bool {
        self.counters.signatures += 1;
        let corrupt = if self.corrupt_next_left > 0 {
            self.corrupt_next_left -= 1;
            true
        } else {
            self.plan.corrupt_rate > 0.0
                && self.rng.gen_bool(self.plan.corrupt_rate.clamp(0.0, 1.0))
        };
        if corrupt && !signature.is_empty() {
            // Flip one bit in the middle: same length, still well-formed, does not verify.
            let i = (signature.len() / 2).saturating_sub(1);
            signature[i] ^= 0x01;
            self.counters.corrupted_signatures += 1;
            self.dirty = true;
        }
        corrupt
    }

    /// Counts a signature delayed or refused by the rate limiter.
    pub fn count_rate_limited(&mut self) {
        self.counters.rate_limited += 1;
        self.dirty = true;
    }

    /// Records a control-file problem.
    pub fn set_error(&mut self, message: Option<String>) {
        if self.counters.last_error != message {
            self.counters.last_error = message;
            self.dirty = true;
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// True once if something worth reporting changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.dirty, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(plan: FaultPlan) -> (Faults, Applied, Instant) {
        let now = Instant::now();
        let (f, a) = Faults::new(plan, now);
        (f, a, now)
    }

    #[test]
    fn fail_next_hits_only_the_aimed_operations_then_stops() {
        let plan = FaultPlan {
            seq: 1,
            fail_next: 2,
            fail_rv: Rv(CKR_DEVICE_ERROR),
            ..Default::default()
        };
        let (mut f, _, _) = engine(plan.clone());
        assert_eq!(f.check_op(OpKind::Login), Ok(()), "login is not aimed at");
        assert_eq!(f.check_op(OpKind::Sign), Err(Rv(CKR_DEVICE_ERROR)));
        assert_eq!(f.check_op(OpKind::Sign), Err(Rv(CKR_DEVICE_ERROR)));
        assert_eq!(f.check_op(OpKind::Sign), Ok(()));
        assert_eq!(f.counters().failures, 2);
        // Re-applying the same seq does not re-arm; a new seq does.
        let now = Instant::now();
        f.apply(plan.clone(), now);
        assert_eq!(f.check_op(OpKind::Sign), Ok(()));
        f.apply(
            FaultPlan {
                seq: 2,
                fail_ops: vec![OpKind::All],
                ..plan
            },
            now,
        );
        assert_eq!(f.check_op(OpKind::Login), Err(Rv(CKR_DEVICE_ERROR)));
        // A plan with another one-shot does not cancel the pending failure; cancel_pending does.
        f.apply(
            FaultPlan {
                seq: 3,
                fail_next: 0,
                corrupt_next: 1,
                ..Default::default()
            },
            now,
        );
        f.apply(
            FaultPlan {
                seq: 4,
                fail_next: 5,
                ..Default::default()
            },
            now,
        );
        f.apply(
            FaultPlan {
                seq: 5,
                cancel_pending: true,
                ..Default::default()
            },
            now,
        );
        assert_eq!(f.check_op(OpKind::Sign), Ok(()));
        assert!(!f.after_signature(&mut [0u8; 4]));
    }

    #[test]
    fn fail_rate_is_seeded_and_roughly_the_fraction() {
        let plan = FaultPlan {
            fail_rate: 0.25,
            seed: 7,
            fail_rv: Rv(CKR_FUNCTION_FAILED),
            ..Default::default()
        };
        let run = |plan: FaultPlan| {
            let (mut f, _, _) = engine(plan);
            (0..4000)
                .map(|_| f.check_op(OpKind::Sign).is_err())
                .collect::<Vec<_>>()
        };
        let a = run(plan.clone());
        assert_eq!(a, run(plan.clone()), "same seed, same decisions");
        let failed = a.iter().filter(|x| **x).count();
        assert!(
            (800..1200).contains(&failed),
            "{failed} of 4000 failed at rate 0.25"
        );
        assert_ne!(a, run(FaultPlan { seed: 8, ..plan }));
    }

    #[test]
    fn unplug_reports_removed_once_then_not_present_until_it_returns() {
        let (mut f, applied, t0) = engine(FaultPlan {
            seq: 1,
            unplug_ms: 1000,
            ..Default::default()
        });
        assert!(applied.drop_sessions);
        assert_eq!(f.check_present(t0), Err(Rv(CKR_DEVICE_REMOVED)));
        assert_eq!(f.check_present(t0), Err(Rv(CKR_TOKEN_NOT_PRESENT)));
        assert_eq!(
            f.check_present(t0 + Duration::from_millis(999)),
            Err(Rv(CKR_TOKEN_NOT_PRESENT))
        );
        assert_eq!(f.check_present(t0 + Duration::from_millis(1000)), Ok(()));
        assert_eq!(f.counters().unplugs, 1);
        assert_eq!(f.counters().calls_while_unplugged, 3);
    }

    #[test]
    fn level_unplug_lasts_until_the_plan_changes() {
        let (mut f, applied, t0) = engine(FaultPlan {
            unplugged: true,
            ..Default::default()
        });
        assert!(applied.drop_sessions);
        let much_later = t0 + Duration::from_secs(3600);
        assert_eq!(f.check_present(much_later), Err(Rv(CKR_DEVICE_REMOVED)));
        assert_eq!(f.check_present(much_later), Err(Rv(CKR_TOKEN_NOT_PRESENT)));
        let applied = f.apply(FaultPlan::default(), much_later);
        assert!(!applied.drop_sessions);
        assert_eq!(f.check_present(much_later), Ok(()));
    }

    #[test]
    fn invalidate_sessions_is_one_shot_per_seq() {
        let plan = FaultPlan {
            seq: 5,
            invalidate_sessions: true,
            ..Default::default()
        };
        let (mut f, applied, now) = engine(plan.clone());
        assert!(applied.drop_sessions);
        assert!(!f.apply(plan.clone(), now).drop_sessions);
        assert!(f.apply(FaultPlan { seq: 6, ..plan }, now).drop_sessions);
        assert_eq!(f.counters().session_invalidations, 2);
    }

    #[test]
    fn invalidate_handles_is_one_shot_per_seq() {
        let plan = FaultPlan {
            seq: 5,
            invalidate_handles: true,
            ..Default::default()
        };
        let (mut f, applied, now) = engine(plan.clone());
        assert!(applied.renumber_objects);
        assert!(!applied.drop_sessions, "sessions survive a renumbering");
        assert!(!f.apply(plan.clone(), now).renumber_objects);
        assert!(f.apply(FaultPlan { seq: 6, ..plan }, now).renumber_objects);
        assert_eq!(f.counters().handle_invalidations, 2);
    }

    #[test]
    fn corrupt_next_flips_a_bit_keeping_the_length() {
        let (mut f, _, _) = engine(FaultPlan {
            seq: 1,
            corrupt_next: 1,
            ..Default::default()
        });
        let good = vec![0xAAu8; 64];
        let mut sig = good.clone();
        assert!(f.after_signature(&mut sig));
        assert_eq!(sig.len(), 64);
        assert_ne!(sig, good);
        let mut sig2 = good.clone();
        assert!(!f.after_signature(&mut sig2));
        assert_eq!(sig2, good);
        assert_eq!(f.counters().corrupted_signatures, 1);
        assert_eq!(f.counters().signatures, 2);
    }

    #[test]
    fn corrupt_rate_all_and_none() {
        let (mut f, _, _) = engine(FaultPlan {
            corrupt_rate: 1.0,
            ..Default::default()
        });
        assert!((0..10).all(|_| f.after_signature(&mut [1u8; 8])));
        let (mut g, _, _) = engine(FaultPlan::default());
        assert!((0..10).all(|_| !g.after_signature(&mut [1u8; 8])));
    }

    #[test]
    fn plan_parses_from_toml_with_names() {
        let plan: FaultPlan = toml::from_str(
            "seq = 3\nfail_next = 2\nfail_rv = \"CKR_SESSION_CLOSED\"\nfail_ops = [\"sign\", \"login\"]\n",
        )
        .unwrap();
        assert_eq!(plan.fail_rv, Rv(CKR_SESSION_CLOSED));
        assert_eq!(plan.fail_ops, vec![OpKind::Sign, OpKind::Login]);
        assert!(toml::from_str::<FaultPlan>("fail_rv = \"CKR_NOPE\"").is_err());
        assert!(toml::from_str::<FaultPlan>("typo = 1").is_err());
        let text = toml::to_string(&plan).unwrap();
        assert_eq!(toml::from_str::<FaultPlan>(&text).unwrap(), plan);
    }
}
