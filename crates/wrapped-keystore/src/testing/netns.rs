//! [`NetnsLink`]: a network namespace of a test's own, joined to this one by a veth pair, whose
//! link the test can cut without a reset: a silent partition, as a failed switch or a firewall
//! that drops packets makes one.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace and a veth pair: `host_addr()` on this side, `inner_addr()` inside the
/// namespace (a /30 of its own in `10.128.0.0/9`). A server started in it
/// ([`PgClusterBuilder::netns`](super::PgClusterBuilder::netns)) is reached at `inner_addr()`.
/// [`partition`](Self::partition) takes the inner end of the link down: packets in both
/// directions are dropped with no reset and no ICMP, so connections hang rather than fail,
/// until [`heal`](Self::heal). Dropped: the namespace and the pair are deleted.
///
/// Needs root and `ip` (iproute2); [`NetnsLink::create_or_skip`] says whether the machine can.
#[derive(Debug)]
pub struct NetnsLink {
    name: String,
    host_if: String,
    inner_if: String,
    host_addr: Ipv4Addr,
    inner_addr: Ipv4Addr,
}

/// Why a [`NetnsLink`] could not be made or changed.
#[derive(Debug, thiserror::Error)]
#[error("`ip {args}` failed: {reason}")]
pub struct NetnsError {
    args: String,
    reason: String,
}

impl NetnsLink {
    /// Creates the namespace, the veth pair and their addresses, and brings both ends up.
    ///
    /// # Errors
    /// [`NetnsError`] naming the `ip` command that failed (not root, no `ip`, no netns support).
    pub fn create() -> Result<NetnsLink, NetnsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names: at most 15 bytes.
        let tag = format!("{:x}", (pid << 4 | (n & 0xf)) & 0xff_ffff);
        // A /30 per link, from the process id and the counter: tests in parallel do not collide.
        let block = ((pid % 0x7fff) << 4 | (n & 0xf)) << 2;
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) | (block & 0x7f_fffc);
        let link = NetnsLink {
            name: format!("hsmdrv-{tag}"),
            host_if: format!("hdh{tag}"),
            inner_if: format!("hdn{tag}"),
            host_addr: Ipv4Addr::from(base + 1),
            inner_addr: Ipv4Addr::from(base + 2),
        };
        link.ip(&["netns", "add", &link.name])?;
        let host = format!("{}/30", link.host_addr);
        let inner = format!("{}/30", link.inner_addr);
        let steps: [&[&str]; 7] = [
            &[
                "link",
                "add",
                &link.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &link.inner_if,
            ],
            &["link", "set", &link.inner_if, "netns", &link.name],
            &["addr", "add", &host, "dev", &link.host_if],
            &["link", "set", &link.host_if, "up"],
            &[
                "netns",
                "exec",
                &link.name,
                "ip",
                "addr",
                "add",
                &inner,
                "dev",
                &link.inner_if,
            ],
            &[
                "netns",
                "exec",
                &link.name,
                "ip",
                "link",
                "set",
                &link.inner_if,
                "up",
            ],
            &["netns", "exec", &link.name, "ip", "link", "set", "lo", "up"],
        ];
        for step in steps {
            link.ip(step)?;
        }
        Ok(link)
    }

    /// [`create`](Self::create), or `None` after printing `SKIPPED: …` when this machine cannot
    /// (not root, no `ip`) and [`require_postgres`](super::require_postgres) is false (the
    /// drills that use it run on CI, as root).
    ///
    /// # Errors
    /// As [`create`](Self::create) when drills are required.
    pub fn create_or_skip() -> Result<Option<NetnsLink>, NetnsError> {
        match NetnsLink::create() {
            Ok(link) => Ok(Some(link)),
            Err(error) if !super::require_postgres() => {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: cannot make a network namespace here: {error}"
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This side's address.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The address inside the namespace.
    pub fn inner_addr(&self) -> Ipv4Addr {
        self.inner_addr
    }

    /// Cuts the link silently: the inner end goes down, every packet either way is dropped.
    ///
    /// # Errors
    /// [`NetnsError`] if `ip` fails.
    pub fn partition(&self) -> Result<(), NetnsError> {
        self.set_inner_link("down")
    }

    /// Restores the link.
    ///
    /// # Errors
    /// [`NetnsError`] if `ip` fails.
    pub fn heal(&self) -> Result<(), NetnsError> {
        self.set_inner_link("up")
    }

    /// `ip link set <inner end> <state>` inside the namespace.
    fn set_inner_link(&self, state: &str) -> Result<(), NetnsError> {
        let (name, inner) = (self.name.as_str(), self.inner_if.as_str());
        self.ip(&["netns", "exec", name, "ip", "link", "set", inner, state])
    }

    fn ip(&self, args: &[&str]) -> Result<(), NetnsError> {
        let failed = |reason: String| NetnsError {
            args: args.join(" "),
            reason,
        };
        let output = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| failed(e.to_string()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(failed(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ))
        }
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        // Deleting the host end deletes the pair; then the namespace.
        let _ = self.ip(&["link", "del", &self.host_if]);
        let _ = self.ip(&["netns", "del", &self.name]);
    }
}
