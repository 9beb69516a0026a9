//! The master key self-test behind [`super::Pkcs11Hsm::master_key_self_test`]: reads the
//! master key's policy attributes, then **attempts the two extraction attacks** against a
//! throwaway canary key and reports what succeeded.
//!
//! 1. Attributes: `CKA_EXTRACTABLE` must be false, `CKA_SENSITIVE` true, and `CKA_ENCRYPT`,
//!    `CKA_DECRYPT`, `CKA_SIGN`, `CKA_VERIFY`, `CKA_DERIVE` false. `CKA_NEVER_EXTRACTABLE` and
//!    `CKA_ALWAYS_SENSITIVE` false are advisory only: a key imported in a key ceremony is
//!    never "never extractable", by construction.
//! 2. A P-256 key pair is generated as session objects (private key sensitive and
//!    extractable, like the driver's own keys) and its private key wrapped under the master
//!    key with the configured mechanism.
//! 3. Attack (a): unwrap the blob as a `CKK_GENERIC_SECRET` secret key with
//!    `CKA_SENSITIVE=false` and read `CKA_VALUE` (that is the plaintext PKCS#8 key).
//! 4. Attack (b): unwrap the blob as an EC private key with `CKA_EXTRACTABLE=true` and wrap it
//!    again under a freshly generated session AES key (a key the caller controls).
//!
//! Every object is a session object owned by an [`ObjectGuard`], destroyed on every path.
//! Bytes a successful attack obtains are held in [`Zeroizing`] buffers, only their presence is
//! reported, and they are never logged.

use std::fmt;

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::guard::ObjectGuard;
use super::keys::{self, MasterKey};
use crate::error::{HsmError, rv_is_transient, rv_name};
use crate::hsm::WrapMechanism;

/// DER `OBJECT IDENTIFIER` prime256v1: the canary's curve, the most widely supported one.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The remedy for every finding that makes the master key unsafe.
const REMEDY: &str = "create a new master key with `hsm-driver master-key create` (it sets \
     CKA_UNWRAP_TEMPLATE and the usage policy) and migrate the wrapped keys to it; see \
     docs/key-ceremony.md";

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Severity {
    /// Keys wrapped under this master key can be extracted, or the master key can be misused:
    /// refuse to start.
    Unsafe,
    /// Worth knowing, not a way to extract keys (for example a master key imported in a key
    /// ceremony is not `CKA_NEVER_EXTRACTABLE`).
    Advisory,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FindingKind {
    /// `CKA_EXTRACTABLE` is true: the master key itself could be wrapped out of the token.
    Extractable,
    /// `CKA_SENSITIVE` is false: the master key's value can be read.
    NotSensitive,
    /// `CKA_NEVER_EXTRACTABLE` is false: the key was extractable at some point (or imported).
    WasExtractable,
    /// `CKA_ALWAYS_SENSITIVE` is false: the key was readable at some point (or imported).
    WasNotSensitive,
    /// A usage other than wrap and unwrap is enabled.
    ExtraUsage {
        /// The attribute, for example `CKA_ENCRYPT`.
        attribute: &'static str,
    },
    /// Attack (a) succeeded: a wrapped key was unwrapped as a non-sensitive secret key.
    ReadableSecretUnwrap,
    /// Attack (b) succeeded: a wrapped key was unwrapped as an extractable private key.
    ExtractableUnwrap,
}

/// One problem the self-test found, with how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SelfTestFinding {
    /// What it is about.
    pub kind: FindingKind,
    /// How much it matters.
    pub severity: Severity,
    /// What is wrong, naming the master key.
    pub problem: String,
    /// How to fix it.
    pub remedy: String,
}

impl fmt::Display for SelfTestFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.problem, self.remedy)
    }
}

/// An attack the self-test attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attack {
    /// (a) Unwrap as a non-sensitive `CKK_GENERIC_SECRET` and read `CKA_VALUE`.
    ReadableSecret,
    /// (b) Unwrap as an extractable EC private key and wrap it under a session AES key.
    ExtractableRewrap,
}

/// How an attempted attack ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttackOutcome {
    /// `C_UnwrapKey` refused, with this return value (SoftHSMv2 with the unwrap template:
    /// `CKR_TEMPLATE_INCONSISTENT`).
    Refused {
        /// The return value.
        return_value: RvError,
    },
    /// The attack worked: `C_UnwrapKey` accepted the attacker's template.
    Succeeded {
        /// (a): whether `CKA_VALUE` could then be read (the plaintext key); (b): whether
        /// `C_WrapKey` under the session AES key then went through.
        rewrapped_or_read: bool,
    },
}

/// One attempted attack and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttackRecord {
    /// The attack.
    pub attack: Attack,
    /// How it ended.
    pub outcome: AttackOutcome,
}

/// What [`super::Pkcs11Hsm::master_key_self_test`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SelfTestReport {
    /// The master key's `CKA_LABEL`.
    pub master_key_label: String,
    /// Every problem found; empty for a well-provisioned master key.
    pub findings: Vec<SelfTestFinding>,
    /// The attacks attempted, in order, and how each ended.
    pub attacks: Vec<AttackRecord>,
}

impl SelfTestReport {
    /// Whether no finding is [`Severity::Unsafe`].
    pub fn is_safe(&self) -> bool {
        !self.findings.iter().any(|f| f.severity == Severity::Unsafe)
    }

    /// The findings of severity [`Severity::Unsafe`].
    pub fn unsafe_findings(&self) -> impl Iterator<Item = &SelfTestFinding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Unsafe)
    }

    /// Whether a finding of this kind was made.
    pub fn has(&self, kind: FindingKind) -> bool {
        self.findings.iter().any(|f| f.kind == kind)
    }

    /// `Ok(self)` when [`is_safe`](Self::is_safe), for a caller that must refuse to start
    /// otherwise.
    ///
    /// # Errors
    /// [`HsmError::UnsafeMasterKey`] carrying the report.
    pub fn require_safe(self) -> Result<Self, HsmError> {
        if self.is_safe() {
            Ok(self)
        } else {
            Err(HsmError::UnsafeMasterKey {
                report: Box::new(self),
            })
        }
    }
}

impl fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_safe() {
            return write!(
                f,
                "master key `{}` passed the self-test",
                self.master_key_label
            );
        }
        write!(f, "master key `{}` is unsafe:", self.master_key_label)?;
        for (i, finding) in self.unsafe_findings().enumerate() {
            let separator = if i == 0 { " " } else { "; " };
            write!(f, "{separator}{finding}")?;
        }
        Ok(())
    }
}

/// Runs the self-test on `session` (see the module documentation).
pub(crate) fn run(
    session: &Session,
    master: MasterKey<'_>,
    label: &str,
    mechanism: WrapMechanism,
) -> Result<SelfTestReport, HsmError> {
    let mut report = SelfTestReport {
        master_key_label: label.to_owned(),
        findings: Vec::new(),
        attacks: Vec::new(),
    };
    check_attributes(session, master.handle, &mut report)?;

    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Sign(true),
            ],
        )
        .map_err(HsmError::pkcs11("C_GenerateKeyPair"))?;
    let public = ObjectGuard::new(session, public, "self-test canary public key");
    drop(public);
    let private = ObjectGuard::new(session, private, "self-test canary private key");
    let blob = keys::wrap(session, master, mechanism, private.handle())
        .map_err(HsmError::pkcs11("C_WrapKey"))?;
    drop(private);

    let outcome = readable_secret_attack(session, master, mechanism, &blob)?;
    report.record(Attack::ReadableSecret, outcome);
    if let AttackOutcome::Succeeded { .. } = outcome {
        report.unsafe_finding(
            FindingKind::ReadableSecretUnwrap,
            format!(
                "master key `{label}` lets a wrapped key be unwrapped as a readable secret \
                 (attack a succeeded: C_UnwrapKey as a non-sensitive CKK_GENERIC_SECRET, \
                 then CKA_VALUE is the plaintext private key)"
            ),
        );
    }
    let outcome = extractable_rewrap_attack(session, master, mechanism, &blob)?;
    report.record(Attack::ExtractableRewrap, outcome);
    if let AttackOutcome::Succeeded { rewrapped_or_read } = outcome {
        let then = if rewrapped_or_read {
            "and it was wrapped again under a session AES key"
        } else {
            "(wrapping it again under a session AES key then failed)"
        };
        report.unsafe_finding(
            FindingKind::ExtractableUnwrap,
            format!(
                "master key `{label}` lets a wrapped key be unwrapped as an extractable \
                 private key (attack b succeeded) {then}"
            ),
        );
    }
    for finding in report.unsafe_findings() {
        tracing::error!(problem = %finding.problem, "master key self-test");
    }
    Ok(report)
}

impl SelfTestReport {
    fn record(&mut self, attack: Attack, outcome: AttackOutcome) {
        self.attacks.push(AttackRecord { attack, outcome });
    }

    fn unsafe_finding(&mut self, kind: FindingKind, problem: String) {
        self.findings.push(SelfTestFinding {
            kind,
            severity: Severity::Unsafe,
            problem,
            remedy: REMEDY.to_owned(),
        });
    }
}

/// Checks the master key's policy attributes. Attributes the token does not report are
/// skipped (cryptoki drops unavailable attributes); the attacks still run.
fn check_attributes(
    session: &Session,
    master: ObjectHandle,
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    let label = report.master_key_label.clone();
    let attributes = session
        .get_attributes(
            master,
            &[
                AttributeType::Extractable,
                AttributeType::Sensitive,
                AttributeType::NeverExtractable,
                AttributeType::AlwaysSensitive,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Sign,
                AttributeType::Verify,
                AttributeType::Derive,
            ],
        )
        .map_err(HsmError::pkcs11("C_GetAttributeValue"))?;
    for attribute in attributes {
        match attribute {
            Attribute::Extractable(true) => report.unsafe_finding(
                FindingKind::Extractable,
                format!(
                    "master key `{label}` is extractable (CKA_EXTRACTABLE=true): it can be \
                     wrapped out of the token"
                ),
            ),
            Attribute::Sensitive(false) => report.unsafe_finding(
                FindingKind::NotSensitive,
                format!(
                    "master key `{label}` is not sensitive (CKA_SENSITIVE=false): its value \
                     can be read"
                ),
            ),
            Attribute::NeverExtractable(false) => report.findings.push(SelfTestFinding {
                kind: FindingKind::WasExtractable,
                severity: Severity::Advisory,
                problem: format!(
                    "master key `{label}` has CKA_NEVER_EXTRACTABLE=false: it was imported or \
                     was extractable at some point"
                ),
                remedy: "expected for a key imported in a key ceremony; otherwise treat the \
                         key as exposed; see docs/key-ceremony.md"
                    .to_owned(),
            }),
            Attribute::AlwaysSensitive(false) => report.findings.push(SelfTestFinding {
                kind: FindingKind::WasNotSensitive,
                severity: Severity::Advisory,
                problem: format!(
                    "master key `{label}` has CKA_ALWAYS_SENSITIVE=false: it was imported or \
                     was readable at some point"
                ),
                remedy: "expected for a key imported in a key ceremony; otherwise treat the \
                         key as exposed; see docs/key-ceremony.md"
                    .to_owned(),
            }),
            Attribute::Encrypt(true) => extra_usage(report, "CKA_ENCRYPT"),
            Attribute::Decrypt(true) => extra_usage(report, "CKA_DECRYPT"),
            Attribute::Sign(true) => extra_usage(report, "CKA_SIGN"),
            Attribute::Verify(true) => extra_usage(report, "CKA_VERIFY"),
            Attribute::Derive(true) => extra_usage(report, "CKA_DERIVE"),
            _ => {}
        }
    }
    Ok(())
}

fn extra_usage(report: &mut SelfTestReport, attribute: &'static str) {
    let problem = format!(
        "master key `{}` has {attribute}=true: it must wrap and unwrap only",
        report.master_key_label
    );
    report.unsafe_finding(FindingKind::ExtraUsage { attribute }, problem);
}

/// Attack (a): unwrap as a non-sensitive generic secret and read `CKA_VALUE`.
fn readable_secret_attack(
    session: &Session,
    master: MasterKey<'_>,
    mechanism: WrapMechanism,
    blob: &[u8],
) -> Result<AttackOutcome, HsmError> {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let key = match keys::unwrap(session, master, mechanism, blob, &template) {
        Ok(key) => ObjectGuard::new(session, key, "self-test attack (a) secret key"),
        Err(error) => return refused("C_UnwrapKey", error),
    };
    let attributes = session
        .get_attributes(key.handle(), &[AttributeType::Value])
        .map_err(HsmError::pkcs11("C_GetAttributeValue"))?;
    let mut read = false;
    for attribute in attributes {
        if let Attribute::Value(bytes) = attribute {
            // The canary's plaintext PKCS#8: wiped on drop, only its presence is reported.
            let bytes = Zeroizing::new(bytes);
            read |= !bytes.is_empty();
        }
    }
    drop(key);
    // Unwrapped as a secret key at all is a failure of the policy, readable or not.
    Ok(AttackOutcome::Succeeded {
        rewrapped_or_read: read,
    })
}

/// Attack (b): unwrap as an extractable EC private key and wrap it under a session AES key.
fn extractable_rewrap_attack(
    session: &Session,
    master: MasterKey<'_>,
    mechanism: WrapMechanism,
    blob: &[u8],
) -> Result<AttackOutcome, HsmError> {
    let template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Sign(false),
    ];
    let key = match keys::unwrap(session, master, mechanism, blob, &template) {
        Ok(key) => ObjectGuard::new(session, key, "self-test attack (b) private key"),
        Err(error) => return refused("C_UnwrapKey", error),
    };
    let attacker = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
            ],
        )
        .map_err(HsmError::pkcs11("C_GenerateKey"))?;
    let attacker = ObjectGuard::new(session, attacker, "self-test attack (b) AES key");
    let attacker_key = MasterKey {
        handle: attacker.handle(),
        raw: master.raw,
    };
    let rewrapped = keys::wrap(session, attacker_key, mechanism, key.handle())
        // Encrypted under a key only this session holds, but wiped all the same.
        .map(Zeroizing::new)
        .is_ok();
    drop(attacker);
    drop(key);
    Ok(AttackOutcome::Succeeded {
        rewrapped_or_read: rewrapped,
    })
}

/// An attack's call failed: a refusal, unless the failure is transient (device, session,
/// login), in which case the self-test could not decide and fails.
fn refused(function: &'static str, error: CryptokiError) -> Result<AttackOutcome, HsmError> {
    match error {
        CryptokiError::Pkcs11(rv, _) if !rv_is_transient(rv) => {
            tracing::debug!(function, rv = %rv_name(rv), "self-test attack refused");
            Ok(AttackOutcome::Refused { return_value: rv })
        }
        source => Err(HsmError::Pkcs11 { function, source }),
    }
}
