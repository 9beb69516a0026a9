//! The edge between cryptoki's errors and the model's plain-data [`HsmError`]: the failing
//! function and return value, with nothing of the binding left in them.

use cryptoki::error::{Error as CryptokiError, RvError};
use custody_model::{CallFailure, HsmError, ReturnValue};

/// The model's [`ReturnValue`] for cryptoki's `rv`, for comparing an [`HsmError`]'s
/// [`return_value`](HsmError::return_value) with a value named by cryptoki.
pub fn return_value(rv: RvError) -> ReturnValue {
    match rv {
        RvError::VendorDefined(code) | RvError::UnknownErrorCode(code) => ReturnValue::new(code),
        other => {
            // The variant names are the CKR_ names in CamelCase (KeyNotWrappable).
            let camel = format!("{other:?}");
            let mut name = String::from("CKR_");
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            ReturnValue::from_name(&name).unwrap_or_else(|| {
                unreachable!("cryptoki names a return value PKCS#11 3.0 does not: {name}")
            })
        }
    }
}

/// How a cryptoki call failed, as plain data.
pub(crate) fn failure(error: CryptokiError) -> CallFailure {
    match error {
        CryptokiError::Pkcs11(rv, _) => CallFailure::Returned(return_value(rv)),
        other => CallFailure::Binding(other.to_string()),
    }
}

/// Maps a cryptoki error to [`HsmError::Pkcs11`] naming `function`.
pub(crate) fn pkcs11(function: &'static str) -> impl FnOnce(CryptokiError) -> HsmError {
    move |error| HsmError::Pkcs11 {
        function,
        failure: failure(error),
    }
}

/// A short description of a cryptoki error: the `CKR_*` name rather than the spec's paragraph.
pub(crate) fn describe(error: &CryptokiError) -> String {
    match error {
        CryptokiError::Pkcs11(rv, _) => return_value(*rv).name().into_owned(),
        other => other.to_string(),
    }
}

/// Whether `rv` may go away on its own or after recovery ([`ReturnValue::is_transient`]).
pub(crate) fn rv_is_transient(rv: RvError) -> bool {
    return_value(rv).is_transient()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::error::Rv;

    #[test]
    fn every_return_value_cryptoki_knows_keeps_its_code_and_name() {
        let mut named = 0;
        for code in (0..0x400).chain([0x8000_0000, 0x8000_0042]) {
            let Rv::Error(rv) = Rv::from(code) else {
                continue;
            };
            let model = return_value(rv);
            assert_eq!(model.code(), code, "{rv:?}");
            if !matches!(rv, RvError::UnknownErrorCode(_)) {
                named += 1;
            }
        }
        assert!(named > 90, "{named} return values named");
        assert_eq!(
            return_value(RvError::KeyNotWrappable).name(),
            "CKR_KEY_NOT_WRAPPABLE"
        );
        assert_eq!(
            return_value(RvError::UserAlreadyLoggedIn).name(),
            "CKR_USER_ALREADY_LOGGED_IN"
        );
        assert!(rv_is_transient(RvError::DeviceError));
        assert!(!rv_is_transient(RvError::KeyNotWrappable));
    }
}
