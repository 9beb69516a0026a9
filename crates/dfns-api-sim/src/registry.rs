//! The driver registry: who registered, what they serve, and whether they are still alive.
//! Pure logic like the queue: no clock of its own (callers pass `now`).
//!
//! ```text
//!   register ──▶ live ──(no sign of life for liveness_timeout)──▶ lapsed
//!                 ▲ │                                                │
//!                 │ └─ heartbeat / lease request: last_seen = now    │
//!                 └──────────────── register again ◀─────────────────┘
//! ```
//!
//! - A driver is *live* while its last sign of life (registration, heartbeat, lease request)
//!   is at most `liveness_timeout` old. A lapsed driver stays listed (not live) but its
//!   heartbeats and lease requests are refused until it registers again: a sign of life never
//!   revives a lapsed registration, because the driver may have restarted with other
//!   capabilities in between.
//! - Registering again (a restarted driver) replaces version, capabilities and fingerprint,
//!   marks it ready, and counts one more registration; its job counters are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dfns_api_client::protocol::{Capability, DriverRegistration, Heartbeat};
use dfns_api_client::wire;

use crate::app_api::DriverView;

/// A heartbeat or lease request from a driver that is not registered (or whose registration
/// lapsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotRegistered {
    /// Whether the driver registered once and lapsed (rather than never registered).
    pub(crate) lapsed: bool,
}

/// What a driver's job reports did, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credit {
    /// A completion was accepted.
    Completed,
    /// A failure was accepted (retryable or not).
    Failed,
}

#[derive(Debug)]
struct DriverRecord {
    /// The id, shared with the leases issued to this driver.
    id: Arc<str>,
    version: String,
    capabilities: BTreeSet<Capability>,
    fingerprint: String,
    /// The master key it holds as a rotation target, if any.
    rotation_target: Option<String>,
    registered_at: Instant,
    last_seen: Instant,
    ready: bool,
    in_flight: u32,
    registrations: u64,
    completed: u64,
    failed: u64,
    /// Deregistered (shut down cleanly): not live until it registers again.
    departed: bool,
}

/// The registry.
#[derive(Debug)]
pub(crate) struct DriverRegistry {
    liveness_timeout: Duration,
    drivers: BTreeMap<String, DriverRecord>,
}

impl DriverRegistry {
    pub(crate) fn new(liveness_timeout: Duration) -> Self {
        Self {
            liveness_timeout,
            drivers: BTreeMap::new(),
        }
    }

    fn is_live(&self, record: &DriverRecord, now: Instant) -> bool {
        !record.departed && now.saturating_duration_since(record.last_seen) <= self.liveness_timeout
    }

    /// Registers a driver, or registers it again (replacing what it serves).
    pub(crate) fn register(&mut self, registration: DriverRegistration, now: Instant) {
        let DriverRegistration {
            driver_id,
            version,
            capabilities,
            master_key_fingerprint,
            rotation_target_fingerprint,
        } = registration;
        let capabilities: BTreeSet<Capability> = capabilities.into_iter().collect();
        let served: Vec<String> = capabilities.iter().map(ToString::to_string).collect();
        match self.drivers.get_mut(&driver_id) {
            Some(record) => {
                tracing::info!(
                    %driver_id,
                    %version,
                    capabilities = ?served,
                    previous_registration_age = ?now.saturating_duration_since(record.registered_at),
                    "driver registered again"
                );
                record.version = version;
                record.capabilities = capabilities;
                record.fingerprint = master_key_fingerprint;
                record.rotation_target = rotation_target_fingerprint;
                record.registered_at = now;
                record.last_seen = now;
                record.ready = true;
                record.in_flight = 0;
                record.registrations += 1;
                record.departed = false;
            }
            None => {
                tracing::info!(%driver_id, %version, capabilities = ?served, "driver registered");
                let record = DriverRecord {
                    id: Arc::from(driver_id.as_str()),
                    version,
                    capabilities,
                    fingerprint: master_key_fingerprint,
                    rotation_target: rotation_target_fingerprint,
                    registered_at: now,
                    last_seen: now,
                    ready: true,
                    in_flight: 0,
                    registrations: 1,
                    completed: 0,
                    failed: 0,
                    departed: false,
                };
                self.drivers.insert(driver_id, record);
            }
        }
    }

    /// The live record of `driver_id`, or why there is none.
    fn live_mut(
        &mut self,
        driver_id: &str,
        now: Instant,
    ) -> Result<&mut DriverRecord, NotRegistered> {
        let timeout = self.liveness_timeout;
        match self.drivers.get_mut(driver_id) {
            None => Err(NotRegistered { lapsed: false }),
            Some(record)
                if record.departed || now.saturating_duration_since(record.last_seen) > timeout =>
            {
                Err(NotRegistered { lapsed: true })
            }
            Some(record) => Ok(record),
        }
    }

    /// A driver shutting down cleanly: no longer live (and refused until it registers again),
    /// at once rather than after the liveness timeout. Its counters are kept. Returns whether
    /// the driver was known.
    pub(crate) fn deregister(&mut self, driver_id: &str) -> bool {
        match self.drivers.get_mut(driver_id) {
            Some(record) => {
                if !record.departed {
                    tracing::info!(%driver_id, "driver deregistered");
                }
                record.departed = true;
                record.ready = false;
                record.in_flight = 0;
                true
            }
            None => false,
        }
    }

    /// Records a heartbeat from a live driver.
    pub(crate) fn heartbeat(
        &mut self,
        heartbeat: &Heartbeat,
        now: Instant,
    ) -> Result<(), NotRegistered> {
        let record = self.live_mut(&heartbeat.driver_id, now)?;
        if record.ready != heartbeat.ready {
            tracing::info!(driver_id = %heartbeat.driver_id, ready = heartbeat.ready, "driver readiness changed");
        }
        record.last_seen = now;
        record.ready = heartbeat.ready;
        record.in_flight = heartbeat.in_flight;
        Ok(())
    }

    /// A sign of life from a live driver (a lease request): refreshes it and returns its id
    /// (to stamp leases with) and what it serves.
    pub(crate) fn seen(
        &mut self,
        driver_id: &str,
        now: Instant,
    ) -> Result<(Arc<str>, BTreeSet<Capability>), NotRegistered> {
        let record = self.live_mut(driver_id, now)?;
        record.last_seen = now;
        Ok((Arc::clone(&record.id), record.capabilities.clone()))
    }

    /// What a registered driver serves now, live or not (a long-poll accepted while the driver
    /// was live is served with its current registration).
    pub(crate) fn serving(&self, driver_id: &str) -> Option<(Arc<str>, BTreeSet<Capability>)> {
        self.drivers
            .get(driver_id)
            .map(|r| (Arc::clone(&r.id), r.capabilities.clone()))
    }

    /// Credits an accepted report to the driver whose lease it was made under.
    pub(crate) fn credit(&mut self, driver_id: &str, credit: Credit) {
        if let Some(record) = self.drivers.get_mut(driver_id) {
            match credit {
                Credit::Completed => record.completed += 1,
                Credit::Failed => record.failed += 1,
            }
        }
    }

    /// How many drivers are live.
    pub(crate) fn live_count(&self, now: Instant) -> usize {
        self.drivers
            .values()
            .filter(|r| self.is_live(r, now))
            .count()
    }

    /// Whether a new job of `capability` should be refused: some driver is live, and no live
    /// driver serves it. With no live driver at all, jobs are accepted (drivers may be
    /// restarting). Returns what the live drivers serve, for the refusal's message.
    pub(crate) fn refuses(&self, capability: Capability, now: Instant) -> Option<Vec<Capability>> {
        let live: Vec<&DriverRecord> = self
            .drivers
            .values()
            .filter(|r| self.is_live(r, now))
            .collect();
        if live.is_empty() || live.iter().any(|r| r.capabilities.contains(&capability)) {
            return None;
        }
        let served: BTreeSet<Capability> = live
            .iter()
            .flat_map(|r| r.capabilities.iter().copied())
            .collect();
        Some(served.into_iter().collect())
    }

    /// Every driver ever registered, by id.
    pub(crate) fn views(&self, now: Instant) -> Vec<DriverView> {
        self.drivers
            .values()
            .map(|r| DriverView {
                driver_id: r.id.to_string(),
                version: r.version.clone(),
                capabilities: r.capabilities.iter().map(wire::encode_capability).collect(),
                master_key_fingerprint: r.fingerprint.clone(),
                rotation_target_fingerprint: r.rotation_target.clone(),
                live: self.is_live(r, now),
                ready: r.ready,
                in_flight: r.in_flight,
                registrations: r.registrations,
                completed: r.completed,
                failed: r.failed,
                last_seen_ms_ago: u64::try_from(
                    now.saturating_duration_since(r.last_seen).as_millis(),
                )
                .unwrap_or(u64::MAX),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfns_api_client::protocol::{Curve, Scheme};

    const LIVENESS: Duration = Duration::from_secs(5);
    const K1: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256k1,
    };
    const P256: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256r1,
    };
    const ED: Capability = Capability {
        scheme: Scheme::Eddsa,
        curve: Curve::Ed25519,
    };

    fn registration(id: &str, capabilities: &[Capability]) -> DriverRegistration {
        DriverRegistration {
            driver_id: id.into(),
            version: "0.1.0".into(),
            capabilities: capabilities.to_vec(),
            master_key_fingerprint: "ab".repeat(32),
            rotation_target_fingerprint: None,
        }
    }

    fn heartbeat(id: &str, ready: bool, in_flight: u32) -> Heartbeat {
        Heartbeat {
            driver_id: id.into(),
            ready,
            in_flight,
            ledger_head: None,
        }
    }

    #[test]
    fn heartbeats_keep_a_driver_live_and_silence_lapses_it() {
        let mut r = DriverRegistry::new(LIVENESS);
        let t0 = Instant::now();
        assert_eq!(
            r.heartbeat(&heartbeat("drv", true, 0), t0),
            Err(NotRegistered { lapsed: false })
        );
        assert!(r.seen("drv", t0).is_err());
        r.register(registration("drv", &[K1]), t0);
        // Heartbeats every 4 s keep it live well past the liveness timeout.
        for n in 1..=5 {
            let at = t0 + Duration::from_secs(4 * n);
            r.heartbeat(&heartbeat("drv", true, 2), at).unwrap();
            assert_eq!(r.live_count(at), 1);
        }
        // So does a lease request.
        let (id, serves) = r.seen("drv", t0 + Duration::from_secs(24)).unwrap();
        assert_eq!((&*id, serves), ("drv", BTreeSet::from([K1])));
        // Then silence: live up to the timeout, lapsed after it.
        let last = t0 + Duration::from_secs(24);
        assert_eq!(r.live_count(last + LIVENESS), 1);
        let lapsed = last + LIVENESS + Duration::from_millis(1);
        assert_eq!(r.live_count(lapsed), 0);
        assert_eq!(
            r.heartbeat(&heartbeat("drv", true, 0), lapsed),
            Err(NotRegistered { lapsed: true })
        );
        assert_eq!(r.seen("drv", lapsed), Err(NotRegistered { lapsed: true }));
        // A refused sign of life did not revive it.
        assert_eq!(r.live_count(lapsed), 0);
        let view = &r.views(lapsed)[0];
        assert!(!view.live);
        assert_eq!(view.last_seen_ms_ago, 5001);
        // Registering again does.
        r.register(registration("drv", &[K1]), lapsed);
        assert!(r.seen("drv", lapsed).is_ok());
        assert_eq!(r.views(lapsed)[0].registrations, 2);
    }

    #[test]
    fn a_new_registration_replaces_capabilities_and_keeps_counters() {
        let mut r = DriverRegistry::new(LIVENESS);
        let t0 = Instant::now();
        r.register(registration("drv", &[K1, P256]), t0);
        r.heartbeat(&heartbeat("drv", false, 3), t0).unwrap();
        r.credit("drv", Credit::Completed);
        r.credit("drv", Credit::Failed);
        r.credit("drv-unknown", Credit::Completed);
        let view = &r.views(t0)[0];
        assert_eq!((view.ready, view.in_flight), (false, 3));
        r.register(registration("drv", &[ED]), t0);
        assert_eq!(r.serving("drv").unwrap().1, BTreeSet::from([ED]));
        let view = &r.views(t0)[0];
        assert_eq!(
            (
                view.ready,
                view.in_flight,
                view.registrations,
                view.completed,
                view.failed
            ),
            (true, 0, 2, 1, 1)
        );
        assert_eq!(view.capabilities.len(), 1);
        assert_eq!(view.capabilities[0].curve, "ed25519");
    }

    #[test]
    fn jobs_are_refused_only_when_live_drivers_exist_and_none_serves_them() {
        let mut r = DriverRegistry::new(LIVENESS);
        let t0 = Instant::now();
        assert_eq!(r.refuses(P256, t0), None, "no driver at all: accepted");
        r.register(registration("a", &[K1]), t0);
        assert_eq!(r.refuses(K1, t0), None);
        assert_eq!(r.refuses(P256, t0), Some(vec![K1]));
        r.register(registration("b", &[P256]), t0 + LIVENESS);
        assert_eq!(r.refuses(P256, t0), None);
        // A lapsed, no longer counts: its capability is refused while b is live...
        let later = t0 + LIVENESS + Duration::from_secs(1);
        assert_eq!(r.refuses(K1, later), Some(vec![P256]));
        // ...and accepted again once nobody is live.
        assert_eq!(r.refuses(K1, later + LIVENESS * 2), None);
    }
}
