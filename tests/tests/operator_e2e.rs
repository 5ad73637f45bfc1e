//! End to end against the cluster in `KUBECONFIG`: the CRD, the real `trackgate operator`
//! binary, the pools of `deploy/examples/`. Skips (and passes) with a message when there is no
//! reachable cluster or no `kubectl`. How to run it against kind or k3d: `tests/README.md`.
//!
//! It checks what the API server and the operator do, not the listener pods' readiness (the
//! image may not be loadable into the test cluster): children created and owned, status
//! written, an edit reaching only its shard's allocation table, deletion cleaning up through
//! owner references, and a bad pool refused by the CRD's schema and CEL rules. The second test
//! runs the operator as the chart's ServiceAccount (RBAC from `deploy/rendered/`, a token from
//! `kubectl create token`) and checks that no device ever loses its port: a deleted shard
//! ConfigMap, a scaled Deployment, a node-port collision, a `portsPerShard` change and an
//! operator restart. It never waits for pods (the cluster may have no nodes).
//!
//! The tests share the cluster's pools (each operator watches every namespace), so they
//! take turns.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use trackgate_tests::{free_port, trackgate_binary, which, workspace_root};

const WAIT: Duration = Duration::from_secs(90);

/// One operator at a time: both would reconcile every pool of the cluster.
static CLUSTER: Mutex<()> = Mutex::new(());

/// Why the suite cannot run here, or `None` when a cluster answers.
fn skip_reason() -> Option<String> {
    if std::env::var_os("KUBECONFIG").is_none() {
        return Some("KUBECONFIG is unset".into());
    }
    if which("kubectl").is_none() {
        return Some("kubectl is not installed".into());
    }
    match Command::new("kubectl")
        .args(["version", "--request-timeout=5s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some("the cluster in KUBECONFIG is unreachable".into()),
    }
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .expect("run kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kubectl_ok(args: &[&str]) -> String {
    let (ok, text) = kubectl(args);
    assert!(ok, "kubectl {}: {text}", args.join(" "));
    text
}

fn kubectl_stdin(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("kubectl output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn get_json(ns: &str, what: &[&str]) -> Value {
    let mut args = vec!["-n", ns, "get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&kubectl_ok(&args)).expect("kubectl json")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A namespace deleted (with everything in it) on drop.
struct TempNamespace(String);

impl TempNamespace {
    fn create(suffix: &str) -> Self {
        let name = format!("trackgate-e2e-{}{suffix}", std::process::id());
        kubectl_ok(&["create", "namespace", &name]);
        Self(name)
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.0, "--wait=false"]);
    }
}

/// The operator binary, killed on drop.
struct Operator(Child);

impl Operator {
    fn start(ns: &str) -> Self {
        Self::start_with(ns, None, Stdio::null())
    }

    /// With `kubeconfig` instead of the test's own, and its output to `log`.
    fn start_with(ns: &str, kubeconfig: Option<&std::path::Path>, log: Stdio) -> Self {
        let mut cmd = Command::new(trackgate_binary());
        cmd.args([
            "operator",
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .env("POD_NAMESPACE", ns)
        .env("POD_NAME", format!("e2e-{}", std::process::id()))
        .env("TRACKGATE_IMAGE", "ghcr.io/trackgate/trackgate:e2e")
        .stdout(log);
        if let Some(path) = kubeconfig {
            cmd.env("KUBECONFIG", path);
        }
        Self(cmd.spawn().expect("start trackgate operator"))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every pool of `deploy/examples/`: (name, file).
fn example_pools() -> Vec<(String, PathBuf)> {
    let dir = workspace_root().join("deploy/examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/examples").flatten() {
        let path = entry.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.extension().is_some_and(|e| e == "yaml") && text.contains("kind: TrackerPortPool") {
            let name = text
                .lines()
                .skip_while(|l| l.trim_end() != "kind: TrackerPortPool")
                .skip_while(|l| !l.starts_with("metadata:"))
                .find_map(|l| l.trim().strip_prefix("name: "))
                .expect("pool name")
                .trim()
                .to_owned();
            out.push((name, path));
        }
    }
    out.sort();
    out
}

#[test]
fn operator_serves_the_example_pools() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP operator_e2e: {why}. See tests/README.md to run it against kind or k3d.");
        return;
    }
    let root = workspace_root();
    let crd = root.join("crds/trackerportpools.trackgate.dev.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", crd.to_str().expect("path")]);
    kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "crd/trackerportpools.trackgate.dev",
        "--timeout=60s",
    ]);
    let _turn = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let ns = TempNamespace::create("");
    let ns = ns.0.as_str();
    kubectl_ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "trackgate-redis",
        "--from-literal=url=redis://redis:6379/0",
    ]);
    let _operator = Operator::start(ns);

    let pools = example_pools();
    assert!(
        !pools.is_empty(),
        "deploy/examples/ holds no TrackerPortPool"
    );
    for (_, file) in &pools {
        kubectl_ok(&["-n", ns, "apply", "-f", file.to_str().expect("path")]);
    }

    // children and status
    for (pool, _) in &pools {
        wait_until(&format!("status of {pool}"), || {
            let p = get_json(ns, &["tpp", pool]);
            p["status"]["observedGeneration"] == p["metadata"]["generation"]
                && p["status"]["devices"].as_u64().unwrap_or(0) > 0
        });
        let p = get_json(ns, &["tpp", pool]);
        let shards = p["status"]["shards"].as_array().map_or(0, Vec::len);
        assert!(shards > 0, "{pool}: no shard in status: {}", p["status"]);
        // shard objects only: the allocation record carries the pool label but no shard label
        let selector = format!("trackgate.dev/pool={pool},trackgate.dev/shard");
        for kind in ["configmaps", "deployments", "poddisruptionbudgets"] {
            let items = get_json(ns, &[kind, "-l", &selector]);
            let n = items["items"].as_array().map_or(0, Vec::len);
            assert_eq!(n, shards, "{pool}: {kind}");
            let owner = &items["items"][0]["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "TrackerPortPool");
            assert_eq!(owner["name"].as_str(), Some(pool.as_str()));
        }
        if p["spec"]["exposure"]["type"] != "HostNetwork" {
            let n = get_json(ns, &["services", "-l", &selector])["items"]
                .as_array()
                .map_or(0, Vec::len);
            assert_eq!(n, shards, "{pool}: services");
        }
    }

    // an edit: one more device in the first dedicated pool lands in its allocation table
    let (pool, _) = pools
        .iter()
        .find(|(name, _)| get_json(ns, &["tpp", name])["spec"]["mode"] == "dedicated")
        .expect("a dedicated example pool");
    let before = get_json(ns, &["tpp", pool])["status"]["devices"]
        .as_u64()
        .unwrap_or(0);
    kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "tpp",
        pool,
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/spec/devices/-","value":{"imei":"358000000000001"}}]"#,
    ]);
    wait_until("the new device's port", || {
        get_json(
            ns,
            &[
                "configmaps",
                "-l",
                &format!("trackgate.dev/pool={pool},trackgate.dev/shard"),
            ],
        )["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|cm| {
                cm["data"]["allocation.txt"]
                    .as_str()
                    .is_some_and(|t| t.contains("358000000000001 "))
            })
    });
    wait_until("status after the edit", || {
        get_json(ns, &["tpp", pool])["status"]["devices"].as_u64() == Some(before + 1)
    });

    // a bad pool is refused by the API server with a readable message
    let bad = format!(
        "apiVersion: trackgate.dev/v1alpha1\nkind: TrackerPortPool\nmetadata: {{name: bad, namespace: {ns}}}\n\
         spec:\n  ports: {{start: 6000, end: 5000}}\n  devices: [{{imei: \"356307042441013\", port: 7000}}]\n\
         \x20 redis: {{urlSecretRef: {{name: trackgate-redis}}}}\n"
    );
    let (ok, text) = kubectl_stdin(&["apply", "-f", "-"], &bad);
    assert!(!ok, "a bad pool was accepted");
    assert!(
        text.contains("ports.start must not be greater than ports.end"),
        "{text}"
    );
    let dup = format!(
        "apiVersion: trackgate.dev/v1alpha1\nkind: TrackerPortPool\nmetadata: {{name: dup, namespace: {ns}}}\n\
         spec:\n  ports: {{start: 5000, end: 5010}}\n  devices: [{{imei: \"356307042441013\"}}, {{imei: \"356307042441013\"}}]\n\
         \x20 redis: {{urlSecretRef: {{name: trackgate-redis}}}}\n"
    );
    let (ok, text) = kubectl_stdin(&["apply", "-f", "-"], &dup);
    assert!(!ok, "duplicate IMEIs were accepted: {text}");

    // deletion: owner references take the children with the pool
    kubectl_ok(&["-n", ns, "delete", "tpp", pool, "--wait=true"]);
    wait_until("children garbage-collected", || {
        get_json(
            ns,
            &[
                "configmaps,deployments",
                "-l",
                &format!("trackgate.dev/pool={pool}"),
            ],
        )["items"]
            .as_array()
            .is_none_or(Vec::is_empty)
    });
}

// === ports are never lost, as the chart's ServiceAccount ===

/// The rendered chart's RBAC (ServiceAccount, ClusterRole and bindings, leader-election Role),
/// moved into `ns` and renamed per run so a real install in the cluster is left alone.
fn chart_rbac(ns: &str) -> (String, String) {
    let text = std::fs::read_to_string(workspace_root().join("deploy/rendered/trackgate.yaml"))
        .expect("deploy/rendered/trackgate.yaml");
    let suffix = format!("-e2e-{}", std::process::id());
    let mut sa = String::new();
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let Ok(mut v) = <Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "ServiceAccount" => {
                sa = v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                v["metadata"]["namespace"] = ns.into();
            }
            "Role" | "RoleBinding" => v["metadata"]["namespace"] = ns.into(),
            "ClusterRole" | "ClusterRoleBinding" => {
                let name = format!(
                    "{}{suffix}",
                    v["metadata"]["name"].as_str().unwrap_or_default()
                );
                v["metadata"]["name"] = name.into();
            }
            _ => continue,
        }
        if kind == "ClusterRoleBinding" {
            let role = format!(
                "{}{suffix}",
                v["roleRef"]["name"].as_str().unwrap_or_default()
            );
            v["roleRef"]["name"] = role.into();
        }
        if let Some(subjects) = v["subjects"].as_array_mut() {
            for s in subjects {
                s["namespace"] = ns.into();
            }
        }
        docs.push(v);
    }
    assert!(!sa.is_empty(), "no ServiceAccount in the rendered chart");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs});
    (sa, list.to_string())
}

/// A kubeconfig for the current cluster that authenticates with `token` only.
fn kubeconfig_with_token(token: &str, dir: &std::path::Path) -> PathBuf {
    let current: Value = serde_json::from_str(&kubectl_ok(&[
        "config", "view", "--raw", "--minify", "-o", "json",
    ]))
    .expect("kubeconfig json");
    let cluster = current["clusters"][0]["cluster"].clone();
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "operator"}}],
        "current-context": "e2e",
    });
    let path = dir.join("kubeconfig.json");
    std::fs::write(&path, config.to_string()).expect("write kubeconfig");
    path
}

/// The pool's record table: `imei port` lines, sorted.
fn record_table(ns: &str, pool: &str) -> Vec<String> {
    let (ok, text) = kubectl(&[
        "-n",
        ns,
        "get",
        "configmap",
        &format!("{pool}-allocation"),
        "-o",
        "json",
    ]);
    if !ok {
        return Vec::new();
    }
    let cm: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let mut lines: Vec<String> = cm["data"]["allocation.txt"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn condition(ns: &str, pool: &str, type_: &str) -> (String, String, String) {
    let p = get_json(ns, &["tpp", pool]);
    p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("status"), s("reason"), s("message"))
        })
        .unwrap_or_default()
}

fn is_settled(ns: &str, pool: &str) -> bool {
    let p = get_json(ns, &["tpp", pool]);
    p["status"]["observedGeneration"] == p["metadata"]["generation"]
        && condition(ns, pool, "Degraded").0 == "False"
}

fn exists(ns: &str, what: &str) -> bool {
    kubectl(&["-n", ns, "get", what, "-o", "name"]).0
}

#[test]
fn operator_keeps_every_port_heals_drift_and_reports_collisions() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP operator_e2e: {why}. See tests/README.md to run it against kind or k3d.");
        return;
    }
    let _turn = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let crd = workspace_root().join("crds/trackerportpools.trackgate.dev.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", crd.to_str().expect("path")]);
    kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "crd/trackerportpools.trackgate.dev",
        "--timeout=60s",
    ]);
    let ns = TempNamespace::create("-ports");
    let ns = ns.0.as_str();
    let (sa, rbac) = chart_rbac(ns);
    let _rbac = ClusterRbac;
    let (ok, text) = kubectl_stdin(&["apply", "-f", "-"], &rbac);
    assert!(ok, "applying the chart's RBAC: {text}");
    let token = kubectl_ok(&["-n", ns, "create", "token", &sa, "--duration=1h"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kubeconfig_with_token(token.trim(), dir.path());
    let log_path = dir.path().join("operator.log");
    let start = |path: &std::path::Path| {
        let log = std::fs::File::create(path).expect("operator log");
        Operator::start_with(ns, Some(&kubeconfig), Stdio::from(log))
    };
    kubectl_ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "trackgate-redis",
        "--from-literal=url=redis://redis:6379/0",
    ]);

    // a band of node ports of its own per run, in the lower (static) band of the range
    let base = 30100 + (std::process::id() % 40) * 50;
    let pinned = base + 12;
    let intruder = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: intruder, namespace: {ns}}}\n\
         spec:\n  type: NodePort\n  selector: {{app: nothing}}\n  ports: [{{port: 80, nodePort: {pinned}}}]\n"
    );
    let (ok, text) = kubectl_stdin(&["apply", "-f", "-"], &intruder);
    assert!(ok, "{text}");
    let devices: String = (0..24)
        .map(|k| format!("    - {{imei: \"35800000000{k:04}\"}}\n"))
        .collect();
    let pool = "ports";
    let manifest = format!(
        "apiVersion: trackgate.dev/v1alpha1\nkind: TrackerPortPool\nmetadata: {{name: {pool}, namespace: {ns}}}\n\
         spec:\n  ports: {{start: {base}, end: {}}}\n  sharding: {{portsPerShard: 10, replicasPerShard: 2}}\n\
         \x20 exposure: {{type: NodePort}}\n  redis: {{urlSecretRef: {{name: trackgate-redis}}}}\n\
         \x20 devices:\n    - {{imei: \"358999999999999\", port: {pinned}}}\n{devices}",
        base + 49
    );
    let (ok, text) = kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(ok, "{text}");
    let mut operator = start(&log_path);

    // the collision: named in status and in a Warning Event; the other shards are served
    wait_until("NodePortInUse in status", || {
        let (status, reason, message) = condition(ns, pool, "Degraded");
        status == "True" && reason == "NodePortInUse" && message.contains("intruder")
    });
    wait_until("a NodePortInUse Warning Event", || {
        get_json(ns, &["events"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["reason"] == "NodePortInUse" && e["type"] == "Warning")
    });
    assert!(
        exists(ns, &format!("service/{pool}-shard-0")),
        "shard 0 served"
    );
    assert!(
        !exists(ns, &format!("service/{pool}-shard-1")),
        "shard 1 collides"
    );
    kubectl_ok(&["-n", ns, "delete", "service", "intruder"]);
    wait_until("the collision cleared", || {
        is_settled(ns, pool) && exists(ns, &format!("service/{pool}-shard-1"))
    });
    let ports = record_table(ns, pool);
    assert_eq!(ports.len(), 25, "{ports:?}");

    // a deleted shard ConfigMap comes back and no port changes
    kubectl_ok(&["-n", ns, "delete", "configmap", &format!("{pool}-shard-0")]);
    wait_until("shard 0's ConfigMap restored", || {
        exists(ns, &format!("configmap/{pool}-shard-0"))
    });
    assert_eq!(record_table(ns, pool), ports, "a port moved");

    // a scaled Deployment is scaled back
    kubectl_ok(&[
        "-n",
        ns,
        "scale",
        "deployment",
        &format!("{pool}-shard-0"),
        "--replicas=5",
    ]);
    wait_until("replicas back to 2", || {
        get_json(ns, &["deployment", &format!("{pool}-shard-0")])["spec"]["replicas"] == 2
    });

    // portsPerShard changes converge with every port kept
    for pps in ["15", "7"] {
        kubectl_ok(&[
            "-n",
            ns,
            "patch",
            "tpp",
            pool,
            "--type",
            "merge",
            "-p",
            &format!("{{\"spec\":{{\"sharding\":{{\"portsPerShard\":{pps}}}}}}}"),
        ]);
        wait_until(&format!("portsPerShard {pps} settled"), || {
            is_settled(ns, pool)
        });
        assert_eq!(
            record_table(ns, pool),
            ports,
            "portsPerShard {pps} moved a port"
        );
    }

    // an operator restart keeps every port
    drop(operator);
    operator = start(&dir.path().join("operator-2.log"));
    std::thread::sleep(Duration::from_secs(5));
    wait_until("settled after the restart", || is_settled(ns, pool));
    assert_eq!(record_table(ns, pool), ports, "the restart moved a port");
    drop(operator);

    // all of it as the chart's ServiceAccount, never refused
    for log in ["operator.log", "operator-2.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap_or_default();
        assert!(
            !text.contains("forbidden") && !text.contains("Forbidden"),
            "{log}: {text}"
        );
    }
}

/// The run's cluster-scoped RBAC, deleted on drop.
struct ClusterRbac;

impl Drop for ClusterRbac {
    fn drop(&mut self) {
        let suffix = format!("-e2e-{}", std::process::id());
        let _ = kubectl(&[
            "delete",
            "--ignore-not-found",
            &format!("clusterrolebinding/trackgate-operator{suffix}"),
            &format!("clusterrole/trackgate-operator{suffix}"),
        ]);
    }
}

/// Issue 10: a 200,000-device shared pool whose IMEIs live in four ConfigMaps reconciles into
/// one Service and one Deployment, with the right count in status, in under 30 s; the pod
/// spec mounts every list (a projected volume) and stays small; an edit of a list updates the
/// count without touching the Deployment.
#[test]
fn a_200k_device_shared_pool_is_one_service_and_one_deployment() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP operator_e2e: {why}. See tests/README.md to run it against kind or k3d.");
        return;
    }
    let _turn = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    const DEVICES: u64 = 200_000;
    const LISTS: u64 = 4;
    let root = workspace_root();
    let crd = root.join("crds/trackerportpools.trackgate.dev.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", crd.to_str().expect("path")]);
    kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "crd/trackerportpools.trackgate.dev",
        "--timeout=60s",
    ]);
    let ns = TempNamespace::create("-shared");
    let ns = ns.0.as_str();
    let dir = tempfile::tempdir().expect("temp dir");
    let per_list = DEVICES / LISTS;
    for list in 0..LISTS {
        let path = dir.path().join(format!("imeis-{list}"));
        let text: String = (0..per_list)
            .map(|n| format!("{}\n", 864_186_000_000_000 + list * per_list + n))
            .collect();
        std::fs::write(&path, text).expect("write list");
        kubectl_ok(&[
            "-n",
            ns,
            "create",
            "configmap",
            &format!("fleet-imeis-{list}"),
            &format!("--from-file=imeis={}", path.display()),
        ]);
    }
    let _operator = Operator::start(ns);
    let sources: String = (0..LISTS)
        .map(|l| format!("    - {{configMap: fleet-imeis-{l}}}\n"))
        .collect();
    let pool = format!(
        "apiVersion: trackgate.dev/v1alpha1\nkind: TrackerPortPool\nmetadata: {{name: big, namespace: {ns}}}\n\
         spec:\n  mode: shared\n  ports: {{start: 5027, end: 5029}}\n  udp: true\n  devicesFrom:\n{sources}\
         \x20 scaling: {{replicas: 3}}\n  redis: {{urlSecretRef: {{name: trackgate-redis}}}}\n"
    );
    let started = Instant::now();
    let (ok, text) = kubectl_stdin(&["apply", "-f", "-"], &pool);
    assert!(ok, "{text}");
    wait_until("status of the 200k pool", || {
        let p = get_json(ns, &["tpp", "big"]);
        p["status"]["observedGeneration"] == p["metadata"]["generation"]
            && p["status"]["devices"].as_u64() == Some(DEVICES)
    });
    let took = started.elapsed();
    eprintln!("FIGURE e2e: {DEVICES}-device shared pool reconciled in {took:?}");
    assert!(took < Duration::from_secs(30), "took {took:?}");

    let selector = "trackgate.dev/pool=big";
    let deployments = get_json(ns, &["deployments", "-l", selector]);
    let services = get_json(ns, &["services", "-l", selector]);
    assert_eq!(deployments["items"].as_array().map_or(0, Vec::len), 1);
    assert_eq!(services["items"].as_array().map_or(0, Vec::len), 1);
    let ports = services["items"][0]["spec"]["ports"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(ports, 6, "3 ports, TCP and UDP");
    let deployment = &deployments["items"][0];
    assert_eq!(deployment["spec"]["replicas"], 3);
    let sources = &deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"];
    assert_eq!(
        sources.as_array().map_or(0, Vec::len) as u64,
        LISTS + 1,
        "{sources}"
    );
    let size = deployment.to_string().len();
    assert!(size < 64 * 1024, "the Deployment is {size} bytes");
    let p = get_json(ns, &["tpp", "big"]);
    assert_eq!(
        p["status"]["replicasReady"]
            .as_str()
            .map(|s| s.ends_with("/3")),
        Some(true)
    );
    let generation = deployment["metadata"]["generation"].clone();

    // one list shrinks: the count follows, the Deployment is not rewritten
    let path = dir.path().join("imeis-0");
    let text: String = (0..per_list / 2)
        .map(|n| format!("{}\n", 864_186_000_000_000 + n))
        .collect();
    std::fs::write(&path, text).expect("write list");
    let (ok, text) = kubectl(&[
        "-n",
        ns,
        "create",
        "configmap",
        "fleet-imeis-0",
        &format!("--from-file=imeis={}", path.display()),
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    assert!(ok, "{text}");
    let (ok, out) = kubectl_stdin(&["-n", ns, "replace", "-f", "-"], &text);
    assert!(ok, "{out}");
    wait_until("status after the list edit", || {
        get_json(ns, &["tpp", "big"])["status"]["devices"].as_u64() == Some(DEVICES - per_list / 2)
    });
    let deployment = &get_json(ns, &["deployments", "-l", selector])["items"][0];
    assert_eq!(deployment["metadata"]["generation"], generation);
}
