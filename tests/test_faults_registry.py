"""The promotion gate's audit trail under odd input (issue 16, item 6), on a real MLflow
tracking server: promoting the champion writes nothing, NaN/infinite/negative margins are
refused unless forced (and then recorded), and every decision and alias move is appended to a
trail that nothing rewrites and `promote.py show` prints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from geco import registry
from geco.errors import ConfigError

mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
METRIC = "valid_auc_1vs1"
GATE = dict(metric=METRIC, margin=0.1)


@pytest.fixture
def model(mlflow_server):
    """(uri, client, name, add): a fresh registered model on the server; add(value) registers
    a version tagged with `METRIC`=value (a plain run, no artifacts) and returns its number."""
    uri = mlflow_server.uri
    client = mlflow.MlflowClient(uri)
    name = f"gate-faults-{uuid.uuid4().hex[:8]}"
    exp = client.get_experiment_by_name("gate-faults") or client.get_experiment(
        client.create_experiment("gate-faults"))
    client.create_registered_model(name)

    def add(value: float) -> int:
        run = client.create_run(exp.experiment_id)
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/retriever",
                                         run_id=run.info.run_id, tags={METRIC: str(value)})
        return int(mv.version)

    return uri, client, name, add


def tags(client, name: str, version: int) -> dict[str, str]:
    return dict(client.get_model_version(name, str(version)).tags)


def champion(client, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


def history(tag_map: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tag_map.items() if k.startswith("gate.history.")}


def cli(uri: str, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "ray_jobs" / "promote.py"), *args,
                           "--tracking-uri", uri, "--model", name],
                          capture_output=True, text=True, timeout=120)


def test_promoting_the_champion_writes_nothing(model):
    uri, client, name, add = model
    v = add(0.6)
    assert registry.promote(uri, name, v, **GATE)["gate.decision"] == "accepted"
    before = tags(client, name, v)
    model_before = dict(client.get_registered_model(name).tags)

    d = registry.promote(uri, name, v, **GATE)
    assert d["gate.decision"] != "refused" and "already champion" in d["gate.reason"]
    assert d["champion"] == v
    r = cli(uri, name, "promote", "--version", str(v), "--margin", "0.5")
    assert r.returncode == 0, r.stderr
    assert "already champion" in json.loads(r.stdout)["gate.reason"]

    # Not one tag rewritten or added: the acceptance record stands as it was.
    assert tags(client, name, v) == before
    assert before["gate.decision"] == "accepted" and before["gate.champion"] == "none"
    assert dict(client.get_registered_model(name).tags) == model_before
    assert champion(client, name) == v


@pytest.mark.parametrize("margin", ["nan", "inf", "-0.1"])
def test_bad_margins_are_refused_unless_forced(model, margin):
    uri, client, name, add = model
    v1, v2 = add(0.6), add(0.5)
    registry.promote(uri, name, v1, **GATE)
    before = tags(client, name, v2)

    r = cli(uri, name, "promote", "--version", str(v2), "--margin", margin)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("geco: error: --margin=") and "--force" in r.stderr
    with pytest.raises(ConfigError, match="margin"):
        registry.promote(uri, name, v2, metric=METRIC, margin=float(margin))
    # From the config, the key is named instead.
    r = cli(uri, name, "promote", "--version", str(v2), f"tracking.gate_margin={margin}")
    assert r.returncode == 2 and "tracking.gate_margin" in r.stderr, r.stderr
    assert tags(client, name, v2) == before and champion(client, name) == v1


def test_a_forced_margin_is_recorded_and_never_called_beats(model):
    uri, client, name, add = model
    v1, v2 = add(0.6), add(0.5)
    registry.promote(uri, name, v1, **GATE)

    r = cli(uri, name, "promote", "--version", str(v2), "--margin", "-0.2", "--force")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gate.decision"] == "accepted" and out["gate.forced"] == "true"
    assert champion(client, name) == v2  # forced through: a worse model, and it says so
    assert "does not beat" in out["gate.reason"] and "forced margin -0.2" in out["gate.reason"]
    t = tags(client, name, v2)
    assert t["gate.forced"] == "true" and t["gate.margin"] == "-0.2"
    (record,) = [json.loads(x) for x in history(t).values()]
    assert record["forced"] is True and record["margin"] == -0.2
    assert (record["from_version"], record["to_version"]) == (v1, v2)

    # A forced NaN refuses (NaN compares false), recorded with its margin as a string.
    v3 = add(0.9)
    d = registry.promote(uri, name, v3, metric=METRIC, margin=math.nan, force=True)
    assert d["gate.decision"] == "refused" and d["gate.forced"] == "true"
    (record,) = [json.loads(x) for x in history(tags(client, name, v3)).values()]
    assert record["margin"] == "nan" and record["forced"] is True
    # An ordinary margin with --force forces nothing.
    d = registry.promote(uri, name, v3, metric=METRIC, margin=0.1, force=True)
    assert d["gate.decision"] == "accepted" and d["gate.forced"] == "false"


def test_every_decision_and_alias_move_is_appended_to_the_trail(model):
    uri, client, name, add = model
    v1, v2, v3 = add(0.6), add(0.5), add(0.8)

    registry.promote(uri, name, v1, **GATE)  # accepted: no champion yet
    registry.promote(uri, name, v2, **GATE)  # refused
    first = history(tags(client, name, v2))
    registry.promote(uri, name, v2, **GATE)  # the same refusal again: appended
    second = history(tags(client, name, v2))
    assert len(first) == 1 and len(second) == 2
    assert all(second[k] == value for k, value in first.items())  # the first kept as written
    registry.promote(uri, name, v3, **GATE)  # accepted: champion 1 -> 3
    assert registry.rollback(uri, name)["champion"] == v1  # champion 3 -> 1
    assert champion(client, name) == v1

    # The model's trail holds every event in order; nothing earlier was rewritten.
    model_trail = history(dict(client.get_registered_model(name).tags))
    assert set(second) <= set(model_trail)
    assert all(model_trail[k] == v for k, v in second.items())
    records = [json.loads(model_trail[k]) for k in sorted(model_trail)]
    assert [(r["action"], r["decision"], r["from_version"], r["to_version"])
            for r in records] == [("promote", "accepted", None, v1),
                                  ("promote", "refused", v1, v1),
                                  ("promote", "refused", v1, v1),
                                  ("promote", "accepted", v1, v3),
                                  ("rollback", "rolled back", v3, v1)]
    assert all(r["user"] and r["host"] and r["time"].endswith("Z") for r in records)
    assert records[3]["value"] == 0.8 and records[3]["champion_value"] == 0.6
    assert records[3]["margin"] == 0.1 and records[3]["forced"] is False
    # Each version holds the records that moved its alias (v1: made, replaced, restored).
    assert len(history(tags(client, name, v1))) == 3
    assert len(history(tags(client, name, v3))) == 2
    # The tags other code reads are still there.
    assert tags(client, name, v3)["gate.decision"] == "accepted"
    assert tags(client, name, v3)["gate.rolled_back_to"] == str(v1)
    assert registry.trail(uri, name) == records

    r = cli(uri, name, "show")
    assert r.returncode == 0, r.stderr
    assert f"version {v1}  aliases: champion" in r.stdout
    assert "gate.history." not in r.stdout  # the records are printed as the trail instead
    lines = r.stdout[r.stdout.index("trail of"):].splitlines()[1:]
    assert len(lines) == 5
    assert [line.split()[1] for line in lines] == ["promote"] * 4 + ["rollback"]
    assert f"champion {v3} -> {v1}" in lines[-1]  # newest last
    assert f"version {v2} refused: champion stays {v1}" in lines[1]
    assert f"champion {v1} -> {v3}" in lines[3] and "margin 0.1" in lines[3]
