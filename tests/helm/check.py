"""Chart, manifest, alert and dashboard checks for trackgate (run through tests/helm/check.sh).

Everything here uses the real tools: Helm v4's engine (helm-python-sdk), the Kubernetes OpenAPI
schemas (kubernetes-validate), the generated CRD's own schema, promtool, and a real Prometheus
server that parses every alert and dashboard expression. Prints one line per check and closes
with `N passed, M failed`.
"""

from __future__ import annotations

import copy
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

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.version import __version__ as kv_version

sys.path.insert(0, str(Path(__file__).resolve().parent))
# render.py is a sibling module, importable once the path is set.
import render  # noqa: E402
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
    """The RBAC table the operator documents at the top of operator/src/controller.rs
    (`//! | apiGroup | resources | verbs |`, core group written `""`), or None before it exists."""
    path = ROOT / "operator" / "src" / "controller.rs"
    if not path.exists():
        return None
    found: dict[tuple[str, str], set[str]] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.removeprefix("//!").strip().strip("|").split("|")]
        if not line.startswith("//! |") or len(cells) != 3 or cells[0] in ("apiGroup", "---"):
            continue
        group = re.sub(r"[`\"]|\(core\)", "", cells[0]).strip()
        verbs = re.sub(r"\(.*?\)", "", cells[2])
        for res in re.sub(r"[`]", "", cells[1]).split(","):
            found.setdefault((group, res.strip()), set()).update(
                v.strip() for v in verbs.split(",") if v.strip()
            )
    return found or None


# Verbs operator/src/controller.rs declares that no code path calls, so the chart leaves them
# out (least privilege): every write is a server-side apply (`patch`, plus `create` for the
# first apply) or a delete, status is written with patch_status, and kube-lease-manager 0.13
# only gets, creates and patches its Lease (src/state.rs).
DECLARED_NOT_CALLED: dict[tuple[str, str], set[str]] = {
    ("trackgate.dev", "trackerportpools/status"): {"update"},
    ("", "configmaps"): {"update"},
    ("", "services"): {"update"},
    ("apps", "deployments"): {"update"},
    ("policy", "poddisruptionbudgets"): {"update"},
    ("coordination.k8s.io", "leases"): {"list", "watch", "update"},
}


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
        assert granted[("trackgate.dev", "trackerportpools")] <= {"get", "list", "watch", "patch"}, (
            "pools are read, and patched only to clear the one-shot reallocate annotation"
        )
        assert ("coordination.k8s.io", "leases") in granted, "no Lease access for leader election"
        lease = re.search(r'LEASE_NAME: &str = "([^"]+)"', (ROOT / "operator" / "src" / "serve.rs").read_text())
        assert lease, "operator/src/serve.rs has no LEASE_NAME"
        for m in manifests:
            for rule in m.obj.get("rules", []) if m.kind == "Role" else []:
                names = rule.get("resourceNames")
                assert names in (None, [lease.group(1)]), f"Lease rule names {names}, operator uses {lease.group(1)}"

    runner.check("RBAC: no wildcards, no Secrets, events create/patch, pools read (+ annotation patch), the one Lease", least_privilege)

    declared = operator_verbs()
    if declared is None:
        runner.skip(
            "RBAC vs operator/src/controller.rs",
            "no RBAC table at the top of operator/src/controller.rs yet",
        )
        return

    def matches_operator() -> None:
        diff = []
        for key in sorted(set(declared) | set(granted)):
            want = declared.get(key, set()) - DECLARED_NOT_CALLED.get(key, set())
            have = granted.get(key, set())
            if want != have:
                diff.append(
                    f"{key[0] or 'core'}/{key[1]}: operator uses {sorted(want)}, chart grants {sorted(have)}"
                )
        assert not diff, "\n".join(diff)

    runner.check("RBAC grants the verbs operator/src/controller.rs declares (less those never called)", matches_operator)


def desired_source() -> str | None:
    """The source of the operator's desired objects (operator/src/desired/*.rs), or None."""
    files = sorted((ROOT / "operator" / "src" / "desired").glob("*.rs"))
    return "\n".join(f.read_text() for f in files) if files else None


def listener_pod_labels() -> dict[str, str] | None:
    """The labels the operator puts on listener pods, read from operator/src/desired/: the
    static `"app.kubernetes.io/...".to_owned(), "value"` pairs (any layout rustfmt picks), and the pool/shard label keys (value `*`),
    or None before the files exist."""
    text = desired_source()
    if text is None:
        return None
    pairs = re.findall(
        r'"(app\.kubernetes\.io/(?:name|component))"(?:\.to_owned\(\)|\.to_string\(\)|\.into\(\))?,\s*'
        r'"([^"]+)"',
        text,
    )
    labels = dict(pairs)
    for const in ("POOL_LABEL", "SHARD_LABEL"):
        m = re.search(rf'const {const}: &str = "([^"]+)"', text)
        if m:
            labels[m.group(1)] = "*"
    return labels or None


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

    def podmonitor_namespaces() -> None:
        sel = pm["spec"]["namespaceSelector"]
        assert sel == {"matchNames": ["fleet-a", "fleet-b"]}, f"metrics.podMonitor.namespaces gave {sel}"

    runner.check("Service/PodMonitor scrape port `admin` with the job names the alerts use", jobs_are_stable)
    runner.check("PodMonitor scrapes only the listed namespaces when some are listed", podmonitor_namespaces)
    runner.check("ServiceMonitor selects the operator Service", servicemonitor_selects_service)

    labels = listener_pod_labels()
    if labels is None:
        runner.skip("PodMonitor vs listener pod labels", "operator/src/desired/ has no listener labels yet")
        return

    def selects_listeners() -> None:
        sel = pm["spec"]["selector"]["matchLabels"]
        missing = {k: v for k, v in sel.items() if labels.get(k) != v}
        assert not missing, f"PodMonitor selects {missing}, desired.rs sets {labels}"
        (ep,) = pm["spec"]["podMetricsEndpoints"]
        sources = {r["targetLabel"]: r["sourceLabels"][0] for r in ep["relabelings"] if "sourceLabels" in r}
        for key, target in (("trackgate.dev/pool", "pool"), ("trackgate.dev/shard", "shard")):
            assert labels.get(key) == "*", f"desired.rs has no pod label {key}"
            meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            assert sources.get(target) == meta, f"{target} relabelled from {sources.get(target)}, want {meta}"

    runner.check("PodMonitor selector matches the listener pod labels of operator/src/desired/", selects_listeners)


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
        if runner.check(
            f"{path.relative_to(ROOT)} parses", lambda p=path, d=docs: d.extend(load_yaml_docs(p))
        ):
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

    schema = crd_schema()["properties"]["spec"]
    for path, obj in objects:
        if obj["kind"] == "TrackerPortPool":
            runner.check(
                f"{path.relative_to(ROOT)}: {obj['metadata']['name']} passes the CRD's CEL rules and list keys",
                lambda o=obj: _assert_admitted(schema, o["spec"]),
            )
    pools = [o for _, o in objects if o["kind"] == "TrackerPortPool" and o["spec"].get("devices")]
    assert pools, "no example pool with inline devices to mutate"
    for what, mutate, message in BAD_POOLS:
        spec = copy.deepcopy(pools[0]["spec"])
        mutate(spec)
        runner.check(
            f"the CRD's rules refuse {what}",
            lambda sp=spec, m=message: _assert_refused(schema, sp, m),
        )


# Mutations of an example pool the API server must refuse, with the message it must give.
BAD_POOLS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("an inverted port range", lambda s: s["ports"].update(start=6000, end=5000), "ports.start must not be greater"),
    ("a pinned port outside the range", lambda s: s["devices"].append({"imei": "490154203237518", "port": 7000}),
     "must lie inside spec.ports"),
    ("a pinned port that is excluded", lambda s: (s["ports"].update(exclude=[5077]),
     s["devices"].append({"imei": "490154203237518", "port": 5077})), "must not be listed in spec.ports.exclude"),
    ("NodePort outside 30000-32767", lambda s: s.update(exposure={"type": "NodePort"}), "node-port range"),
    ("gt06 settings on a teltonika pool", lambda s: s.update(protocol="teltonika", gt06={"utcOffsetMinutes": 480}),
     "spec.gt06 applies to protocol: gt06"),
    ("udp on a gt06 pool", lambda s: s.update(protocol="gt06", udp=True), "udp: true applies to protocol: teltonika"),
    ("a duplicate IMEI", lambda s: s["devices"].append(dict(s["devices"][0])), "duplicate"),
]


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Structural defaulting, as the API server does before it runs the CEL rules."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(schema["items"], item)


def admission_errors(schema: dict[str, Any], value: Any, path: str = "spec") -> list[str]:
    """What the API server's CEL rules (`x-kubernetes-validations`, evaluated with cel-python)
    and list keys (`x-kubernetes-list-type: map|set`) say about `value` on create. Transition
    rules (those naming `oldSelf`) are skipped: the API server runs them only on an update."""
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        try:
            ok = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as err:
            ok = err
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            errors.append(f"{path}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += admission_errors(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(i.get(k) for k in keys) if kind == "map" else json.dumps(i) for i in value]
        if kind in ("map", "set") and len(set(seen)) != len(seen):
            errors.append(f"{path}: duplicate entries in a list of type {kind}")
        for i, item in enumerate(value):
            errors += admission_errors(schema.get("items", {}), item, f"{path}[{i}]")
    return errors


def _assert_admitted(schema: dict[str, Any], spec: dict[str, Any]) -> None:
    spec = copy.deepcopy(spec)
    apply_defaults(schema, spec)
    errors = admission_errors(schema, spec)
    assert not errors, "\n".join(errors)


def _assert_refused(schema: dict[str, Any], spec: dict[str, Any], message: str) -> None:
    apply_defaults(schema, spec)
    errors = admission_errors(schema, spec)
    assert any(message in e for e in errors), f"not refused with '{message}': {errors or 'admitted'}"


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


def check_dashboard_layout(runner: Runner) -> None:
    """What Grafana would show wrong without complaining: clashing ids, panels off the 24-column
    grid or on top of each other, a panel bound to a fixed data source."""
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]

    def ids_unique() -> None:
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"duplicate panel ids {sorted(ids)}"
        assert dash["uid"] == "trackgate", "the uid is what links and provisioning refer to"

    def grid() -> None:
        cells: dict[tuple[int, int], str] = {}
        for p in panels:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"'{p['title']}' leaves the 24-column grid"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"'{p['title']}' overlaps '{cells[(x, y)]}'"
                    cells[(x, y)] = p["title"]

    def datasource_variable() -> None:
        fixed = [p["title"] for p in panels for t in p.get("targets", [])
                 if t.get("datasource", {}).get("uid") != "${datasource}"]
        assert not fixed, f"panels not on the $datasource variable: {fixed}"

    runner.check("dashboard: unique panel ids and uid `trackgate`", ids_unique)
    runner.check("dashboard: panels on the 24-column grid, none overlapping", grid)
    runner.check("dashboard: every query uses the $datasource variable", datasource_variable)


def grafana_to_promql(expr: str) -> str:
    """Grafana expands its variables before PromQL sees the query; do the same."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_promtool(runner: Runner, all_on: list[Manifest]) -> None:
    def promtool_rules(path: Path) -> None:
        out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
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
            out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
            problems = [
                line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "counter metrics should have \"_total\" suffix" not in line
            ]
            assert not problems, "\n".join(problems)

        runner.check("promtool check metrics accepts every charted metric name", promtool_metrics_names)


# Behaviour of each alert's expression on made-up series: which label sets it returns (the
# expression is wrapped as `(expr) * 0 + 1`, so only presence and labels are compared; `for:`
# is not applied). Cases: alert -> (input series, eval time, expected label sets).
L = 'namespace="trackers", pool="{pool}"'
ALERT_CASES: dict[str, tuple[list[tuple[str, str]], str, list[str]]] = {
    "TrackgateListenerDown": (
        [
            ('up{job="trackgate-listener", namespace="trackers", pod="a-0", pool="a", shard="0"}', "1 1 0 0"),
            ('up{job="trackgate-listener", namespace="trackers", pod="a-1", pool="a", shard="0"}', "1 1 1 1"),
            ('up{job="trackgate-operator", namespace="trackgate", pod="op-0"}', "0 0 0 0"),
        ],
        "3m",
        ['{job="trackgate-listener", namespace="trackers", pod="a-0", pool="a", shard="0"}'],
    ),
    "TrackgatePoolNoRecords": (
        [
            # stopped: records flat for the last 30 min
            (f'trackgate_listener_records_total{{{L.format(pool="stopped")}, codec="8", pod="s-0"}}', "0+10x120 1200x30"),
            # gone: the listener's series vanish (pods deleted)
            (f'trackgate_listener_records_total{{{L.format(pool="gone")}, codec="8", pod="g-0"}}', "0+10x120 _x30"),
            # healthy: still counting
            (f'trackgate_listener_records_total{{{L.format(pool="healthy")}, codec="8", pod="h-0"}}', "0+10x150"),
            # new: never had a record, so nothing to miss
            (f'trackgate_listener_records_total{{{L.format(pool="new")}, codec="8", pod="n-0"}}', "0x150"),
        ],
        "145m",
        ['{namespace="trackers", pool="gone"}', '{namespace="trackers", pool="stopped"}'],
    ),
    "TrackgatePublishErrors": (
        [
            (f'trackgate_listener_publish_errors_total{{{L.format(pool="a")}, reason="timeout", pod="a-0"}}', "0+5x20"),
            (f'trackgate_listener_publish_errors_total{{{L.format(pool="b")}, reason="timeout", pod="b-0"}}', "3x20"),
        ],
        "15m",
        ['{namespace="trackers", pool="a", reason="timeout"}'],
    ),
    "TrackgateDecodeErrorSpike": (
        [
            # a: 10% of frames malformed; b: 1%
            (f'trackgate_listener_frames_total{{{L.format(pool="a")}, codec="8", pod="a-0"}}', "0+600x30"),
            (f'trackgate_listener_decode_errors_total{{{L.format(pool="a")}, reason="crc", pod="a-0"}}', "0+60x30"),
            (f'trackgate_listener_frames_total{{{L.format(pool="b")}, codec="8", pod="b-0"}}', "0+600x30"),
            (f'trackgate_listener_decode_errors_total{{{L.format(pool="b")}, reason="crc", pod="b-0"}}', "0+6x30"),
        ],
        "20m",
        ['{namespace="trackers", pool="a"}'],
    ),
    "TrackgateConnectionsRejected": (
        [
            (f'trackgate_listener_connections_rejected_total{{{L.format(pool="a")}, shard="0", reason="limit", pod="a-0"}}', "0+1x20"),
        ],
        "15m",
        ['{namespace="trackers", pool="a", reason="limit"}'],
    ),
    "TrackgateCommandsExpiring": (
        [
            (f'trackgate_listener_commands_total{{{L.format(pool="a")}, status="expired", pod="a-0"}}', "0 0 1 1 1 1 1 1 1 1"),
            (f'trackgate_listener_commands_total{{{L.format(pool="b")}, status="answered", pod="b-0"}}', "0+5x10"),
        ],
        "8m",
        ['{namespace="trackers", pool="a"}'],
    ),
    "TrackgateAckSlow": (
        [
            # a: every ack between 2.5 s and +Inf... within the 2.5 s bucket but above 1 s
            (f'trackgate_listener_ack_delay_seconds_bucket{{{L.format(pool="a")}, pod="a-0", le="1"}}', "0x20"),
            (f'trackgate_listener_ack_delay_seconds_bucket{{{L.format(pool="a")}, pod="a-0", le="2.5"}}', "0+100x20"),
            (f'trackgate_listener_ack_delay_seconds_bucket{{{L.format(pool="a")}, pod="a-0", le="+Inf"}}', "0+100x20"),
            # b: every ack under 1 s
            (f'trackgate_listener_ack_delay_seconds_bucket{{{L.format(pool="b")}, pod="b-0", le="1"}}', "0+100x20"),
            (f'trackgate_listener_ack_delay_seconds_bucket{{{L.format(pool="b")}, pod="b-0", le="2.5"}}', "0+100x20"),
            (f'trackgate_listener_ack_delay_seconds_bucket{{{L.format(pool="b")}, pod="b-0", le="+Inf"}}', "0+100x20"),
        ],
        "15m",
        ['{namespace="trackers", pool="a"}'],
    ),
    "TrackgateOperatorDown": (
        [('up{job="trackgate-listener", namespace="trackers", pod="a-0"}', "1x10")],
        "5m",
        ["{}"],
    ),
    "TrackgateListenerNotReady": (
        [
            ('kube_deployment_spec_replicas{namespace="trackers", deployment="a-shard-0"}', "2x10"),
            ('kube_deployment_status_replicas_available{namespace="trackers", deployment="a-shard-0"}', "1x10"),
            ('kube_deployment_spec_replicas{namespace="trackers", deployment="a-shard-1"}', "2x10"),
            ('kube_deployment_status_replicas_available{namespace="trackers", deployment="a-shard-1"}', "2x10"),
            ('kube_deployment_spec_replicas{namespace="trackers", deployment="web"}', "2x10"),
            ('kube_deployment_status_replicas_available{namespace="trackers", deployment="web"}', "0x10"),
        ],
        "5m",
        ['{namespace="trackers", deployment="a-shard-0"}'],
    ),
    "TrackgateUnallocatedDevices": (
        [
            ('trackgate_operator_pool_devices{pool="full", state="unallocated", pod="op-0"}', "3x10"),
            ('trackgate_operator_pool_devices{pool="full", state="allocated", pod="op-0"}', "100x10"),
            ('trackgate_operator_pool_devices{pool="fine", state="unallocated", pod="op-0"}', "0x10"),
        ],
        "5m",
        ['{pool="full"}'],
    ),
    "TrackgateOperatorNoLeader": (
        [
            ('trackgate_operator_leader{job="trackgate-operator", pod="op-0"}', "1 1 0 0 0"),
            ('trackgate_operator_leader{job="trackgate-operator", pod="op-1"}', "0 0 0 0 0"),
        ],
        "4m",
        ["{}"],
    ),
    "TrackgateReconcileErrors": (
        [('trackgate_operator_reconcile_errors_total{reason="kube", pod="op-0"}', "0+1x20")],
        "15m",
        ['{reason="kube"}'],
    ),
}


def check_alert_behaviour(runner: Runner) -> None:
    exprs = dict(rule_exprs())
    with tempfile.TemporaryDirectory() as tmp:
        for alert, (series, at, want) in ALERT_CASES.items():
            expr = exprs.get(f"alert {alert}")
            if expr is None:
                runner.check(f"promtool test: {alert} exists", lambda a=alert: _fail(f"no alert {a}"))
                continue
            test = {
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": s, "values": v} for s, v in series],
                        "promql_expr_test": [
                            {
                                "expr": f"({expr.strip()}) * 0 + 1",
                                "eval_time": at,
                                "exp_samples": [{"labels": lbl, "value": 1} for lbl in want],
                            }
                        ],
                    }
                ],
            }
            path = Path(tmp) / f"{alert}.test.yaml"
            path.write_text(yaml.safe_dump(test, sort_keys=False))
            what = ", ".join(want) if want else "nothing"
            runner.check(
                f"promtool test rules: {alert} returns {what}",
                lambda p=path: _promtool(["test", "rules", str(p)]),
            )
    missing = {name.removeprefix("alert ") for name in exprs} - set(ALERT_CASES)
    for alert in sorted(missing):
        runner.check(f"promtool test: {alert} has a test case", lambda a=alert: _fail(f"add {a} to ALERT_CASES"))


def _promtool(args: list[str]) -> None:
    out = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr).strip()


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def check_prometheus_config(runner: Runner) -> None:
    """deploy/prometheus/prometheus.yml through `promtool check config`. Debian's Prometheus is
    built without Kubernetes service discovery, so its kubernetes_sd_configs are swapped for a
    static target first; the relabelling, the rule file and the rest are checked as written."""
    path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}

    def jobs_match_the_rules() -> None:
        used = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
        assert used <= jobs, f"rules use jobs {sorted(used - jobs)} the example config lacks"

    def promtool_accepts() -> None:
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
        config["rule_files"] = [str((path.parent / f).resolve()) for f in config["rule_files"]]
        with tempfile.TemporaryDirectory() as tmp:
            copy_path = Path(tmp) / "prometheus.yml"
            copy_path.write_text(yaml.safe_dump(config))
            _promtool(["check", "config", str(copy_path)])

    runner.check("deploy/prometheus/prometheus.yml defines the jobs the alerts select", jobs_match_the_rules)
    runner.check(
        "promtool check config deploy/prometheus/prometheus.yml (Kubernetes SD swapped for a static target)",
        promtool_accepts,
    )


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


# === The image ===


def check_dockerfile(runner: Runner, manifests: list[Manifest]) -> None:
    """No container engine runs here, so the Dockerfile is checked for what the chart and the
    operator rely on: the one binary, built locked, run as the uid the pods declare."""
    text = (ROOT / "Dockerfile").read_text()
    deploy = find(manifests, "Deployment", "-operator").obj
    chart_uid = deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    desired = desired_source() or ""

    def builds_the_binary() -> None:
        assert "cargo build --release --locked -p trackgate" in text, "build step changed"
        assert re.search(r'ENTRYPOINT \["/usr/local/bin/trackgate"\]', text), "entrypoint is not the binary"

    def same_uid_everywhere() -> None:
        user = re.findall(r"^USER (\d+)", text, re.MULTILINE)
        assert user == [str(chart_uid)], f"Dockerfile USER {user}, chart runAsUser {chart_uid}"
        listener = re.search(r'run_as_user:\s*Some\((\d+)\)|"runAsUser":\s*(\d+)', desired)
        uid = listener and (listener.group(1) or listener.group(2))
        assert uid and int(uid) == chart_uid, f"listener pods run as {uid}, the image as {chart_uid}"

    runner.check("Dockerfile builds `trackgate` --locked and runs it as the entrypoint", builds_the_binary)
    runner.check("image user = chart runAsUser = listener pods' runAsUser (operator/src/desired/)", same_uid_everywhere)


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

    def all_charted() -> None:
        dashboard = {re.sub(r"_(bucket|sum|count)$", "", n)
                     for n in re.findall(r"\btrackgate_[a-z0-9_]+", DASHBOARD.read_text())}
        uncharted = sorted(registered_names() - dashboard)
        assert not uncharted, "registered but on no dashboard panel: " + ", ".join(uncharted)

    runner.check("every metric the alerts and dashboard use is registered in the code", all_registered)
    runner.check("every metric the code registers has a dashboard panel", all_charted)


# === Main ===


def section(runner: Runner, fn: Callable[..., None], *args: Any) -> None:
    """Runs one group of checks; an error that escapes it (a file that does not parse, say)
    fails the group instead of ending the run."""
    try:
        fn(runner, *args)
    except Exception as err:
        runner.failed += 1
        print(f"FAIL {fn.__name__} stopped: {type(err).__name__}: {err}", flush=True)


def main() -> int:
    started = time.monotonic()
    runner = Runner()
    for tool in ("promtool", "prometheus"):
        if shutil.which(tool) is None:
            print(f"FAIL {tool} is not installed (Debian package `prometheus`)")
            runner.failed += 1
    print(f"helm-python-sdk {helm.__version__} (Helm SDK {helm.helm_sdk_version()}), "
          f"kubernetes-validate {kv_version}, Kubernetes schemas {KUBE_VERSION}")

    section(runner, check_lint)
    section(runner, check_values_schema)
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
        section(runner, check_contents, default, all_on)
        section(runner, check_operator, default, "defaults", 2)
        section(runner, check_operator, all_on, "all-on", 3)
        section(runner, check_rbac, default)
        section(runner, check_monitors, all_on)
        section(runner, check_embedded, all_on)
        section(runner, check_dockerfile, default)
        if shutil.which("promtool"):
            section(runner, check_promtool, all_on)
            section(runner, check_alert_behaviour)
            section(runner, check_prometheus_config)
    section(runner, check_generated)
    section(runner, check_examples)
    section(runner, check_metric_names)
    section(runner, check_dashboard_layout)
    if shutil.which("prometheus"):
        section(runner, check_promql)

    print(f"\nchart checks took {time.monotonic() - started:.1f}s (skipped: reasons above)")
    print(f"{runner.passed} passed, {runner.failed} failed, {len(runner.skipped)} skipped")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
