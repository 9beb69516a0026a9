//! The attack suite behind [`super::Pkcs11Hsm::master_key_self_test`]: it reads the policy
//! attributes of the deployment's keys, then **attempts, for real, what an insider holding the
//! user PIN would try** and reports what succeeded. It runs at start-up (an unsafe finding
//! refuses the start) and again at every health check (an unsafe finding marks the HSM down).
//!
//! 1. Attributes of the master key and of each HMAC key (record MAC, ledger): not extractable,
//!    sensitive, no usage beyond their own, and fixed (`CKA_MODIFIABLE`, `CKA_COPYABLE`,
//!    `CKA_DESTROYABLE` false). `CKA_NEVER_EXTRACTABLE`/`CKA_ALWAYS_SENSITIVE` false are
//!    advisory only: a key imported in a key ceremony is never "never extractable".
//! 2. **Modify in place**: `C_SetAttributeValue` on each deployment key. The suite writes the
//!    value the key already has (`CKA_DERIVE=false`), so that a token that accepts the write
//!    is reported without the production key ever being weakened, even for a moment; a token
//!    that accepts it would equally accept `CKA_DECRYPT=true` (the tests do that for real).
//! 3. **Copy with a usage**: `C_CopyObject` of each deployment key into a session object with
//!    a usage it must not have (`CKA_DECRYPT` for the master key: with it, `C_Decrypt` in ECB
//!    mode runs the RFC 3394/5649 unwrap in software; `CKA_DERIVE` for an HMAC key). A copy
//!    that is made is destroyed at once.
//! 4. A throwaway P-256 canary key pair is generated as session objects, and its private key
//!    wrapped under the master key with **every wrap mechanism the token offers**; for each
//!    blob:
//!    - (a) unwrap it as a non-sensitive `CKK_GENERIC_SECRET` and read `CKA_VALUE` (the
//!      plaintext PKCS#8);
//!    - (b) unwrap it as an extractable private key and wrap it again under a session AES
//!      key the caller controls;
//!    - unwrap it with one forbidden attribute and every other attribute as the master key's
//!      unwrap template pins it: `CKA_DERIVE` (then ECDH with it), `CKA_DECRYPT`,
//!      `CKA_UNWRAP`, `CKA_SIGN_RECOVER`, `CKA_MODIFIABLE` (then turn `CKA_DERIVE` on in
//!      place), `CKA_COPYABLE` (then copy it with `CKA_DERIVE`), and `CKA_WRAP_WITH_TRUSTED`
//!      false with `CKA_EXTRACTABLE` (then wrap it under a session AES key).
//! 5. **Trusted keys**: any key with `CKA_TRUSTED=true` other than the master key could
//!    receive every key unwrapped under the master key (they are wrappable by trusted keys
//!    only): reported.
//!
//! Every object is a session object owned by an [`ObjectGuard`], destroyed on every path.
//! Bytes a successful attack obtains are held in [`Zeroizing`] buffers, only their presence is
//! reported, and they are never logged.

use std::fmt;

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::guard::ObjectGuard;
use super::keys::{self, MasterKey};
use crate::error::{HsmError, rv_is_transient, rv_name};
use crate::hsm::WrapMechanism;

/// DER `OBJECT IDENTIFIER` prime256v1: the canary's curve, the most widely supported one.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The remedy for every finding that makes a key of the deployment unsafe.
const REMEDY: &str = "the key cannot be repaired in place: provision a new master key (and its \
     HMAC keys) with `hsm-driver master-key create`, which sets the policy, and treat keys \
     wrapped under this one as exposed to whoever held the user PIN; see docs/key-ceremony.md \
     and docs/security.md";

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Severity {
    /// Keys wrapped under this master key can be extracted, or a deployment key can be
    /// misused: refuse to start, or stop signing.
    Unsafe,
    /// Worth knowing, not a way to extract keys (for example a master key imported in a key
    /// ceremony is not `CKA_NEVER_EXTRACTABLE`).
    Advisory,
}

/// What a finding is about. The key concerned is named in [`SelfTestFinding::problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FindingKind {
    /// `CKA_EXTRACTABLE` is true: the key itself could be wrapped out of the token.
    Extractable,
    /// `CKA_SENSITIVE` is false: the key's value can be read.
    NotSensitive,
    /// `CKA_NEVER_EXTRACTABLE` is false: the key was extractable at some point (or imported).
    WasExtractable,
    /// `CKA_ALWAYS_SENSITIVE` is false: the key was readable at some point (or imported).
    WasNotSensitive,
    /// A usage beyond the key's own is enabled (for the master key, anything but wrap and
    /// unwrap; for an HMAC key, anything but sign and verify).
    ExtraUsage {
        /// The attribute, for example `CKA_ENCRYPT`.
        attribute: &'static str,
    },
    /// `CKA_MODIFIABLE`, `CKA_COPYABLE` or `CKA_DESTROYABLE` is true.
    NotFixed {
        /// The attribute.
        attribute: &'static str,
    },
    /// The modify attack succeeded: `C_SetAttributeValue` on a deployment key went through.
    ModifiedInPlace,
    /// The copy attack succeeded: `C_CopyObject` made a copy of a deployment key with a usage.
    CopiedWithUsage,
    /// Attack (a) succeeded: a wrapped key was unwrapped as a non-sensitive secret key.
    ReadableSecretUnwrap,
    /// Attack (b) succeeded: a wrapped key was unwrapped as an extractable private key and
    /// wrapped again under a key the caller controls.
    ExtractableUnwrap,
    /// A wrapped key could be unwrapped with an attribute the unwrap template forbids.
    ForbiddenUnwrap {
        /// The attribute, for example `CKA_DERIVE`.
        attribute: &'static str,
    },
    /// A key other than the master key is `CKA_TRUSTED`.
    TrustedKey,
}

impl FindingKind {
    /// A short, stable, low-cardinality name (`snake_case`) for logs and metrics labels, for
    /// example `copied_with_usage` or `forbidden_unwrap`.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Extractable => "extractable",
            FindingKind::NotSensitive => "not_sensitive",
            FindingKind::WasExtractable => "was_extractable",
            FindingKind::WasNotSensitive => "was_not_sensitive",
            FindingKind::ExtraUsage { .. } => "extra_usage",
            FindingKind::NotFixed { .. } => "not_fixed",
            FindingKind::ModifiedInPlace => "modified_in_place",
            FindingKind::CopiedWithUsage => "copied_with_usage",
            FindingKind::ReadableSecretUnwrap => "readable_secret_unwrap",
            FindingKind::ExtractableUnwrap => "extractable_unwrap",
            FindingKind::ForbiddenUnwrap { .. } => "forbidden_unwrap",
            FindingKind::TrustedKey => "trusted_key",
        }
    }
}

/// One problem the self-test found, with how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SelfTestFinding {
    /// What it is about.
    pub kind: FindingKind,
    /// How much it matters.
    pub severity: Severity,
    /// What is wrong, naming the key.
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
    /// `C_SetAttributeValue` on a deployment key (the master key or an HMAC key).
    ModifyInPlace,
    /// `C_CopyObject` of a deployment key into a session object with a usage it must not have.
    CopyWithUsage,
    /// (a) Unwrap as a non-sensitive `CKK_GENERIC_SECRET` and read `CKA_VALUE`.
    ReadableSecret,
    /// (b) Unwrap as an extractable EC private key and wrap it under a session AES key.
    ExtractableRewrap,
    /// Unwrap with one attribute the unwrap template forbids, then use it where that says how.
    ForbiddenUnwrap {
        /// The attribute, for example `CKA_DERIVE`.
        attribute: &'static str,
    },
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attack::ModifyInPlace => f.write_str("modify in place (C_SetAttributeValue)"),
            Attack::CopyWithUsage => f.write_str("copy with a usage (C_CopyObject)"),
            Attack::ReadableSecret => {
                f.write_str("unwrap as a readable secret (C_UnwrapKey, read CKA_VALUE)")
            }
            Attack::ExtractableRewrap => {
                f.write_str("unwrap extractable and re-wrap under a known key")
            }
            Attack::ForbiddenUnwrap { attribute } => {
                write!(f, "unwrap with {attribute} and use it")
            }
        }
    }
}

/// How an attempted attack ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttackOutcome {
    /// The token refused, with this return value (for example `CKR_TEMPLATE_INCONSISTENT`
    /// from `C_UnwrapKey`, `CKR_ACTION_PROHIBITED` from `C_CopyObject`).
    Refused {
        /// The return value.
        return_value: RvError,
    },
    /// The first step went through.
    Succeeded {
        /// Whether the follow-up went through too: (a) `CKA_VALUE` read; (b) the re-wrap;
        /// `CKA_DERIVE` the ECDH derivation; `CKA_MODIFIABLE` turning `CKA_DERIVE` on;
        /// `CKA_COPYABLE` the copy with `CKA_DERIVE`; `CKA_WRAP_WITH_TRUSTED` the wrap under
        /// a session key. False where there is no follow-up.
        rewrapped_or_read: bool,
    },
    /// The first step succeeded but the follow-up was refused: the token gave the attacker
    /// nothing usable (for example a key unwrapped extractable that no untrusted key can
    /// wrap: `CKA_WRAP_WITH_TRUSTED`). Not a finding.
    Contained {
        /// The follow-up's return value.
        return_value: RvError,
    },
    /// Not applicable: the canary could not be wrapped with this mechanism on this token
    /// (for example plain `CKM_AES_KEY_WRAP` of a key whose encoding is not a multiple of 8
    /// bytes).
    NotApplicable {
        /// The wrap's return value.
        return_value: RvError,
    },
}

impl AttackOutcome {
    /// Whether the attack got the attacker something.
    pub fn succeeded(&self) -> bool {
        matches!(self, AttackOutcome::Succeeded { .. })
    }
}

/// One attempted attack and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttackRecord {
    /// The attack.
    pub attack: Attack,
    /// The key attacked (a deployment key's label) or, for the unwrap attacks, the master key.
    pub target: String,
    /// The wrap mechanism, for the unwrap attacks.
    pub mechanism: Option<WrapMechanism>,
    /// How it ended.
    pub outcome: AttackOutcome,
}

impl fmt::Display for AttackRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on `{}`", self.attack, self.target)?;
        if let Some(mechanism) = self.mechanism {
            write!(f, " ({})", mechanism.pkcs11_name())?;
        }
        match self.outcome {
            AttackOutcome::Refused { return_value } => {
                write!(f, ": refused ({})", rv_name(return_value))
            }
            AttackOutcome::Contained { return_value } => write!(
                f,
                ": first step went through, follow-up refused ({})",
                rv_name(return_value)
            ),
            AttackOutcome::Succeeded { rewrapped_or_read } => write!(
                f,
                ": SUCCEEDED{}",
                if rewrapped_or_read {
                    ", follow-up too"
                } else {
                    ""
                }
            ),
            AttackOutcome::NotApplicable { return_value } => write!(
                f,
                ": not applicable (the canary cannot be wrapped: {})",
                rv_name(return_value)
            ),
        }
    }
}

/// What [`super::Pkcs11Hsm::master_key_self_test`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SelfTestReport {
    /// The master key's `CKA_LABEL`.
    pub master_key_label: String,
    /// Every problem found; empty for a well-provisioned deployment.
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

    /// The attacks that succeeded.
    pub fn successful_attacks(&self) -> impl Iterator<Item = &AttackRecord> {
        self.attacks.iter().filter(|a| a.outcome.succeeded())
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

    fn record(
        &mut self,
        attack: Attack,
        target: &str,
        mechanism: Option<WrapMechanism>,
        outcome: AttackOutcome,
    ) {
        self.attacks.push(AttackRecord {
            attack,
            target: target.to_owned(),
            mechanism,
            outcome,
        });
    }

    fn unsafe_finding(&mut self, kind: FindingKind, problem: String) {
        self.findings.push(SelfTestFinding {
            kind,
            severity: Severity::Unsafe,
            problem,
            remedy: REMEDY.to_owned(),
        });
    }

    fn advisory(&mut self, kind: FindingKind, problem: String) {
        self.findings.push(SelfTestFinding {
            kind,
            severity: Severity::Advisory,
            problem,
            remedy: "expected for a key imported in a key ceremony; otherwise treat the key as \
                     exposed; see docs/key-ceremony.md"
                .to_owned(),
        });
    }
}

impl fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_safe() {
            return write!(
                f,
                "master key `{}` passed the attack suite ({} attacks refused or contained)",
                self.master_key_label,
                self.attacks.len()
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

/// A key of the deployment other than the master key: an HMAC key (record MAC, ledger).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HmacKey<'a> {
    pub(crate) label: &'a str,
    pub(crate) handle: ObjectHandle,
}

/// What the suite attacks.
pub(crate) struct Targets<'a> {
    pub(crate) master: MasterKey<'a>,
    pub(crate) master_label: &'a str,
    pub(crate) hmac_keys: Vec<HmacKey<'a>>,
    /// Every wrap mechanism the token offers.
    pub(crate) mechanisms: Vec<WrapMechanism>,
}

/// Runs the suite on `session` (see the module documentation).
pub(crate) fn run(session: &Session, targets: &Targets<'_>) -> Result<SelfTestReport, HsmError> {
    let label = targets.master_label;
    let mut report = SelfTestReport {
        master_key_label: label.to_owned(),
        findings: Vec::new(),
        attacks: Vec::new(),
    };
    check_attributes(
        session,
        targets.master.handle,
        label,
        KeyRole::Master,
        &mut report,
    )?;
    for key in &targets.hmac_keys {
        check_attributes(session, key.handle, key.label, KeyRole::Hmac, &mut report)?;
    }
    modify_in_place(session, targets.master.handle, label, &mut report)?;
    copy_with_usage(
        session,
        targets.master.handle,
        label,
        Attribute::Decrypt(true),
        &mut report,
    )?;
    for key in &targets.hmac_keys {
        modify_in_place(session, key.handle, key.label, &mut report)?;
        copy_with_usage(
            session,
            key.handle,
            key.label,
            Attribute::Derive(true),
            &mut report,
        )?;
    }
    trusted_keys(session, label, &mut report)?;

    let canary = Canary::generate(session)?;
    for &mechanism in &targets.mechanisms {
        let blob = match keys::wrap(session, targets.master, mechanism, canary.private.handle()) {
            Ok(blob) => blob,
            Err(error) => {
                let outcome = not_applicable("C_WrapKey", error)?;
                report.record(Attack::ReadableSecret, label, Some(mechanism), outcome);
                continue;
            }
        };
        let unwrapping = Unwrapping {
            session,
            master: targets.master,
            mechanism,
            blob: &blob,
            canary: &canary,
        };
        unwrapping.run_all(&mut report)?;
    }
    drop(canary);
    for finding in report.unsafe_findings() {
        tracing::error!(problem = %finding.problem, "TAMPER: master key attack suite");
    }
    Ok(report)
}

/// Which kind of deployment key, for what its attributes must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyRole {
    /// Wrap and unwrap only.
    Master,
    /// Sign and verify (HMAC) only.
    Hmac,
}

/// Checks a deployment key's policy attributes. Attributes the token does not report are
/// skipped (cryptoki drops unavailable attributes); the attacks still run.
fn check_attributes(
    session: &Session,
    key: ObjectHandle,
    label: &str,
    role: KeyRole,
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    let kind = match role {
        KeyRole::Master => "master key",
        KeyRole::Hmac => "HMAC key",
    };
    let mut wanted = vec![
        AttributeType::Extractable,
        AttributeType::Sensitive,
        AttributeType::NeverExtractable,
        AttributeType::AlwaysSensitive,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Derive,
        AttributeType::Modifiable,
        AttributeType::Copyable,
        AttributeType::Destroyable,
    ];
    wanted.extend(match role {
        KeyRole::Master => [AttributeType::Sign, AttributeType::Verify],
        KeyRole::Hmac => [AttributeType::Wrap, AttributeType::Unwrap],
    });
    let attributes = session
        .get_attributes(key, &wanted)
        .map_err(HsmError::pkcs11("C_GetAttributeValue"))?;
    let own = |what: &str| format!("{kind} `{label}` {what}");
    let extra = |report: &mut SelfTestReport, attribute: &'static str| {
        let problem = own(&format!(
            "has {attribute}=true: it must {} only",
            match role {
                KeyRole::Master => "wrap and unwrap",
                KeyRole::Hmac => "sign and verify (HMAC)",
            }
        ));
        report.unsafe_finding(FindingKind::ExtraUsage { attribute }, problem);
    };
    let not_fixed = |report: &mut SelfTestReport, attribute: &'static str, what: &str| {
        let problem = own(&format!("has {attribute}=true: {what}"));
        report.unsafe_finding(FindingKind::NotFixed { attribute }, problem);
    };
    for attribute in attributes {
        match attribute {
            Attribute::Extractable(true) => report.unsafe_finding(
                FindingKind::Extractable,
                own("is extractable (CKA_EXTRACTABLE=true): it can be wrapped out of the token"),
            ),
            Attribute::Sensitive(false) => report.unsafe_finding(
                FindingKind::NotSensitive,
                own("is not sensitive (CKA_SENSITIVE=false): its value can be read"),
            ),
            Attribute::NeverExtractable(false) => report.advisory(
                FindingKind::WasExtractable,
                own(
                    "has CKA_NEVER_EXTRACTABLE=false: it was imported or was extractable at \
                     some point",
                ),
            ),
            Attribute::AlwaysSensitive(false) => report.advisory(
                FindingKind::WasNotSensitive,
                own(
                    "has CKA_ALWAYS_SENSITIVE=false: it was imported or was readable at some \
                     point",
                ),
            ),
            Attribute::Encrypt(true) => extra(report, "CKA_ENCRYPT"),
            Attribute::Decrypt(true) => extra(report, "CKA_DECRYPT"),
            Attribute::Derive(true) => extra(report, "CKA_DERIVE"),
            Attribute::Sign(true) => extra(report, "CKA_SIGN"),
            Attribute::Verify(true) => extra(report, "CKA_VERIFY"),
            Attribute::Wrap(true) => extra(report, "CKA_WRAP"),
            Attribute::Unwrap(true) => extra(report, "CKA_UNWRAP"),
            Attribute::Modifiable(true) => not_fixed(
                report,
                "CKA_MODIFIABLE",
                "a PIN holder can turn a usage on in place (C_SetAttributeValue)",
            ),
            Attribute::Copyable(true) => not_fixed(
                report,
                "CKA_COPYABLE",
                "a PIN holder can copy it with a usage on (C_CopyObject)",
            ),
            Attribute::Destroyable(true) => not_fixed(
                report,
                "CKA_DESTROYABLE",
                "a PIN holder can destroy it, and every key wrapped under it with it",
            ),
            _ => {}
        }
    }
    Ok(())
}

/// The modify attack: writes `CKA_DERIVE=false` (the value every deployment key has) to the
/// key. A token that accepts the write lets a PIN holder turn a usage on.
fn modify_in_place(
    session: &Session,
    key: ObjectHandle,
    label: &str,
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    let outcome = match session.update_attributes(key, &[Attribute::Derive(false)]) {
        Ok(()) => AttackOutcome::Succeeded {
            rewrapped_or_read: false,
        },
        Err(error) => refused("C_SetAttributeValue", error)?,
    };
    report.record(Attack::ModifyInPlace, label, None, outcome);
    if outcome.succeeded() {
        report.unsafe_finding(
            FindingKind::ModifiedInPlace,
            format!(
                "`{label}` accepted C_SetAttributeValue (the modify attack succeeded): a PIN \
                 holder can turn a usage such as CKA_DECRYPT on and unwrap stored keys in \
                 software"
            ),
        );
    }
    Ok(())
}

/// The copy attack: `C_CopyObject` of the key into a session object with `usage`; a copy is
/// destroyed at once.
fn copy_with_usage(
    session: &Session,
    key: ObjectHandle,
    label: &str,
    usage: Attribute,
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    // CKA_DESTROYABLE: Kryoptic's copies are not destroyable unless asked.
    let template = [Attribute::Token(false), Attribute::Destroyable(true), usage];
    let outcome = match session.copy_object(key, &template) {
        Ok(copy) => {
            drop(ObjectGuard::new(session, copy, "self-test copy attack"));
            AttackOutcome::Succeeded {
                rewrapped_or_read: false,
            }
        }
        Err(error) => refused("C_CopyObject", error)?,
    };
    report.record(Attack::CopyWithUsage, label, None, outcome);
    if outcome.succeeded() {
        report.unsafe_finding(
            FindingKind::CopiedWithUsage,
            format!(
                "`{label}` could be copied into an object with a usage it must not have (the \
                 copy attack succeeded)"
            ),
        );
    }
    Ok(())
}

/// Reports every `CKA_TRUSTED` key but the master key.
fn trusted_keys(
    session: &Session,
    master_label: &str,
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    let found = session
        .find_objects(&[Attribute::Trusted(true)])
        .map_err(HsmError::pkcs11("C_FindObjects"))?;
    for handle in found {
        let label = session
            .get_attributes(handle, &[AttributeType::Label])
            .map_err(HsmError::pkcs11("C_GetAttributeValue"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Label(label) => Some(String::from_utf8_lossy(&label).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        if label == master_label {
            continue;
        }
        report.unsafe_finding(
            FindingKind::TrustedKey,
            format!(
                "the token holds a trusted key `{label}` (CKA_TRUSTED=true) other than the \
                 master key: keys unwrapped under the master key can be wrapped under it, and \
                 whoever knows its value can open them"
            ),
        );
    }
    Ok(())
}

/// The canary key pair, destroyed on drop.
struct Canary<'s> {
    private: ObjectGuard<'s>,
    /// The uncompressed public point, for the ECDH follow-up.
    point: Vec<u8>,
    _public: ObjectGuard<'s>,
}

impl<'s> Canary<'s> {
    /// A P-256 key pair with the driver's own private-key template: what is wrapped is what
    /// a stored key is.
    fn generate(session: &'s Session) -> Result<Self, HsmError> {
        let mut private_template = vec![
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
        ];
        private_template.extend(keys::SIGNING_ONLY);
        let (public, private) = session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[
                    Attribute::Token(false),
                    Attribute::EcParams(P256_PARAMS.to_vec()),
                    Attribute::Verify(true),
                ],
                &private_template,
            )
            .map_err(HsmError::pkcs11("C_GenerateKeyPair"))?;
        let public = ObjectGuard::new(session, public, "self-test canary public key");
        let private = ObjectGuard::new(session, private, "self-test canary private key");
        let point = session
            .get_attributes(public.handle(), &[AttributeType::EcPoint])
            .map_err(HsmError::pkcs11("C_GetAttributeValue"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(point) => Some(point),
                _ => None,
            })
            .unwrap_or_default();
        let point = keys::strip_octet_string(&point)
            .filter(|p| p.len() == 65)
            .map_or(point.clone(), <[u8]>::to_vec);
        Ok(Canary {
            private,
            point,
            _public: public,
        })
    }
}

/// The unwrap attacks on one blob.
struct Unwrapping<'a, 's> {
    session: &'s Session,
    master: MasterKey<'a>,
    mechanism: WrapMechanism,
    blob: &'a [u8],
    canary: &'a Canary<'s>,
}

/// What the attacker does with a key once unwrapped with a forbidden attribute.
#[derive(Debug, Clone, Copy)]
enum FollowUp {
    /// Nothing to try with an EC key.
    None,
    /// ECDH with it (`CKM_ECDH1_DERIVE`).
    Derive,
    /// Turn `CKA_DERIVE` on in place.
    SetDerive,
    /// Copy it with `CKA_DERIVE`.
    CopyDerive,
    /// Wrap it under a session AES key.
    Rewrap,
}

impl Unwrapping<'_, '_> {
    fn run_all(&self, report: &mut SelfTestReport) -> Result<(), HsmError> {
        let label = report.master_key_label.clone();
        let mechanism = Some(self.mechanism);

        let outcome = self.readable_secret()?;
        report.record(Attack::ReadableSecret, &label, mechanism, outcome);
        if outcome.succeeded() {
            report.unsafe_finding(
                FindingKind::ReadableSecretUnwrap,
                format!(
                    "master key `{label}` lets a wrapped key be unwrapped as a readable secret \
                     with {} (attack a succeeded: C_UnwrapKey as a non-sensitive \
                     CKK_GENERIC_SECRET, then CKA_VALUE is the plaintext private key)",
                    self.mechanism.pkcs11_name()
                ),
            );
        }

        // An attacker first asks for a key any key may wrap; a token that insists on
        // CKA_WRAP_WITH_TRUSTED gets it, and the wrap must then fail.
        let mut outcome = self.forbidden(
            &[
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(false),
            ],
            FollowUp::Rewrap,
        )?;
        if matches!(outcome, AttackOutcome::Refused { .. }) {
            outcome = self.forbidden(&[Attribute::Extractable(true)], FollowUp::Rewrap)?;
        }
        report.record(Attack::ExtractableRewrap, &label, mechanism, outcome);
        if outcome.succeeded() {
            report.unsafe_finding(
                FindingKind::ExtractableUnwrap,
                format!(
                    "master key `{label}` lets a wrapped key be unwrapped as an extractable \
                     private key and wrapped again under a session AES key with {} (attack b \
                     succeeded)",
                    self.mechanism.pkcs11_name()
                ),
            );
        }

        let forbidden: [(&'static str, &[Attribute], FollowUp); 7] = [
            ("CKA_DERIVE", &[Attribute::Derive(true)], FollowUp::Derive),
            ("CKA_DECRYPT", &[Attribute::Decrypt(true)], FollowUp::None),
            ("CKA_UNWRAP", &[Attribute::Unwrap(true)], FollowUp::None),
            (
                "CKA_SIGN_RECOVER",
                &[Attribute::SignRecover(true)],
                FollowUp::None,
            ),
            (
                "CKA_MODIFIABLE",
                &[Attribute::Modifiable(true)],
                FollowUp::SetDerive,
            ),
            (
                "CKA_COPYABLE",
                &[Attribute::Copyable(true)],
                FollowUp::CopyDerive,
            ),
            (
                "CKA_WRAP_WITH_TRUSTED",
                &[
                    Attribute::WrapWithTrusted(false),
                    Attribute::Extractable(true),
                ],
                FollowUp::Rewrap,
            ),
        ];
        for (attribute, flipped, follow_up) in forbidden {
            let outcome = self.forbidden(flipped, follow_up)?;
            report.record(
                Attack::ForbiddenUnwrap { attribute },
                &label,
                mechanism,
                outcome,
            );
            if outcome.succeeded() {
                report.unsafe_finding(
                    FindingKind::ForbiddenUnwrap { attribute },
                    format!(
                        "master key `{label}` lets a wrapped key be unwrapped with {attribute} \
                         {} with {}",
                        match attribute {
                            "CKA_DERIVE" => "(ECDH with a customer's key)",
                            "CKA_WRAP_WITH_TRUSTED" => "false (wrappable by any key)",
                            _ => "(a usage beyond signing, or a key that can be changed)",
                        },
                        self.mechanism.pkcs11_name()
                    ),
                );
            }
        }
        Ok(())
    }

    /// Attack (a): unwrap as a non-sensitive generic secret and read `CKA_VALUE`.
    fn readable_secret(&self) -> Result<AttackOutcome, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ];
        let session = self.session;
        let key = match keys::unwrap(session, self.master, self.mechanism, self.blob, &template) {
            Ok(key) => ObjectGuard::new(session, key, "self-test attack (a) secret key"),
            Err(error) => return refused("C_UnwrapKey", error),
        };
        let mut read = false;
        if let Ok(attributes) = session.get_attributes(key.handle(), &[AttributeType::Value]) {
            for attribute in attributes {
                if let Attribute::Value(bytes) = attribute {
                    // The canary's plaintext PKCS#8: wiped on drop, only its presence is
                    // reported.
                    let bytes = Zeroizing::new(bytes);
                    read |= !bytes.is_empty();
                }
            }
        }
        drop(key);
        // Unwrapped as a secret key at all is a failure of the policy, readable or not.
        Ok(AttackOutcome::Succeeded {
            rewrapped_or_read: read,
        })
    }

    /// Unwraps with the template the master key's unwrap template pins, `flipped` overriding
    /// it, then tries `follow_up`. Some tokens (SoftHSMv2) insist that every pinned attribute
    /// is stated: an attacker who does not know whether the template pins `CKA_EXTRACTABLE`
    /// tries both values, and so does this.
    fn forbidden(
        &self,
        flipped: &[Attribute],
        follow_up: FollowUp,
    ) -> Result<AttackOutcome, HsmError> {
        let mut outcome = self.forbidden_once(flipped, follow_up, false)?;
        let states_extractable = flipped
            .iter()
            .any(|a| a.attribute_type() == AttributeType::Extractable);
        if !states_extractable && matches!(outcome, AttackOutcome::Refused { .. }) {
            outcome = self.forbidden_once(flipped, follow_up, true)?;
        }
        Ok(outcome)
    }

    fn forbidden_once(
        &self,
        flipped: &[Attribute],
        follow_up: FollowUp,
        extractable: bool,
    ) -> Result<AttackOutcome, HsmError> {
        let session = self.session;
        let mut template = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(extractable),
            Attribute::WrapWithTrusted(true),
        ];
        template.extend(keys::SIGNING_ONLY);
        // In place, so that CKA_MODIFIABLE stays last (see `keys::SIGNING_ONLY`): an attacker
        // orders the template to suit the token.
        for attribute in flipped {
            match template
                .iter_mut()
                .find(|a| a.attribute_type() == attribute.attribute_type())
            {
                Some(slot) => *slot = attribute.clone(),
                None => template.insert(0, attribute.clone()),
            }
        }
        let key = match keys::unwrap(session, self.master, self.mechanism, self.blob, &template) {
            Ok(key) => ObjectGuard::new(session, key, "self-test forbidden-unwrap key"),
            Err(error) => return refused("C_UnwrapKey", error),
        };
        let follow = match follow_up {
            FollowUp::None => {
                return Ok(AttackOutcome::Succeeded {
                    rewrapped_or_read: false,
                });
            }
            FollowUp::Derive => self.derive(key.handle()),
            FollowUp::SetDerive => session
                .update_attributes(key.handle(), &[Attribute::Derive(true)])
                .map(|()| None),
            FollowUp::CopyDerive => session
                .copy_object(
                    key.handle(),
                    &[
                        Attribute::Token(false),
                        Attribute::Destroyable(true),
                        Attribute::Derive(true),
                    ],
                )
                .map(Some),
            FollowUp::Rewrap => self.rewrap(key.handle()).map(|()| None),
        };
        match follow {
            Ok(made) => {
                if let Some(made) = made {
                    drop(ObjectGuard::new(
                        session,
                        made,
                        "self-test follow-up object",
                    ));
                }
                Ok(AttackOutcome::Succeeded {
                    rewrapped_or_read: true,
                })
            }
            // Kryoptic refuses to wrap a CKA_WRAP_WITH_TRUSTED key under an untrusted one
            // with CKR_WRAPPING_KEY_HANDLE_INVALID, about a key this session just made: a
            // refusal here, not a lost session.
            Err(CryptokiError::Pkcs11(RvError::WrappingKeyHandleInvalid, _))
                if matches!(follow_up, FollowUp::Rewrap) =>
            {
                self.contained(flipped, RvError::WrappingKeyHandleInvalid)
            }
            Err(error) => match refused("follow-up", error)? {
                AttackOutcome::Refused { return_value }
                    if matches!(follow_up, FollowUp::Rewrap) =>
                {
                    self.contained(flipped, return_value)
                }
                // The unwrap itself went through: that alone breaks the policy.
                AttackOutcome::Refused { .. } => Ok(AttackOutcome::Succeeded {
                    rewrapped_or_read: false,
                }),
                other => Ok(other),
            },
        }
    }

    /// The outcome when a key was unwrapped extractable but the wrap under a session key was
    /// refused: contained, unless the unwrap already gave up `CKA_WRAP_WITH_TRUSTED`.
    fn contained(
        &self,
        flipped: &[Attribute],
        return_value: RvError,
    ) -> Result<AttackOutcome, HsmError> {
        if flipped.contains(&Attribute::WrapWithTrusted(false)) {
            Ok(AttackOutcome::Succeeded {
                rewrapped_or_read: false,
            })
        } else {
            Ok(AttackOutcome::Contained { return_value })
        }
    }

    /// ECDH with `key` and the canary's public point; the derived secret is destroyed.
    fn derive(&self, key: ObjectHandle) -> Result<Option<ObjectHandle>, CryptokiError> {
        let params = Ecdh1DeriveParams::new(EcKdf::null(), &self.canary.point);
        self.session
            .derive_key(
                &Mechanism::Ecdh1Derive(params),
                key,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::ValueLen(32.into()),
                ],
            )
            .map(Some)
    }

    /// Wraps `key` under a fresh session AES key (a key the caller controls).
    fn rewrap(&self, key: ObjectHandle) -> Result<(), CryptokiError> {
        let session = self.session;
        let attacker = session.generate_key(
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
        )?;
        let attacker = ObjectGuard::new(session, attacker, "self-test attacker AES key");
        let attacker_key = MasterKey {
            handle: attacker.handle(),
            raw: self.master.raw,
        };
        // Encrypted under a key only this session holds, but wiped all the same.
        keys::wrap(session, attacker_key, self.mechanism, key).map(|blob| {
            drop(Zeroizing::new(blob));
        })
    }
}

/// An attack's call failed: a refusal, unless the failure is transient (device, session,
/// login), in which case the self-test could not decide and fails.
fn refused(function: &'static str, error: CryptokiError) -> Result<AttackOutcome, HsmError> {
    match error {
        CryptokiError::Pkcs11(rv, _) if !rv_is_transient(rv) => {
            tracing::debug!(function, rv = %rv_name(rv), "self-test attack refused");
            Ok(AttackOutcome::Refused { return_value: rv })
        }
        source => Err(HsmError::Pkcs11 {
            function: if function == "follow-up" {
                "C_DeriveKey/C_SetAttributeValue/C_CopyObject/C_WrapKey"
            } else {
                function
            },
            source,
        }),
    }
}

/// The canary could not be wrapped with a mechanism: not applicable, unless transient.
fn not_applicable(function: &'static str, error: CryptokiError) -> Result<AttackOutcome, HsmError> {
    match refused(function, error)? {
        AttackOutcome::Refused { return_value } => {
            Ok(AttackOutcome::NotApplicable { return_value })
        }
        other => Ok(other),
    }
}
