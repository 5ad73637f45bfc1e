"""Chart, manifest, alert and dashboard checks for trackgate (run through tests/helm/check.sh).

Everything here uses the real tools: Helm v4's engine (helm-python-sdk), the Kubernetes OpenAPI
schemas (kubernetes-validate), the generated CRD's own schema, promtool, and a real Prometheus
server that parses every alert and dashboard expression. Prints one line per check and closes
with `N passed, M failed`.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
from kubernetes_validate.version import __version__ as kv_version
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402  (sibling module, after the path set-up)
from render import CHART, ROOT, Manifest  # noqa: E402

# The Kubernetes minor the project builds against (k8s-openapi feature v1_33).
KUBE_VERSION = "1.33"
CRD_FILE = ROOT / "crds" / "trackerportpools.trackgate.dev.yaml"
CHART_CRD = CHART / "crds" / "trackerportpools.trackgate.dev.yaml"
RULES = CHART / "rules" / "trackgate.rules.yaml"
DASHBOARD = CHART / "dashboards" / "trackgate.json"
ALL_ON = Path(__file__).resolve().parent / "values-all-on.yaml"
EXAMPLES = ROOT / "deploy" / "examples"
REDIS = ROOT / "deploy" / "redis.yaml"
# Sources where the listener and operator register their metrics.
METRIC_SOURCES = [ROOT / "listener" / "src", ROOT / "operator" / "src", ROOT / "telemetry" / "src"]
# Kinds from other projects' CRDs (Prometheus Operator): their CRDs are not available offline.
FOREIGN_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com CRD schema is not shipped with any pinned package",
    "PodMonitor": "monitoring.coreos.com CRD schema is not shipped with any pinned package",
    "PrometheusRule": "monitoring.coreos.com CRD schema is not shipped with any pinned package; "
    "its rule groups are checked with promtool and Prometheus below",
}


# === Runner ===


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped: dict[str, str] = {}

    def check(self, name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
        except Exception as err:  # every failure is reported, the run goes on
            self.failed += 1
            msg = str(err) or type(err).__name__
            if not isinstance(err, (AssertionError, helm.HelmError, jsonschema.ValidationError)):
                msg = "".join(traceback.format_exception_only(type(err), err)).strip()
            print(f"FAIL {name}\n     {msg.replace(chr(10), chr(10) + '     ')}", flush=True)
            return False
        self.passed += 1
        print(f"ok   {name}", flush=True)
        return True

    def skip(self, what: str, reason: str) -> None:
        if what not in self.skipped:
            self.skipped[what] = reason
            print(f"skip {what}: {reason}", flush=True)


# === Helpers ===


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_on_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(ALL_ON.read_text())
    return values


def crd_schema() -> dict[str, Any]:
    crd = load_yaml_docs(CRD_FILE)[0]
    versions = [v for v in crd["spec"]["versions"] if v.get("storage")]
    assert versions, "CRD has no storage version"
    schema: dict[str, Any] = versions[0]["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: Any) -> Any:
    """A structural CRD schema as plain JSON Schema: `x-kubernetes-*` extensions dropped (CEL rules
    cannot be evaluated here), int-or-string made explicit."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    return out


def validate_object(obj: dict[str, Any], where: str, runner: Runner) -> None:
    kind = obj.get("kind", "")
    if kind in FOREIGN_KINDS:
        runner.skip(f"schema of {kind}", FOREIGN_KINDS[kind])
        return
    if obj.get("apiVersion", "").startswith("trackgate.dev/"):
        runner.check(
            f"{where}: {kind}/{obj['metadata']['name']} matches the CRD's openAPIV3Schema",
            lambda: validate_pool(obj),
        )
        return
    runner.check(
        f"{where}: {kind}/{obj.get('metadata', {}).get('name')} is a valid Kubernetes {KUBE_VERSION} object",
        lambda: kubernetes_validate.validate(obj, KUBE_VERSION, strict=True),
    )


def validate_pool(obj: dict[str, Any]) -> None:
    schema = to_json_schema(crd_schema())
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path)
    )
    if errors:
        raise AssertionError(
            "\n".join(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)
        )


def find(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [m for m in manifests if m.kind == kind and m.name.endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {len(found)}"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# === Chart structure ===


def check_lint(runner: Runner) -> None:
    def lint(values: dict[str, Any] | None) -> None:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [
            {"path": "", "error": e} for e in report["errors"]
        ]
        assert not problems, "\n".join(f"{p['path']}: {p['error']}" for p in problems)

    runner.check("helm lint --strict (defaults)", lambda: lint(None))
    runner.check("helm lint --strict (values-all-on.yaml)", lambda: lint(all_on_values()))


def check_values_schema(runner: Runner) -> None:
    bad = {
        "an unknown top-level key": {"replicaCount": 3},
        "a typo inside operator": {"operator": {"replica": 3}},
        "zero operator replicas": {"operator": {"replicas": 0}},
        "an invalid pull policy": {"image": {"pullPolicy": "Sometimes"}},
        "a malformed scrape interval": {"metrics": {"podMonitor": {"interval": "15 seconds"}}},
    }

    def refuses(values: dict[str, Any]) -> None:
        with helm.Chart.load(CHART) as chart:
            try:
                chart.validate_schema(chart.merge_values(values))
            except helm.HelmValuesError:
                return
        raise AssertionError(f"values.schema.json accepted {values}")

    for what, values in bad.items():
        runner.check(f"values.schema.json refuses {what}", lambda v=values: refuses(v))


def check_contents(runner: Runner, default: list[Manifest], all_on: list[Manifest]) -> None:
    optional = {"NetworkPolicy", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    always = {
        "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
        "RoleBinding", "Service", "Deployment", "PodDisruptionBudget",
    }

    def defaults_are_minimal() -> None:
        kinds = {m.kind for m in default}
        assert always <= kinds, f"missing {sorted(always - kinds)}"
        assert not kinds & optional, f"optional kinds on by default: {sorted(kinds & optional)}"
        assert not any(m.kind == "ConfigMap" for m in default), "dashboard ConfigMap on by default"

    def all_on_has_everything() -> None:
        kinds = {m.kind for m in all_on}
        assert always | optional <= kinds, f"missing {sorted((always | optional) - kinds)}"
        cm = find(all_on, "ConfigMap", "-dashboard")
        assert cm.obj["metadata"]["labels"].get("grafana_dashboard") == "1", "no grafana_dashboard label"
        assert cm.obj["metadata"]["namespace"] == "monitoring", "dashboards.namespace ignored"

    def crd_copy_is_exact() -> None:
        crds = [m for m in default if m.kind == "CustomResourceDefinition"]
        assert len(crds) == 1, f"expected one CRD, got {len(crds)}"
        assert CHART_CRD.read_text() == CRD_FILE.read_text(), (
            "charts/trackgate/crds/ differs from crds/: run `make generate`"
        )
        assert crds[0].name == "trackerportpools.trackgate.dev"

    runner.check("defaults render the operator only (monitoring, dashboard, NetworkPolicy off)", defaults_are_minimal)
    runner.check("values-all-on.yaml renders every optional object", all_on_has_everything)
    runner.check("chart CRD is an exact copy of crds/ and Helm loads it from crds/", crd_copy_is_exact)


def check_operator(runner: Runner, manifests: list[Manifest], where: str, replicas: int) -> None:
    deploy = find(manifests, "Deployment", "-operator").obj
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    def shape() -> None:
        assert deploy["spec"]["replicas"] == replicas, f"replicas {deploy['spec']['replicas']}"
        assert container["args"] == ["operator", "--admin-addr", "0.0.0.0:8080"], container["args"]
        env = {e["name"]: e for e in container["env"]}
        assert env["TRACKGATE_IMAGE"]["value"] == container["image"], "TRACKGATE_IMAGE is not the operator's image"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"admin": 8080}, ports
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}

    def restricted() -> None:
        # Pod Security Standards "restricted", plus a read-only root filesystem.
        sc = container["securityContext"]
        psc = pod["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0
        for ctx in (sc, psc):
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork") and not pod.get("hostPID")

    def pdb_selects_operator() -> None:
        pdb = find(manifests, "PodDisruptionBudget", "-operator").obj
        assert pdb["spec"]["selector"] == deploy["spec"]["selector"], "PDB selector differs"

    runner.check(f"{where}: operator Deployment args, env, ports and probes", shape)
    runner.check(f"{where}: operator pods run restricted (non-root, read-only, drop ALL, RuntimeDefault)", restricted)
    runner.check(f"{where}: PDB selects the operator pods", pdb_selects_operator)


def operator_verbs() -> dict[tuple[str, str], set[str]] | None:
    """The verbs the operator declares at the top of operator/src/controller.rs, as
    `// rbac: <group>/<resource>: verb, verb` lines (core group: empty), or None before it exists."""
    path = ROOT / "operator" / "src" / "controller.rs"
    if not path.exists():
        return None
    found: dict[tuple[str, str], set[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*//[!/]?\s*rbac:\s*([\w.-]*)/([\w/-]+)\s*:\s*(.+)$", line)
        if m:
            verbs = {v.strip().strip("`") for v in re.split(r"[,\s]+", m.group(3)) if v.strip()}
            found.setdefault((m.group(1), m.group(2)), set()).update(verbs)
    return found or None


def chart_verbs(manifests: list[Manifest]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for m in manifests:
        if m.kind not in ("ClusterRole", "Role"):
            continue
        for rule in m.obj["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def check_rbac(runner: Runner, manifests: list[Manifest]) -> None:
    granted = chart_verbs(manifests)

    def least_privilege() -> None:
        for (group, res), verbs in granted.items():
            assert "*" not in verbs and res != "*" and group != "*", f"wildcard in {group}/{res}"
            assert res not in ("secrets", "pods/exec", "nodes"), f"operator must not touch {res}"
        assert granted[("events.k8s.io", "events")] == {"create", "patch"}, "events: create, patch only"
        assert granted[("trackgate.dev", "trackerportpools")] <= {"get", "list", "watch"}, (
            "pools are read-only; only their status is written"
        )
        assert ("coordination.k8s.io", "leases") in granted, "no Lease access for leader election"

    runner.check("RBAC: no wildcards, no Secrets, events create/patch, pools read-only", least_privilege)

    declared = operator_verbs()
    if declared is None:
        runner.skip(
            "RBAC vs operator/src/controller.rs",
            "no `// rbac: group/resource: verbs` lines in operator/src/controller.rs yet",
        )
        return

    def matches_operator() -> None:
        diff = []
        for key in sorted(set(declared) | set(granted)):
            want, have = declared.get(key, set()), granted.get(key, set())
            if want != have:
                diff.append(
                    f"{key[0] or 'core'}/{key[1]}: operator uses {sorted(want)}, chart grants {sorted(have)}"
                )
        assert not diff, "\n".join(diff)

    runner.check("RBAC grants exactly the verbs operator/src/controller.rs declares", matches_operator)


def listener_pod_labels() -> dict[str, str] | None:
    """The static labels the operator puts on listener pods, read from operator/src/desired.rs
    (`("app.kubernetes.io/...", "value")` pairs), or None before it exists."""
    path = ROOT / "operator" / "src" / "desired.rs"
    if not path.exists():
        return None
    text = path.read_text()
    pairs = re.findall(r'"(app\.kubernetes\.io/(?:name|component))"\s*(?:\.to_string\(\)|\.into\(\)|\.to_owned\(\))?\s*,\s*"([^"]+)"', text)
    return dict(pairs) or None


def check_monitors(runner: Runner, manifests: list[Manifest]) -> None:
    pm = find(manifests, "PodMonitor").obj
    sm = find(manifests, "ServiceMonitor").obj

    def jobs_are_stable() -> None:
        for obj, job in ((pm, "trackgate-listener"), (sm, "trackgate-operator")):
            key = "podMetricsEndpoints" if obj["kind"] == "PodMonitor" else "endpoints"
            (ep,) = obj["spec"][key]
            assert ep["port"] == "admin", ep["port"]
            jobs = [r["replacement"] for r in ep["relabelings"] if r.get("targetLabel") == "job"]
            assert jobs == [job], f"{obj['kind']} job relabel {jobs}, alerts expect {job}"

    def servicemonitor_selects_service() -> None:
        svc = find(manifests, "Service", "-operator").obj
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert [p["name"] for p in svc["spec"]["ports"]] == ["admin"]

    runner.check("Service/PodMonitor scrape port `admin` with the job names the alerts use", jobs_are_stable)
    runner.check("ServiceMonitor selects the operator Service", servicemonitor_selects_service)

    labels = listener_pod_labels()
    if labels is None:
        runner.skip("PodMonitor vs listener pod labels", "operator/src/desired.rs has no listener labels yet")
        return

    def selects_listeners() -> None:
        sel = pm["spec"]["selector"]["matchLabels"]
        missing = {k: v for k, v in sel.items() if labels.get(k) != v}
        assert not missing, f"PodMonitor selects {missing}, desired.rs sets {labels}"

    runner.check("PodMonitor selector matches the listener pod labels of operator/src/desired.rs", selects_listeners)


def check_embedded(runner: Runner, manifests: list[Manifest]) -> None:
    def rule_groups_verbatim() -> None:
        pr = find(manifests, "PrometheusRule").obj
        assert pr["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]

    def dashboard_verbatim() -> None:
        cm = find(manifests, "ConfigMap", "-dashboard").obj
        assert json.loads(cm["data"]["trackgate.json"]) == json.loads(DASHBOARD.read_text())

    runner.check("PrometheusRule carries rules/trackgate.rules.yaml verbatim", rule_groups_verbatim)
    runner.check("dashboard ConfigMap carries dashboards/trackgate.json verbatim", dashboard_verbatim)


def check_generated(runner: Runner) -> None:
    pairs = {
        "deploy/alerts/trackgate.rules.yaml": RULES,
        "deploy/dashboards/trackgate.json": DASHBOARD,
    }
    for copy_path, source in pairs.items():
        runner.check(
            f"{copy_path} is a copy of {source.relative_to(ROOT)}",
            lambda c=copy_path, s=source: _same(ROOT / c, s.read_text()),
        )
    runner.check(
        "deploy/rendered/trackgate.yaml equals a fresh render",
        lambda: _same(ROOT / "deploy" / "rendered" / "trackgate.yaml", render.rendered_default()),
    )


def _same(path: Path, want: str) -> None:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `make generate`"
    assert path.read_text() == want, f"{path.relative_to(ROOT)} drifted: run `make generate`"


# === deploy/ examples ===


def check_examples(runner: Runner) -> None:
    files = sorted(EXAMPLES.glob("*.yaml")) + [REDIS]
    assert files, "no examples"
    objects: list[tuple[Path, dict[str, Any]]] = []
    for path in files:
        docs: list[dict[str, Any]] = []
        if runner.check(f"{path.relative_to(ROOT)} parses", lambda p=path: docs.extend(load_yaml_docs(p))):
            objects += [(path, d) for d in docs]
    for path, obj in objects:
        validate_object(obj, str(path.relative_to(ROOT)), runner)

    def references_resolve() -> None:
        have = {(p.name, o["kind"], o["metadata"]["name"]) for p, o in objects}
        missing = []
        for path, obj in objects:
            if obj["kind"] != "TrackerPortPool":
                continue
            for ref in _config_map_refs(obj["spec"]):
                if (path.name, "ConfigMap", ref) not in have:
                    missing.append(f"{path.name}: ConfigMap {ref}")
        assert not missing, "pools name ConfigMaps their file does not define: " + ", ".join(missing)

    runner.check("every ConfigMap a pool's devicesFrom names is in the same file", references_resolve)
    runner.skip(
        "CEL rules of the examples",
        "x-kubernetes-validations need an API server or kube's `cel` feature (the api crate's tests)",
    )


def _config_map_refs(spec: dict[str, Any]) -> Iterator[str]:
    """The ConfigMaps a pool reads its devices from (`spec.devicesFrom[].configMap`)."""
    for source in spec.get("devicesFrom", []):
        yield source["configMap"]


# === Alerts and dashboards against the real tools ===


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel '{p['title']}' {t['refId']}", t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        out.append((f"variable ${var['name']}", m.group(1) if m else query))
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana expands its variables before PromQL sees the query; do the same."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_promtool(runner: Runner, all_on: list[Manifest]) -> None:
    def promtool_rules(path: Path) -> None:
        out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, (out.stdout + out.stderr).strip()

    runner.check(f"promtool check rules {RULES.relative_to(ROOT)}", lambda: promtool_rules(RULES))
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "prometheusrule-spec.yaml"
        rendered.write_text(yaml.safe_dump(find(all_on, "PrometheusRule").obj["spec"]))
        runner.check("promtool check rules (the rendered PrometheusRule's spec)", lambda: promtool_rules(rendered))

        def promtool_metrics_names() -> None:
            # promtool lints rule files but not dashboards: ask it about the names we chart.
            names = sorted(metric_names())
            text = "".join(f"# HELP {n} x\n# TYPE {n} untyped\n{n} 1\n" for n in names)
            out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            problems = [
                line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "counter metrics should have \"_total\" suffix" not in line
            ]
            assert not problems, "\n".join(problems)

        runner.check("promtool check metrics accepts every charted metric name", promtool_metrics_names)


class Prometheus:
    """A throw-away Prometheus on a free loopback port, loading our rule file."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1m"}, "rule_files": [str(RULES)]}))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}: see its log")
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus not ready after 30 s")

    def query(self, expr: str) -> None:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        assert body.get("status") == "success", f"{body.get('errorType')}: {body.get('error')}\n{expr}"

    def loaded_rules(self) -> int:
        with urllib.request.urlopen(f"{self.base}/api/v1/rules", timeout=10) as r:
            body = json.load(r)
        return sum(len(g["rules"]) for g in body["data"]["groups"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def check_promql(runner: Runner) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prom = Prometheus(Path(tmp))
        try:
            if not runner.check(f"Prometheus starts with {RULES.name} loaded", prom.wait_ready):
                print((Path(tmp) / "prometheus.log").read_text()[-2000:])
                return
            want = len(rule_exprs())
            runner.check(
                f"Prometheus loaded all {want} alert rules",
                lambda: _eq(prom.loaded_rules(), want, "rules loaded"),
            )
            for what, expr in rule_exprs():
                runner.check(f"PromQL parses: {what}", lambda e=expr: prom.query(e))
            for what, expr in dashboard_exprs():
                runner.check(f"PromQL parses: dashboard {what}", lambda e=expr: prom.query(grafana_to_promql(e)))
        finally:
            prom.stop()


def _eq(got: Any, want: Any, what: str) -> None:
    assert got == want, f"{what}: got {got}, want {want}"


# === Metric names against the code ===


def metric_names() -> set[str]:
    """Every trackgate_* metric the alerts and the dashboard use, without histogram suffixes."""
    text = RULES.read_text() + DASHBOARD.read_text()
    names = set(re.findall(r"\btrackgate_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def registered_names() -> set[str]:
    found: set[str] = set()
    for src in METRIC_SOURCES:
        for path in src.rglob("*.rs") if src.exists() else []:
            found |= set(re.findall(r'"(trackgate_[a-z0-9_]+)"', path.read_text()))
    return found


def check_metric_names(runner: Runner) -> None:
    def all_registered() -> None:
        unknown = sorted(metric_names() - registered_names())
        assert not unknown, (
            "charted but not registered by listener/operator/telemetry: " + ", ".join(unknown)
        )

    runner.check("every metric the alerts and dashboard use is registered in the code", all_registered)


# === Main ===


def main() -> int:
    started = time.monotonic()
    runner = Runner()
    for tool in ("promtool", "prometheus"):
        if shutil.which(tool) is None:
            print(f"FAIL {tool} is not installed (Debian package `prometheus`)")
            runner.failed += 1
    print(f"helm-python-sdk {helm.__version__} (Helm SDK {helm.helm_sdk_version()}), "
          f"kubernetes-validate {kv_version}, Kubernetes schemas {KUBE_VERSION}")

    check_lint(runner)
    check_values_schema(runner)
    default: list[Manifest] = []
    all_on: list[Manifest] = []
    runner.check("helm template (defaults)", lambda: default.extend(render.render()))
    runner.check(
        "helm template -f values-all-on.yaml",
        lambda: all_on.extend(render.render(all_on_values(), name="gps", namespace="platform")),
    )
    if default and all_on:
        for m in default:
            validate_object(m.obj, "defaults", runner)
        for m in all_on:
            validate_object(m.obj, "all-on", runner)
        check_contents(runner, default, all_on)
        check_operator(runner, default, "defaults", replicas=2)
        check_operator(runner, all_on, "all-on", replicas=3)
        check_rbac(runner, default)
        check_monitors(runner, all_on)
        check_embedded(runner, all_on)
        if shutil.which("promtool"):
            check_promtool(runner, all_on)
    check_generated(runner)
    check_examples(runner)
    check_metric_names(runner)
    if shutil.which("prometheus"):
        check_promql(runner)

    print(f"\nchart checks took {time.monotonic() - started:.1f}s (skipped: reasons above)")
    print(f"{runner.passed} passed, {runner.failed} failed, {len(runner.skipped)} skipped")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
