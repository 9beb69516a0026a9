//! The fault module in front of SoftHSMv2, driven through cryptoki as the driver drives it:
//! forwarding with no fault, then each fault seen at the PKCS#11 boundary.
//!
//! The faults are process-wide, so the tests of this binary run one at a time ([`Drill`]).

mod common;

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki_sys::CKR_DEVICE_ERROR;
use pkcs11_fault::{Action, ControlFile, Rule, Stats};

use common::{DIGEST, Fixture, Real};

/// How long the module may take to apply a change of the control file (it polls every 20 ms).
const APPLIED_WITHIN: Duration = Duration::from_secs(5);

/// Where SoftHSMv2 is looked for when `SOFTHSM2_MODULE` is not set.
const SOFTHSM2_CANDIDATES: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

fn softhsm2() -> PathBuf {
    std::env::var_os("SOFTHSM2_MODULE")
        .map(PathBuf::from)
        .or_else(|| {
            SOFTHSM2_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .expect("SoftHSMv2: install softhsm2 or set SOFTHSM2_MODULE")
}

/// One test's exclusive use of the module's faults; lifts them when dropped, on every path.
struct Drill {
    fixture: &'static Fixture,
    control: ControlFile,
    _serial: MutexGuard<'static, ()>,
}

impl Drill {
    fn start() -> Drill {
        static SERIAL: Mutex<()> = Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let fixture = Fixture::get(Real::SoftHsm2, &softhsm2());
        Drill {
            fixture,
            control: ControlFile::new(&fixture.control),
            _serial: serial,
        }
    }

    /// Puts `rules` in force and waits until the module reports them.
    fn set(&self, rules: &[Rule]) -> Stats {
        self.control.set(rules).expect("write the control file");
        self.wait(|s| s.faults() == rules && s.control_error().is_none())
    }

    /// Lifts every fault and waits until the module reports none.
    fn clear(&self) {
        self.control.clear().expect("remove the control file");
        self.wait(|s| s.faults().is_empty() && s.control_error().is_none());
    }

    fn wait(&self, done: impl FnMut(&Stats) -> bool) -> Stats {
        Stats::wait(&self.fixture.stats, APPLIED_WITHIN, done).expect("the module's statistics")
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        let _ = self.control.clear();
    }
}

#[test]
fn forwards_every_call_when_no_fault_is_set() {
    let drill = Drill::start();
    drill.clear();
    let session = drill.fixture.user_session();
    let before = drill.set(&[]).calls("C_Sign");
    common::forwarding_smoke(&session);
    // C_Sign twice per signature (cryptoki asks for the length first), all returned, none
    // held. (The counts are the process's, shared with the other tests, and `before` may
    // lag the last calls of the previous test by one poll: hence `>=`.)
    let stats = drill.wait(|s| {
        let sign = s.calls("C_Sign");
        sign.entered >= before.entered + 2 && sign.in_flight() == 0
    });
    assert_eq!(stats.calls("C_Sign").stalled, 0);
    assert!(stats.calls("C_Initialize").entered >= 1);
}

#[test]
fn fail_returns_the_configured_value_without_forwarding() {
    let drill = Drill::start();
    let session = drill.fixture.user_session();
    let (public, private) = common::key_pair(&session);
    let before = drill.set(&[]).calls("C_Sign");

    let rules = [Rule::new("C_Sign", Action::Fail(CKR_DEVICE_ERROR)).expect("rule")];
    drill.set(&rules);
    match session.sign(&Mechanism::Ecdsa, private, &DIGEST) {
        Err(CryptokiError::Pkcs11(RvError::DeviceError, Function::Sign)) => {}
        other => panic!("expected C_Sign to fail with CKR_DEVICE_ERROR, got {other:?}"),
    }
    let after = drill.wait(|s| s.calls("C_Sign").failed > before.failed);
    assert_eq!(after.calls("C_Sign").failed, before.failed + 1);

    // Lifted, signing works again. A `fail` never reached SoftHSMv2, so the operation begun
    // by C_SignInit is still active in that session: sign in another session of the token
    // (session objects are visible to every session of the application).
    drill.clear();
    let slot = session
        .get_session_info()
        .expect("C_GetSessionInfo")
        .slot_id();
    let second = drill
        .fixture
        .pkcs11
        .open_rw_session(slot)
        .expect("C_OpenSession");
    let signature = second
        .sign(&Mechanism::Ecdsa, private, &DIGEST)
        .expect("C_Sign once the fault is lifted");
    common::verify(&second, public, &signature);
}

#[test]
fn delay_holds_a_call_at_least_that_long() {
    let drill = Drill::start();
    let session = drill.fixture.user_session();
    let before = drill.set(&[]).calls("C_GenerateRandom");
    let delay = Duration::from_millis(200);
    drill.set(&[Rule::new("C_GenerateRandom", Action::Delay(delay)).expect("rule")]);

    let start = Instant::now();
    let random = session
        .generate_random_vec(16)
        .expect("C_GenerateRandom is delayed, then forwarded");
    let took = start.elapsed();
    assert_eq!(random.len(), 16);
    assert!(
        took >= delay,
        "returned after {took:?}, before the {delay:?} delay"
    );
    drill.wait(|s| s.calls("C_GenerateRandom").delayed == before.delayed + 1);

    // Other functions are not delayed.
    let start = Instant::now();
    session.get_session_info().expect("C_GetSessionInfo");
    assert!(start.elapsed() < delay, "C_GetSessionInfo was delayed too");
}

#[test]
fn stall_blocks_a_call_until_the_fault_is_lifted() {
    let drill = Drill::start();
    let session = drill.fixture.user_session();
    let (public, private) = common::key_pair(&session);
    drill.set(&[Rule::new("C_Sign", Action::Stall).expect("rule")]);

    // Sign on another thread, as a driver worker would; the session goes with it and back.
    let (sender, receiver) = mpsc::channel();
    let signer = std::thread::spawn(move || {
        let result = session.sign(&Mechanism::Ecdsa, private, &DIGEST);
        let _ = sender.send((result, session));
    });
    match receiver.recv_timeout(Duration::from_millis(300)) {
        Err(RecvTimeoutError::Timeout) => {}
        Ok((result, _)) => panic!("C_Sign returned through a stall: {result:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("the signing thread died"),
    }
    let stats = drill.wait(|s| s.calls("C_Sign").stalled == 1);
    assert_eq!(
        stats.calls("C_Sign").in_flight(),
        1,
        "one C_Sign inside the module"
    );
    assert!(
        matches!(receiver.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "still blocked"
    );

    // Lifting the fault releases the call within a short bound, and it completes correctly.
    drill.control.clear().expect("remove the control file");
    let lifted = Instant::now();
    let (result, session) = receiver
        .recv_timeout(Duration::from_secs(5))
        .expect("the stalled C_Sign returns once the fault is lifted");
    let released_after = lifted.elapsed();
    assert!(
        released_after < Duration::from_secs(1),
        "released {released_after:?} after the control file was removed"
    );
    let signature = result.expect("the stalled C_Sign succeeds once forwarded");
    common::verify(&session, public, &signature);
    signer.join().expect("the signing thread");
    drill.wait(|s| s.calls("C_Sign").stalled == 0 && s.calls("C_Sign").in_flight() == 0);
}

#[test]
fn an_unreadable_control_file_keeps_the_previous_faults() {
    let drill = Drill::start();
    let session = drill.fixture.user_session();
    let rules = [Rule::new("C_GenerateRandom", Action::Fail(CKR_DEVICE_ERROR)).expect("rule")];
    drill.set(&rules);

    // A typo: reported, and the rules in force stay (a drill never silently loses its fault).
    let temporary = drill.fixture.control.with_extension("typo");
    std::fs::write(&temporary, "C_GenerateRandom hang\n").expect("write");
    std::fs::rename(&temporary, &drill.fixture.control).expect("rename");
    let stats = drill.wait(|s| s.control_error().is_some());
    assert_eq!(stats.faults(), rules);
    assert!(
        stats.control_error().is_some_and(|e| e.contains("hang")),
        "{:?}",
        stats.control_error()
    );
    match session.generate_random_vec(16) {
        Err(CryptokiError::Pkcs11(RvError::DeviceError, Function::GenerateRandom)) => {}
        other => panic!("expected CKR_DEVICE_ERROR, got {other:?}"),
    }

    drill.clear();
    session
        .generate_random_vec(16)
        .expect("C_GenerateRandom once the file is removed");
}
