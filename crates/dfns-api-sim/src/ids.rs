//! Random identifiers shaped like the real API's: `key-xxxxx-xxxxx-xxxxxxxxxxxxxx`.

use rand::Rng;

/// Lowercase base32 without easily confused letters (Crockford's alphabet).
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A new identifier `{prefix}-xxxxx-xxxxx-xxxxxxxxxxxxxx` (24 random characters, 120 bits).
pub(crate) fn new_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(prefix.len() + 27);
    id.push_str(prefix);
    for len in [5, 5, 14] {
        id.push('-');
        for _ in 0..len {
            id.push(char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]));
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_real_shape_and_are_valid_protocol_ids() {
        let id = new_id("key");
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 4, "{id}");
        assert_eq!(parts[0], "key");
        assert_eq!(
            parts[1..].iter().map(|p| p.len()).collect::<Vec<_>>(),
            [5, 5, 14]
        );
        assert!(dfns_api_client::protocol::KeyId::new(&id).is_ok());
        assert_ne!(new_id("key"), new_id("key"));
    }
}
