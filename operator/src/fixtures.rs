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

/// In-memory API server: objects by path, and the writes it received.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    /// Objects by item path (`/api/v1/namespaces/ns/configmaps/name`).
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Every non-GET request, in order.
    pub writes: Arc<Mutex<Vec<Write>>>,
    next_rv: Arc<Mutex<u64>>,
}

impl FakeApiServer {
    /// Stores `obj` at its item path.
    pub fn insert(&self, path: &str, mut obj: Value) {
        self.bump(&mut obj);
        self.objects.lock().unwrap().insert(path.to_owned(), obj);
    }

    /// The object at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    /// Writes so far, and forget them.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.lock().unwrap())
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
                let (status, value) =
                    server.answer(&parts.method, parts.uri.path(), selector.as_ref(), &bytes);
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
        body: &[u8],
    ) -> (StatusCode, Value) {
        if method != Method::GET {
            self.writes
                .lock()
                .unwrap()
                .push((method.clone(), path.to_owned()));
        }
        let (path, status_sub) = match path.strip_suffix("/status") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let mut objects = self.objects.lock().unwrap();
        match *method {
            Method::GET => {
                if let Some(obj) = objects.get(path) {
                    return (StatusCode::OK, obj.clone());
                }
                // a list: every object directly under this collection path
                let prefix = format!("{path}/");
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .filter(|(_, v)| {
                        selector.is_none_or(|(k, want)| {
                            v["metadata"]["labels"][k].as_str() == Some(want)
                        })
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
            Method::PATCH => {
                let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let entry = objects
                    .entry(path.to_owned())
                    .or_insert_with(|| patch.clone());
                if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                    && entry["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return (
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "code": 409, "reason": "Conflict", "message": "resourceVersion"}),
                    );
                }
                if status_sub {
                    entry["status"] = patch["status"].clone();
                } else {
                    let status = entry.get("status").cloned();
                    *entry = patch;
                    if let Some(s) = status {
                        entry["status"] = s;
                    }
                }
                let mut rv = self.next_rv.lock().unwrap();
                *rv += 1;
                entry["metadata"]["resourceVersion"] = json!(rv.to_string());
                (StatusCode::OK, entry.clone())
            }
            Method::DELETE => match objects.remove(path) {
                Some(v) => (StatusCode::OK, v),
                None => not_found(path),
            },
            // events are POSTed: echo them back
            _ => (
                StatusCode::CREATED,
                serde_json::from_slice(body).unwrap_or(Value::Null),
            ),
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

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound", "status": "Failure", "message": format!("{path} not found")}),
    )
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
