//! How a PostgreSQL connection is secured: [`PgConnectOptions`] (TLS verification, client
//! certificate, password), the check that refuses an unverified connection to a host that is not
//! this machine, and the libpq connection string that carries the options.
//!
//! The rule: a connection to anything other than a loopback address, `localhost` or a Unix
//! socket must use `sslmode=verify-full` (TLS, the server's certificate checked against a CA and
//! its name against the host), unless [`PgConnectOptions::dangerous_allow_plaintext`] says
//! otherwise. Every host of a multi-host URL must qualify, and so must every `hostaddr`: libpq
//! connects to a `hostaddr` when one is given, whatever `host` says.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::error::StoreError;

/// How to secure and authenticate PostgreSQL connections, beyond what the URL says. Ignored for
/// SQLite.
///
/// The default verifies nothing by itself and allows no plaintext: a URL naming a remote host
/// must then carry `sslmode=verify-full` itself, or [`tls_ca_file`](Self::tls_ca_file) be set.
/// `Debug` never shows the password.
#[derive(Debug, Clone, Default)]
pub struct PgConnectOptions {
    /// PEM file of the CA(s) that may sign the server's certificate. When set, every connection
    /// uses libpq's `sslmode=verify-full` with this file as `sslrootcert`: TLS, the certificate
    /// chain checked against these CAs, and the certificate's name checked against the host.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate presented to the server (libpq `sslcert`), for servers that
    /// authenticate clients by certificate (`hostssl … cert`). Needs
    /// [`tls_client_key`](Self::tls_client_key).
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of [`tls_client_cert`](Self::tls_client_cert) (libpq `sslkey`). libpq
    /// refuses a key file that its group or others may read.
    pub tls_client_key: Option<PathBuf>,
    /// The password, instead of one in the URL. Handed to libpq in the connection string only,
    /// which is never printed and is wiped after use.
    pub password: Option<SecretString>,
    /// DANGEROUS: allow a connection that is not `sslmode=verify-full` to a host that is not
    /// loopback or a Unix socket. Anyone on the network path can then read and alter what the
    /// store reads and writes, or impersonate the server.
    pub dangerous_allow_plaintext: bool,
}

/// The libpq parameters [`PgConnectOptions`] sets, which a URL given with them must not set too.
const OPTION_PARAMS: &[(&str, &str)] = &[
    ("sslmode", "tls_ca_file"),
    ("sslrootcert", "tls_ca_file"),
    ("sslcert", "tls_client_cert"),
    ("sslkey", "tls_client_key"),
    ("password", "password"),
];

/// libpq's `sslmode` when neither the URL nor the environment names one.
const LIBPQ_DEFAULT_SSLMODE: &str = "prefer";

/// A libpq URL taken apart as far as the transport check needs: hosts, host addresses and the
/// query parameters, percent-decoded.
struct ParsedPgUrl {
    /// Hosts of the authority (`postgres://a:1,b:2/…`), without ports.
    authority_hosts: Vec<String>,
    /// Whether the authority carries a password (`user:password@`).
    authority_password: bool,
    /// `name=value` query parameters, in order.
    params: Vec<(String, String)>,
}

impl ParsedPgUrl {
    fn parse(url: &str) -> Self {
        let after_scheme = url.find("://").map_or(url, |i| &url[i + 3..]);
        let (before_query, query) = after_scheme
            .split_once('?')
            .map_or((after_scheme, ""), |(b, q)| (b, q));
        let authority = before_query
            .find('/')
            .map_or(before_query, |i| &before_query[..i]);
        let (userinfo, hosts) = authority.rfind('@').map_or(("", authority), |at| {
            (&authority[..at], &authority[at + 1..])
        });
        let authority_hosts = hosts
            .split(',')
            .map(host_without_port)
            .filter(|h| !h.is_empty())
            .map(percent_decode)
            .collect();
        let params = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (name, value) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(name), percent_decode(value))
            })
            .collect();
        ParsedPgUrl {
            authority_hosts,
            authority_password: userinfo.contains(':'),
            params,
        }
    }

    /// The last value of parameter `name` (libpq lets a later one override an earlier one).
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every place libpq may connect to: the hosts (of the URL's authority and of every
    /// `host=` parameter, which overrides it; without either, `PGHOST`) and the host addresses
    /// (`hostaddr=`, else `PGHOSTADDR`). An empty list means libpq's default, a Unix socket. A
    /// `service=` (or `PGSERVICE`, which names one when the URL does not) is reported as a host
    /// that cannot be seen from here: its service file may name any host and any `sslmode`.
    fn destinations(&self) -> Vec<String> {
        self.destinations_in(|var| std::env::var(var).ok())
    }

    /// [`Self::destinations`] with `env` for the process environment.
    fn destinations_in(&self, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let env_list = |var: &str| env(var).filter(|v| !v.is_empty()).map(|v| split_list(&v));
        let params = |name: &str| -> Vec<String> {
            self.params
                .iter()
                .filter(|(n, _)| n == name)
                .flat_map(|(_, v)| split_list(v))
                .collect()
        };
        // More than libpq will use (a later `host=` replaces the authority's hosts) errs
        // towards refusing.
        let mut out = self.authority_hosts.clone();
        out.extend(params("host"));
        if out.is_empty() {
            out.extend(env_list("PGHOST").unwrap_or_default());
        }
        let addrs = params("hostaddr");
        if addrs.is_empty() {
            out.extend(env_list("PGHOSTADDR").unwrap_or_default());
        } else {
            out.extend(addrs);
        }
        if let Some(service) = self.param("service") {
            out.push(format!("service {service}"));
        } else if let Some(service) = env("PGSERVICE").filter(|v| !v.is_empty()) {
            out.push(format!("service {service} (PGSERVICE)"));
        }
        out
    }
}

/// `host` of `host:port` or `[v6]:port`.
fn host_without_port(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.find(']').map_or(rest, |i| &rest[..i]);
    }
    host_port.rfind(':').map_or(host_port, |i| &host_port[..i])
}

/// A libpq comma-separated list, empty items dropped.
fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Decodes `%XX` escapes (and leaves malformed ones as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| char::from(b).to_digit(16);
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Two hex digits make at most 0xFF.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'%'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes everything but unreserved characters, for a value put into a libpq URL.
fn percent_encode(text: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(text.len() * 3));
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Whether libpq reaches `destination` without leaving this machine: a Unix socket (a path, or
/// an abstract socket `@name`), `localhost`, or a loopback address. Names other than
/// `localhost` are not resolved: a name is remote.
fn is_local(destination: &str) -> bool {
    destination.starts_with('/')
        || destination.starts_with('@')
        || destination.eq_ignore_ascii_case("localhost")
        || destination
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks that connecting to the PostgreSQL `url` with `options` either is `sslmode=verify-full`
/// or stays on this machine, and that the URL does not also set what `options` sets.
pub(crate) fn check(url: &str, options: &PgConnectOptions) -> Result<(), StoreError> {
    let parsed = ParsedPgUrl::parse(url);
    let set_by_options = |field: &str| match field {
        "tls_ca_file" => options.tls_ca_file.is_some(),
        "tls_client_cert" => options.tls_client_cert.is_some(),
        "tls_client_key" => options.tls_client_key.is_some(),
        "password" => options.password.is_some(),
        _ => false,
    };
    for (param, field) in OPTION_PARAMS {
        if set_by_options(field) && parsed.param(param).is_some() {
            return Err(StoreError::InvalidUrl {
                reason: format!(
                    "the URL sets `{param}`, which the connection options set too ({field}): \
                     give it in one place"
                ),
            });
        }
    }
    if options.password.is_some() && parsed.authority_password {
        return Err(StoreError::InvalidUrl {
            reason: "the URL carries a password and the connection options give one too: \
                     give it in one place"
                .to_owned(),
        });
    }
    if options.tls_client_cert.is_some() != options.tls_client_key.is_some() {
        return Err(StoreError::InvalidUrl {
            reason: "a TLS client certificate needs its key, and a key its certificate".to_owned(),
        });
    }
    if options.tls_ca_file.is_some() || options.dangerous_allow_plaintext {
        return Ok(());
    }
    let sslmode = match parsed.param("sslmode") {
        Some(mode) => mode.to_owned(),
        None if parsed.param("requiressl") == Some("1") => "require".to_owned(),
        None => std::env::var("PGSSLMODE").unwrap_or_else(|_| LIBPQ_DEFAULT_SSLMODE.to_owned()),
    };
    if sslmode == "verify-full" {
        return Ok(());
    }
    match parsed.destinations().into_iter().find(|d| !is_local(d)) {
        Some(host) => Err(StoreError::InsecureTransport { host, sslmode }),
        None => Ok(()),
    }
}

/// The libpq connection string: `url` plus the parameters `options` sets, plus each of
/// `defaults` the URL does not set itself. Holds the password in clear when there is one: never
/// print it; it is wiped when dropped.
pub(crate) fn connection_string(
    url: &str,
    options: &PgConnectOptions,
    defaults: &[(&str, String)],
) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(url.len() + 128));
    out.push_str(url);
    let mut separator = if url.contains('?') { '&' } else { '?' };
    let mut push = |name: &str, value: &str| {
        if !(out.ends_with('?') || out.ends_with('&')) {
            out.push(separator);
        }
        separator = '&';
        out.push_str(name);
        out.push('=');
        out.push_str(&percent_encode(value));
    };
    let path = |p: &Path| p.to_string_lossy().into_owned();
    if let Some(ca) = &options.tls_ca_file {
        push("sslmode", "verify-full");
        push("sslrootcert", &path(ca));
    }
    if let Some(cert) = &options.tls_client_cert {
        push("sslcert", &path(cert));
    }
    if let Some(key) = &options.tls_client_key {
        push("sslkey", &path(key));
    }
    if let Some(password) = &options.password {
        push("password", password.expose_secret());
    }
    let query = url.split_once('?').map_or("", |(_, query)| query);
    for (name, value) in defaults {
        let set_by_url = query
            .split('&')
            .any(|pair| pair.split_once('=').map_or(pair, |(key, _)| key) == *name);
        if !set_by_url {
            push(name, value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_plain(url: &str) -> Result<(), StoreError> {
        check(url, &PgConnectOptions::default())
    }

    fn refused_host(url: &str) -> Option<String> {
        match check_plain(url) {
            Err(StoreError::InsecureTransport { host, .. }) => Some(host),
            Ok(()) => None,
            Err(other) => panic!("{url}: unexpected {other:?}"),
        }
    }

    #[test]
    fn loopback_and_unix_sockets_may_be_reached_without_tls() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/keys",
            "postgres://postgres@127.3.4.5/keys?sslmode=disable",
            "postgres://localhost/keys",
            "postgresql://[::1]:5432/keys?sslmode=prefer",
            "postgres://%2Frun%2Fpostgresql/keys",
            "postgres:///keys?host=/run/postgresql",
            "postgres://u@127.0.0.1:5432,localhost:5433/keys?target_session_attrs=read-write",
        ] {
            assert_eq!(refused_host(url), None, "{url}");
        }
    }

    #[test]
    fn a_remote_host_needs_verify_full_on_every_host() {
        let cases = [
            ("postgres://db.example/keys", "db.example"),
            (
                "postgres://u:p@10.0.0.5:5432/keys?sslmode=require",
                "10.0.0.5",
            ),
            ("postgres://db.example/keys?sslmode=verify-ca", "db.example"),
            (
                "postgres://127.0.0.1:5432,db-b.example:5432/keys?target_session_attrs=read-write",
                "db-b.example",
            ),
            // libpq connects to hostaddr, whatever host says.
            (
                "postgres://localhost/keys?hostaddr=192.0.2.7&sslmode=disable",
                "192.0.2.7",
            ),
            ("postgres:///keys?host=db.example", "db.example"),
            // A `host` parameter overrides the URL's host.
            ("postgres://localhost/keys?host=db.example", "db.example"),
            (
                "postgres://localhost/keys?host=%2Ftmp&host=db.example",
                "db.example",
            ),
            ("postgres:///keys?service=keys", "service keys"),
        ];
        for (url, host) in cases {
            assert_eq!(refused_host(url).as_deref(), Some(host), "{url}");
        }
        for url in [
            "postgres://db.example/keys?sslmode=verify-full",
            "postgres://a.example:5432,b.example:5432/keys?sslmode=verify-full&target_session_attrs=read-write",
        ] {
            assert_eq!(refused_host(url), None, "{url}");
        }
    }

    #[test]
    fn a_ca_file_or_the_dangerous_flag_admits_a_remote_host() {
        let url = "postgres://a.example,b.example/keys";
        let with_ca = PgConnectOptions {
            tls_ca_file: Some("/etc/hsm-driver/pg-ca.pem".into()),
            ..PgConnectOptions::default()
        };
        assert!(check(url, &with_ca).is_ok());
        let dangerous = PgConnectOptions {
            dangerous_allow_plaintext: true,
            ..PgConnectOptions::default()
        };
        assert!(check(url, &dangerous).is_ok());
    }

    #[test]
    fn an_option_also_set_in_the_url_is_refused() {
        let with_ca = PgConnectOptions {
            tls_ca_file: Some("/ca.pem".into()),
            password: Some(SecretString::from("pw")),
            ..PgConnectOptions::default()
        };
        for (url, what) in [
            ("postgres://db.example/keys?sslmode=disable", "sslmode"),
            (
                "postgres://db.example/keys?sslrootcert=/x.pem",
                "sslrootcert",
            ),
            ("postgres://db.example/keys?password=x", "password"),
            ("postgres://u:x@db.example/keys", "password"),
        ] {
            let error = check(url, &with_ca).expect_err(url);
            assert!(
                error.to_string().contains(what) && !error.to_string().contains("pw"),
                "{url}: {error}"
            );
        }
    }

    #[test]
    fn the_connection_string_carries_the_options_encoded() {
        let options = PgConnectOptions {
            tls_ca_file: Some("/etc/pg ca.pem".into()),
            tls_client_cert: Some("/c.pem".into()),
            tls_client_key: Some("/c.key".into()),
            password: Some(SecretString::from("p&w=%?")),
            dangerous_allow_plaintext: false,
        };
        assert_eq!(
            connection_string("postgres://u@db/keys", &options, &[]).as_str(),
            "postgres://u@db/keys?sslmode=verify-full&sslrootcert=/etc/pg%20ca.pem\
             &sslcert=/c.pem&sslkey=/c.key&password=p%26w%3D%25%3F"
        );
        // Tried: liveness defaults, one of which the URL sets itself: the URL's value stays,
        // the others are added.
        let defaults = [
            ("connect_timeout", "5".to_owned()),
            ("tcp_user_timeout", "10000".to_owned()),
        ];
        assert_eq!(
            connection_string(
                "postgres://u@db/keys?connect_timeout=3",
                &PgConnectOptions::default(),
                &defaults
            )
            .as_str(),
            "postgres://u@db/keys?connect_timeout=3&tcp_user_timeout=10000"
        );
        assert_eq!(
            connection_string(
                "postgres://u@db/keys",
                &PgConnectOptions::default(),
                &defaults
            )
            .as_str(),
            "postgres://u@db/keys?connect_timeout=5&tcp_user_timeout=10000"
        );
        assert!(
            !format!("{options:?}").contains("p&w"),
            "Debug must not show the password"
        );
    }

    #[test]
    fn a_service_named_by_pgservice_counts_as_a_remote_host() {
        // Tried: a URL naming no host, with PGSERVICE set in the environment (libpq then reads
        // the host and sslmode from a service file the driver cannot vet).
        let parsed = ParsedPgUrl::parse("postgres:///keys");
        let env = |var: &str| (var == "PGSERVICE").then(|| "keys-prod".to_owned());
        let destinations = parsed.destinations_in(env);
        assert_eq!(
            destinations,
            vec!["service keys-prod (PGSERVICE)".to_owned()]
        );
        assert!(!is_local(&destinations[0]));
        assert!(parsed.destinations_in(|_| None).is_empty(), "a Unix socket");
    }
}
