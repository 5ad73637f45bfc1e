//! PURE: what was computed and observed → the pool's status. The clock is an argument.
//!
//! A condition keeps its `lastTransitionTime` while its status stays the same, so recomputing
//! the status of an unchanged pool yields an equal value and the controller writes nothing
//! (writing would trigger another reconcile: a self-made loop).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use trackgate_api::conditions::{self, reasons};
use trackgate_api::{ExposureType, ShardStatus, TrackerPortPool, TrackerPortPoolStatus};

use crate::allocate::{Allocation, Layout, Unallocated};
use crate::desired::{NLB_LISTENER_LIMIT, SpecError, shard_name};
use crate::record::RecordError;

/// A write the API server refused (or the operator refused before sending), for `Degraded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The `Degraded` reason (`api::conditions::reasons`).
    pub reason: &'static str,
    /// `Kind name` of the object.
    pub object: String,
    /// The API server's message, or why the operator did not send it.
    pub message: String,
}

impl Failure {
    /// Whether the failed write was a part of `pool`'s allocation record: then nothing of the
    /// new allocation may be reported (or served) yet.
    pub fn is_record(&self, pool: &str) -> bool {
        self.object
            .strip_prefix("ConfigMap ")
            .is_some_and(|name| crate::record::is_record_name(pool, name))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Failures named in the `Degraded` message; the rest are counted.
const FAILURES_SHOWN: usize = 3;

/// What the reconcile computed for the pool.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// The pool was allocated and its children applied, except `failures`.
    Allocated {
        /// The allocation.
        allocation: &'a Allocation,
        /// Largest listener count of one LoadBalancer Service.
        max_listeners: usize,
        /// Writes that failed.
        failures: &'a [Failure],
    },
    /// The spec cannot be served.
    Invalid(&'a SpecError),
    /// The previous allocation cannot be known; nothing was changed.
    RecordLost(&'a RecordError),
}

/// The children as observed (live objects of this pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed<'a> {
    /// Shard Deployments.
    pub deployments: &'a [Deployment],
    /// Shard Services.
    pub services: &'a [Service],
}

type Cond = (&'static str, &'static str, &'static str, String);

const TRUE: &str = "True";
const FALSE: &str = "False";
const UNKNOWN: &str = "Unknown";

/// The status `pool` should have now. Every outcome sets every condition: what the reconcile
/// could not tell is `Unknown`, never left out.
pub fn status_for(
    pool: &TrackerPortPool,
    outcome: Outcome<'_>,
    observed: Observed<'_>,
    now: &Time,
) -> TrackerPortPoolStatus {
    let old = pool.status.clone().unwrap_or_default();
    let mut new = TrackerPortPoolStatus {
        observed_generation: pool.metadata.generation,
        ..old.clone()
    };
    let unknown = |type_: &'static str, why: &str| -> Cond {
        (type_, UNKNOWN, reasons::UNKNOWN, why.to_owned())
    };
    let mut conds: Vec<Cond> = Vec::new();
    match outcome {
        Outcome::Invalid(err) => {
            conds.push((conditions::DEGRADED, TRUE, err.reason(), err.to_string()));
            for t in [
                conditions::PORTS_ALLOCATED,
                conditions::LISTENERS_AVAILABLE,
                conditions::EXPOSURE_WITHIN_LIMITS,
            ] {
                conds.push(unknown(t, "the spec cannot be served; see Degraded"));
            }
            conds.push((
                conditions::READY,
                FALSE,
                reasons::POOL_NOT_READY,
                "the spec cannot be served; see Degraded".to_owned(),
            ));
        }
        Outcome::RecordLost(err) => {
            conds.push((conditions::DEGRADED, TRUE, err.reason(), err.to_string()));
            for t in [
                conditions::PORTS_ALLOCATED,
                conditions::LISTENERS_AVAILABLE,
                conditions::EXPOSURE_WITHIN_LIMITS,
            ] {
                conds.push(unknown(
                    t,
                    "the allocation record is lost; nothing is changed; see Degraded",
                ));
            }
            conds.push((
                conditions::READY,
                FALSE,
                reasons::POOL_NOT_READY,
                "the allocation record is lost; see Degraded".to_owned(),
            ));
        }
        Outcome::Allocated {
            allocation,
            max_listeners,
            failures,
        } => {
            let layout = Layout::from_spec(&pool.spec);
            let allocated = allocation.allocated();
            // an allocation the record does not hold is not reported: the next reconcile must
            // not take these counts for the history of a pool whose record was lost
            if !failures.iter().any(|f| f.is_record(&pool.name_any())) {
                new.devices = count(allocated + allocation.unallocated.len());
                new.allocated = count(allocated);
                new.unallocated = count(allocation.unallocated.len());
                new.free_ports = allocation.free_ports;
                new.shards = allocation
                    .shards
                    .iter()
                    .map(|(&index, entries)| {
                        shard_status(pool, &layout, index, entries.len(), observed)
                    })
                    .collect();
            }
            let replicas = i32::from(pool.spec.sharding.replicas_per_shard);
            let rolled_out = allocation
                .shards
                .keys()
                .filter(|&&index| {
                    let name = shard_name(&pool.name_any(), index);
                    observed
                        .deployments
                        .iter()
                        .find(|d| d.name_any() == name)
                        .is_some_and(|d| is_rolled_out(d, replicas))
                })
                .count();
            let ready = new
                .shards
                .iter()
                .filter(|s| s.replicas > 0 && s.ready_replicas >= s.replicas)
                .count();
            new.shards_ready = format!("{ready}/{}", new.shards.len());

            let ports_ok = allocation.unallocated.is_empty();
            conds.push(if ports_ok {
                (
                    conditions::PORTS_ALLOCATED,
                    TRUE,
                    reasons::ALL_ALLOCATED,
                    format!("{allocated} devices hold a port"),
                )
            } else {
                let pinned = allocation
                    .unallocated
                    .iter()
                    .any(|(_, w)| *w != Unallocated::RangeFull);
                let sample: Vec<&str> = allocation
                    .unallocated
                    .iter()
                    .take(5)
                    .map(|(i, _)| i.as_str())
                    .collect();
                (
                    conditions::PORTS_ALLOCATED,
                    FALSE,
                    if pinned {
                        reasons::PINNED_PORT_UNAVAILABLE
                    } else {
                        reasons::PORTS_EXHAUSTED
                    },
                    format!(
                        "{} devices hold no port (first: {}); widen spec.ports or remove devices",
                        allocation.unallocated.len(),
                        sample.join(", ")
                    ),
                )
            });
            let shards = new.shards.len();
            let listeners_ok = ready == shards && rolled_out == shards;
            conds.push(if new.shards.is_empty() {
                (
                    conditions::LISTENERS_AVAILABLE,
                    FALSE,
                    reasons::NO_DEVICES,
                    "the pool has no devices".to_owned(),
                )
            } else if listeners_ok {
                (
                    conditions::LISTENERS_AVAILABLE,
                    TRUE,
                    reasons::ALL_REPLICAS_READY,
                    format!("{ready} shards ready"),
                )
            } else if ready == shards {
                (
                    conditions::LISTENERS_AVAILABLE,
                    FALSE,
                    reasons::ROLLOUT_IN_PROGRESS,
                    format!("{rolled_out} of {shards} shards run the current pod template"),
                )
            } else {
                (
                    conditions::LISTENERS_AVAILABLE,
                    FALSE,
                    reasons::REPLICAS_NOT_READY,
                    format!("{ready} of {shards} shards have every replica ready"),
                )
            });
            let limits_ok = pool.spec.exposure.type_ != ExposureType::LoadBalancer
                || max_listeners <= NLB_LISTENER_LIMIT;
            conds.push(if limits_ok {
                (
                    conditions::EXPOSURE_WITHIN_LIMITS,
                    TRUE,
                    reasons::WITHIN_LIMITS,
                    "within known load balancer limits".to_owned(),
                )
            } else {
                (
                    conditions::EXPOSURE_WITHIN_LIMITS,
                    FALSE,
                    reasons::AWS_NLB_LISTENER_LIMIT,
                    format!(
                        "a shard Service has {max_listeners} listeners; an AWS NLB takes at most \
                         {NLB_LISTENER_LIMIT}: lower spec.sharding.portsPerShard"
                    ),
                )
            });
            conds.push(match failures {
                [] => (
                    conditions::DEGRADED,
                    FALSE,
                    reasons::SPEC_VALID,
                    "the spec is valid and every object is applied".to_owned(),
                ),
                [first, ..] => (
                    conditions::DEGRADED,
                    TRUE,
                    first.reason,
                    degraded_message(failures),
                ),
            });
            let all = ports_ok && listeners_ok && !new.shards.is_empty() && failures.is_empty();
            conds.push(if all {
                (
                    conditions::READY,
                    TRUE,
                    reasons::POOL_READY,
                    "every device holds a port on a ready listener".to_owned(),
                )
            } else {
                (
                    conditions::READY,
                    FALSE,
                    reasons::POOL_NOT_READY,
                    "see PortsAllocated, ListenersAvailable and Degraded".to_owned(),
                )
            });
        }
    }
    new.conditions = merge_conditions(&old.conditions, conds, pool.metadata.generation, now);
    new
}

/// "n objects were not applied: A: msg; B: msg; and k more".
pub(crate) fn degraded_message(failures: &[Failure]) -> String {
    let shown: Vec<String> = failures
        .iter()
        .take(FAILURES_SHOWN)
        .map(ToString::to_string)
        .collect();
    let more = failures.len().saturating_sub(FAILURES_SHOWN);
    let tail = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    format!(
        "{} object(s) not applied: {}{tail}",
        failures.len(),
        shown.join("; ")
    )
}

/// Whether a Deployment runs its current template on every wanted replica: the controller has
/// seen the latest generation and every replica is updated and ready.
pub fn is_rolled_out(dep: &Deployment, replicas: i32) -> bool {
    let Some(st) = dep.status.as_ref() else {
        return false;
    };
    let generation = dep.metadata.generation.unwrap_or(0);
    st.observed_generation.unwrap_or(0) >= generation
        && st.updated_replicas.unwrap_or(0) >= replicas
        && st.ready_replicas.unwrap_or(0) >= replicas
}

/// The address the cloud gave Service `name`'s load balancer (hostname, else IP), once it has.
pub(crate) fn load_balancer_host(services: &[Service], name: &str) -> Option<String> {
    let ingress = services
        .iter()
        .find(|s| s.name_any() == name)?
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .clone();
    ingress.hostname.or(ingress.ip)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn shard_status(
    pool: &TrackerPortPool,
    layout: &Layout,
    index: u32,
    devices: usize,
    observed: Observed<'_>,
) -> ShardStatus {
    let name = shard_name(&pool.name_any(), index);
    let (first, last) = layout.shard_ports(index);
    let dep = observed.deployments.iter().find(|d| d.name_any() == name);
    let dep_status = dep.and_then(|d| d.status.as_ref());
    let endpoint = match pool.spec.exposure.type_ {
        ExposureType::HostNetwork => Some("hostNetwork".to_owned()),
        ExposureType::NodePort => Some("any node address, port = device port".to_owned()),
        ExposureType::LoadBalancer => load_balancer_host(observed.services, &name),
    };
    ShardStatus {
        index,
        ports: format!("{first}-{last}"),
        devices: count(devices),
        replicas: i32::from(pool.spec.sharding.replicas_per_shard),
        ready_replicas: dep_status.and_then(|s| s.ready_replicas).unwrap_or(0),
        endpoint,
    }
}

/// Builds the conditions, keeping `lastTransitionTime` of those whose status did not change.
pub(crate) fn merge_conditions(
    old: &[Condition],
    new: Vec<Cond>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    new.into_iter()
        .map(|(type_, status, reason, message)| {
            let status = status.to_owned();
            let since = old
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether writing `new` would change anything.
pub fn is_changed(pool: &TrackerPortPool, new: &TrackerPortPoolStatus) -> bool {
    pool.status.as_ref() != Some(new)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::allocate::Previous;
    use crate::fixtures::{PoolBuilder, allocate_for};

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn cond<'a>(s: &'a TrackerPortPoolStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn ready_deployment(name: &str, ready: i32) -> Deployment {
        Deployment {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                ready_replicas: Some(ready),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn counts_shards_and_conditions() {
        let pool = PoolBuilder::dedicated(5000, 5019)
            .ports_per_shard(10)
            .with_devices(15)
            .build();
        let a = allocate_for(&pool, &Previous::new());
        let deps = [
            ready_deployment("fleet-shard-0", 2),
            ready_deployment("fleet-shard-1", 1),
        ];
        let observed = Observed {
            deployments: &deps,
            services: &[],
        };
        let s = status_for(
            &pool,
            Outcome::Allocated {
                allocation: &a,
                max_listeners: 10,
                failures: &[],
            },
            observed,
            &at(1),
        );
        assert_eq!(
            (s.devices, s.allocated, s.unallocated, s.free_ports),
            (15, 15, 0, 5)
        );
        assert_eq!(s.shards_ready, "1/2");
        assert_eq!(s.shards[1].ports, "5010-5019");
        assert_eq!(cond(&s, "PortsAllocated").status, "True");
        assert_eq!(cond(&s, "ListenersAvailable").reason, "ReplicasNotReady");
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "False");
    }

    /// Ready must not be True mid-rollout: every replica ready but on the old template.
    #[test]
    fn ready_waits_for_the_rollout_and_failures_are_degraded() {
        let pool = PoolBuilder::dedicated(5000, 5009).with_devices(2).build();
        let a = allocate_for(&pool, &Previous::new());
        let mut dep = ready_deployment("fleet-shard-0", 2);
        dep.metadata.generation = Some(3);
        dep.status.as_mut().unwrap().observed_generation = Some(2);
        dep.status.as_mut().unwrap().updated_replicas = Some(2);
        let deps = [dep];
        let observed = Observed {
            deployments: &deps,
            services: &[],
        };
        let outcome = |failures| Outcome::Allocated {
            allocation: &a,
            max_listeners: 2,
            failures,
        };
        let s = status_for(&pool, outcome(&[]), observed, &at(1));
        assert_eq!(cond(&s, "ListenersAvailable").reason, "RolloutInProgress");
        assert_eq!(cond(&s, "Ready").status, "False");
        let mut done = deps.clone();
        done[0].status.as_mut().unwrap().observed_generation = Some(3);
        let observed = Observed {
            deployments: &done,
            services: &[],
        };
        let s = status_for(&pool, outcome(&[]), observed, &at(1));
        assert_eq!(cond(&s, "Ready").status, "True");

        let failures: Vec<Failure> = (0..5)
            .map(|n| Failure {
                reason: reasons::NODE_PORT_IN_USE,
                object: format!("Service fleet-shard-{n}"),
                message: "node ports 30152 (held by Service a/b) are taken".into(),
            })
            .collect();
        let s = status_for(&pool, outcome(&failures), observed, &at(1));
        let d = cond(&s, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "NodePortInUse")
        );
        assert!(
            d.message
                .starts_with("5 object(s) not applied: Service fleet-shard-0: node ports"),
            "{}",
            d.message
        );
        assert!(d.message.ends_with("and 2 more"), "{}", d.message);
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    /// A spec error or a lost record keeps every condition, the unknown ones as Unknown.
    #[test]
    fn conditions_never_vanish() {
        let pool = PoolBuilder::dedicated(5000, 5009).with_devices(2).build();
        let err = SpecError::Invalid("nope".into());
        let s = status_for(&pool, Outcome::Invalid(&err), Observed::default(), &at(1));
        assert_eq!(s.conditions.len(), 5);
        assert_eq!(cond(&s, "PortsAllocated").status, "Unknown");
        assert_eq!(cond(&s, "ListenersAvailable").status, "Unknown");
    }

    #[test]
    fn full_range_reports_unallocated_devices() {
        let pool = PoolBuilder::dedicated(5000, 5004).with_devices(8).build();
        let a = allocate_for(&pool, &Previous::new());
        let s = status_for(
            &pool,
            Outcome::Allocated {
                allocation: &a,
                max_listeners: 5,
                failures: &[],
            },
            Observed::default(),
            &at(1),
        );
        assert_eq!((s.allocated, s.unallocated, s.free_ports), (5, 3, 0));
        let c = cond(&s, "PortsAllocated");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "PortsExhausted")
        );
        assert!(
            c.message.starts_with("3 devices hold no port"),
            "{}",
            c.message
        );
    }

    #[test]
    fn unchanged_pool_gives_an_equal_status_later() {
        let mut pool = PoolBuilder::dedicated(5000, 5009).with_devices(2).build();
        let a = allocate_for(&pool, &Previous::new());
        let outcome = Outcome::Allocated {
            allocation: &a,
            max_listeners: 2,
            failures: &[],
        };
        let first = status_for(&pool, outcome, Observed::default(), &at(1));
        pool.status = Some(first.clone());
        let again = status_for(&pool, outcome, Observed::default(), &at(500));
        assert!(
            !is_changed(&pool, &again),
            "recomputing must not rewrite the status"
        );
        let err = SpecError::Invalid("nope".into());
        let degraded = status_for(&pool, Outcome::Invalid(&err), Observed::default(), &at(600));
        assert!(is_changed(&pool, &degraded));
        assert_eq!(cond(&degraded, "Degraded").status, "True");
        assert_eq!(cond(&degraded, "Degraded").last_transition_time, at(600));
    }

    #[test]
    fn endpoint_is_the_load_balancer_address() {
        use k8s_openapi::api::core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus,
        };
        let pool = PoolBuilder::dedicated(5000, 5009).with_devices(1).build();
        let a = allocate_for(&pool, &Previous::new());
        let mut svc = Service::default();
        svc.metadata.name = Some("fleet-shard-0".into());
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    hostname: Some("nlb-1.elb.amazonaws.com".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let services = [svc];
        let observed = Observed {
            deployments: &[],
            services: &services,
        };
        let s = status_for(
            &pool,
            Outcome::Allocated {
                allocation: &a,
                max_listeners: 1,
                failures: &[],
            },
            observed,
            &at(1),
        );
        assert_eq!(
            s.shards[0].endpoint.as_deref(),
            Some("nlb-1.elb.amazonaws.com")
        );
    }

    #[test]
    fn warns_past_the_nlb_listener_limit() {
        let pool = PoolBuilder::dedicated(5000, 5099)
            .ports_per_shard(100)
            .with_devices(60)
            .build();
        let a = allocate_for(&pool, &Previous::new());
        let s = status_for(
            &pool,
            Outcome::Allocated {
                allocation: &a,
                max_listeners: 60,
                failures: &[],
            },
            Observed::default(),
            &at(1),
        );
        assert_eq!(
            cond(&s, "ExposureWithinLimits").reason,
            "AwsNlbListenerLimit"
        );
    }
}
