#!/usr/bin/env python3
"""Writes dashboards/cync-gateway.json, the Grafana dashboard for cync-gateway.

Run from anywhere, with Python 3 alone (standard library only):

    python3 scripts/gen-dashboard.py           # rewrite dashboards/cync-gateway.json
    python3 scripts/gen-dashboard.py --check   # exit 1 if the committed file is stale

The JSON is committed (Grafana provisions it as a file) and checked by tests/dashboard.rs:
unique panel ids, grid positions without overlaps, every query filtered by `$instance`, every
metric name documented in docs/metrics.md (or recorded in alerts/cync-gateway.rules.yml), and
every query parsed by `promtool check rules`. Edit this script, not the JSON: it hands out the
ids and grid positions, so a panel added or moved keeps the others consistent. The output is
deterministic (sorted keys, 2-space indent, trailing newline), so a rerun without changes
leaves the file byte-identical.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "dashboards", "cync-gateway.json")

DS = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'  # the filter every query carries
COLS = 24


def sel(metric, *matchers):
    """`metric{instance=~"$instance", matchers...}`."""
    return "%s{%s}" % (metric, ", ".join((I,) + matchers))


class Layout:
    """Hands out panel ids and packs panels left to right, row by row, on the 24-column grid."""

    def __init__(self):
        self.panels = []
        self.next_id = 1
        self.y = 0  # top of the current line
        self.x = 0
        self.line_h = 0

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def _newline(self):
        self.y += self.line_h
        self.x = 0
        self.line_h = 0

    def row(self, title):
        self._newline()
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": COLS, "x": 0, "y": self.y},
                "id": self._id(),
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self.line_h = 1
        self._newline()

    def add(self, panel, w, h):
        assert 0 < w <= COLS
        if self.x + w > COLS:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.line_h = max(self.line_h, h)
        self.panels.append(panel)


def targets(*queries):
    """[(expr, legend)] -> Grafana targets with refIds A, B, ..."""
    out = []
    for n, (expr, legend) in enumerate(queries):
        assert I in expr, expr
        out.append(
            {
                "datasource": DS,
                "editorMode": "code",
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "refId": chr(ord("A") + n),
            }
        )
    return out


def defaults(unit, minimum=None, maximum=None, thresholds=None, mappings=None, custom=None):
    d = {
        "mappings": mappings or [],
        "thresholds": {
            "mode": "absolute",
            "steps": thresholds or [{"color": "green", "value": None}],
        },
        "unit": unit,
    }
    if minimum is not None:
        d["min"] = minimum
    if maximum is not None:
        d["max"] = maximum
    if custom is not None:
        d["custom"] = custom
    return d


def timeseries(title, description, unit, queries, minimum=None, maximum=None, thresholds=None,
               stack=False):
    custom = {
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    if thresholds:
        custom["thresholdsStyle"] = {"mode": "dashed"}
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {
            "defaults": defaults(unit, minimum, maximum, thresholds, custom=custom),
            "overrides": [],
        },
        "options": {
            "legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table",
                       "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(*queries),
        "title": title,
        "type": "timeseries",
    }


def stat(title, description, unit, queries, thresholds=None, mappings=None):
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {
            "defaults": defaults(unit, thresholds=thresholds, mappings=mappings),
            "overrides": [],
        },
        "options": {
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
        },
        "targets": targets(*queries),
        "title": title,
        "type": "stat",
    }


def gauge(title, description, unit, queries, minimum, maximum, thresholds):
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {
            "defaults": defaults(unit, minimum, maximum, thresholds),
            "overrides": [],
        },
        "options": {
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showThresholdLabels": False,
            "showThresholdMarkers": True,
        },
        "targets": targets(*queries),
        "title": title,
        "type": "gauge",
    }


def heatmap(title, description, query):
    panel = {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": {"unit": "s"}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential",
                      "exponent": 0.5, "steps": 64},
            "filterValues": {"le": 1e-09},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"show": True, "yHistogram": False},
            "yAxis": {"axisPlacement": "left", "unit": "s"},
        },
        "targets": targets((query, "{{le}}")),
        "title": title,
        "type": "heatmap",
    }
    panel["targets"][0]["format"] = "heatmap"
    return panel


def rate(metric, by, *matchers, window="5m"):
    return "sum by (%s) (rate(%s[%s]))" % (by, sel(metric, *matchers), window)


def increase(metric, by, *matchers, window="5m"):
    return "sum by (%s) (increase(%s[%s]))" % (by, sel(metric, *matchers), window)


RED_AT_1 = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
BUDGET = [
    {"color": "red", "value": None},
    {"color": "orange", "value": 0.25},
    {"color": "green", "value": 0.5},
]
PATHS = 'transport=~"new|legacy"'


def build():
    g = Layout()

    # ---------------------------------------------------------------- Overview
    g.row("Overview")
    g.add(stat(
        "Canary: configured vs effective",
        "Share of devices routed to the new path: configured (routing.canary_percent) and in "
        "force now (0 while the rollback latch is set), so a gap between them means a rollback.",
        "percent",
        [("max by (instance) (%s)" % sel("tcp_comm_canary_percentage"), "configured {{instance}}"),
         ("max by (instance) (%s)" % sel("tcp_comm_canary_effective_percentage"),
          "effective {{instance}}")],
        thresholds=[{"color": "blue", "value": None}],
    ), 6, 5)
    g.add(stat(
        "Rollback latch",
        "LATCHED means every device is routed to legacy until an operator clears the latch "
        "(see the Rollout row for why).",
        "short",
        [("max by (instance) (%s)" % sel("tcp_comm_rollback_active"), "{{instance}}")],
        thresholds=RED_AT_1,
        mappings=[{"options": {"0": {"color": "green", "index": 0, "text": "clear"},
                               "1": {"color": "red", "index": 1, "text": "LATCHED"}},
                   "type": "value"}],
    ), 4, 5)
    g.add(stat(
        "Devices connected",
        "Device connections open now per path (shadow counts live dark-launch shadows), so a "
        "sudden drop means devices are falling off.",
        "short",
        [("sum by (transport) (%s)" % sel("tcp_comm_connections_active"), "{{transport}}")],
        thresholds=[{"color": "blue", "value": None}],
    ), 6, 5)
    g.add(stat(
        "Command success, 5m",
        "Share of commands answered by the device's f9 within the command deadline, new vs "
        "legacy, over the last 5 minutes (no value = no commands).",
        "percentunit",
        [(rate("tcp_comm_packet_sent_total", "transport", PATHS, 'outcome="success"')
          + " / " + rate("tcp_comm_packet_sent_total", "transport", PATHS), "{{transport}}")],
        thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0.99},
                    {"color": "green", "value": 0.999}],
    ), 8, 5)
    g.add(timeseries(
        "Commands per second, new vs legacy",
        "Commands (srv to dev f8) ended per second on each path, by outcome, so you can see "
        "load shifting with the canary and timeouts appearing.",
        "ops",
        [(rate("tcp_comm_packet_sent_total", "transport, outcome", PATHS),
          "{{transport}} {{outcome}}")],
    ), 12, 8)
    g.add(timeseries(
        "Command success ratio, new vs legacy",
        "Share of commands answered in time per path over 5 minutes; the new path below legacy "
        "is what the rollback controller acts on.",
        "percentunit",
        [(rate("tcp_comm_packet_sent_total", "transport", PATHS, 'outcome="success"')
          + " / " + rate("tcp_comm_packet_sent_total", "transport", PATHS), "{{transport}}")],
        maximum=1,
    ), 12, 8)

    # ---------------------------------------------------------------- SLO
    g.row("SLO")
    g.add(timeseries(
        "SLIs vs target, 1h (worst instance)",
        "Each ratio SLI (good share, 1 = all good) per path over the gateway's 1 h window, with "
        "the target as a dashed line: a path under its target is burning budget.",
        "percentunit",
        [("min by (transport, slo) (%s)" % sel("tcp_comm_slo_sli", 'slo!="churn"', 'window="1h"'),
          "{{transport}} {{slo}}"),
         ("max by (slo) (%s)" % sel("tcp_comm_slo_target", 'slo!="churn"'), "target {{slo}}")],
        maximum=1,
    ), 12, 8)
    g.add(timeseries(
        "Churn vs maximum, 1h (worst instance)",
        "Closes the gateway did not ask for per connected device-hour, per path, against the "
        "configured maximum: above it devices are being dropped too often.",
        "short",
        [("max by (transport) (%s)" % sel("tcp_comm_slo_sli", 'slo="churn"', 'window="1h"'),
          "{{transport}}"),
         ("max(%s)" % sel("tcp_comm_slo_target", 'slo="churn"'), "maximum")],
        minimum=0,
    ), 12, 8)
    g.add(gauge(
        "Error budget remaining, new path",
        "Share of each SLO's error budget the new path has left over its period (30 d, 7 d for "
        "latency) on the worst instance: 0 means spent.",
        "percentunit",
        [("min by (slo) (%s)" % sel("tcp_comm_slo_error_budget_remaining", 'transport="new"'),
          "{{slo}}")],
        0, 1, BUDGET,
    ), 12, 7)
    g.add(gauge(
        "Error budget remaining, legacy path",
        "The same budgets for the legacy path, the baseline the new path is judged against: "
        "both low points at the devices or the add-on, not the new path.",
        "percentunit",
        [("min by (slo) (%s)" % sel("tcp_comm_slo_error_budget_remaining", 'transport="legacy"'),
          "{{slo}}")],
        0, 1, BUDGET,
    ), 12, 7)
    burn_thresholds = [{"color": "green", "value": None}, {"color": "orange", "value": 6},
                       {"color": "red", "value": 14.4}]
    g.add(timeseries(
        "Burn rate, fast windows (5m, 1h)",
        "How fast each budget is being spent (1 = exactly over the period); above 14.4 on both "
        "5 m and 1 h is the fast-burn page.",
        "short",
        [("max by (transport, slo, window) (%s)"
          % sel("tcp_comm_slo_burn_rate", PATHS, 'window=~"5m|1h"'),
          "{{transport}} {{slo}} {{window}}")],
        minimum=0, thresholds=burn_thresholds,
    ), 12, 8)
    g.add(timeseries(
        "Burn rate, slow windows (30m, 6h)",
        "Budget spend over the slow windows: above 6 on both 30 m and 6 h is the slow-burn "
        "ticket.",
        "short",
        [("max by (transport, slo, window) (%s)"
          % sel("tcp_comm_slo_burn_rate", PATHS, 'window=~"30m|6h"'),
          "{{transport}} {{slo}} {{window}}")],
        minimum=0, thresholds=burn_thresholds,
    ), 12, 8)

    # ---------------------------------------------------------------- Latency
    g.row("Latency")
    quantiles = []
    for q, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"), ("0.999", "p99.9")):
        quantiles.append((
            "histogram_quantile(%s, sum by (le, transport) (rate(%s[5m])))"
            % (q, sel("tcp_comm_packet_latency_seconds_bucket")),
            "{{transport}} %s" % name,
        ))
    g.add(timeseries(
        "Command latency p50 / p95 / p99 / p99.9 per path",
        "Time from a command's first forward to the device's f9 reply, per path, from the "
        "histogram over 5 minutes: the SLO threshold is 1.5 s.",
        "s",
        quantiles,
        minimum=0,
        thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1.5}],
    ), 24, 9)
    for path in ("new", "legacy"):
        g.add(heatmap(
            "Command latency distribution, %s path" % path,
            "Commands answered per latency bucket on the %s path over time, so a second mode "
            "or a tail creeping toward the deadline stands out." % path,
            "sum by (le) (rate(%s[5m]))"
            % sel("tcp_comm_packet_latency_seconds_bucket", 'transport="%s"' % path),
        ), 12, 8)

    # ---------------------------------------------------------------- Reliability
    g.row("Reliability")
    g.add(timeseries(
        "Retransmits per second",
        "Commands the new path re-sent because their f9 reply was missing; a rise means a "
        "lossy or slow device link.",
        "ops",
        [(rate("tcp_comm_packet_retransmit_total", "transport"), "{{transport}}")],
    ), 8, 8)
    g.add(timeseries(
        "Ack (0x7b) timeouts per second",
        "0x73 packets whose 0x7b acknowledgement never came, per path: devices not hearing "
        "the add-on.",
        "ops",
        [(rate("tcp_comm_ack_received_total", "transport", 'outcome="timeout"'),
          "{{transport}}")],
    ), 8, 8)
    g.add(timeseries(
        "Idempotent drops per second",
        "Device answers the new path did not forward because upstream already had one "
        "(duplicate) or its upstream was replaced (stale): retries working as designed.",
        "ops",
        [(rate("tcp_comm_idempotent_drops_total", "transport, packet_type, reason"),
          "{{transport}} {{packet_type}} {{reason}}")],
    ), 8, 8)
    g.add(timeseries(
        "Upstream resumptions per 5m",
        "Upstream connections lost under a live device and how each ended: anything but "
        "success closed the device side.",
        "short",
        [(increase("tcp_comm_resumptions_total", "transport, outcome"),
          "{{transport}} {{outcome}}")],
        minimum=0,
    ), 12, 8)
    g.add(timeseries(
        "Retries skipped per second",
        "Copies that were due but not sent, over the retry budget or too close to the command "
        "deadline: the reliable path is saturated.",
        "ops",
        [(rate("tcp_comm_retries_skipped_total", "transport, reason"),
          "{{transport}} {{reason}}")],
    ), 12, 8)

    # ---------------------------------------------------------------- Queues
    g.row("Queues")
    g.add(timeseries(
        "Bytes queued in the gateway",
        "Bytes waiting inside the gateway per path and direction, summed over connections: a "
        "steady climb means a slow reader.",
        "bytes",
        [("sum by (transport, direction) (%s)" % sel("tcp_comm_queue_bytes"),
          "{{transport}} {{direction}}")],
        minimum=0,
    ), 12, 8)
    g.add(timeseries(
        "Frames that met a full queue, per second",
        "Frames shed, rejected, dropped or closing a pair because a queue was full, per "
        "direction and action: the queue_full SLO's bad events.",
        "ops",
        [(rate("tcp_comm_queue_full_total", "transport, direction, action"),
          "{{transport}} {{direction}} {{action}}")],
    ), 12, 8)

    # ---------------------------------------------------------------- Errors
    g.row("Errors")
    g.add(timeseries(
        "Decode errors per second",
        "Frames the decoder rejected, per path and reason (forwarded verbatim anyway): a rise "
        "on one path only points at that path.",
        "ops",
        [(rate("tcp_comm_decode_errors_total", "transport, reason"),
          "{{transport}} {{reason}}")],
    ), 12, 8)
    g.add(timeseries(
        "Unframed bytes per second",
        "Bytes that could not be framed and were forwarded as they came, per direction: stray "
        "bytes or a peer speaking something else.",
        "Bps",
        [(rate("tcp_comm_unframed_bytes_total", "transport, direction"),
          "{{transport}} {{direction}}")],
    ), 12, 8)
    g.add(timeseries(
        "Upstream connect errors per second",
        "Failed dials to the Home Assistant add-on by reason: the add-on is down, unreachable "
        "or refusing TLS.",
        "ops",
        [(rate("tcp_comm_upstream_connect_errors_total", "transport, reason"),
          "{{transport}} {{reason}}")],
    ), 12, 8)
    g.add(timeseries(
        "Connection closes per second by reason",
        "Why device/add-on pairs ended, per path: who closed first for clean closes, and "
        "errors, timeouts or gateway decisions otherwise.",
        "ops",
        [(rate("tcp_comm_connection_closes_total", "transport, reason"),
          "{{transport}} {{reason}}")],
    ), 12, 8)

    # ---------------------------------------------------------------- Dark launch
    g.row("Dark launch")
    g.add(timeseries(
        "Shadow comparisons per second by result",
        "Legacy upstream replies paired with the shadow's (mirror mode): mismatch, missing or "
        "extra mean the new stack would have behaved differently.",
        "ops",
        [(rate("tcp_comm_shadow_comparisons_total", "result"), "{{result}}")],
    ), 10, 8)
    g.add(timeseries(
        "Shadow mismatch ratio",
        "Share of shadow comparisons that mismatched over 5 minutes: the dark launch's verdict "
        "before any real device moves.",
        "percentunit",
        [(rate("tcp_comm_shadow_comparisons_total", "instance", 'result="mismatch"')
          + " / " + rate("tcp_comm_shadow_comparisons_total", "instance"), "{{instance}}")],
        minimum=0,
    ), 7, 8)
    g.add(timeseries(
        "Shadow upstream connections lost per 5m",
        "Shadow upstream connections lost by reason (mirror mode): while they are down, "
        "comparisons count as uncompared.",
        "short",
        [(increase("tcp_comm_shadow_upstream_lost_total", "reason"), "{{reason}}")],
        minimum=0,
    ), 7, 8)

    # ---------------------------------------------------------------- Rollout
    g.row("Rollout")
    g.add(stat(
        "Restart required",
        "YES means the config file changes settings only a restart applies, so the running "
        "gateway is not what the file says.",
        "short",
        [("max by (instance) (%s)" % sel("tcp_comm_config_restart_required"), "{{instance}}")],
        thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}],
        mappings=[{"options": {"0": {"color": "green", "index": 0, "text": "no"},
                               "1": {"color": "orange", "index": 1, "text": "YES"}},
                   "type": "value"}],
    ), 6, 8)
    g.add(timeseries(
        "Config reloads per 5m by result",
        "Reloads (SIGHUP or a changed file): error means the file was invalid and the running "
        "configuration was kept.",
        "short",
        [(increase("tcp_comm_config_reloads_total", "result"), "{{result}}")],
        minimum=0,
    ), 9, 8)
    g.add(timeseries(
        "Routing decisions per second",
        "How new connections were routed and why (percent, forced, rollback), so you can see "
        "the canary taking effect.",
        "ops",
        [(rate("tcp_comm_routing_decisions_total", "transport, reason"),
          "{{transport}} {{reason}}")],
    ), 9, 8)
    g.add(timeseries(
        "Rollbacks per 5m by reason",
        "Times the rollback latch was set, by the SLO that tripped it or operator: the reason "
        "to look at first after a rollback.",
        "short",
        [(increase("tcp_comm_rollbacks_total", "reason"), "{{reason}}")],
        minimum=0,
    ), 12, 8)
    g.add(timeseries(
        "Rollback checks per 5m by result",
        "The rollback controller's checks of the new path: a run of fail leads to a rollback, "
        "inconclusive means too few new-path commands to judge.",
        "short",
        [(increase("tcp_comm_rollback_checks_total", "result"), "{{result}}")],
        minimum=0,
    ), 12, 8)

    return g.panels


def dashboard():
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "datasource": DS,
                    "enable": True,
                    "expr": "sum by (instance, reason) (increase(%s[1m])) > 0"
                    % sel("tcp_comm_rollbacks_total"),
                    "iconColor": "red",
                    "name": "Rollbacks",
                    "step": "1m",
                    "tagKeys": "instance,reason",
                    "textFormat": "rollback latch set on {{instance}}: {{reason}}",
                    "titleFormat": "Rollback",
                    "useValueForTime": False,
                },
                {
                    "datasource": DS,
                    "enable": True,
                    "expr": "max by (instance) (changes(%s[1m])) > 0"
                    % sel("tcp_comm_rollback_active"),
                    "iconColor": "orange",
                    "name": "Rollback latch changes",
                    "step": "1m",
                    "tagKeys": "instance",
                    "textFormat": "rollback latch set or cleared on {{instance}}",
                    "titleFormat": "Latch changed",
                    "useValueForTime": False,
                },
            ]
        },
        "description": "cync-gateway: canary rollout, SLOs, latency and reliability of the "
                       "legacy, new and shadow paths. Generated by scripts/gen-dashboard.py.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": build(),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["cync", "cync-gateway"],
        "templating": {
            "list": [
                {
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                    "type": "datasource",
                },
                {
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "datasource": DS,
                    "definition": "label_values(tcp_comm_ready, instance)",
                    "hide": 0,
                    "includeAll": True,
                    "label": "Instance",
                    "multi": True,
                    "name": "instance",
                    "options": [],
                    "query": "label_values(tcp_comm_ready, instance)",
                    "refresh": 2,
                    "regex": "",
                    "skipUrlSync": False,
                    "sort": 1,
                    "type": "query",
                },
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "Cync gateway",
        "uid": "cync-gateway",
        "version": 1,
        "weekStart": "",
    }


def render():
    return json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def main(argv):
    text = render()
    if argv[1:] == ["--check"]:
        try:
            with open(OUT, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            sys.stderr.write("%s is stale: run python3 scripts/gen-dashboard.py\n" % OUT)
            return 1
        return 0
    if argv[1:]:
        sys.stderr.write("usage: %s [--check]\n" % argv[0])
        return 2
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
