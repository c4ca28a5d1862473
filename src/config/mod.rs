//! Configuration: the typed [`Config`] every other layer reads, and its one loader.
//!
//! `raw.rs` is the file's serde shape, `validate.rs` turns it into a [`Config`], `edit.rs`
//! changes one value of the file in place (`set-canary`, promotion); this file
//! holds the typed sections, the errors, and the loader ([`Config::load`] / [`Config::parse`])
//! that start-up, `check-config` and reload share, so the three can never disagree about what
//! is valid.
//!
//! Invariants:
//! - Validation collects *every* problem before failing ([`ConfigError::problems`]), so an
//!   operator fixes a file in one pass. Unknown keys are rejected like `deny_unknown_fields`
//!   would, but all of them are listed (collected with `serde_ignored`), not just the first.
//! - A [`Config`] only exists fully validated: addresses parsed, durations non-negative, limits
//!   in range, TLS files named consistently. Code that holds one never re-checks.
//! - Defaults live in the validator, once, and are documented key by key in
//!   `config/gateway.toml` (a test holds the two to each other).

pub mod edit;
mod raw;
mod types;
mod validate;

pub use types::*;

use std::path::Path;

/// The largest configuration file read (a reference file is ~15 KiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a configuration (or secret) file: a regular file only — a FIFO, device or directory
/// at the path is refused before it is opened, and it is opened non-blocking besides, so a
/// path swapped for a FIFO can never hang the reader — and at most [`MAX_FILE_BYTES`].
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Whether `path` can be read by others than its owner (`mask`: 0o044 group or others,
/// 0o004 others only).
fn readable_beyond_owner(path: &Path, mask: u32) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & mask != 0)
}

impl Config {
    /// What is valid but unwise, for `check-config` and the start-up log: secrets readable by
    /// others, device auth codes sent to an unverified shadow.
    pub fn warnings(&self, path: Option<&Path>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(key) = &self.device_tls.key_file {
            if readable_beyond_owner(key, 0o044) {
                out.push(format!(
                    "device_tls.key_file {} is readable by group or others (chmod 600 it)",
                    key.display()
                ));
            }
        }
        if let Some(p) = path {
            if readable_beyond_owner(p, 0o004) {
                out.push(format!(
                    "the configuration {} is readable by others (chmod o-r it)",
                    p.display()
                ));
            }
        }
        if self.dark_launch.mode == DarkMode::Mirror {
            if let Some(u) = &self.upstream_shadow {
                if !u.tls || u.verify == UpstreamVerify::None {
                    out.push(
                        "dark_launch.mode = \"mirror\" sends every shadowed device's hello, auth code included, to upstream.shadow, whose identity is not verified: set upstream.shadow.tls = true and verify = \"ca\" or \"fingerprint\"".into(),
                    );
                }
            }
        }
        out
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_regular(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Self::parse(&text)
    }

    /// Validates TOML text, collecting every problem.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut unknown = Vec::new();
        let de = toml::Deserializer::new(text);
        let raw: raw::RawConfig = match serde_ignored::deserialize(de, |path| {
            // serde_ignored writes `?` for the step through an Option; it means nothing to a user.
            unknown.push(path.to_string().replace(".?", "").replace("?.", ""));
        }) {
            Ok(raw) => raw,
            Err(e) => {
                // Nothing past a syntax error can be judged: report it alone, not the
                // "missing" keys the unparsed file seems to lack.
                return Err(ConfigError::Invalid(vec![Problem {
                    key: "(file)".into(),
                    message: e.to_string().trim().replace('\n', " "),
                }]));
            }
        };
        for key in unknown {
            problems.push(Problem {
                key,
                message: "unknown key".into(),
            });
        }
        let mut v = validate::Validator {
            problems: &mut problems,
        };
        let config = v.config(raw);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = "[upstream.legacy]\naddress = \"127.0.0.1:23780\"\n";

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.listen.devices, "0.0.0.0:23779".parse().expect("addr"));
        assert_eq!(c.listen.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.device_tls.mode, DeviceTlsMode::Tls);
        assert!(c.upstream_legacy.tls);
        assert_eq!(c.upstream_legacy.verify, UpstreamVerify::None);
        assert_eq!(c.protocol.max_frame_len, 4096);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = r#"
[listen]
devices = "not-an-address"
handshake_timeout = -5
bogus = 1
[upstream.legacy]
address = "127.0.0.1:23780"
colour = "red"
connect_timeout = "-2s"
"#;
        let err = Config::parse(text).expect_err("invalid");
        let keys: Vec<String> = err.problems().into_iter().map(|p| p.key).collect();
        for k in [
            "listen.devices",
            "listen.handshake_timeout",
            "listen.bogus",
            "upstream.legacy.colour",
            "upstream.legacy.connect_timeout",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        let err = Config::parse("[upstream.legacy\naddress = \"127.0.0.1:1\"\n").expect_err("bad");
        let p = err.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "(file)");
        assert!(!p[0].message.contains("required"), "{p:?}");
    }

    #[test]
    fn durations_accept_text_and_seconds() {
        let text =
            format!("{MINIMAL}[protocol]\ncommand_deadline = \"1500ms\"\nreply_timeout = 2.5\n[reliable]\nmax_attempts = 2\n");
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.protocol.command_deadline, Duration::from_millis(1500));
        assert_eq!(c.protocol.reply_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn reliable_defaults_fit_inside_the_command_deadline() {
        let c = Config::parse(MINIMAL).expect("valid");
        let r = &c.reliable;
        assert_eq!(r.ack_timeout, Duration::from_millis(400));
        assert_eq!(r.max_attempts, 4);
        assert_eq!(r.retry_until, RetryUntil::Reply);
        assert_eq!(r.idle_timeout, Duration::from_secs(90));
        assert_eq!(
            (r.dedup_capacity, r.dedup_ttl),
            (1000, Duration::from_secs(300))
        );
        // 0.4 + 0.8 + 1.6 s of backoff plus three 0.1 s jitters.
        assert_eq!(r.last_attempt_at(), Duration::from_millis(3100));
        assert!(r.last_attempt_at() + r.ack_timeout <= c.protocol.command_deadline);
        assert_eq!(c.routing.canary_percent, 0.0);
    }

    #[test]
    fn retry_budget_beyond_the_deadline_and_bad_percent_are_rejected() {
        let text = format!(
            "{MINIMAL}[reliable]\nmax_attempts = 6\nretry_until = \"never\"\n[routing]\ncanary_percent = 150\n"
        );
        let keys: Vec<String> = Config::parse(&text)
            .expect_err("invalid")
            .problems()
            .into_iter()
            .map(|p| p.key)
            .collect();
        for k in [
            "reliable.max_attempts",
            "reliable.retry_until",
            "routing.canary_percent",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        let fine = format!("{MINIMAL}[routing]\ncanary_percent = 12.34\n");
        assert_eq!(
            Config::parse(&fine).expect("valid").routing.canary_percent,
            12.34
        );
        let too_fine = format!("{MINIMAL}[routing]\ncanary_percent = 12.345\n");
        assert!(Config::parse(&too_fine).is_err());
    }

    #[test]
    fn fingerprint_and_verify_modes() {
        let fp = "ab".repeat(32);
        let text = format!(
            "[upstream.legacy]\naddress = \"addon.local:23779\"\nverify = \"fingerprint\"\nfingerprint_sha256 = \"{fp}\"\n"
        );
        let c = Config::parse(&text).expect("valid");
        assert_eq!(
            c.upstream_legacy.verify,
            UpstreamVerify::Fingerprint([0xab; 32])
        );
        let bad = "[upstream.legacy]\naddress = \"addon.local:23779\"\nverify = \"ca\"\n";
        let err = Config::parse(bad).expect_err("ca_file missing");
        assert_eq!(err.problems()[0].key, "upstream.legacy.ca_file");
    }

    #[test]
    fn missing_upstream_and_bad_tls_pair_are_named() {
        let text = "[device_tls]\ncert_file = \"/x.pem\"\n";
        let keys: Vec<String> = Config::parse(text)
            .expect_err("invalid")
            .problems()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert!(keys.contains(&"upstream.legacy".to_string()), "{keys:?}");
        assert!(
            keys.contains(&"device_tls.cert_file".to_string()),
            "{keys:?}"
        );
    }

    #[test]
    fn bad_upstream_addresses_are_rejected() {
        for addr in ["localhost", "host:0", "host:70000", ":23779", "a b:1"] {
            let text = format!("[upstream.legacy]\naddress = \"{addr}\"\n");
            assert!(Config::parse(&text).is_err(), "{addr} accepted");
        }
        for addr in ["localhost:1", "[::1]:23779", "10.0.0.2:23779"] {
            let text = format!("[upstream.legacy]\naddress = \"{addr}\"\n");
            assert!(Config::parse(&text).is_ok(), "{addr} rejected");
        }
    }
}
