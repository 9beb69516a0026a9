//! [`TokenReport`]: what is on the token, for the binary's `check` command.

/// The token's identity and an object census. The driver never creates token objects other
/// than the master key, so `token_private_keys` should be 0 and `session_private_keys` 0
/// whenever no operation is in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenReport {
    /// The token's label.
    pub token_label: String,
    /// The token's manufacturer.
    pub manufacturer: String,
    /// The token's model.
    pub model: String,
    /// The token's serial number.
    pub serial_number: String,
    /// Token (persistent) objects of class private key visible to the user.
    pub token_private_keys: usize,
    /// Session objects of class private key visible to this application's sessions.
    pub session_private_keys: usize,
    /// Token objects of class secret key visible to the user (master keys and anything else).
    pub token_secret_keys: usize,
}
