//! Array-valued attributes (`CKA_UNWRAP_TEMPLATE`), which cryptoki 0.12 has no typed
//! [`Attribute`] for, passed through [`Attribute::VendorDefined`].
//!
//! An array attribute's value is itself an array of `CK_ATTRIBUTE` structs, each pointing at
//! its own value. cryptoki passes a `VendorDefined` attribute's bytes to the token unchanged
//! and its type number unchanged (`AttributeType::VendorDefined(n)` converts to `n`), so the
//! bytes of a correctly laid out `CK_ATTRIBUTE` array work. This module builds those bytes
//! **without `unsafe`**: every field is written at its `offset_of!` position in native byte
//! order (portable across the `CK_ULONG` widths and the packed Windows layout, and no padding
//! byte is ever read), and the inner values are pointers turned into integers (`as usize`,
//! an exposed-provenance cast).
//!
//! The one invariant the type system does not check: the inner pointers point into the
//! [`RawTemplate`]'s own heap buffers, so the [`Attribute`] from [`RawTemplate::attribute`]
//! must only be passed to the token (`C_GenerateKey`, `C_CreateObject`) while its
//! [`RawTemplate`] is alive. `attribute` borrows `self` for that reason; a clone placed in a
//! template must be used and dropped while the [`RawTemplate`] lives (declare the
//! [`RawTemplate`] first, so that it is dropped last). The module is crate-private so that
//! this stays a local rule.

use std::mem::{offset_of, size_of};

use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_BBOOL, CK_FALSE, CK_OBJECT_CLASS, CK_TRUE, CK_ULONG,
    CKA_ALLOWED_MECHANISMS, CKA_CLASS, CKA_COPYABLE, CKA_DECRYPT, CKA_DERIVE, CKA_EXTRACTABLE,
    CKA_MODIFIABLE, CKA_PRIVATE, CKA_SENSITIVE, CKA_SIGN_RECOVER, CKA_UNWRAP, CKA_UNWRAP_TEMPLATE,
    CKA_WRAP_WITH_TRUSTED,
};

/// Whether keys unwrapped under a master key may be extractable (towards trusted keys only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extraction {
    /// `CKA_EXTRACTABLE` left to the caller: rotation possible.
    ToTrustedKeysOnly,
    /// `CKA_EXTRACTABLE=false` pinned: rotation impossible.
    Never,
}

/// One inner attribute: a type and its value bytes, kept on the heap at a fixed address.
struct Entry {
    kind: CK_ATTRIBUTE_TYPE,
    /// A boxed slice never moves when the `Vec` holding it grows or the template moves.
    value: Box<[u8]>,
}

/// An array attribute (type and inner attributes) and the storage its bytes point into.
pub(crate) struct RawTemplate {
    /// Read only through the pointers in `attribute`; owning it keeps them valid.
    _entries: Vec<Entry>,
    attribute: Attribute,
}

impl RawTemplate {
    /// The `CKA_UNWRAP_TEMPLATE` of the master key. Whatever is unwrapped with it must be:
    ///
    /// - a private key (`CKA_CLASS`), not a secret key whose `CKA_VALUE` could be read, and a
    ///   private object (`CKA_PRIVATE`): only a session logged in as the user can create it,
    ///   which matters for a trusted master key (a public object, made by the security
    ///   officer) that a session without the user PIN can see;
    /// - sensitive (`CKA_SENSITIVE`): its value is never readable;
    /// - wrappable only by a trusted key (`CKA_WRAP_WITH_TRUSTED`);
    /// - with [`Extraction::ToTrustedKeysOnly`], `CKA_EXTRACTABLE` left to the caller, so that
    ///   a master-key rotation can unwrap a key extractable and wrap it under a new, trusted
    ///   master key inside the HSM: safe only on a token where a PIN holder cannot make a
    ///   trusted key (SoftHSMv2). With [`Extraction::Never`], `CKA_EXTRACTABLE=false`: for a
    ///   token that lets a user session make a trusted key (Kryoptic 1.5.4), where an
    ///   extractable key could be wrapped out under it; keys under such a master key can never
    ///   be rotated;
    /// - for signing only: no `CKA_DERIVE` (ECDH with a customer key), `CKA_DECRYPT`,
    ///   `CKA_UNWRAP` or `CKA_SIGN_RECOVER`;
    /// - fixed (`CKA_MODIFIABLE`, `CKA_COPYABLE` false): a usage cannot be turned on
    ///   afterwards, in place or on a copy.
    pub(crate) fn master_unwrap_template(extraction: Extraction) -> Self {
        let mut entries = vec![
            Entry::ulong(CKA_CLASS, CK_OBJECT_CLASS::from(ObjectClass::PRIVATE_KEY)),
            Entry::bool(CKA_PRIVATE, true),
            Entry::bool(CKA_SENSITIVE, true),
            Entry::bool(CKA_WRAP_WITH_TRUSTED, true),
            Entry::bool(CKA_DERIVE, false),
            Entry::bool(CKA_DECRYPT, false),
            Entry::bool(CKA_UNWRAP, false),
            Entry::bool(CKA_SIGN_RECOVER, false),
            // Last, as in the driver's own templates (see `keys::SIGNING_ONLY`).
            Entry::bool(CKA_COPYABLE, false),
            Entry::bool(CKA_MODIFIABLE, false),
        ];
        if extraction == Extraction::Never {
            entries.insert(3, Entry::bool(CKA_EXTRACTABLE, false));
        }
        Self::build(CKA_UNWRAP_TEMPLATE, entries)
    }

    /// The unwrap template versions before the insider attack suite set: private key,
    /// sensitive, non-extractable, and nothing about usages or copying. For the test fixture's
    /// negative tests (the derive attack succeeds under it).
    pub(crate) fn legacy_unwrap_template() -> Self {
        Self::build(
            CKA_UNWRAP_TEMPLATE,
            vec![
                Entry::ulong(CKA_CLASS, CK_OBJECT_CLASS::from(ObjectClass::PRIVATE_KEY)),
                Entry::bool(CKA_SENSITIVE, true),
                Entry::bool(CKA_EXTRACTABLE, false),
            ],
        )
    }

    fn build(kind: CK_ATTRIBUTE_TYPE, entries: Vec<Entry>) -> Self {
        let stride = size_of::<CK_ATTRIBUTE>();
        let mut bytes = vec![0u8; stride * entries.len()];
        for (entry, slot) in entries.iter().zip(bytes.chunks_exact_mut(stride)) {
            let len = CK_ULONG::try_from(entry.value.len()).unwrap_or(CK_ULONG::MAX);
            // The address of the value, as the C struct's `pValue` expects it.
            let address = entry.value.as_ptr() as usize;
            put(
                slot,
                offset_of!(CK_ATTRIBUTE, type_),
                &entry.kind.to_ne_bytes(),
            );
            put(
                slot,
                offset_of!(CK_ATTRIBUTE, pValue),
                &address.to_ne_bytes(),
            );
            put(
                slot,
                offset_of!(CK_ATTRIBUTE, ulValueLen),
                &len.to_ne_bytes(),
            );
        }
        RawTemplate {
            _entries: entries,
            attribute: Attribute::VendorDefined((AttributeType::VendorDefined(kind), bytes)),
        }
    }

    /// The attribute to add to a `C_GenerateKey` / `C_CreateObject` template. Valid only while
    /// `self` is (see the module documentation).
    pub(crate) fn attribute(&self) -> &Attribute {
        &self.attribute
    }
}

impl Entry {
    fn bool(kind: CK_ATTRIBUTE_TYPE, value: bool) -> Self {
        let value: CK_BBOOL = if value { CK_TRUE } else { CK_FALSE };
        Entry {
            kind,
            value: Box::new([value]),
        }
    }

    fn ulong(kind: CK_ATTRIBUTE_TYPE, value: CK_ULONG) -> Self {
        Entry {
            kind,
            value: value.to_ne_bytes().to_vec().into_boxed_slice(),
        }
    }
}

/// `CKA_ALLOWED_MECHANISMS` with exactly `mechanisms` (raw numbers: cryptoki 0.12 has no
/// `MechanismType` for `CKM_AES_KEY_WRAP_KWP`). Its value is a plain `CK_MECHANISM_TYPE` array
/// in native byte order, with no pointer inside, so the attribute owns everything it needs.
pub(crate) fn allowed_mechanisms(mechanisms: &[CK_ULONG]) -> Attribute {
    let bytes = mechanisms.iter().flat_map(|m| m.to_ne_bytes()).collect();
    Attribute::VendorDefined((AttributeType::VendorDefined(CKA_ALLOWED_MECHANISMS), bytes))
}

/// Copies `field` into `slot` at `offset`.
fn put(slot: &mut [u8], offset: usize, field: &[u8]) {
    slot[offset..offset + field.len()].copy_from_slice(field);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(slot: &[u8], offset: usize) -> CK_ULONG {
        let mut raw = [0u8; size_of::<CK_ULONG>()];
        raw.copy_from_slice(&slot[offset..offset + size_of::<CK_ULONG>()]);
        CK_ULONG::from_ne_bytes(raw)
    }

    #[test]
    fn a_never_extractable_template_pins_cka_extractable_false() {
        let template = RawTemplate::master_unwrap_template(Extraction::Never);
        let Attribute::VendorDefined((_, bytes)) = template.attribute() else {
            panic!("not a vendor-defined attribute");
        };
        let stride = size_of::<CK_ATTRIBUTE>();
        let kinds: Vec<_> = bytes
            .chunks_exact(stride)
            .map(|slot| field(slot, offset_of!(CK_ATTRIBUTE, type_)))
            .collect();
        assert_eq!(kinds.len(), 11);
        assert_eq!(kinds[3], CKA_EXTRACTABLE);
        let at = offset_of!(CK_ATTRIBUTE, pValue);
        let mut raw = [0u8; size_of::<usize>()];
        raw.copy_from_slice(&bytes[3 * stride + at..3 * stride + at + size_of::<usize>()]);
        assert_eq!(
            usize::from_ne_bytes(raw),
            template._entries[3].value.as_ptr() as usize
        );
        assert_eq!(*template._entries[3].value, [CK_FALSE]);
    }

    #[test]
    fn the_unwrap_template_is_a_ck_attribute_array_pointing_at_its_values() {
        let template = RawTemplate::master_unwrap_template(Extraction::ToTrustedKeysOnly);
        let Attribute::VendorDefined((AttributeType::VendorDefined(kind), bytes)) =
            template.attribute()
        else {
            panic!("not a vendor-defined attribute");
        };
        assert_eq!(*kind, CKA_UNWRAP_TEMPLATE);
        let stride = size_of::<CK_ATTRIBUTE>();
        assert_eq!(bytes.len(), 10 * stride);
        let kinds: Vec<_> = bytes
            .chunks_exact(stride)
            .map(|slot| field(slot, offset_of!(CK_ATTRIBUTE, type_)))
            .collect();
        assert_eq!(
            kinds,
            [
                CKA_CLASS,
                CKA_PRIVATE,
                CKA_SENSITIVE,
                CKA_WRAP_WITH_TRUSTED,
                CKA_DERIVE,
                CKA_DECRYPT,
                CKA_UNWRAP,
                CKA_SIGN_RECOVER,
                CKA_COPYABLE,
                CKA_MODIFIABLE
            ]
        );
        let lengths: Vec<_> = bytes
            .chunks_exact(stride)
            .map(|slot| field(slot, offset_of!(CK_ATTRIBUTE, ulValueLen)))
            .collect();
        assert_eq!(
            lengths,
            [size_of::<CK_ULONG>() as CK_ULONG, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        );
        for (slot, entry) in bytes.chunks_exact(stride).zip(&template._entries) {
            let at = offset_of!(CK_ATTRIBUTE, pValue);
            let mut raw = [0u8; size_of::<usize>()];
            raw.copy_from_slice(&slot[at..at + size_of::<usize>()]);
            assert_eq!(usize::from_ne_bytes(raw), entry.value.as_ptr() as usize);
        }
    }
}
