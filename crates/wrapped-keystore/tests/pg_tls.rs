//! The key store over TLS to a real PostgreSQL server: each test starts its own throwaway
//! cluster ([`PgCluster`]) with `ssl = on`, a server certificate for `localhost`/`127.0.0.1`
//! from a test CA, and `pg_hba.conf` accepting TLS connections only. Shows what a user sees:
//! `sslmode=verify-full` with the right CA works; the wrong CA, a certificate for another name
//! and plaintext are refused; an unverified connection to a host off this machine is refused
//! before anything connects; a password kept out of the URL authenticates.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use wrapped_keystore::testing::{PgCluster, TestCa};
use wrapped_keystore::{
    DatabaseUrl, DieselKeyStore, KeyStore, PgConnectOptions, PoolOptions, StoreError,
};

use crate::support::record;

/// A TLS-only cluster: its CA, the cluster, and a directory holding the CA's certificate.
struct TlsCluster {
    cluster: PgCluster,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts a cluster with TLS on and these TCP `pg_hba.conf` lines (plaintext always rejected),
/// or `None` when PostgreSQL is not installed and not required.
fn tls_cluster(hba: &[&str]) -> Option<TlsCluster> {
    let ca = TestCa::new("pg-tls test CA").expect("a test CA");
    let mut builder = PgCluster::builder().tls(
        ca.issue_server(&["localhost", "127.0.0.1"])
            .expect("a server certificate"),
    );
    for line in hba {
        builder = builder.hba(line);
    }
    let cluster = builder
        .hba("hostnossl all all all reject")
        .start_or_skip()
        .expect("starting a TLS PostgreSQL cluster")?;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca_file = write_pem(dir.path(), "ca.pem", ca.cert_pem());
    Some(TlsCluster {
        cluster,
        ca_file,
        _dir: dir,
    })
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("writing a PEM file");
    path
}

fn options(postgres: PgConnectOptions) -> PoolOptions {
    PoolOptions {
        max_size: 2,
        postgres,
        ..PoolOptions::default()
    }
}

fn verify_with(ca_file: &Path) -> PgConnectOptions {
    PgConnectOptions {
        tls_ca_file: Some(ca_file.to_owned()),
        ..PgConnectOptions::default()
    }
}

fn url(text: &str) -> DatabaseUrl {
    DatabaseUrl::parse(text).expect("a PostgreSQL URL")
}

/// The error and all its sources, one string.
fn chain(error: &StoreError) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        text.push_str(&e.to_string());
        text.push_str(" / ");
        source = e.source();
    }
    text
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn verify_full_with_the_servers_ca_connects_and_the_store_works() {
    let Some(tls) = tls_cluster(&["hostssl all all all trust"]) else {
        return;
    };
    // `localhost` is checked against the certificate's DNS name; plaintext is rejected by
    // pg_hba.conf, so a connection that works is a TLS connection.
    let store = DieselKeyStore::connect_and_migrate(
        &url(&tls.cluster.tcp_url("localhost", "postgres", "postgres")),
        options(verify_with(&tls.ca_file)),
    )
    .expect("verify-full with the CA that signed the server's certificate");
    runtime().block_on(async {
        store
            .insert(record("key-tls", 1))
            .await
            .expect("insert over TLS");
        assert_eq!(
            store.get("key-tls").await.expect("get over TLS"),
            Some(record("key-tls", 1))
        );
    });
}

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let Some(tls) = tls_cluster(&["hostssl all all all trust"]) else {
        return;
    };
    // The attack: a server (here the real one, but it could be anyone's) presents a certificate
    // the configured CA did not sign.
    let other_ca = TestCa::new("some other CA").expect("another CA");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let other_ca_file = write_pem(dir.path(), "other-ca.pem", other_ca.cert_pem());
    let error = DieselKeyStore::connect(
        &url(&tls.cluster.tcp_url("localhost", "postgres", "postgres")),
        options(verify_with(&other_ca_file)),
    )
    .expect_err("a certificate from another CA must not verify");
    let text = chain(&error);
    assert!(
        matches!(error, StoreError::Connection { .. })
            && text.contains("certificate verify failed"),
        "the error says the certificate did not verify: {text}"
    );
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let Some(tls) = tls_cluster(&["hostssl all all all trust"]) else {
        return;
    };
    // The attack: something at the database's address holds a certificate from the right CA,
    // issued for another name. `hostaddr` sends the connection to it while the name to verify
    // stays `db.internal.example`.
    let impostor = format!(
        "{}?hostaddr=127.0.0.1",
        tls.cluster
            .tcp_url("db.internal.example", "postgres", "postgres")
    );
    let error = DieselKeyStore::connect(&url(&impostor), options(verify_with(&tls.ca_file)))
        .expect_err("a certificate for another name must not verify");
    let text = chain(&error);
    assert!(
        text.contains("does not match host name \"db.internal.example\""),
        "the error says the name did not match: {text}"
    );
}

#[test]
fn plaintext_to_a_tls_only_server_is_refused_by_the_server() {
    let Some(tls) = tls_cluster(&["hostssl all all all trust"]) else {
        return;
    };
    // Loopback may be reached without TLS as far as the store is concerned; the server's
    // `hostnossl … reject` still refuses it.
    let plaintext = format!(
        "{}?sslmode=disable",
        tls.cluster.tcp_url("127.0.0.1", "postgres", "postgres")
    );
    let error = DieselKeyStore::connect(&url(&plaintext), options(PgConnectOptions::default()))
        .expect_err("the server rejects connections without TLS");
    let text = chain(&error);
    assert!(
        text.contains("pg_hba.conf rejects connection") && text.contains("no encryption"),
        "the server says it refuses unencrypted connections: {text}"
    );
}

#[test]
fn an_unverified_connection_to_a_remote_name_is_refused_before_connecting() {
    let Some(tls) = tls_cluster(&["hostssl all all all trust"]) else {
        return;
    };
    // `sslmode=require` encrypts but checks no certificate: whoever answers at the address is
    // believed. The name is not this machine's, so the store refuses it.
    let unverified = format!(
        "{}?hostaddr=127.0.0.1&sslmode=require",
        tls.cluster
            .tcp_url("db.internal.example", "postgres", "postgres")
    );

    // Weakened: with plaintext explicitly allowed, the connection goes through to a server
    // whose certificate nobody checked (the attack works).
    let weakened = PgConnectOptions {
        dangerous_allow_plaintext: true,
        ..PgConnectOptions::default()
    };
    let store = DieselKeyStore::connect(&url(&unverified), options(weakened))
        .expect("an unverified connection when it is explicitly allowed");
    store.ping().expect("the unverified connection works");
    drop(store);

    // Ours: refused by the store, naming the host, before anything connects. A listener stands
    // at the address to see whether anyone knocks.
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let port = listener.local_addr().expect("its address").port();
    for text in [
        format!(
            "postgres://postgres@db.internal.example:{port}/keys?hostaddr=127.0.0.1&sslmode=require"
        ),
        format!(
            "postgres://postgres@127.0.0.1:{port},db-b.internal.example:{port}/keys?target_session_attrs=read-write"
        ),
    ] {
        let error = DieselKeyStore::connect(&url(&text), options(PgConnectOptions::default()))
            .expect_err("an unverified connection to a remote name");
        assert!(
            error.is_insecure_transport() && !error.is_retryable(),
            "{text}: refused as insecure, for good: {error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("internal.example`") && message.contains("verify-full"),
            "{text}: the error names the host and what is needed: {message}"
        );
    }
    assert_eq!(
        listener.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "nothing connected to the address"
    );
}

#[test]
fn a_password_kept_out_of_the_url_authenticates_and_a_wrong_one_is_refused() {
    let Some(tls) = tls_cluster(&["hostssl all all all scram-sha-256"]) else {
        return;
    };
    // One statement per call: `CREATE DATABASE` cannot run in the implicit transaction of a
    // multi-statement string. scram-sha-256 is the default password encryption.
    for sql in [
        "CREATE ROLE driver LOGIN PASSWORD 'correct horse'",
        "CREATE DATABASE keys OWNER driver",
    ] {
        tls.cluster
            .execute(sql)
            .expect("creating the driver's role and database");
    }
    let driver_url = url(&tls.cluster.tcp_url("localhost", "driver", "keys"));
    let with_password = |password: Option<&str>| PgConnectOptions {
        password: password.map(SecretString::from),
        ..verify_with(&tls.ca_file)
    };

    let store = DieselKeyStore::connect_and_migrate(
        &driver_url,
        options(with_password(Some("correct horse"))),
    )
    .expect("the right password over verified TLS");
    runtime().block_on(async {
        store.insert(record("key-pw", 2)).await.expect("insert");
        assert_eq!(store.count().await.expect("count"), 1);
    });
    assert!(
        !format!("{store:?}").contains("correct horse"),
        "the store's Debug does not show the password"
    );

    for (password, what) in [
        (Some("Tr0ub4dor&3"), "a wrong password"),
        (None, "no password"),
    ] {
        let error =
            DieselKeyStore::connect(&driver_url, options(with_password(password))).expect_err(what);
        let text = chain(&error);
        assert!(
            text.contains("password authentication failed")
                || text.contains("no password supplied"),
            "{what}: the server refuses: {text}"
        );
        assert!(
            !text.contains("correct horse") && !text.contains("Tr0ub4dor"),
            "{what}: the error shows no password: {text}"
        );
    }
}
