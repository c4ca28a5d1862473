//! What the gateway looks like in Home Assistant: the MQTT discovery messages of its one
//! device ("Cync gateway `<instance>`") and its entities, and the state they read, made from
//! the same [`Status`] `cync-gateway status --json` prints. Pure: the bridge
//! ([`super::mqtt`]) publishes them.
//!
//! Invariants:
//! - Every entity reads one retained JSON state topic (`<base>/state`) through its
//!   `value_template`, and is available while `<base>/availability` says `online` (the
//!   bridge's last will says `offline`).
//! - Percentages are 0–100 (Home Assistant's `%`), latencies milliseconds; a figure with no
//!   data yet is `null`, which Home Assistant shows as "unknown".
//! - Ids (`unique_id`, the discovery node and object ids) are `cync_gateway_<instance>` and
//!   `<key>`: `[a-zA-Z0-9_-]` only, as discovery requires.
//! - The controls (a number, three buttons) are only announced with `allow_control`; without
//!   it their config topics are cleared (an empty retained message), so a control announced
//!   before disappears from Home Assistant.

use serde_json::{json, Map, Value};

use super::admin::Status;

/// The topics of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Topics {
    pub instance: String,
    pub discovery_prefix: String,
    pub base: String,
}

/// The payload a button sends.
pub const PRESS: &str = "PRESS";

/// A control's command, by the topic it arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Canary,
    Rollback,
    Resume,
    Promote,
}

impl Topics {
    pub fn availability(&self) -> String {
        format!("{}/availability", self.base)
    }

    pub fn state(&self) -> String {
        format!("{}/state", self.base)
    }

    fn node(&self) -> String {
        format!("cync_gateway_{}", self.instance)
    }

    /// The topic a control's commands arrive on.
    pub fn command(&self, c: Command) -> String {
        match c {
            Command::Canary => format!("{}/canary/set", self.base),
            Command::Rollback => format!("{}/rollback/press", self.base),
            Command::Resume => format!("{}/resume/press", self.base),
            Command::Promote => format!("{}/promote/press", self.base),
        }
    }

    /// Which control `topic` belongs to.
    pub fn command_of(&self, topic: &str) -> Option<Command> {
        [
            Command::Canary,
            Command::Rollback,
            Command::Resume,
            Command::Promote,
        ]
        .into_iter()
        .find(|c| self.command(*c) == topic)
    }

    /// The topics the bridge subscribes to with controls on.
    pub fn command_filter(&self) -> String {
        format!("{}/+/+", self.base)
    }

    fn config_topic(&self, component: &str, key: &str) -> String {
        format!(
            "{}/{component}/{}/{key}/config",
            self.discovery_prefix,
            self.node()
        )
    }
}

/// One entity: its component, key, and the fields beyond the shared ones.
struct Entity {
    component: &'static str,
    key: &'static str,
    name: &'static str,
    extra: Value,
    control: bool,
}

fn sensor(key: &'static str, name: &'static str, extra: Value) -> Entity {
    Entity {
        component: "sensor",
        key,
        name,
        extra,
        control: false,
    }
}

fn percent(state_class: bool) -> Value {
    let mut v = json!({ "unit_of_measurement": "%" });
    if state_class {
        v["state_class"] = json!("measurement");
    }
    v
}

fn entities(t: &Topics) -> Vec<Entity> {
    let ms = json!({
        "unit_of_measurement": "ms",
        "device_class": "duration",
        "state_class": "measurement",
    });
    let count = json!({ "state_class": "measurement", "icon": "mdi:lan-connect" });
    let button = |key: &'static str, name: &'static str, c: Command, icon: &str| Entity {
        component: "button",
        key,
        name,
        extra: json!({
            "command_topic": t.command(c),
            "payload_press": PRESS,
            "icon": icon,
        }),
        control: true,
    };
    vec![
        sensor("canary_configured", "Canary configured", percent(true)),
        sensor("canary_effective", "Canary in force", percent(true)),
        sensor("devices_new", "Devices on the new path", count.clone()),
        sensor("devices_legacy", "Devices on legacy", count),
        sensor("success_1h_new", "New path success (1 h)", percent(true)),
        sensor("success_1h_legacy", "Legacy success (1 h)", percent(true)),
        sensor("p99_ms_new", "New path p99", ms.clone()),
        sensor("p99_ms_legacy", "Legacy p99", ms),
        sensor("budget_new", "New path error budget left", percent(true)),
        sensor("budget_legacy", "Legacy error budget left", percent(true)),
        sensor("stage", "Rollout stage", json!({ "icon": "mdi:stairs-up" })),
        sensor(
            "last_rollback_reason",
            "Last rollback reason",
            json!({ "icon": "mdi:undo-variant" }),
        ),
        Entity {
            component: "binary_sensor",
            key: "latched",
            name: "Rollback latch",
            extra: json!({
                "device_class": "problem",
                "payload_on": "ON",
                "payload_off": "OFF",
                "value_template": "{{ 'ON' if value_json.latched else 'OFF' }}",
            }),
            control: false,
        },
        Entity {
            component: "number",
            key: "canary",
            name: "Canary percentage",
            extra: json!({
                "command_topic": t.command(Command::Canary),
                "min": 0,
                "max": 100,
                "step": 0.01,
                "mode": "box",
                "unit_of_measurement": "%",
                "value_template": "{{ value_json.canary_configured }}",
                "icon": "mdi:percent",
            }),
            control: true,
        },
        button("rollback", "Roll back", Command::Rollback, "mdi:undo"),
        button("resume", "Resume", Command::Resume, "mdi:play"),
        button("promote", "Promote", Command::Promote, "mdi:arrow-up-bold"),
    ]
}

/// The discovery messages, `(topic, payload)`, all to be published retained; a control's
/// payload is empty (removing it) without `allow_control`.
pub fn discovery(t: &Topics, allow_control: bool) -> Vec<(String, Vec<u8>)> {
    let device = json!({
        "identifiers": [t.node()],
        "name": format!("Cync gateway {}", t.instance),
        "manufacturer": "cync-gateway",
        "model": "Cync strangler gateway",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    entities(t)
        .into_iter()
        .map(|e| {
            let topic = t.config_topic(e.component, e.key);
            if e.control && !allow_control {
                return (topic, Vec::new());
            }
            let mut m = Map::new();
            m.insert("name".into(), json!(e.name));
            m.insert("unique_id".into(), json!(format!("{}_{}", t.node(), e.key)));
            m.insert("object_id".into(), json!(format!("{}_{}", t.node(), e.key)));
            m.insert("availability_topic".into(), json!(t.availability()));
            m.insert("payload_available".into(), json!("online"));
            m.insert("payload_not_available".into(), json!("offline"));
            m.insert("device".into(), device.clone());
            if e.component != "button" {
                m.insert("state_topic".into(), json!(t.state()));
                m.insert(
                    "value_template".into(),
                    json!(format!("{{{{ value_json.{} }}}}", e.key)),
                );
            }
            if let Value::Object(extra) = e.extra {
                m.extend(extra);
            }
            (topic, Value::Object(m).to_string().into_bytes())
        })
        .collect()
}

fn pct(v: Option<f64>) -> Value {
    v.filter(|x| x.is_finite())
        .map_or(Value::Null, |x| json!((x * 10_000.0).round() / 100.0))
}

/// The state payload: the figures of `s`, and `last_rollback` (the reason of the newest
/// rollback, when the latch is not set now).
pub fn state(s: &Status, last_rollback: Option<&str>) -> Value {
    let path = |t: &str| s.paths.iter().find(|p| p.transport == t);
    let mut v = json!({
        "canary_configured": s.configured_percent,
        "canary_effective": s.effective_percent,
        "latched": s.latch.latched,
    });
    for t in ["new", "legacy"] {
        let p = path(t);
        v[format!("devices_{t}")] = json!(p.map_or(0, |p| p.connections));
        v[format!("success_1h_{t}")] = pct(p.and_then(|p| {
            p.windows
                .iter()
                .find(|w| w.window == "1h")
                .and_then(|w| w.success)
        }));
        v[format!("p99_ms_{t}")] = p
            .and_then(|p| p.p99_s)
            .filter(|x| x.is_finite())
            .map_or(Value::Null, |x| json!((x * 1e6).round() / 1e3));
        v[format!("budget_{t}")] = pct(p.and_then(|p| {
            p.budget_remaining
                .iter()
                .find(|(slo, _)| slo == "success")
                .map(|(_, b)| *b)
        }));
    }
    v["stage"] = json!(match &s.rollout {
        Some(r) if !r.stages.is_empty() => {
            let n = r.stages.len();
            match r.position.stage {
                Some(st) => {
                    let i = r.stages.iter().position(|x| *x == st).map_or(0, |i| i + 1);
                    format!("{st}% (stage {i} of {n})")
                }
                None => format!("before the first stage ({}%)", r.stages[0]),
            }
        }
        _ => "no stages configured".to_string(),
    });
    let reason = if s.latch.latched {
        s.latch.reason.clone()
    } else {
        last_rollback.map(str::to_string)
    };
    v["last_rollback_reason"] = json!(reason.unwrap_or_else(|| "none".into()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics {
            instance: "home".into(),
            discovery_prefix: "homeassistant".into(),
            base: "cync-gateway/home".into(),
        }
    }

    #[test]
    fn controls_are_announced_only_when_allowed_and_cleared_otherwise() {
        let t = topics();
        let on = discovery(&t, true);
        let off = discovery(&t, false);
        assert_eq!(on.len(), off.len());
        let empty: Vec<&String> = off
            .iter()
            .filter(|(_, p)| p.is_empty())
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            empty,
            [
                "homeassistant/number/cync_gateway_home/canary/config",
                "homeassistant/button/cync_gateway_home/rollback/config",
                "homeassistant/button/cync_gateway_home/resume/config",
                "homeassistant/button/cync_gateway_home/promote/config",
            ]
        );
        assert!(on.iter().all(|(_, p)| !p.is_empty()));
    }

    #[test]
    fn command_topics_map_back_to_their_control_and_nothing_else_does() {
        let t = topics();
        for c in [
            Command::Canary,
            Command::Rollback,
            Command::Resume,
            Command::Promote,
        ] {
            assert_eq!(t.command_of(&t.command(c)), Some(c));
        }
        assert_eq!(t.command_of("cync-gateway/home/state"), None);
        assert_eq!(t.command_of("cync-gateway/other/rollback/press"), None);
    }
}
