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
//!    values the key already has (`CKA_DERIVE`, `CKA_DECRYPT`, `CKA_ENCRYPT` false, one at a
//!    time), so that a token that accepts a write is reported without the production key ever
//!    being weakened, even for a moment; a token that accepts it would equally accept
//!    `CKA_DECRYPT=true` (the tests do that for real).
//! 3. **Copy with a usage**: `C_CopyObject` of each deployment key into a session object with
//!    a usage it must not have (`CKA_DECRYPT` for the master key: with it, `C_Decrypt` in ECB
//!    mode runs the RFC 3394/5649 unwrap in software; `CKA_DERIVE` for an HMAC key). A copy
//!    that is made is destroyed at once.
//! 4. Whether a user session can make a trusted key (advice: then no rotation is possible, and
//!    attack (b) below re-wraps under such a key).
//! 5. A throwaway P-256 canary key pair is generated as session objects, and its private key
//!    wrapped under the master key with **every AES key-wrap mechanism the token offers**
//!    (`CKM_AES_KEY_WRAP`, `_PAD`, `_KWP`); for each blob, first a positive control (it unwraps
//!    with the driver's own template and signs: otherwise no attack below would prove
//!    anything), then:
//!    - (a) unwrap it as a non-sensitive `CKK_GENERIC_SECRET` and read `CKA_VALUE` (the
//!      plaintext PKCS#8);
//!    - (b) unwrap it as an extractable private key and wrap it again under a session AES
//!      key the caller controls;
//!    - unwrap it with one forbidden attribute and every other attribute as the master key's
//!      unwrap template pins it: `CKA_DERIVE` (then ECDH with it), `CKA_DECRYPT`,
//!      `CKA_UNWRAP`, `CKA_SIGN_RECOVER`, `CKA_MODIFIABLE` (then turn `CKA_DERIVE` on in
//!      place), `CKA_COPYABLE` (then copy it with `CKA_DERIVE`), and `CKA_WRAP_WITH_TRUSTED`
//!      false with `CKA_EXTRACTABLE` (then wrap it under a session AES key).
//! 6. `C_UnwrapKey` under the master key with `CKM_AES_CBC_PAD` and `CKM_AES_ECB`: both must be
//!    refused as mechanisms the key may not be used with (`CKA_ALLOWED_MECHANISMS`).
//! 7. **Trusted objects**: any object with `CKA_TRUSTED=true` other than the master key itself
//!    (compared by handle) could receive every key unwrapped under the master key: reported.
//!
//! Each step accepts only the return values that mean "refused" for it; any other answer is
//! no verdict, and the suite fails ([`HsmError::SelfTestInconclusive`]) rather than count an
//! attack that was never really tried as refused.
//!
//! Every object is a session object owned by an [`ObjectGuard`], destroyed on every path.
//! Bytes a successful attack obtains are held in [`Zeroizing`] buffers, only their presence is
//! reported, and they are never logged.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::guard::ObjectGuard;
use super::keys::{self, MasterKey};
use crate::error::{failure, return_value, rv_is_transient};
use custody_model::WrapMechanism;
use custody_model::{Attack, AttackOutcome, FindingKind, HsmError, ReturnValue, SelfTestReport};

/// DER `OBJECT IDENTIFIER` prime256v1: the canary's curve, the most widely supported one.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

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
    /// A trusted master key made for a rotation that the deployment expects (its label and
    /// handle): checked and attacked like the master key, and not reported as a foreign
    /// trusted object.
    pub(crate) rotation_target: Option<(&'a str, ObjectHandle)>,
    pub(crate) hmac_keys: Vec<HmacKey<'a>>,
    /// Every wrap mechanism the token offers.
    pub(crate) mechanisms: Vec<WrapMechanism>,
}

/// About how many session objects one [`run`] creates and destroys on a safe token, for
/// [`Pkcs11Config::recycle_after_objects`](super::Pkcs11Config::recycle_after_objects): the
/// canary key pair, the user's trusted-key probe, and per wrap mechanism a control key, an
/// attacker's key and what the attacks a token refuses late leave behind. Rounded up: an
/// over-count only brings a recycle a little earlier.
pub(crate) const SESSION_OBJECTS: u64 = 16;

/// Runs the suite on `session` (see the module documentation).
pub(crate) fn run(session: &Session, targets: &Targets<'_>) -> Result<SelfTestReport, HsmError> {
    let label = targets.master_label;
    let mut report = SelfTestReport::new(label);
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
    if let Some((target_label, target)) = targets.rotation_target {
        check_attributes(session, target, target_label, KeyRole::Master, &mut report)?;
        modify_in_place(session, target, target_label, &mut report)?;
        copy_with_usage(
            session,
            target,
            target_label,
            Attribute::Decrypt(true),
            &mut report,
        )?;
    }
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
    let expected: Vec<ObjectHandle> = std::iter::once(targets.master.handle)
        .chain(targets.rotation_target.map(|(_, handle)| handle))
        .collect();
    trusted_keys(session, &expected, &mut report)?;
    let user_trusted = user_made_trusted_key(session, &mut report)?;

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
            user_trusted,
        };
        // The control: the blob unwraps as the driver unwraps it. Without it, a blob the
        // token cannot unwrap at all would make every attack below look refused.
        unwrapping.control()?;
        unwrapping.run_all(&mut report)?;
        if mechanism == targets.mechanisms[0] {
            unwrapping.other_mechanisms(&mut report)?;
        }
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
        .map_err(crate::error::pkcs11("C_GetAttributeValue"))?;
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
    // A policy attribute the token does not report cannot be relied on: a PKCS#11 2.20 token
    // without CKA_COPYABLE, say, may well copy the key.
    for (wanted, name) in [
        (AttributeType::Extractable, "CKA_EXTRACTABLE"),
        (AttributeType::Sensitive, "CKA_SENSITIVE"),
        (AttributeType::Modifiable, "CKA_MODIFIABLE"),
        (AttributeType::Copyable, "CKA_COPYABLE"),
        (AttributeType::Destroyable, "CKA_DESTROYABLE"),
    ] {
        if !attributes.iter().any(|a| a.attribute_type() == wanted) {
            let problem = own(&format!(
                "does not report {name}: the policy cannot be checked, nor relied on"
            ));
            report.unsafe_finding(FindingKind::NotFixed { attribute: name }, problem);
        }
    }
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

/// The modify attack: writes `CKA_DERIVE`, `CKA_DECRYPT` and `CKA_ENCRYPT` false (the values
/// every deployment key has) to the key, one at a time. A token that accepts a write lets a
/// PIN holder turn that usage on.
fn modify_in_place(
    session: &Session,
    key: ObjectHandle,
    label: &str,
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    // Each usage on its own: a token may guard attributes one by one. Every value written is
    // the one the key already has.
    let mut outcome = AttackOutcome::Refused {
        return_value: return_value(RvError::ActionProhibited),
    };
    for usage in [
        Attribute::Derive(false),
        Attribute::Decrypt(false),
        Attribute::Encrypt(false),
    ] {
        outcome = match session.update_attributes(key, &[usage]) {
            Ok(()) => AttackOutcome::Succeeded {
                rewrapped_or_read: false,
            },
            Err(error) => refused("C_SetAttributeValue", error, REFUSED_CHANGE)?,
        };
        if outcome.succeeded() {
            break;
        }
    }
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
        Err(error) => refused("C_CopyObject", error, REFUSED_CHANGE)?,
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

/// Reports every `CKA_TRUSTED` object but the master key itself and an expected rotation target
/// (compared by handle, not by label: an object of another class may carry their labels).
fn trusted_keys(
    session: &Session,
    expected: &[ObjectHandle],
    report: &mut SelfTestReport,
) -> Result<(), HsmError> {
    let found = session
        .find_objects(&[Attribute::Trusted(true)])
        .map_err(crate::error::pkcs11("C_FindObjects"))?;
    for handle in found {
        if expected.contains(&handle) {
            continue;
        }
        let label = session
            .get_attributes(handle, &[AttributeType::Label])
            .ok()
            .and_then(|attributes| {
                attributes.into_iter().find_map(|a| match a {
                    Attribute::Label(label) => Some(String::from_utf8_lossy(&label).into_owned()),
                    _ => None,
                })
            })
            .unwrap_or_default();
        report.unsafe_finding(
            FindingKind::TrustedKey,
            format!(
                "the token holds a trusted object `{label}` (CKA_TRUSTED=true) other than the \
                 master key: keys unwrapped under the master key can be wrapped under it, and \
                 whoever knows its value can open them"
            ),
        );
    }
    Ok(())
}

/// Whether a user session can make a trusted key. Not unsafe by itself: the unwrap template
/// must then pin `CKA_EXTRACTABLE=false`, which attack (b) (re-wrapping under a trusted key
/// made this way) checks; but no master key can be rotated on such a token.
fn user_made_trusted_key(session: &Session, report: &mut SelfTestReport) -> Result<bool, HsmError> {
    let refusal = super::provision::trusted_key_probe(session)?;
    let outcome = match refusal {
        None => {
            report.advisory(
                FindingKind::UserTrustedKey,
                "a user session can make a trusted key on this token: keys unwrapped under the \
                 master key must stay non-extractable (attack b checks it), and no master key \
                 can be rotated here"
                    .to_owned(),
            );
            AttackOutcome::Succeeded {
                rewrapped_or_read: false,
            }
        }
        Some(rv) => AttackOutcome::Refused {
            return_value: return_value(rv),
        },
    };
    report.record(Attack::UserMadeTrustedKey, "-", None, outcome);
    Ok(refusal.is_none())
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
            .map_err(crate::error::pkcs11("C_GenerateKeyPair"))?;
        let public = ObjectGuard::new(session, public, "self-test canary public key");
        let private = ObjectGuard::new(session, private, "self-test canary private key");
        let point = session
            .get_attributes(public.handle(), &[AttributeType::EcPoint])
            .map_err(crate::error::pkcs11("C_GetAttributeValue"))?
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
    /// Whether a user session can make a trusted key: the attacker's wrapping key is one.
    user_trusted: bool,
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

    /// The positive control: the blob unwraps with the driver's own template and signs.
    fn control(&self) -> Result<(), HsmError> {
        let session = self.session;
        let mut template = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::WrapWithTrusted(true),
        ];
        template.extend(keys::SIGNING_ONLY);
        let key = keys::unwrap(session, self.master, self.mechanism, self.blob, &template)
            .map_err(|source| inconclusive("C_UnwrapKey", source))?;
        let key = ObjectGuard::new(session, key, "self-test control key");
        session
            .sign(&Mechanism::Ecdsa, key.handle(), &[0x5a; 32])
            .map_err(|source| inconclusive("C_Sign", source))?;
        Ok(())
    }

    /// `C_UnwrapKey` of the blob under the master key with mechanisms that are not key-wrap
    /// ones: each must be refused as a mechanism the key may not be used with.
    fn other_mechanisms(&self, report: &mut SelfTestReport) -> Result<(), HsmError> {
        let label = report.master_key_label.clone();
        let iv = [0u8; 16];
        let tries: [(&'static str, Mechanism<'_>); 2] = [
            ("CKM_AES_CBC_PAD", Mechanism::AesCbcPad(iv)),
            ("CKM_AES_ECB", Mechanism::AesEcb),
        ];
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ];
        for (mechanism, with) in tries {
            let outcome =
                match self
                    .session
                    .unwrap_key(&with, self.master.handle, self.blob, &template)
                {
                    Ok(key) => {
                        drop(ObjectGuard::new(
                            self.session,
                            key,
                            "self-test other-mechanism key",
                        ));
                        AttackOutcome::Succeeded {
                            rewrapped_or_read: true,
                        }
                    }
                    // Refused as a mechanism: the defence. Any other answer means the token ran
                    // the mechanism with the master key (a padding or format error is an oracle).
                    Err(CryptokiError::Pkcs11(rv, _)) if REFUSED_MECHANISM.contains(&rv) => {
                        AttackOutcome::Refused {
                            return_value: return_value(rv),
                        }
                    }
                    Err(CryptokiError::Pkcs11(rv, _)) if !rv_is_transient(rv) => {
                        AttackOutcome::Succeeded {
                            rewrapped_or_read: false,
                        }
                    }
                    Err(source) => return Err(inconclusive("C_UnwrapKey", source)),
                };
            report.record(Attack::OtherMechanism { mechanism }, &label, None, outcome);
            if outcome.succeeded() {
                report.unsafe_finding(
                    FindingKind::OtherMechanism { mechanism },
                    format!(
                        "master key `{label}` can be used with {mechanism} (C_UnwrapKey ran it \
                         instead of refusing the mechanism): an oracle on the master key; it \
                         needs CKA_ALLOWED_MECHANISMS"
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
            Err(error) => return refused("C_UnwrapKey", error, REFUSED_UNWRAP),
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
            Err(error) => return refused("C_UnwrapKey", error, REFUSED_UNWRAP),
        };
        let follow = match follow_up {
            FollowUp::None => {
                return Ok(AttackOutcome::Succeeded {
                    rewrapped_or_read: false,
                });
            }
            FollowUp::Rewrap => {
                return match self.rewrap(key.handle())? {
                    None => Ok(AttackOutcome::Succeeded {
                        rewrapped_or_read: true,
                    }),
                    Some(return_value) => self.contained(flipped, return_value),
                };
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
        };
        // The unwrap itself went through: that alone breaks the policy; the follow-up says
        // how far the attacker got.
        let made = follow.as_ref().ok().copied().flatten();
        if let Some(made) = made {
            drop(ObjectGuard::new(
                session,
                made,
                "self-test follow-up object",
            ));
        }
        Ok(AttackOutcome::Succeeded {
            rewrapped_or_read: follow.is_ok(),
        })
    }

    /// The outcome when a key was unwrapped extractable but the wrap under a session key was
    /// refused: contained, unless the unwrap already gave up `CKA_WRAP_WITH_TRUSTED`.
    fn contained(
        &self,
        flipped: &[Attribute],
        return_value: ReturnValue,
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

    /// Wraps `key` under a fresh session AES key the caller controls: a trusted one where the
    /// token lets a user session make one (Kryoptic), else an ordinary one (asking for a
    /// trusted one where it is refused would leave an object behind on SoftHSMv2). `None` when the
    /// wrap went through; the return value when the token refused it.
    fn rewrap(&self, key: ObjectHandle) -> Result<Option<ReturnValue>, HsmError> {
        let session = self.session;
        let attacker_template = |trusted: bool| {
            let mut template = vec![
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
            ];
            if trusted {
                template.push(Attribute::Trusted(true));
            }
            template
        };
        let attacker = session
            .generate_key(&Mechanism::AesKeyGen, &attacker_template(self.user_trusted))
            .map_err(|source| inconclusive("C_GenerateKey", source))?;
        let attacker = ObjectGuard::new(session, attacker, "self-test attacker AES key");
        let attacker_key = MasterKey {
            handle: attacker.handle(),
            raw: self.master.raw,
        };
        match keys::wrap(session, attacker_key, self.mechanism, key) {
            // Encrypted under a key only this session holds, but wiped all the same.
            Ok(blob) => {
                drop(Zeroizing::new(blob));
                Ok(None)
            }
            // Kryoptic's answer for a CKA_WRAP_WITH_TRUSTED key and an untrusted wrapping key,
            // which is also what a lost handle gives: a refusal only while the attacker's key
            // is still there.
            Err(CryptokiError::Pkcs11(RvError::WrappingKeyHandleInvalid, function)) => {
                match session.get_attributes(attacker.handle(), &[AttributeType::Class]) {
                    Ok(_) => Ok(Some(return_value(RvError::WrappingKeyHandleInvalid))),
                    Err(_) => Err(inconclusive(
                        "C_WrapKey",
                        CryptokiError::Pkcs11(RvError::WrappingKeyHandleInvalid, function),
                    )),
                }
            }
            Err(error) => match refused("C_WrapKey", error, REFUSED_WRAP)? {
                AttackOutcome::Refused { return_value } => Ok(Some(return_value)),
                _ => Ok(None),
            },
        }
    }
}

/// The return values that mean "the token refused this step" for each kind of step. Anything
/// else is no verdict (a lost session, an attribute this token does not know, a failing device):
/// the suite fails closed with [`HsmError::SelfTestInconclusive`] rather than count an attack
/// that was never really tried as refused.
const REFUSED_UNWRAP: &[RvError] = &[
    RvError::TemplateInconsistent,
    RvError::AttributeValueInvalid,
    RvError::AttributeReadOnly,
    RvError::KeyFunctionNotPermitted,
    RvError::ActionProhibited,
];
/// `C_SetAttributeValue`, `C_CopyObject`.
const REFUSED_CHANGE: &[RvError] = &[
    RvError::ActionProhibited,
    RvError::AttributeReadOnly,
    RvError::TemplateInconsistent,
];
/// `C_WrapKey` of an unwrapped key under the attacker's key. Kryoptic's answer for a
/// `CKA_WRAP_WITH_TRUSTED` key is `CKR_WRAPPING_KEY_HANDLE_INVALID`, checked separately.
const REFUSED_WRAP: &[RvError] = &[
    RvError::KeyNotWrappable,
    RvError::KeyUnextractable,
    RvError::KeyFunctionNotPermitted,
];
/// `C_UnwrapKey` with a mechanism the master key must not be used with.
const REFUSED_MECHANISM: &[RvError] = &[
    RvError::MechanismInvalid,
    RvError::KeyFunctionNotPermitted,
    RvError::KeyTypeInconsistent,
];

/// An attack's call failed: a refusal if the return value is one of `refusals`; otherwise the
/// suite cannot decide and fails.
fn refused(
    function: &'static str,
    error: CryptokiError,
    refusals: &[RvError],
) -> Result<AttackOutcome, HsmError> {
    match error {
        CryptokiError::Pkcs11(rv, _) if refusals.contains(&rv) => {
            tracing::debug!(function, rv = %return_value(rv), "self-test attack refused");
            Ok(AttackOutcome::Refused {
                return_value: return_value(rv),
            })
        }
        source => Err(inconclusive(function, source)),
    }
}

/// A step that should have worked (or been refused in a known way) did something else.
fn inconclusive(function: &'static str, source: CryptokiError) -> HsmError {
    match source {
        CryptokiError::Pkcs11(rv, _) if rv_is_transient(rv) => HsmError::Pkcs11 {
            function,
            failure: failure(source),
        },
        source => HsmError::SelfTestInconclusive {
            function,
            failure: failure(source),
        },
    }
}

/// The canary could not be wrapped with a mechanism: not applicable, where the token says the
/// data or mechanism does not fit; otherwise no verdict.
fn not_applicable(function: &'static str, error: CryptokiError) -> Result<AttackOutcome, HsmError> {
    const DOES_NOT_FIT: &[RvError] = &[
        RvError::DataLenRange,
        RvError::MechanismInvalid,
        RvError::KeyNotWrappable,
        RvError::MechanismParamInvalid,
    ];
    match refused(function, error, DOES_NOT_FIT)? {
        AttackOutcome::Refused { return_value } => {
            Ok(AttackOutcome::NotApplicable { return_value })
        }
        other => Ok(other),
    }
}
