//! [`FaultInjectingHsm`]: wraps any [`Hsm`] and makes every operation fail while a
//! [`FaultSwitch`] is tripped, for tests and fault drills of the layers above (the driver's
//! failure handling: mark unhealthy, stop leasing, give jobs back, recover, rejoin).
//!
//! ```
//! use hsm_testing::{FaultInjectingHsm, FaultSwitch};
//! # fn wrap<H: custody_model::Hsm>(hsm: H) -> FaultInjectingHsm<H> {
//! // Tripped while /run/hsm-driver/hsm-fault exists (touch it to fail, rm it to heal).
//! let switch = FaultSwitch::from_trigger_file("/run/hsm-driver/hsm-fault");
//! FaultInjectingHsm::new(hsm, switch)
//! # }
//! ```
//!
//! While tripped, every operation, [`Hsm::check`] and [`Hsm::recover`] included, fails with
//! [`HsmError::InjectedFault`] (retryable, standing for `CKR_DEVICE_ERROR`) without reaching
//! the inner HSM; [`Hsm::capabilities`] and [`Hsm::master_key`] still answer. Once cleared,
//! everything reaches the inner HSM again, and [`Hsm::recover`] really recovers it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use custody_model::{
    Capabilities, GeneratedKey, Hsm, HsmError, KeyScheme, MacChain, MacKey, MasterKeyInfo,
    RawSignature, RecordMacCheck, RewrapRequest, SignRequest, WrappedKey,
};

/// Whether faults are being injected: a manual switch, and optionally a trigger file (tripped
/// while it exists; looked at, one `stat`, on every call). Clones share the same switch.
#[derive(Clone, Debug, Default)]
pub struct FaultSwitch {
    inner: Arc<SwitchState>,
}

#[derive(Debug, Default)]
struct SwitchState {
    manual: AtomicBool,
    trigger_file: Option<PathBuf>,
    /// The last state observed, to log transitions once rather than every call.
    observed: AtomicBool,
}

impl FaultSwitch {
    /// A manual switch, not tripped.
    pub fn new() -> Self {
        Self::default()
    }

    /// A switch tripped while `path` exists (or while [`FaultSwitch::trip`]ped). Whether it
    /// exists is checked on every call, so creating or removing the file takes effect at once.
    pub fn from_trigger_file(path: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(SwitchState {
                trigger_file: Some(path.into()),
                ..SwitchState::default()
            }),
        }
    }

    /// Trips the switch until [`FaultSwitch::clear`].
    pub fn trip(&self) {
        self.inner.manual.store(true, Ordering::Release);
        self.is_tripped();
    }

    /// Clears the manual switch. A trigger file that exists keeps it tripped.
    pub fn clear(&self) {
        self.inner.manual.store(false, Ordering::Release);
        self.is_tripped();
    }

    /// The trigger file, if this switch has one.
    pub fn trigger_file(&self) -> Option<&Path> {
        self.inner.trigger_file.as_deref()
    }

    /// Whether faults are being injected now: tripped manually, or the trigger file exists.
    /// Logs a warning when this differs from the previous answer.
    pub fn is_tripped(&self) -> bool {
        let manual = self.inner.manual.load(Ordering::Acquire);
        let file = self.inner.trigger_file.as_deref().is_some_and(Path::exists);
        let tripped = manual || file;
        if self.inner.observed.swap(tripped, Ordering::AcqRel) != tripped {
            let trigger_file = self.inner.trigger_file.as_deref().map(Path::display);
            if tripped {
                tracing::warn!(
                    manual,
                    trigger_file = trigger_file.map(tracing::field::display),
                    "HSM fault injection ON: every HSM operation now fails (fault-injection \
                     test configuration)"
                );
            } else {
                tracing::warn!(
                    trigger_file = trigger_file.map(tracing::field::display),
                    "HSM fault injection OFF: HSM operations reach the HSM again"
                );
            }
        }
        tripped
    }
}

/// An [`Hsm`] that fails every operation with [`HsmError::InjectedFault`] while its
/// [`FaultSwitch`] is tripped, and otherwise delegates to the inner HSM. For tests and fault
/// drills; see the [crate documentation](crate).
pub struct FaultInjectingHsm<H> {
    inner: H,
    switch: FaultSwitch,
}

impl<H: Hsm> FaultInjectingHsm<H> {
    /// Wraps `inner`, failing while `switch` is tripped.
    pub fn new(inner: H, switch: FaultSwitch) -> Self {
        Self { inner, switch }
    }

    /// The wrapped HSM.
    pub fn inner(&self) -> &H {
        &self.inner
    }

    /// The switch (clones of it control this HSM).
    pub fn switch(&self) -> &FaultSwitch {
        &self.switch
    }

    /// `Err` while the switch is tripped.
    fn gate(&self, operation: &'static str) -> Result<(), HsmError> {
        if self.switch.is_tripped() {
            Err(HsmError::InjectedFault { operation })
        } else {
            Ok(())
        }
    }
}

impl<H: fmt::Debug> fmt::Debug for FaultInjectingHsm<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjectingHsm")
            .field("inner", &self.inner)
            .field("switch", &self.switch)
            .finish()
    }
}

/// The operation name a MAC under `key` fails as (`mac_record`, `mac_ledger`).
fn mac_operation(key: MacKey) -> &'static str {
    match key {
        MacKey::Record => "mac_record",
        MacKey::Ledger => "mac_ledger",
    }
}

impl<H: Hsm> Hsm for FaultInjectingHsm<H> {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }

    fn master_key(&self) -> &MasterKeyInfo {
        self.inner.master_key()
    }

    async fn generate_key(&self, scheme: KeyScheme) -> Result<GeneratedKey, HsmError> {
        self.gate("generate_key")?;
        self.inner.generate_key(scheme).await
    }

    async fn sign_raw(&self, request: SignRequest) -> Result<RawSignature, HsmError> {
        self.gate("sign")?;
        self.inner.sign_raw(request).await
    }

    async fn mac(&self, key: MacKey, message: Vec<u8>) -> Result<[u8; 32], HsmError> {
        self.gate(mac_operation(key))?;
        self.inner.mac(key, message).await
    }

    async fn mac_chain(&self, key: MacKey, chain: MacChain) -> Result<Vec<[u8; 32]>, HsmError> {
        // A chain is MACs under the same key: the same switch stops it.
        self.gate(mac_operation(key))?;
        self.inner.mac_chain(key, chain).await
    }

    async fn verify_mac(
        &self,
        key: MacKey,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> Result<(), HsmError> {
        self.gate(match key {
            MacKey::Record => "verify_record_mac",
            MacKey::Ledger => "verify_ledger_mac",
        })?;
        self.inner.verify_mac(key, message, mac).await
    }

    fn master_keys(&self) -> Vec<MasterKeyInfo> {
        self.inner.master_keys()
    }

    fn holds_master_key(&self, fingerprint: &str) -> bool {
        self.inner.holds_master_key(fingerprint)
    }

    async fn generate_key_under(
        &self,
        master: &str,
        scheme: KeyScheme,
    ) -> Result<GeneratedKey, HsmError> {
        self.gate("generate_key")?;
        self.inner.generate_key_under(master, scheme).await
    }

    async fn sign_raw_under(
        &self,
        master: &str,
        request: SignRequest,
    ) -> Result<RawSignature, HsmError> {
        self.gate("sign")?;
        self.inner.sign_raw_under(master, request).await
    }

    async fn sign_record(
        &self,
        master: &str,
        record: RecordMacCheck,
        request: SignRequest,
    ) -> Result<RawSignature, HsmError> {
        self.gate("sign")?;
        self.inner.sign_record(master, record, request).await
    }

    async fn mac_record_under(&self, master: &str, message: Vec<u8>) -> Result<[u8; 32], HsmError> {
        self.gate("mac_record")?;
        self.inner.mac_record_under(master, message).await
    }

    async fn verify_record_mac_under(
        &self,
        master: &str,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> Result<(), HsmError> {
        self.gate("verify_record_mac")?;
        self.inner
            .verify_record_mac_under(master, message, mac)
            .await
    }

    async fn rewrap(&self, request: RewrapRequest) -> Result<WrappedKey, HsmError> {
        self.gate("rewrap")?;
        self.inner.rewrap(request).await
    }

    async fn check(&self) -> Result<(), HsmError> {
        self.gate("check")?;
        self.inner.check().await
    }

    async fn recover(&self) -> Result<(), HsmError> {
        self.gate("recover")?;
        self.inner.recover().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Held by every test of this module. `tracing` caches, per call site and for the whole
    /// process, whether anyone listens: a test tripping or clearing a switch on another
    /// thread, with no subscriber, while the counting test's subscriber is being set up could
    /// leave a warning's call site switched off for it (seen once in CI: the `cleared`
    /// warning went uncounted). One test at a time, the cache is rebuilt when the counting
    /// subscriber is installed.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts warnings (a minimal subscriber: the crate has no tracing-subscriber).
    #[derive(Default)]
    struct WarningCounter(Arc<AtomicUsize>);

    impl tracing::Subscriber for WarningCounter {
        fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
            *metadata.level() == tracing::Level::WARN
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn transitions_are_logged_once_not_per_call() {
        let _serial = serial();
        let warnings = Arc::new(AtomicUsize::new(0));
        let counter = WarningCounter(Arc::clone(&warnings));
        tracing::subscriber::with_default(counter, || {
            let switch = FaultSwitch::new();
            for _ in 0..5 {
                assert!(!switch.is_tripped());
            }
            assert_eq!(warnings.load(Ordering::Relaxed), 0);
            switch.trip();
            for _ in 0..5 {
                assert!(switch.is_tripped());
            }
            assert_eq!(
                warnings.load(Ordering::Relaxed),
                1,
                "one warning when tripped"
            );
            switch.clear();
            for _ in 0..5 {
                assert!(!switch.is_tripped());
            }
            assert_eq!(
                warnings.load(Ordering::Relaxed),
                2,
                "one warning when cleared"
            );
        });
    }

    #[test]
    fn the_manual_switch_trips_and_clears() {
        let _serial = serial();
        let switch = FaultSwitch::new();
        assert!(!switch.is_tripped());
        let clone = switch.clone();
        clone.trip();
        assert!(switch.is_tripped());
        switch.clear();
        assert!(!clone.is_tripped());
        assert_eq!(switch.trigger_file(), None);
    }

    #[test]
    fn a_trigger_file_trips_while_it_exists_or_while_tripped_manually() {
        let _serial = serial();
        let dir = std::env::temp_dir().join(format!(
            "hsm-pkcs11-fault-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("trip");
        let _ = std::fs::remove_file(&file);
        let switch = FaultSwitch::from_trigger_file(&file);
        assert!(!switch.is_tripped());
        std::fs::write(&file, b"").unwrap();
        assert!(switch.is_tripped());
        switch.clear();
        assert!(switch.is_tripped(), "the file still exists");
        std::fs::remove_file(&file).unwrap();
        assert!(!switch.is_tripped());
        switch.trip();
        assert!(switch.is_tripped(), "tripped manually without the file");
        switch.clear();
        assert!(!switch.is_tripped());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
