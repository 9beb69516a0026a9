//! The PKCS#11 2.40 functions the module forwards, by name: the vocabulary of the control file
//! and of the statistics.

/// The functions of a PKCS#11 2.40 `CK_FUNCTION_LIST` in their order there, except
/// `C_GetFunctionList`, which the module answers itself and never faults.
pub const FUNCTIONS: [&str; 67] = [
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecoverInit",
    "C_SignRecover",
    "C_VerifyInit",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecoverInit",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_DeriveKey",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_WaitForSlotEvent",
];

/// One of [`FUNCTIONS`], by its index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Function(usize);

impl Function {
    /// The function called `name` (`C_Sign`), if it is one of [`FUNCTIONS`].
    pub fn from_name(name: &str) -> Option<Function> {
        FUNCTIONS.iter().position(|f| *f == name).map(Function)
    }

    /// The function called `name`, at compile time: a name that is not one of [`FUNCTIONS`]
    /// fails the build.
    pub(crate) const fn named(name: &str) -> Function {
        let mut i = 0;
        while i < FUNCTIONS.len() {
            if const_eq(FUNCTIONS[i], name) {
                return Function(i);
            }
            i += 1;
        }
        panic!("not a PKCS#11 2.40 function name");
    }

    /// Its name, `C_Sign`.
    pub fn name(self) -> &'static str {
        FUNCTIONS[self.0]
    }

    /// Its index in [`FUNCTIONS`].
    pub(crate) fn index(self) -> usize {
        self.0
    }

    /// Every function, in [`FUNCTIONS`] order.
    pub fn all() -> impl Iterator<Item = Function> {
        (0..FUNCTIONS.len()).map(Function)
    }
}

impl std::fmt::Display for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Function::all() {
            assert_eq!(Function::from_name(f.name()), Some(f));
        }
        assert_eq!(Function::named("C_Sign").name(), "C_Sign");
        assert_eq!(Function::from_name("C_sign"), None);
        assert_eq!(Function::from_name("C_GetFunctionList"), None);
    }
}
