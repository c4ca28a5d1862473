//! The MQTT bridge (`[mqtt]`): the gateway as a Home Assistant device over the household's
//! broker, through the `rumqttc` client. It announces the device and its entities
//! ([`super::hass`]), publishes their state, and, with `mqtt.allow_control`, takes the
//! number's and the buttons' commands.
//!
//! Invariants:
//! - Nothing here can slow device traffic: the bridge is one task of its own, every publish is
//!   a non-blocking `try_publish` into a bounded queue (`mqtt.queue`; a full queue drops the
//!   message, counted in `tcp_comm_mqtt_messages_total{outcome="dropped"}`), and a broker that
//!   is down only makes the client reconnect, with backoff (1 s doubling to 30 s).
//! - After every (re)connection the discovery messages, `online` and the state are published
//!   again (retained) and the commands subscribed again, so a restarted broker that lost
//!   everything gets it back. The last will marks the device `offline`, and so does a clean
//!   stop.
//! - State is published when it changes (looked at every second) and at least every
//!   `mqtt.publish_interval`, and at once after any command, so Home Assistant shows what the
//!   gateway did, not what was asked.
//! - A command goes through the same [`Control`] path and audit log as the admin API, actor
//!   `mqtt`, its topic in the audit reason. Every command received is logged with its topic;
//!   a malformed payload or a retained command (it would be replayed at every reconnection)
//!   is refused with a log line and never applied; a canary change is refused while latched.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::admin::Admin;
use super::event::{Control, Origin, RollbackCause};
use super::hass::{self, Command, Topics};
use crate::config::MqttConfig;
use crate::telemetry::labels::{MqttCommand, MqttCommandResult, MqttMessage};
use crate::telemetry::metrics::Metrics;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a clean stop waits for `offline` to reach the broker.
const STOP_FLUSH: Duration = Duration::from_secs(2);

/// `instance` made safe for Home Assistant's ids: anything but `[A-Za-z0-9_-]` becomes `_`.
pub fn id_safe(instance: &str) -> String {
    instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The topics of this gateway: `mqtt.instance` or the host name.
pub fn topics(cfg: &MqttConfig, host: &str) -> Topics {
    let instance = cfg.instance.clone().unwrap_or_else(|| id_safe(host));
    Topics {
        base: cfg
            .base_topic
            .clone()
            .unwrap_or_else(|| format!("cync-gateway/{instance}")),
        discovery_prefix: cfg.discovery_prefix.clone(),
        instance,
    }
}

/// What the bridge needs: its settings, the password read at start, and the admin API's view
/// of the daemon (the same `status`, the same [`Control`] channel).
pub struct Bridge {
    pub cfg: MqttConfig,
    pub topics: Topics,
    pub password: Option<String>,
    pub admin: Arc<Admin>,
    pub metrics: Arc<Metrics>,
}

/// The client's options: id, keep-alive, last will, credentials, TLS.
fn options(b: &Bridge) -> Result<MqttOptions, String> {
    let (host, port) = b
        .cfg
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("mqtt.broker {:?} is not host:port", b.cfg.broker))?;
    let id = b
        .cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("cync-gateway-{}", b.topics.instance));
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(b.cfg.keep_alive);
    o.set_clean_session(true);
    o.set_last_will(LastWill::new(
        b.topics.availability(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &b.cfg.username {
        o.set_credentials(user.clone(), b.password.clone().unwrap_or_default());
    }
    if b.cfg.tls {
        let tls = match &b.cfg.ca_file {
            Some(path) => rumqttc::TlsConfiguration::SimpleNative {
                ca: std::fs::read(path)
                    .map_err(|e| format!("mqtt.ca_file {}: {e}", path.display()))?,
                client_auth: None,
            },
            None => rumqttc::TlsConfiguration::Native,
        };
        o.set_transport(rumqttc::Transport::tls_with_config(tls));
    }
    Ok(o)
}

/// What the event task reports.
enum Report {
    Connected,
    Disconnected(String),
    Publish(rumqttc::Publish),
}

/// Drives the client's event loop (reconnecting with backoff) and forwards what matters; a
/// task of its own so the bridge only ever waits on a channel.
async fn drive(mut events: rumqttc::EventLoop, tx: mpsc::Sender<Report>, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let report = match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                Report::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Report::Publish(p),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                if tx.send(Report::Disconnected(e.to_string())).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

/// The bridge's own state between events.
struct Run {
    client: AsyncClient,
    connected: bool,
    /// Whether this outage has been warned about (once per outage, then debug).
    warned: bool,
    last_state: Option<Value>,
    last_sent: Option<Instant>,
    /// The reason of the newest rollback, for the sensor once the latch is cleared.
    last_rollback: Option<String>,
}

impl Bridge {
    /// Runs until `stop`, then marks the device `offline`.
    pub async fn run(self, stop: CancellationToken) {
        let opts = match options(&self) {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "MQTT bridge not started");
                return;
            }
        };
        let (client, events) = AsyncClient::new(opts, self.cfg.queue);
        let (tx, mut rx) = mpsc::channel(64);
        let driver_stop = CancellationToken::new();
        let driver = tokio::spawn(drive(events, tx, driver_stop.clone()));
        let mut run = Run {
            client,
            connected: false,
            warned: false,
            last_state: None,
            last_sent: None,
            last_rollback: self.newest_rollback_reason().await,
        };
        info!(broker = %self.cfg.broker, base = %self.topics.base, "MQTT bridge started");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.publish_state(&mut run, false).await,
                r = rx.recv() => match r {
                    Some(Report::Connected) => self.connected(&mut run).await,
                    Some(Report::Disconnected(why)) => {
                        if run.connected {
                            warn!(error = %why, broker = %self.cfg.broker, "MQTT broker connection lost; reconnecting (device traffic is not affected)");
                        } else if !run.warned {
                            warn!(error = %why, broker = %self.cfg.broker, "MQTT broker unreachable (or it refused the connection); retrying with backoff (device traffic is not affected)");
                        } else {
                            debug!(error = %why, "MQTT broker still unreachable; retrying");
                        }
                        run.warned = true;
                        run.connected = false;
                        self.metrics.set_mqtt_connected(false);
                    }
                    Some(Report::Publish(p)) => {
                        self.command(&p).await;
                        self.publish_state(&mut run, true).await;
                    }
                    None => break,
                },
            }
        }
        if run.connected {
            self.publish(&run, self.topics.availability(), b"offline".to_vec());
            let _ = run.client.try_disconnect();
            // Delivered by the event task, which ends once the disconnect is out.
            let _ = tokio::time::timeout(STOP_FLUSH, async { while rx.recv().await.is_some() {} })
                .await;
        }
        driver_stop.cancel();
        driver.abort();
        self.metrics.set_mqtt_connected(false);
        info!("MQTT bridge stopped");
    }

    fn publish(&self, run: &Run, topic: String, payload: Vec<u8>) {
        match run
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
        {
            Ok(()) => self.metrics.mqtt_message(MqttMessage::Published),
            Err(e) => {
                self.metrics.mqtt_message(MqttMessage::Dropped);
                debug!(error = %e, "MQTT message dropped: the queue toward the broker is full");
            }
        }
    }

    /// (Re)connected: announce everything again, and listen for commands.
    async fn connected(&self, run: &mut Run) {
        info!(broker = %self.cfg.broker, "MQTT broker connected; publishing discovery");
        run.connected = true;
        run.warned = false;
        self.metrics.set_mqtt_connected(true);
        for (topic, payload) in hass::discovery(&self.topics, self.cfg.allow_control) {
            self.publish(run, topic, payload);
        }
        self.publish(run, self.topics.availability(), b"online".to_vec());
        if self.cfg.allow_control {
            if let Err(e) = run
                .client
                .try_subscribe(self.topics.command_filter(), QoS::AtMostOnce)
            {
                warn!(error = %e, "MQTT: cannot subscribe to the command topics");
            }
        }
        run.last_state = None;
        self.publish_state(run, true).await;
    }

    /// Publishes the state if it changed, if it is due, or if `now`.
    async fn publish_state(&self, run: &mut Run, now: bool) {
        if !run.connected {
            return;
        }
        let status = self.admin.status().await;
        if status.latch.latched {
            run.last_rollback = status.latch.reason.clone();
        }
        let state = hass::state(&status, run.last_rollback.as_deref());
        let due = run
            .last_sent
            .is_none_or(|t| t.elapsed() >= self.cfg.publish_interval);
        if now || due || run.last_state.as_ref() != Some(&state) {
            self.publish(run, self.topics.state(), state.to_string().into_bytes());
            run.last_state = Some(state);
            run.last_sent = Some(Instant::now());
        }
    }

    /// The reason of the newest rollback in the audit log, if any.
    async fn newest_rollback_reason(&self) -> Option<String> {
        let dir = self.admin.live.config().state_dir.clone();
        tokio::task::spawn_blocking(move || super::audit::read(&dir, None))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|h| {
                h.entries
                    .into_iter()
                    .rev()
                    .find(|e| e.action == "rollback")
                    .map(|e| e.reason)
            })
    }

    /// One message on a command topic.
    async fn command(&self, p: &rumqttc::Publish) {
        let topic = p.topic.as_str();
        let text = String::from_utf8_lossy(&p.payload);
        let text = text.trim();
        let Some(c) = self.topics.command_of(topic) else {
            self.metrics
                .mqtt_command(MqttCommand::Unknown, MqttCommandResult::Malformed);
            warn!(topic, "MQTT: a message on no known command topic; ignored");
            return;
        };
        let label = match c {
            Command::Canary => MqttCommand::Canary,
            Command::Rollback => MqttCommand::Rollback,
            Command::Resume => MqttCommand::Resume,
            Command::Promote => MqttCommand::Promote,
        };
        info!(topic, payload = text, "MQTT: command received");
        let refuse = |result: MqttCommandResult, why: &str| {
            self.metrics.mqtt_command(label, result);
            warn!(topic, payload = text, why, "MQTT: command not applied");
        };
        if !self.cfg.allow_control {
            return refuse(MqttCommandResult::Refused, "mqtt.allow_control is false");
        }
        if p.retain {
            return refuse(
                MqttCommandResult::Malformed,
                "a retained command (it would be applied again at every reconnection)",
            );
        }
        let reason = format!("Home Assistant, MQTT {topic}");
        let event = match c {
            Command::Canary => {
                let Some(to) = canary_payload(text) else {
                    return refuse(
                        MqttCommandResult::Malformed,
                        "not a percentage 0-100 with at most two decimals",
                    );
                };
                if self.admin.live.latched() {
                    return refuse(
                        MqttCommandResult::Refused,
                        "the rollback latch is set: resume first",
                    );
                }
                Control::SetCanary {
                    origin: Origin::Mqtt,
                    to,
                    reason: format!("{reason}: {to}%"),
                }
            }
            _ if text != hass::PRESS => {
                return refuse(MqttCommandResult::Malformed, "a button sends PRESS");
            }
            Command::Rollback => Control::Rollback {
                origin: Origin::Mqtt,
                cause: RollbackCause::Operator,
                reason,
            },
            Command::Resume => Control::Resume {
                origin: Origin::Mqtt,
                reason,
            },
            Command::Promote => match self.admin.rollouts.next(Instant::now(), false) {
                Ok(to) => {
                    self.admin.rollouts.asked(to);
                    Control::Promote {
                        origin: Origin::Mqtt,
                        to,
                        reason: format!("{reason}: every gate met"),
                    }
                }
                Err(why) => return refuse(MqttCommandResult::Refused, &why),
            },
        };
        match self.admin.control.send(event).await {
            Ok(()) => self
                .metrics
                .mqtt_command(label, MqttCommandResult::Accepted),
            Err(_) => refuse(MqttCommandResult::Refused, "the gateway is shutting down"),
        }
    }
}

/// A canary percentage as the number entity sends it: 0–100, at most two decimals.
pub fn canary_payload(text: &str) -> Option<f64> {
    let v: f64 = text.parse().ok()?;
    let hundredths = v * 100.0;
    (v.is_finite() && (0.0..=100.0).contains(&v) && (hundredths - hundredths.round()).abs() < 1e-6)
        .then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_payloads_are_percentages_with_two_decimals_at_most() {
        for (text, want) in [
            ("25", Some(25.0)),
            ("0", Some(0.0)),
            ("100.0", Some(100.0)),
            ("12.34", Some(12.34)),
            ("12.345", None),
            ("100.01", None),
            ("-1", None),
            ("NaN", None),
            ("inf", None),
            ("", None),
            ("25%", None),
            ("{\"value\": 25}", None),
        ] {
            assert_eq!(canary_payload(text), want, "{text:?}");
        }
    }

    #[test]
    fn host_names_become_id_safe_instances() {
        assert_eq!(id_safe("ha.local"), "ha_local");
        assert_eq!(id_safe("gw-1_a"), "gw-1_a");
    }
}
