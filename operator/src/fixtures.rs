//! Test builders and a fake API server (tests only).
//!
//! `FakeApiServer` answers the kube client through `tower_test::mock` from an in-memory store,
//! as controller-rs' `ApiServerVerifier` does, but keyed by path instead of a fixed request
//! order, so a scenario states what must (or must not) be written, not the exact call order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use trackgate_api::{
    Device, PortRange, RedisSink, RedisSpec, SecretKeyRef, TrackerPortPool, TrackerPortPoolSpec,
};

use crate::allocate::{self, Allocation, Layout, Previous};
use crate::desired;

// === PoolBuilder ===

/// Chainable test pool: `PoolBuilder::dedicated(5000, 5099).with_devices(500).build()`.
pub struct PoolBuilder {
    pool: TrackerPortPool,
}

impl PoolBuilder {
    fn new(mode: trackgate_api::IdentificationMode, start: u16, end: u16) -> Self {
        let spec = TrackerPortPoolSpec {
            protocol: Default::default(),
            gt06: None,
            mode,
            ports: PortRange {
                start,
                end,
                exclude: vec![],
            },
            devices: vec![],
            devices_from: vec![],
            sharding: Default::default(),
            exposure: Default::default(),
            listener: Default::default(),
            limits: Default::default(),
            redis: RedisSpec {
                url_secret_ref: SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                },
                tls: None,
                sink: RedisSink::default(),
            },
            udp: false,
            admission: Default::default(),
            scaling: None,
        };
        let mut pool = TrackerPortPool::new("fleet", spec);
        pool.metadata.namespace = Some("trackers".into());
        pool.metadata.uid = Some("0b7c6c1e-0000-4000-8000-000000000001".into());
        pool.metadata.generation = Some(1);
        pool.metadata.resource_version = Some("1".into());
        Self { pool }
    }

    /// A dedicated-mode pool on `start..=end`.
    pub fn dedicated(start: u16, end: u16) -> Self {
        Self::new(trackgate_api::IdentificationMode::Dedicated, start, end)
    }

    /// A shared-mode pool on `start..=end`.
    pub fn shared(start: u16, end: u16) -> Self {
        Self::new(trackgate_api::IdentificationMode::Shared, start, end)
    }

    /// Ports per shard.
    pub fn ports_per_shard(mut self, n: u16) -> Self {
        self.pool.spec.sharding.ports_per_shard = n;
        self
    }

    /// Adds `n` generated devices (IMEIs `35000000000000k`).
    pub fn with_devices(mut self, n: u64) -> Self {
        let base = self.pool.spec.devices.len() as u64;
        self.pool
            .spec
            .devices
            .extend((base..base + n).map(|k| Device {
                imei: imei(k),
                port: None,
            }));
        self
    }

    /// Adds a device pinned to `port`.
    pub fn pinned(mut self, imei: &str, port: u16) -> Self {
        self.pool.spec.devices.push(Device {
            imei: imei.into(),
            port: Some(port),
        });
        self
    }

    /// The pool.
    pub fn build(self) -> TrackerPortPool {
        self.pool
    }
}

/// The k-th generated IMEI.
pub fn imei(k: u64) -> String {
    format!("{:015}", 350_000_000_000_000 + k)
}

/// Allocation of a pool with inline devices only.
pub fn allocate_for(pool: &TrackerPortPool, previous: &Previous) -> Allocation {
    let devices = desired::pool_devices(&pool.spec, |_, _| None).unwrap();
    allocate::allocate(&Layout::from_spec(&pool.spec), &devices, previous)
}

// === FakeApiServer ===

/// A request that changed something: `(method, path)`.
pub type Write = (Method, String);

/// In-memory API server: objects by path, and the writes it received. It behaves like the real
/// one where the operator depends on it: server-side apply merges into the live object (fields
/// the manager stopped setting are removed, fields others set stay), create is create-only
/// (409), a stale resourceVersion or a failed delete precondition is a 409, a Service's node
/// ports are unique across the cluster and auto-assigned for LoadBalancers from a range that
/// can run out, and a ConfigMap's data is at most 1 MiB.
#[derive(Clone)]
pub struct FakeApiServer {
    /// Objects by item path (`/api/v1/namespaces/ns/configmaps/name`).
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Every non-GET request, in order.
    pub writes: Arc<Mutex<Vec<Write>>>,
    /// What the field manager last applied, by path (its managed fields).
    applied: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Injected refusals: a write to a path containing the key gets `(code, message)`.
    refusals: Arc<Mutex<Vec<(String, u16, String)>>>,
    /// The node-port range.
    pub node_ports: Arc<Mutex<(u16, u16)>>,
    next_rv: Arc<Mutex<u64>>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self {
            objects: Arc::default(),
            writes: Arc::default(),
            applied: Arc::default(),
            refusals: Arc::default(),
            node_ports: Arc::new(Mutex::new((30000, 32767))),
            next_rv: Arc::default(),
        }
    }
}

/// The real limit on a ConfigMap's data (keys + values).
const MAX_CONFIG_MAP_DATA: usize = 1 << 20;

impl FakeApiServer {
    /// Stores `obj` at its item path, as a user or another tool would (no field manager).
    pub fn insert(&self, path: &str, mut obj: Value) {
        self.bump(&mut obj);
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{path}"));
        }
        self.objects.lock().unwrap().insert(path.to_owned(), obj);
    }

    /// Edits the object at `path` in place, as `kubectl edit` would.
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut obj = self.get(path).unwrap();
        f(&mut obj);
        self.insert(path, obj);
    }

    /// Deletes the object at `path`, as `kubectl delete` would.
    pub fn remove(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().remove(path)
    }

    /// The object at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    /// Writes so far, and forget them.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.lock().unwrap())
    }

    /// Refuses every write to a path containing `path_part` with `code` and `message`.
    pub fn refuse(&self, path_part: &str, code: u16, message: &str) {
        self.refusals
            .lock()
            .unwrap()
            .push((path_part.to_owned(), code, message.to_owned()));
    }

    /// Stops refusing.
    pub fn allow_all(&self) {
        self.refusals.lock().unwrap().clear();
    }

    fn bump(&self, obj: &mut Value) {
        let mut rv = self.next_rv.lock().unwrap();
        *rv += 1;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    /// A kube client served by this store, and the task that serves it.
    pub fn client(&self) -> (kube::Client, tokio::task::JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = self.clone();
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let selector = parts.uri.query().and_then(label_selector);
                let content_type = parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let (status, value) = server.answer(
                    &parts.method,
                    parts.uri.path(),
                    selector.as_ref(),
                    &content_type,
                    &bytes,
                );
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        (kube::Client::new(service, "trackers"), task)
    }

    fn answer(
        &self,
        method: &Method,
        path: &str,
        selector: Option<&(String, String)>,
        content_type: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        if method != Method::GET {
            self.writes
                .lock()
                .unwrap()
                .push((method.clone(), path.to_owned()));
            let refused = self
                .refusals
                .lock()
                .unwrap()
                .iter()
                .find(|(part, _, _)| path.contains(part.as_str()))
                .cloned();
            if let Some((_, code, message)) = refused {
                return failure(code, "Refused", &message);
            }
        }
        let (path, status_sub) = match path.strip_suffix("/status") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        match *method {
            Method::GET => self.read(path, selector),
            Method::PATCH => self.patch(path, status_sub, content_type, body),
            Method::POST if path.contains("/events") => (StatusCode::CREATED, body),
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                self.create(&format!("{path}/{name}"), body)
            }
            Method::DELETE => self.delete(path, &body),
            _ => failure(405, "MethodNotAllowed", "method not allowed"),
        }
    }

    fn read(&self, path: &str, selector: Option<&(String, String)>) -> (StatusCode, Value) {
        let objects = self.objects.lock().unwrap();
        if let Some(obj) = objects.get(path) {
            return (StatusCode::OK, obj.clone());
        }
        // a list: every object directly under this collection path (cluster-wide lists look
        // under every namespace)
        let cluster_wide = path.strip_prefix("/api/v1/").filter(|r| !r.contains('/'));
        let prefix = format!("{path}/");
        let items: Vec<Value> = objects
            .iter()
            .filter(|(k, _)| match cluster_wide {
                Some(resource) => {
                    k.starts_with("/api/v1/namespaces/") && k.rsplit('/').nth(1) == Some(resource)
                }
                None => k.starts_with(&prefix) && !k[prefix.len()..].contains('/'),
            })
            .filter(|(_, v)| {
                selector.is_none_or(|(k, want)| v["metadata"]["labels"][k].as_str() == Some(want))
            })
            .map(|(_, v)| v.clone())
            .collect();
        if items.is_empty() && !looks_like_collection(path) {
            return not_found(path);
        }
        (
            StatusCode::OK,
            json!({"metadata": {"resourceVersion": "1"}, "items": items}),
        )
    }

    fn create(&self, path: &str, mut obj: Value) -> (StatusCode, Value) {
        if self.objects.lock().unwrap().contains_key(path) {
            return failure(409, "AlreadyExists", &format!("{path} already exists"));
        }
        obj["metadata"]["uid"] = json!(format!("uid-{path}-{}", self.next_rv.lock().unwrap()));
        obj["metadata"]["generation"] = json!(1);
        self.store(path, obj, None)
    }

    fn patch(
        &self,
        path: &str,
        status_sub: bool,
        content_type: &str,
        patch: Value,
    ) -> (StatusCode, Value) {
        let live = self.get(path);
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
            && live
                .as_ref()
                .and_then(|l| l["metadata"]["resourceVersion"].as_str())
                != Some(rv)
        {
            return failure(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            );
        }
        let mut entry = live.clone().unwrap_or_else(
            || json!({"metadata": {"uid": format!("uid-{path}"), "generation": 1}}),
        );
        if content_type.starts_with("application/merge-patch") {
            merge_patch(&mut entry, &patch);
            return self.store(path, entry, live.as_ref());
        }
        if status_sub {
            entry["status"] = patch["status"].clone();
            return self.store(path, entry, live.as_ref());
        }
        let mut applied = patch;
        if let Some(m) = applied["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let old = self.applied.lock().unwrap().get(path).cloned();
        if let Some(old) = &old {
            prune(&mut entry, old, &applied);
        }
        merge(&mut entry, &applied);
        self.applied
            .lock()
            .unwrap()
            .insert(path.to_owned(), applied);
        self.store(path, entry, live.as_ref())
    }

    /// Validates like the API server, bumps resourceVersion (and generation on a spec change),
    /// assigns node ports, stores.
    fn store(&self, path: &str, mut obj: Value, live: Option<&Value>) -> (StatusCode, Value) {
        if path.contains("/configmaps/") {
            let bytes: usize = obj["data"]
                .as_object()
                .map(|d| {
                    d.iter()
                        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                        .sum()
                })
                .unwrap_or(0);
            if bytes > MAX_CONFIG_MAP_DATA {
                return failure(
                    422,
                    "Invalid",
                    &format!(
                        "ConfigMap is invalid: []: Too long: must have at most {MAX_CONFIG_MAP_DATA} bytes"
                    ),
                );
            }
        }
        if path.contains("/services/")
            && let Err(message) = self.assign_node_ports(path, &mut obj, live)
        {
            return failure(422, "Invalid", &message);
        }
        if let Some(live) = live
            && live["spec"] != obj["spec"]
        {
            let g = live["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        self.bump(&mut obj);
        self.objects
            .lock()
            .unwrap()
            .insert(path.to_owned(), obj.clone());
        (StatusCode::OK, obj)
    }

    fn assign_node_ports(
        &self,
        path: &str,
        svc: &mut Value,
        live: Option<&Value>,
    ) -> Result<(), String> {
        let kind = svc["spec"]["type"]
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        if kind == "ClusterIP" {
            return Ok(());
        }
        let taken: BTreeMap<u64, String> = self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("/services/") && k.as_str() != path)
            .flat_map(|(k, v)| {
                v["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["nodePort"].as_u64())
                    .map(|p| (p, k.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let auto = kind == "LoadBalancer"
            && svc["spec"]["allocateLoadBalancerNodePorts"].as_bool() != Some(false);
        let (lo, hi) = *self.node_ports.lock().unwrap();
        let mut mine: BTreeMap<u64, u64> = BTreeMap::new(); // port → node port in this Service
        let ports = svc["spec"]["ports"]
            .as_array_mut()
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::new();
        for (i, mut p) in ports.into_iter().enumerate() {
            let port = p["port"].as_u64().unwrap_or(0);
            if p["nodePort"].is_null() && auto {
                let kept = live
                    .and_then(|l| l["spec"]["ports"].as_array())
                    .into_iter()
                    .flatten()
                    .find(|lp| lp["name"] == p["name"])
                    .and_then(|lp| lp["nodePort"].as_u64());
                let pick = kept.or_else(|| mine.get(&port).copied()).or_else(|| {
                    (u64::from(lo)..=u64::from(hi))
                        .find(|n| !taken.contains_key(n) && !mine.values().any(|m| m == n))
                });
                match pick {
                    Some(n) => p["nodePort"] = json!(n),
                    None => return Err("failed to allocate a nodePort: range is full".to_owned()),
                }
            }
            if let Some(n) = p["nodePort"].as_u64() {
                if taken.contains_key(&n) || mine.iter().any(|(other, m)| *m == n && *other != port)
                {
                    return Err(format!(
                        "Service is invalid: spec.ports[{i}].nodePort: Invalid value: {n}: provided port is already allocated"
                    ));
                }
                mine.insert(port, n);
            }
            out.push(p);
        }
        svc["spec"]["ports"] = Value::Array(out);
        Ok(())
    }

    fn delete(&self, path: &str, options: &Value) -> (StatusCode, Value) {
        let mut objects = self.objects.lock().unwrap();
        let Some(live) = objects.get(path) else {
            return not_found(path);
        };
        let pre = &options["preconditions"];
        for (field, key) in [("uid", "uid"), ("resourceVersion", "resourceVersion")] {
            if let Some(want) = pre[field].as_str()
                && live["metadata"][key].as_str() != Some(want)
            {
                return failure(
                    409,
                    "Conflict",
                    &format!("Precondition failed: {field} in precondition: {want}"),
                );
            }
        }
        let v = objects.remove(path).unwrap();
        self.applied.lock().unwrap().remove(path);
        (StatusCode::OK, v)
    }
}

/// Server-side apply for one manager: objects merge key by key; lists and scalars replace.
fn merge(live: &mut Value, applied: &Value) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                merge(l.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (l, a) => *l = a.clone(),
    }
}

/// Removes from `live` what the manager applied before (`old`) and no longer applies (`new`).
fn prune(live: &mut Value, old: &Value, new: &Value) {
    let (Value::Object(l), Value::Object(o)) = (live, old) else {
        return;
    };
    for (k, ov) in o {
        match new.get(k) {
            None => {
                l.remove(k);
            }
            Some(nv) => {
                if let Some(lv) = l.get_mut(k) {
                    prune(lv, ov, nv);
                }
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn looks_like_collection(path: &str) -> bool {
    [
        "configmaps",
        "deployments",
        "services",
        "poddisruptionbudgets",
        "trackerportpools",
    ]
    .iter()
    .any(|c| path.ends_with(c))
}

fn failure(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "code": code, "reason": reason, "status": "Failure", "message": message}),
    )
}

fn not_found(path: &str) -> (StatusCode, Value) {
    failure(404, "NotFound", &format!("{path} not found"))
}

/// `labelSelector=k%3Dv` → `(k, v)` (the only selector form the operator sends).
fn label_selector(query: &str) -> Option<(String, String)> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))?;
    let decoded = percent_decode(raw);
    let (k, v) = decoded.split_once('=')?;
    Some((k.to_owned(), v.to_owned()))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
