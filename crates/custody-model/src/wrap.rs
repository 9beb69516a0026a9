//! [`WrapMechanism`]: how a private key was wrapped under the master key.

use std::fmt;

/// The PKCS#11 mechanism a private key was wrapped with. Recorded with every wrapped key:
/// a blob is only ever unwrapped with the mechanism that wrapped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrapMechanism {
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A; RFC 5649 as SoftHSMv2 implements it).
    AesKeyWrapPad,
    /// `CKM_AES_KEY_WRAP` (0x2109; RFC 3394; the key encoding must be a multiple of 8 bytes).
    AesKeyWrap,
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B; exact RFC 5649, PKCS#11 3.0), offered by Kryoptic and
    /// most current HSMs. Preferred where the token offers it.
    AesKeyWrapKwp,
}

impl WrapMechanism {
    /// Every mechanism, in a stable order.
    pub const ALL: [WrapMechanism; 3] = [
        WrapMechanism::AesKeyWrapPad,
        WrapMechanism::AesKeyWrap,
        WrapMechanism::AesKeyWrapKwp,
    ];

    /// The mechanisms chosen automatically, best first: where the configuration names none,
    /// new keys are wrapped with the first one the token lists (`CKM_AES_KEY_WRAP_KWP`, else
    /// `CKM_AES_KEY_WRAP_PAD`). Plain `CKM_AES_KEY_WRAP` is never chosen automatically: it
    /// cannot wrap every key encoding.
    pub const PREFERENCE: [WrapMechanism; 2] =
        [WrapMechanism::AesKeyWrapKwp, WrapMechanism::AesKeyWrapPad];

    /// A stable name, used in key records and configuration (`aes-key-wrap-pad`,
    /// `aes-key-wrap`, `aes-key-wrap-kwp`).
    pub fn as_str(self) -> &'static str {
        match self {
            WrapMechanism::AesKeyWrapPad => "aes-key-wrap-pad",
            WrapMechanism::AesKeyWrap => "aes-key-wrap",
            WrapMechanism::AesKeyWrapKwp => "aes-key-wrap-kwp",
        }
    }

    /// The PKCS#11 mechanism number (`CK_MECHANISM_TYPE`).
    pub fn mechanism_type(self) -> u64 {
        match self {
            WrapMechanism::AesKeyWrap => 0x2109,
            WrapMechanism::AesKeyWrapPad => 0x210A,
            WrapMechanism::AesKeyWrapKwp => 0x210B,
        }
    }

    /// The PKCS#11 name (`CKM_AES_KEY_WRAP_KWP`...).
    pub fn pkcs11_name(self) -> &'static str {
        match self {
            WrapMechanism::AesKeyWrapPad => "CKM_AES_KEY_WRAP_PAD",
            WrapMechanism::AesKeyWrap => "CKM_AES_KEY_WRAP",
            WrapMechanism::AesKeyWrapKwp => "CKM_AES_KEY_WRAP_KWP",
        }
    }

    /// Parses [`WrapMechanism::as_str`]'s names.
    pub fn from_name(name: &str) -> Option<WrapMechanism> {
        WrapMechanism::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

impl fmt::Display for WrapMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
