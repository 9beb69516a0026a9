//! [`DatabaseUrl`]: which backend to use and where, parsed once at start-up, with any password
//! redacted whenever it is printed.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use super::pg_transport::{self, PgConnectOptions};
use crate::error::StoreError;

/// What replaces a password when a URL is printed.
const REDACTED: &str = "REDACTED";

/// Where the key store lives.
///
/// Parse with [`DatabaseUrl::parse`] (or [`str::parse`]). `Debug` and `Display` never show a
/// PostgreSQL password.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An SQLite database file (created if missing; its directory must exist), or `:memory:`.
    Sqlite(String),
    /// A PostgreSQL connection URL, passed to libpq as is.
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a database URL:
    ///
    /// - `postgres://…` or `postgresql://…`: PostgreSQL;
    /// - `sqlite://PATH`, `sqlite:PATH` or `:memory:`: SQLite (`sqlite:///var/lib/keys.db` is an
    ///   absolute path, `sqlite://keys.db` a relative one).
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] for anything else, or an SQLite URL without a path.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let trimmed = url.trim();
        if trimmed == ":memory:" {
            return Ok(DatabaseUrl::Sqlite(":memory:".to_owned()));
        }
        if let Some(rest) = trimmed
            .strip_prefix("postgres://")
            .or_else(|| trimmed.strip_prefix("postgresql://"))
        {
            if rest.is_empty() {
                return Err(StoreError::InvalidUrl {
                    reason: format!("`{trimmed}` names no PostgreSQL server"),
                });
            }
            return Ok(DatabaseUrl::Postgres(trimmed.to_owned()));
        }
        if let Some(rest) = trimmed.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreError::InvalidUrl {
                    reason: format!(
                        "`{trimmed}` names no SQLite file (try `sqlite:///var/lib/hsm-driver/keys.db`)"
                    ),
                });
            }
            return Ok(DatabaseUrl::Sqlite(path.to_owned()));
        }
        Err(StoreError::InvalidUrl {
            reason: format!(
                "`{}` is not a supported database URL; expected `postgres://…`, `postgresql://…`, \
                 `sqlite://PATH`, `sqlite:PATH` or `:memory:`",
                redact_password(trimmed)
            ),
        })
    }

    /// The backend this URL selects: `"postgresql"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        match self {
            DatabaseUrl::Postgres(_) => "postgresql",
            DatabaseUrl::Sqlite(_) => "sqlite",
        }
    }

    /// Whether this is an in-memory SQLite database (one connection, gone when it closes).
    pub fn is_in_memory(&self) -> bool {
        matches!(self, DatabaseUrl::Sqlite(path) if path == ":memory:")
    }

    /// Checks, without connecting, what [`DieselKeyStore::connect`](crate::DieselKeyStore::connect)
    /// checks before it connects to PostgreSQL with `options`: that every host and `hostaddr`
    /// is loopback, `localhost` or a Unix socket, or the connection is `sslmode=verify-full`
    /// (or plaintext is explicitly allowed); and that the URL does not set what `options` sets.
    /// Always `Ok` for SQLite.
    ///
    /// # Errors
    /// [`StoreError::InsecureTransport`] naming the first host that does not qualify, or
    /// [`StoreError::InvalidUrl`] for a parameter given both in the URL and in `options`.
    pub fn check_postgres_options(&self, options: &PgConnectOptions) -> Result<(), StoreError> {
        match self {
            DatabaseUrl::Postgres(url) => pg_transport::check(url, options),
            DatabaseUrl::Sqlite(_) => Ok(()),
        }
    }

    /// Whether the URL itself carries a password (`user:password@`, or a `password=` parameter):
    /// then whoever reads the URL's source (a configuration file, an environment variable)
    /// reads the password.
    pub fn has_inline_password(&self) -> bool {
        match self {
            DatabaseUrl::Postgres(url) => matches!(redact_password(url), Cow::Owned(_)),
            DatabaseUrl::Sqlite(_) => false,
        }
    }

    /// The string handed to the database driver. Contains any password in clear: never log it.
    pub(crate) fn connection_string(&self) -> &str {
        match self {
            DatabaseUrl::Sqlite(path) | DatabaseUrl::Postgres(path) => path,
        }
    }
}

impl FromStr for DatabaseUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        DatabaseUrl::parse(url)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Prints a URL that parses back to the same value.
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite://{path}"),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            DatabaseUrl::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&redact_password(url))
                .finish(),
        }
    }
}

/// Replaces the password of `scheme://user:password@host…` and the value of any query parameter
/// whose name contains `password` (libpq's `password`, `sslpassword`) with `REDACTED`.
///
/// Errs towards redacting too much: the user information runs to the *last* `@` before the query,
/// so a password containing an unescaped `/` or `@` is still hidden.
pub(crate) fn redact_password(url: &str) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let query_start = url[scheme_end..]
        .find(['?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..scheme_end]);
    let before_query = &url[scheme_end..query_start];
    let mut changed = false;
    match before_query.rfind('@') {
        Some(at) if before_query[..at].contains(':') => {
            let colon = before_query[..at].find(':').unwrap_or(at);
            out.push_str(&before_query[..=colon]);
            out.push_str(REDACTED);
            out.push_str(&before_query[at..]);
            changed = true;
        }
        _ => out.push_str(before_query),
    }
    let query = &url[query_start..];
    if let Some(params) = query.strip_prefix('?') {
        out.push('?');
        let (params, fragment) = params
            .split_once('#')
            .map_or((params, None), |(p, f)| (p, Some(f)));
        for (i, param) in params.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match param.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                    changed = true;
                }
                _ => out.push_str(param),
            }
        }
        if let Some(fragment) = fragment {
            out.push('#');
            out.push_str(fragment);
        }
    } else {
        out.push_str(query);
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tried: a password as user information, as a query parameter, as `sslpassword`; a URL
    /// with a user only; another parameter; an SQLite path that looks like user information.
    #[test]
    fn a_password_in_the_url_is_told_apart() {
        for (url, inline) in [
            ("postgres://driver:s3cret@db.example/keys", true),
            ("postgresql://driver@db.example/keys?password=s3cret", true),
            ("postgres://driver@db.example/keys?sslpassword=s3cret", true),
            ("postgres://driver@db.example/keys", false),
            (
                "postgres://driver@db.example/keys?sslmode=verify-full",
                false,
            ),
            ("sqlite://user:pass@keys.db", false),
        ] {
            let parsed = DatabaseUrl::parse(url).expect("a valid URL");
            assert_eq!(parsed.has_inline_password(), inline, "{url}");
        }
    }

    #[test]
    fn redaction_hides_passwords_in_user_info_and_query() {
        let cases = [
            (
                "postgres://driver:s3cret@db:5432/keys",
                "postgres://driver:REDACTED@db:5432/keys",
            ),
            (
                "postgres://driver:s3/c@ret@db/keys?sslmode=disable",
                "postgres://driver:REDACTED@db/keys?sslmode=disable",
            ),
            (
                "postgres://db/keys?user=d&password=s3cret",
                "postgres://db/keys?user=d&password=REDACTED",
            ),
            ("postgres://driver@db/keys", "postgres://driver@db/keys"),
            ("postgres://db:5432/keys", "postgres://db:5432/keys"),
            ("keys.db", "keys.db"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_password(input), expected, "redacting {input}");
        }
    }
}
