//! A test gateway and its configuration, built key by key instead of from inline TOML.
//!
//! `TestGateway::new(upstream)` is a gateway on plain TCP, both listeners on port 0, in front of
//! `upstream` (plain TCP too); `.path("new")` puts every device on one path; `.set(key, value)`
//! sets any dotted key (`"reliable.max_attempts"`, `"listen.max_pending"`); `.start()` starts
//! it in this process. The text it builds is an ordinary configuration file ([`TestGateway::text`]),
//! so a test that needs the file (reloads, the real binary) writes that.

use std::net::SocketAddr;

use cync_gateway::config::Config;
use cync_gateway::gateway::Gateway;
use toml_edit::{DocumentMut, Item, Table, Value};

/// A change to a test gateway's configuration, for tables of cases.
pub type Configure = fn(TestGateway) -> TestGateway;

pub struct TestGateway {
    doc: DocumentMut,
}

/// A fresh state directory for one gateway, so no test sees another's rollback latch or SLO
/// state (the default, `/var/lib/cync-gateway`, is shared by every process on the machine).
/// Not created here: the gateway creates it when it starts. All of them are under one parent
/// per checkout, `/tmp/cgw-<first 8 hex of SHA-256 of the checkout's path>` (short, because the
/// admin socket inside must fit a Unix socket path), which the test command empties before
/// each run; they are kept until then, so a failed test's latch, SLO state and audit log can be
/// looked at.
pub fn fresh_state_dir() -> String {
    use sha2::Digest;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let checkout = hex::encode(sha2::Sha256::digest(env!("CARGO_MANIFEST_DIR").as_bytes()));
    let dir = std::env::temp_dir()
        .join(format!("cgw-{}", &checkout[..8]))
        .join(format!(
            "{}-{}-{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
    dir.to_string_lossy().into_owned()
}

/// `text` with its own `state_dir` when it names none (a top-level key, so it goes first).
pub fn with_own_state_dir(text: &str) -> String {
    if text
        .lines()
        .any(|l| l.trim_start().starts_with("state_dir"))
    {
        return text.to_string();
    }
    format!("state_dir = {:?}\n{text}", fresh_state_dir())
}

impl TestGateway {
    pub fn new(upstream: SocketAddr) -> TestGateway {
        TestGateway {
            doc: DocumentMut::new(),
        }
        .set("state_dir", fresh_state_dir())
        .set("listen.devices", "127.0.0.1:0")
        .set("listen.metrics", "127.0.0.1:0")
        .set("device_tls.mode", "plain")
        .set("upstream.legacy.address", upstream.to_string())
        .set("upstream.legacy.tls", false)
    }

    /// Every device on `path` (`"legacy"` or `"new"`): `routing.canary_percent` 0 or 100.
    pub fn path(self, path: &str) -> TestGateway {
        let percent = match path {
            "new" => 100,
            "legacy" => 0,
            other => panic!("no path {other:?}"),
        };
        self.set("routing.canary_percent", percent)
    }

    /// Sets the dotted `key` (tables are made as needed).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> TestGateway {
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().expect("a key");
        let mut table: &mut Table = self.doc.as_table_mut();
        for p in parts {
            table = table
                .entry(p)
                .or_insert_with(|| {
                    let mut t = Table::new();
                    t.set_implicit(true);
                    Item::Table(t)
                })
                .as_table_mut()
                .unwrap_or_else(|| panic!("{key}: {p} is not a table"));
        }
        table.insert(leaf, Item::Value(value.into()));
        self
    }

    /// Appends TOML that `set` cannot say (arrays of tables and the like).
    pub fn raw(mut self, toml: &str) -> TestGateway {
        let text = format!("{}\n{toml}", self.doc);
        self.doc = text
            .parse()
            .unwrap_or_else(|e| panic!("test TOML invalid: {e}\n{text}"));
        self
    }

    /// The configuration file this describes.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }

    pub fn config(&self) -> Config {
        Config::parse(&self.text())
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{}", self.text()))
    }

    pub async fn start(self) -> Gateway {
        Gateway::start(self.config()).await.expect("gateway starts")
    }
}
