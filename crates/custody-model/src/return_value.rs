//! [`ReturnValue`]: a PKCS#11 return value (`CK_RV`) as plain data, so that errors can name the
//! value a token returned without tying every layer to a PKCS#11 binding.

use std::borrow::Cow;
use std::fmt;

/// The first vendor-defined return value (`CKR_VENDOR_DEFINED`).
const VENDOR_DEFINED: u64 = 0x8000_0000;

/// A PKCS#11 return value other than `CKR_OK`, for example `CKR_KEY_NOT_WRAPPABLE` (`0x6A`).
///
/// ```
/// use custody_model::ReturnValue;
///
/// let rv = ReturnValue::from_name("CKR_DEVICE_ERROR").unwrap();
/// assert_eq!(rv.code(), 0x30);
/// assert!(rv.is_transient());
/// assert_eq!(ReturnValue::new(0x8000_0001).to_string(), "CKR_VENDOR_DEFINED+0x1");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReturnValue(u64);

impl ReturnValue {
    /// The return value with this code.
    pub const fn new(code: u64) -> Self {
        ReturnValue(code)
    }

    /// The standard return value named `name` (`CKR_…`), if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(code, _)| ReturnValue(*code))
    }

    /// The `CK_RV` code.
    pub const fn code(self) -> u64 {
        self.0
    }

    /// The spec's name (`CKR_KEY_NOT_WRAPPABLE`), `CKR_VENDOR_DEFINED+0x…` for a vendor's
    /// value, or `unknown return value 0x…`.
    pub fn name(self) -> Cow<'static, str> {
        if let Some((_, name)) = NAMES.iter().find(|(code, _)| *code == self.0) {
            Cow::Borrowed(name)
        } else if self.0 >= VENDOR_DEFINED {
            Cow::Owned(format!("CKR_VENDOR_DEFINED+{:#x}", self.0 - VENDOR_DEFINED))
        } else {
            Cow::Owned(format!("unknown return value {:#x}", self.0))
        }
    }

    /// Whether the value may go away on its own or after the HSM is re-established: device,
    /// memory, session and login state, and the handles of the deployment keys that each
    /// session looks up once (a lost login or session invalidates them; recovery looks them up
    /// again, and fails for good if a key is really gone).
    pub fn is_transient(self) -> bool {
        TRANSIENT
            .iter()
            .any(|name| Some(self) == ReturnValue::from_name(name))
    }
}

impl fmt::Display for ReturnValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Debug for ReturnValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.0)
    }
}

/// The return values [`ReturnValue::is_transient`] accepts.
const TRANSIENT: &[&str] = &[
    "CKR_KEY_HANDLE_INVALID",
    "CKR_OBJECT_HANDLE_INVALID",
    "CKR_WRAPPING_KEY_HANDLE_INVALID",
    "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    "CKR_DEVICE_ERROR",
    "CKR_DEVICE_MEMORY",
    "CKR_DEVICE_REMOVED",
    "CKR_HOST_MEMORY",
    "CKR_FUNCTION_FAILED",
    "CKR_GENERAL_ERROR",
    "CKR_FUNCTION_CANCELED",
    "CKR_OPERATION_ACTIVE",
    "CKR_SESSION_CLOSED",
    "CKR_SESSION_COUNT",
    "CKR_SESSION_HANDLE_INVALID",
    "CKR_SESSION_EXISTS",
    "CKR_TOKEN_NOT_PRESENT",
    "CKR_TOKEN_NOT_RECOGNIZED",
    "CKR_USER_NOT_LOGGED_IN",
    "CKR_CRYPTOKI_NOT_INITIALIZED",
];

/// Every return value of PKCS#11 3.0 but `CKR_OK`, by code.
const NAMES: &[(u64, &str)] = &[
    (0x1, "CKR_CANCEL"),
    (0x2, "CKR_HOST_MEMORY"),
    (0x3, "CKR_SLOT_ID_INVALID"),
    (0x5, "CKR_GENERAL_ERROR"),
    (0x6, "CKR_FUNCTION_FAILED"),
    (0x7, "CKR_ARGUMENTS_BAD"),
    (0x8, "CKR_NO_EVENT"),
    (0x9, "CKR_NEED_TO_CREATE_THREADS"),
    (0xA, "CKR_CANT_LOCK"),
    (0x10, "CKR_ATTRIBUTE_READ_ONLY"),
    (0x11, "CKR_ATTRIBUTE_SENSITIVE"),
    (0x12, "CKR_ATTRIBUTE_TYPE_INVALID"),
    (0x13, "CKR_ATTRIBUTE_VALUE_INVALID"),
    (0x1B, "CKR_ACTION_PROHIBITED"),
    (0x20, "CKR_DATA_INVALID"),
    (0x21, "CKR_DATA_LEN_RANGE"),
    (0x30, "CKR_DEVICE_ERROR"),
    (0x31, "CKR_DEVICE_MEMORY"),
    (0x32, "CKR_DEVICE_REMOVED"),
    (0x40, "CKR_ENCRYPTED_DATA_INVALID"),
    (0x41, "CKR_ENCRYPTED_DATA_LEN_RANGE"),
    (0x42, "CKR_AEAD_DECRYPT_FAILED"),
    (0x50, "CKR_FUNCTION_CANCELED"),
    (0x51, "CKR_FUNCTION_NOT_PARALLEL"),
    (0x54, "CKR_FUNCTION_NOT_SUPPORTED"),
    (0x60, "CKR_KEY_HANDLE_INVALID"),
    (0x62, "CKR_KEY_SIZE_RANGE"),
    (0x63, "CKR_KEY_TYPE_INCONSISTENT"),
    (0x64, "CKR_KEY_NOT_NEEDED"),
    (0x65, "CKR_KEY_CHANGED"),
    (0x66, "CKR_KEY_NEEDED"),
    (0x67, "CKR_KEY_INDIGESTIBLE"),
    (0x68, "CKR_KEY_FUNCTION_NOT_PERMITTED"),
    (0x69, "CKR_KEY_NOT_WRAPPABLE"),
    (0x6A, "CKR_KEY_UNEXTRACTABLE"),
    (0x70, "CKR_MECHANISM_INVALID"),
    (0x71, "CKR_MECHANISM_PARAM_INVALID"),
    (0x82, "CKR_OBJECT_HANDLE_INVALID"),
    (0x90, "CKR_OPERATION_ACTIVE"),
    (0x91, "CKR_OPERATION_NOT_INITIALIZED"),
    (0xA0, "CKR_PIN_INCORRECT"),
    (0xA1, "CKR_PIN_INVALID"),
    (0xA2, "CKR_PIN_LEN_RANGE"),
    (0xA3, "CKR_PIN_EXPIRED"),
    (0xA4, "CKR_PIN_LOCKED"),
    (0xB0, "CKR_SESSION_CLOSED"),
    (0xB1, "CKR_SESSION_COUNT"),
    (0xB3, "CKR_SESSION_HANDLE_INVALID"),
    (0xB4, "CKR_SESSION_PARALLEL_NOT_SUPPORTED"),
    (0xB5, "CKR_SESSION_READ_ONLY"),
    (0xB6, "CKR_SESSION_EXISTS"),
    (0xB7, "CKR_SESSION_READ_ONLY_EXISTS"),
    (0xB8, "CKR_SESSION_READ_WRITE_SO_EXISTS"),
    (0xC0, "CKR_SIGNATURE_INVALID"),
    (0xC1, "CKR_SIGNATURE_LEN_RANGE"),
    (0xD0, "CKR_TEMPLATE_INCOMPLETE"),
    (0xD1, "CKR_TEMPLATE_INCONSISTENT"),
    (0xE0, "CKR_TOKEN_NOT_PRESENT"),
    (0xE1, "CKR_TOKEN_NOT_RECOGNIZED"),
    (0xE2, "CKR_TOKEN_WRITE_PROTECTED"),
    (0xF0, "CKR_UNWRAPPING_KEY_HANDLE_INVALID"),
    (0xF1, "CKR_UNWRAPPING_KEY_SIZE_RANGE"),
    (0xF2, "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT"),
    (0x100, "CKR_USER_ALREADY_LOGGED_IN"),
    (0x101, "CKR_USER_NOT_LOGGED_IN"),
    (0x102, "CKR_USER_PIN_NOT_INITIALIZED"),
    (0x103, "CKR_USER_TYPE_INVALID"),
    (0x104, "CKR_USER_ANOTHER_ALREADY_LOGGED_IN"),
    (0x105, "CKR_USER_TOO_MANY_TYPES"),
    (0x110, "CKR_WRAPPED_KEY_INVALID"),
    (0x112, "CKR_WRAPPED_KEY_LEN_RANGE"),
    (0x113, "CKR_WRAPPING_KEY_HANDLE_INVALID"),
    (0x114, "CKR_WRAPPING_KEY_SIZE_RANGE"),
    (0x115, "CKR_WRAPPING_KEY_TYPE_INCONSISTENT"),
    (0x120, "CKR_RANDOM_SEED_NOT_SUPPORTED"),
    (0x121, "CKR_RANDOM_NO_RNG"),
    (0x130, "CKR_DOMAIN_PARAMS_INVALID"),
    (0x140, "CKR_CURVE_NOT_SUPPORTED"),
    (0x150, "CKR_BUFFER_TOO_SMALL"),
    (0x160, "CKR_SAVED_STATE_INVALID"),
    (0x170, "CKR_INFORMATION_SENSITIVE"),
    (0x180, "CKR_STATE_UNSAVEABLE"),
    (0x190, "CKR_CRYPTOKI_NOT_INITIALIZED"),
    (0x191, "CKR_CRYPTOKI_ALREADY_INITIALIZED"),
    (0x1A0, "CKR_MUTEX_BAD"),
    (0x1A1, "CKR_MUTEX_NOT_LOCKED"),
    (0x1B0, "CKR_NEW_PIN_MODE"),
    (0x1B1, "CKR_NEXT_OTP"),
    (0x1B5, "CKR_EXCEEDED_MAX_ITERATIONS"),
    (0x1B6, "CKR_FIPS_SELF_TEST_FAILED"),
    (0x1B7, "CKR_LIBRARY_LOAD_FAILED"),
    (0x1B8, "CKR_PIN_TOO_WEAK"),
    (0x1B9, "CKR_PUBLIC_KEY_INVALID"),
    (0x200, "CKR_FUNCTION_REJECTED"),
    (0x201, "CKR_TOKEN_RESOURCE_EXCEEDED"),
    (0x202, "CKR_OPERATION_CANCEL_FAILED"),
    (0x203, "CKR_KEY_EXHAUSTED"),
    (0x204, "CKR_PENDING"),
    (0x205, "CKR_SESSION_ASYNC_NOT_SUPPORTED"),
    (0x206, "CKR_SEED_RANDOM_REQUIRED"),
    (0x207, "CKR_OPERATION_NOT_VALIDATED"),
    (0x208, "CKR_TOKEN_NOT_INITIALIZED"),
    (0x209, "CKR_PARAMETER_SET_NOT_SUPPORTED"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transient_name_is_a_return_value() {
        for name in TRANSIENT {
            assert!(ReturnValue::from_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn names_and_codes_round_trip_and_others_are_named_by_number() {
        for (code, name) in NAMES {
            assert_eq!(ReturnValue::from_name(name), Some(ReturnValue::new(*code)));
            assert_eq!(ReturnValue::new(*code).name(), *name);
        }
        assert_eq!(
            ReturnValue::new(0x7777).name(),
            "unknown return value 0x7777"
        );
        assert!(
            !ReturnValue::from_name("CKR_KEY_NOT_WRAPPABLE")
                .unwrap()
                .is_transient()
        );
        assert_eq!(
            format!("{:?}", ReturnValue::new(0x30)),
            "CKR_DEVICE_ERROR (0x30)"
        );
    }
}
