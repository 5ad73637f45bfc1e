//! End to end against the cluster in `KUBECONFIG`: the CRD, the real `trackgate operator`
//! binary, the pools of `deploy/examples/`. Skips (and passes) with a message when there is no
//! reachable cluster or no `kubectl`. How to run it against kind or k3d: `tests/README.md`.
//!
//! It checks what the API server and the operator do, not the listener pods' readiness (the
//! image may not be loadable into the test cluster): children created and owned, status
//! written, an edit reaching only its shard's allocation table, deletion cleaning up through
//! owner references, and a bad pool refused by the CRD's schema and CEL rules.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use trackgate_tests::{free_port, trackgate_binary, which, workspace_root};

const WAIT: Duration = Duration::from_secs(90);

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
    fn create() -> Self {
        let name = format!("trackgate-e2e-{}", std::process::id());
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
        let child = Command::new(trackgate_binary())
            .args([
                "operator",
                "--admin-addr",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .env("POD_NAMESPACE", ns)
            .env("POD_NAME", format!("e2e-{}", std::process::id()))
            .env("TRACKGATE_IMAGE", "ghcr.io/trackgate/trackgate:e2e")
            .stdout(Stdio::null())
            .spawn()
            .expect("start trackgate operator");
        Self(child)
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
    let ns = TempNamespace::create();
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
        let selector = format!("trackgate.dev/pool={pool}");
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
            &["configmaps", "-l", &format!("trackgate.dev/pool={pool}")],
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
    let ns = TempNamespace::create();
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
