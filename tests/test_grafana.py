"""The Grafana dashboard and its provisioning, read as files: one InfluxQL datasource, InfluxQL queries
that every InfluxDB version answers, each filtered by the dashboard's time range and variables.

What the queries return, against what a real bridge wrote to a real InfluxDB, is
tests/test_dashboard_queries.py's job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "grafana" / "dashboards" / "fleet.json"
PROVISIONING = REPO / "grafana" / "provisioning"
_FLEET = '"fleet" =~ /^$fleet$/'
_DEVICE = '"device" =~ /^$device$/'


def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def test_dashboard_is_wired_to_the_provisioned_influxql_datasource() -> None:
    dashboard = board()
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert source["type"] == "influxdb" and source["jsonData"]["version"] == "InfluxQL"
    assert source["jsonData"]["dbName"] and source["jsonData"]["httpMode"] == "POST"
    used = {p["datasource"]["uid"] for p in dashboard["panels"]} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]
    }
    used |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    used |= {a["datasource"]["uid"] for a in dashboard["annotations"]["list"]}
    assert used == {source["uid"]}
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "edgefleet.yaml").read_text())["providers"]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "online",
        "inferences/s",
        "p95",
        "escalation rate",
        "agreement",
        "class mix",
        "drift",
        "outbox",
        "link",
    ):
        assert topic in titles, f"no panel about {topic}"
    assert "rollout" in titles and "budget" in titles and "improvement" in titles and "shadow" in titles
    assert len(dashboard["panels"]) == 17


def test_every_panel_query_is_raw_influxql_over_the_range_and_the_selection() -> None:
    for panel in board()["panels"]:
        for t in panel["targets"]:
            where, query = f"panel {panel['title']!r} {t['refId']}", t["query"]
            assert t.get("rawQuery") is True and t.get("resultFormat") == "time_series", where
            assert query.startswith("SELECT ") and "|>" not in query and "from(bucket" not in query, where
            assert len(re.findall(r'\bFROM "([a-z_]+)"', query)) == 1, f"{where}: one measurement"
            assert query.count("$timeFilter") == 1 and _FLEET in query, where
            # Rollouts and improvement loops are per fleet; everything else follows the device selection too.
            per_fleet = panel["title"] == "Rollout stages" or panel["title"].startswith(("Improvement", "Shadow"))
            assert (_DEVICE in query) != per_fleet, where
            if "GROUP BY time(" in query:
                assert query.endswith("fill(none)"), f"{where}: empty steps are not zeros"


def test_variables_list_tag_values_and_devices_follow_the_fleet() -> None:
    variables = {v["name"]: v for v in board()["templating"]["list"]}
    assert set(variables) == {"fleet", "device"}
    for v in variables.values():
        assert v["query"].startswith("SHOW TAG VALUES ") and f'WITH KEY = "{v["name"]}"' in v["query"]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*"
    assert "$fleet" not in variables["fleet"]["query"]
    assert variables["device"]["query"].endswith('WHERE "fleet" =~ /^$fleet$/')


def test_the_alert_annotation_selects_its_text_and_tag_columns() -> None:
    (annotation,) = board()["annotations"]["list"]
    t = annotation["target"]
    assert t["fromAnnotations"] is True and 'FROM "alert"' in t["query"] and "$timeFilter" in t["query"]
    assert _FLEET in t["query"] and _DEVICE in t["query"]
    selected = set(re.findall(r'"([a-z_]+)"', t["query"].split(" FROM ")[0]))
    assert {t["textColumn"], *t["tagsColumn"].split(",")} <= selected
