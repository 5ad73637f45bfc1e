//! PURE: node ports. Which ones other Services hold, and whether the node-port range can hold
//! what a pool's Services would take.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use trackgate_api::conditions::reasons;
use trackgate_api::{ExposureType, TrackerPortPoolSpec};

use crate::desired::Desired;
use crate::status::Failure;

/// The cluster's node-port range (`--service-node-port-range` of the API server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePortRange {
    /// First port.
    pub start: u16,
    /// Last port.
    pub end: u16,
}

impl Default for NodePortRange {
    fn default() -> Self {
        Self {
            start: 30000,
            end: 32767,
        }
    }
}

impl std::str::FromStr for NodePortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like 30000-32767");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let start: u16 = a.trim().parse().map_err(|_| bad())?;
        let end: u16 = b.trim().parse().map_err(|_| bad())?;
        if start == 0 || start > end {
            return Err(bad());
        }
        Ok(Self { start, end })
    }
}

impl NodePortRange {
    fn contains(&self, port: u16) -> bool {
        port >= self.start && port <= self.end
    }

    fn size(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }
}

/// Node ports a Service asks for explicitly.
pub(super) fn node_ports(svc: &Service) -> impl Iterator<Item = u16> + '_ {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
}

/// Node ports held by Services the pool does not own: port → `namespace/name`.
pub fn foreign_node_ports(services: &[Service], pool_uid: &str) -> BTreeMap<u16, String> {
    services
        .iter()
        .filter(|s| {
            !s.owner_references()
                .iter()
                .any(|r| !pool_uid.is_empty() && r.uid == pool_uid)
        })
        .flat_map(|s| {
            let who = format!(
                "Service {}/{}",
                s.namespace().unwrap_or_default(),
                s.name_any()
            );
            node_ports(s)
                .map(move |p| (p, who.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether the pool takes node ports at all (so the cluster's Services must be listed).
pub fn takes_node_ports(spec: &TrackerPortPoolSpec) -> bool {
    match spec.exposure.type_ {
        ExposureType::NodePort => true,
        ExposureType::LoadBalancer => {
            spec.exposure.allocate_load_balancer_node_ports != Some(false)
        }
        ExposureType::HostNetwork => false,
    }
}

/// Distinct port numbers of a Service (TCP and UDP on one port share one node port).
fn port_numbers(svc: &Service) -> usize {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.port)
        .collect::<BTreeSet<_>>()
        .len()
}

/// LoadBalancer pools that allocate node ports: when the range cannot hold the node ports the
/// new or growing Services need, the failure and the names of those Services (not applied,
/// rather than half the pool exposed and the rest failing one by one).
pub(super) fn node_port_shortfall(
    spec: &TrackerPortPoolSpec,
    desired: &Desired,
    live: &[Service],
    foreign: &BTreeMap<u16, String>,
    range: NodePortRange,
) -> Option<(Failure, BTreeSet<String>)> {
    if spec.exposure.type_ != ExposureType::LoadBalancer || !takes_node_ports(spec) {
        return None;
    }
    let held_here: usize = live.iter().map(|s| node_ports(s).count()).sum();
    let mut growing = BTreeSet::new();
    let mut needed = 0usize;
    for want in &desired.services {
        let have = live
            .iter()
            .find(|s| s.name_any() == want.name_any())
            .map_or(0, port_numbers);
        let wants = port_numbers(want);
        if wants > have {
            needed += wants - have;
            growing.insert(want.name_any());
        }
    }
    let held_elsewhere = foreign.keys().filter(|p| range.contains(**p)).count();
    let free = range.size().saturating_sub(held_elsewhere + held_here);
    if needed <= free {
        return None;
    }
    let failure = Failure {
        reason: reasons::NODE_PORT_RANGE_FULL,
        object: format!("{} Services", growing.len()),
        message: format!(
            "the pool needs {needed} more node ports but the node-port range {}-{} has {free} \
             free ({held_elsewhere} held by other Services); none of these Services is applied. \
             Set spec.exposure.allocateLoadBalancerNodePorts: false (an IP-target load \
             balancer) or use fewer ports",
            range.start, range.end
        ),
    };
    Some((failure, growing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_port_range_parses_and_refuses_nonsense() {
        assert_eq!(
            "30000-30099".parse::<NodePortRange>(),
            Ok(NodePortRange {
                start: 30000,
                end: 30099
            })
        );
        assert!("30099-30000".parse::<NodePortRange>().is_err());
        assert!("30000".parse::<NodePortRange>().is_err());
    }
}
