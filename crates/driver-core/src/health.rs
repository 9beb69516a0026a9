//! The driver's view of its three dependencies, and the readiness that decides whether it leases.
//!
//! A driver leases only while its HSM and its key store are usable and the API knows it
//! (registered). The API's own health is tracked too, but it does not stop leasing: a lease
//! request is how an unreachable API is retried (with backoff).
//!
//! The engine updates the state; a host reads it through a cloned [`Health`] (for example to
//! answer `/readyz`) and may wait for changes with [`Health::changed`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Why the HSM and the store are down before their first check.
const NOT_CHECKED_YET: &str = "not checked yet";

/// One dependency of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// The HSM (PKCS#11 sessions, token, device).
    Hsm,
    /// The key store (the database).
    Store,
    /// The API (leases, reports, presence).
    Api,
}

impl Component {
    /// Every component, in a stable order.
    pub const ALL: [Component; 3] = [Component::Hsm, Component::Store, Component::Api];

    /// `hsm`, `store` or `api`: used in logs, metrics labels and health answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Hsm => "hsm",
            Component::Store => "store",
            Component::Api => "api",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether one component is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    /// Usable: its last check or operation succeeded.
    Up,
    /// Not usable since `since`; `reason` is the error that showed it (no key material).
    Down {
        /// The error, as one line.
        reason: String,
        /// When it went down.
        since: Instant,
    },
}

impl ComponentState {
    /// Whether the component is usable.
    pub fn is_up(&self) -> bool {
        matches!(self, ComponentState::Up)
    }
}

/// A snapshot of the driver's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The HSM.
    pub hsm: ComponentState,
    /// The key store.
    pub store: ComponentState,
    /// The API.
    pub api: ComponentState,
    /// Whether the API has accepted this driver's registration (and not since forgotten it).
    pub registered: bool,
    /// Whether shutdown was requested: leasing has stopped for good.
    pub draining: bool,
    /// When a lease request last succeeded (`None` before the first one).
    pub last_successful_poll: Option<Instant>,
}

impl HealthReport {
    /// The state of one component.
    pub fn component(&self, component: Component) -> &ComponentState {
        match component {
            Component::Hsm => &self.hsm,
            Component::Store => &self.store,
            Component::Api => &self.api,
        }
    }

    /// Whether the driver leases work now: HSM and store usable, registered, not draining.
    pub fn can_lease(&self) -> bool {
        self.hsm.is_up() && self.store.is_up() && self.registered && !self.draining
    }

    /// Whether a job already leased can run: HSM and store usable. (Registration and draining
    /// do not matter here: the API handed the job over, and a draining driver finishes what it
    /// holds.)
    pub fn can_execute(&self) -> bool {
        self.hsm.is_up() && self.store.is_up()
    }

    /// Whether the driver is fully usable: it can lease and the API answers. This is `/readyz`.
    pub fn is_ready(&self) -> bool {
        self.can_lease() && self.api.is_up()
    }

    /// Time since the last successful lease request.
    pub fn since_last_successful_poll(&self) -> Option<Duration> {
        self.last_successful_poll.map(|at| at.elapsed())
    }

    /// Why the driver is not ready, one reason per line-item (empty when ready).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for component in Component::ALL {
            if let ComponentState::Down { reason, since } = self.component(component) {
                problems.push(format!(
                    "{component} down for {:.1}s: {reason}",
                    since.elapsed().as_secs_f64()
                ));
            }
        }
        if !self.registered {
            problems.push("not registered with the API".to_owned());
        }
        if self.draining {
            problems.push("shutting down".to_owned());
        }
        problems
    }
}

/// A shared, cheaply cloned handle on the driver's health. Obtained from
/// [`Driver::health`](crate::Driver::health) before the driver runs.
#[derive(Clone)]
pub struct Health {
    state: Arc<watch::Sender<HealthReport>>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Health")
            .field(&*self.state.borrow())
            .finish()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A new state: HSM and store up (the host opened them), API not yet reached, not registered.
    pub fn new() -> Self {
        // Nothing is leased before the HSM (with its attack suite) and the store have passed
        // their first check, which the engine runs at once.
        let unchecked = || ComponentState::Down {
            reason: NOT_CHECKED_YET.to_owned(),
            since: Instant::now(),
        };
        let (state, _) = watch::channel(HealthReport {
            hsm: unchecked(),
            store: unchecked(),
            api: ComponentState::Down {
                reason: "not contacted yet".to_owned(),
                since: Instant::now(),
            },
            registered: false,
            draining: false,
            last_successful_poll: None,
        });
        Self {
            state: Arc::new(state),
        }
    }

    /// The current state.
    pub fn report(&self) -> HealthReport {
        self.state.borrow().clone()
    }

    /// Waits until the state changes (any field).
    pub async fn changed(&self) {
        let mut receiver = self.state.subscribe();
        receiver.borrow_and_update();
        // The sender lives as long as `self`: this cannot fail.
        let _ = receiver.changed().await;
    }

    /// Waits until `predicate` holds for the state (returns at once if it holds now).
    pub async fn wait_for(&self, mut predicate: impl FnMut(&HealthReport) -> bool) {
        let mut receiver = self.state.subscribe();
        let _ = receiver.wait_for(|report| predicate(report)).await;
    }

    /// Marks a component down. Returns `true` if it was up (a transition).
    pub(crate) fn set_down(&self, component: Component, reason: String) -> bool {
        let mut transition = false;
        self.state.send_if_modified(|report| {
            let state = match component {
                Component::Hsm => &mut report.hsm,
                Component::Store => &mut report.store,
                Component::Api => &mut report.api,
            };
            match state {
                ComponentState::Up => {
                    *state = ComponentState::Down {
                        reason,
                        since: Instant::now(),
                    };
                    transition = true;
                    true
                }
                // The first check's failure replaces the placeholder, keeping the time.
                ComponentState::Down {
                    reason: current, ..
                } if current == NOT_CHECKED_YET => {
                    *current = reason;
                    true
                }
                // Keep the first reason and time: "down since" must not reset on each failure.
                ComponentState::Down { .. } => false,
            }
        });
        transition
    }

    /// Marks a component up. Returns `true` if it was down (a transition).
    pub(crate) fn set_up(&self, component: Component) -> bool {
        self.state.send_if_modified(|report| {
            let state = match component {
                Component::Hsm => &mut report.hsm,
                Component::Store => &mut report.store,
                Component::Api => &mut report.api,
            };
            if state.is_up() {
                false
            } else {
                *state = ComponentState::Up;
                true
            }
        })
    }

    pub(crate) fn set_registered(&self, registered: bool) {
        self.state.send_if_modified(|report| {
            let changed = report.registered != registered;
            report.registered = registered;
            changed
        });
    }

    pub(crate) fn set_draining(&self) {
        self.state.send_if_modified(|report| {
            let changed = !report.draining;
            report.draining = true;
            changed
        });
    }

    /// Records a successful lease request (also: the API is up). Does not wake waiters unless
    /// the API was down: polls happen all the time.
    pub(crate) fn polled(&self) {
        self.state.send_if_modified(|report| {
            report.last_successful_poll = Some(Instant::now());
            if report.api.is_up() {
                false
            } else {
                report.api = ComponentState::Up;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_leases_only_with_hsm_and_store_up_and_registered() {
        let health = Health::new();
        assert!(!health.report().can_lease(), "nothing checked yet");
        assert!(
            health.report().problems()[0].contains("not checked yet"),
            "{:?}",
            health.report().problems()
        );
        health.set_up(Component::Hsm);
        health.set_up(Component::Store);
        assert!(!health.report().can_lease(), "not registered yet");
        health.set_registered(true);
        assert!(health.report().can_lease());
        assert!(!health.report().is_ready(), "the API was not reached yet");
        health.polled();
        assert!(health.report().is_ready());

        assert!(health.set_down(Component::Hsm, "CKR_DEVICE_ERROR".into()));
        assert!(
            !health.set_down(Component::Hsm, "again".into()),
            "already down"
        );
        let report = health.report();
        assert!(!report.can_lease() && !report.is_ready());
        assert!(report.problems()[0].contains("hsm down"));
        assert!(
            report.problems()[0].contains("CKR_DEVICE_ERROR"),
            "the first reason is kept: {:?}",
            report.problems()
        );
        assert!(health.set_up(Component::Hsm));
        assert!(health.report().is_ready());

        health.set_down(Component::Api, "connection refused".into());
        assert!(
            health.report().can_lease(),
            "an unreachable API is retried by leasing"
        );
        assert!(!health.report().is_ready());

        health.set_draining();
        assert!(!health.report().can_lease());
        assert!(
            health
                .report()
                .problems()
                .iter()
                .any(|p| p == "shutting down")
        );
    }

    #[tokio::test]
    async fn waiters_wake_when_the_state_changes() {
        let health = Health::new();
        health.set_registered(true);
        health.set_up(Component::Hsm);
        health.set_down(Component::Store, "pool timed out".into());
        let waiter = {
            let health = health.clone();
            tokio::spawn(async move { health.wait_for(HealthReport::can_lease).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        health.set_up(Component::Store);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
    }
}
