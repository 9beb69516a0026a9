//! [`SelfTestReport`]: what the insider attack suite found on a token, as plain data. The
//! suite itself is the PKCS#11 implementation's (`hsm_pkcs11`, `pkcs11/self_test.rs`); the
//! report travels up the layers ([`HsmError::UnsafeMasterKey`](crate::HsmError::UnsafeMasterKey))
//! to the engine, which latches it as tamper, and to the binary's `check`.

use std::fmt;

use crate::error::HsmError;
use crate::return_value::ReturnValue;
use crate::wrap::WrapMechanism;

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
    /// An object other than the master key is `CKA_TRUSTED`.
    TrustedKey,
    /// A user session can make a trusted key (advisory: rotation is impossible on the token).
    UserTrustedKey,
    /// The master key can be used with a mechanism other than its key-wrap ones.
    OtherMechanism {
        /// The mechanism, for example `CKM_AES_CBC_PAD`.
        mechanism: &'static str,
    },
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
            FindingKind::UserTrustedKey => "user_trusted_key",
            FindingKind::OtherMechanism { .. } => "other_mechanism",
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
    /// Make a `CKA_TRUSTED` key from a user session.
    UserMadeTrustedKey,
    /// `C_UnwrapKey` under the master key with another mechanism than a key-wrap one
    /// (`CKM_AES_CBC_PAD`: a padding oracle; `CKM_AES_ECB`).
    OtherMechanism {
        /// The mechanism.
        mechanism: &'static str,
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
            Attack::UserMadeTrustedKey => f.write_str("make a trusted key as the user"),
            Attack::OtherMechanism { mechanism } => {
                write!(f, "unwrap under the master key with {mechanism}")
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
        return_value: ReturnValue,
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
        return_value: ReturnValue,
    },
    /// Not applicable: the canary could not be wrapped with this mechanism on this token
    /// (for example plain `CKM_AES_KEY_WRAP` of a key whose encoding is not a multiple of 8
    /// bytes).
    NotApplicable {
        /// The wrap's return value.
        return_value: ReturnValue,
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
                write!(f, ": refused ({})", return_value)
            }
            AttackOutcome::Contained { return_value } => write!(
                f,
                ": first step went through, follow-up refused ({})",
                return_value
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
                return_value
            ),
        }
    }
}

/// What the insider attack suite found (`hsm_pkcs11::Pkcs11Hsm::master_key_self_test`, run
/// by every [`Hsm::check`](crate::Hsm::check) of the PKCS#11 implementation).
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

    /// An empty report for the master key labelled `master_key_label`, for an implementation
    /// to fill as its suite runs.
    pub fn new(master_key_label: &str) -> Self {
        SelfTestReport {
            master_key_label: master_key_label.to_owned(),
            findings: Vec::new(),
            attacks: Vec::new(),
        }
    }

    /// Records an attempted attack and how it ended.
    pub fn record(
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

    /// Records a finding of severity [`Severity::Unsafe`], with the remedy every such finding
    /// shares (a new master key).
    pub fn unsafe_finding(&mut self, kind: FindingKind, problem: String) {
        self.findings.push(SelfTestFinding {
            kind,
            severity: Severity::Unsafe,
            problem,
            remedy: REMEDY.to_owned(),
        });
    }

    /// Records a finding of severity [`Severity::Advisory`].
    pub fn advisory(&mut self, kind: FindingKind, problem: String) {
        let remedy = match kind {
            FindingKind::UserTrustedKey => {
                "none needed while attack (b) is refused; master keys cannot be rotated on this \
                 token; see docs/hsm-compatibility.md"
            }
            _ => {
                "expected for a key imported in a key ceremony; otherwise treat the key as \
                 exposed; see docs/key-ceremony.md"
            }
        };
        self.findings.push(SelfTestFinding {
            kind,
            severity: Severity::Advisory,
            problem,
            remedy: remedy.to_owned(),
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
