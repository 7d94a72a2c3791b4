"""Write deploy/k8s/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The Prometheus Operator reads alert rules from PrometheusRule objects, plain Prometheus from rule
files; both carry the same groups. Edit alerts.yml, then run

    python deploy/prometheus/render_prometheusrule.py

tests/ops/test_deploy.py fails while the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yml"
TARGET = HERE.parent / "k8s" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/prometheus/render_prometheusrule.py: the same
# alert groups for the Prometheus Operator. Edit alerts.yml and rerun the script; a test fails while
# the two differ. The Prometheus object must select this object (its ruleSelector; with
# kube-prometheus-stack e.g. the label `release: <release name>`, or
# prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule object holding ``alerts["groups"]``."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "segstream",
            "namespace": "segstream",
            "labels": {"app.kubernetes.io/name": "segstream"},
        },
        "spec": {"groups": alerts["groups"]},
    }


def render() -> str:
    alerts = yaml.safe_load(ALERTS.read_text())
    return HEADER + yaml.dump(prometheus_rule(alerts), Dumper=_Dumper, sort_keys=False, width=110)


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
