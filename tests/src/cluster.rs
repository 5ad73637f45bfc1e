//! A real Redis Cluster on loopback: `redis-server --cluster-enabled yes` nodes joined with
//! `redis-cli --cluster create`, killed on drop.
//!
//! A node's cluster bus listens on its port + 10000, so node ports come from 20000-22767:
//! both the data port and the bus port stay below the ephemeral range (32768-60999).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{RedisServer, free_ports_in, require_tool};

/// Offset of the cluster bus port from the data port (fixed by Redis).
const BUS_OFFSET: u16 = 10000;

/// One node of a [`RedisCluster`].
pub struct ClusterNode {
    /// The node's server (its data directory holds `nodes.conf`, so a restart rejoins).
    pub server: RedisServer,
}

/// A Redis Cluster of `masters` primaries and `replicas` replicas per primary.
pub struct RedisCluster {
    /// Every node, primaries first as `redis-cli --cluster create` assigns them.
    pub nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok` (and every replica is in sync). `None` when `redis-server` or
    /// `redis-cli` is missing and skipping is allowed.
    pub fn start(masters: usize, replicas: usize) -> Option<Self> {
        require_tool("redis-server")?;
        require_tool("redis-cli")?;
        let n = masters * (1 + replicas);
        let ports = free_ports_in(20000..(32768 - BUS_OFFSET), n, |p| {
            std::net::TcpListener::bind(("127.0.0.1", p + BUS_OFFSET)).is_ok()
        });
        let nodes = ports
            .iter()
            .map(|&port| ClusterNode {
                server: RedisServer::start_on(
                    "redis-server",
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        // Short, so that a killed primary's replica takes over within seconds.
                        "--cluster-node-timeout",
                        "1000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                )
                .expect("redis-server is installed"),
            })
            .collect::<Vec<_>>();
        let cluster = Self { nodes };
        cluster.create(replicas).expect("create the cluster");
        Some(cluster)
    }

    fn create(&self, replicas: usize) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.server.port()));
        }
        let out = cmd
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("run redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.wait_until_ok(Duration::from_secs(20))
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on the slots, and
    /// every replica's link to its primary is up.
    pub fn wait_until_ok(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().all(|node| {
                let info = node.server.command("CLUSTER INFO").unwrap_or_default();
                let repl = node.server.command("INFO replication").unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (!repl.contains("role:slave") || repl.contains("master_link_status:up"))
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not become ok within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://127.0.0.1:<first>,127.0.0.1:<second>/`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .take(2)
            .map(|n| format!("127.0.0.1:{}", n.server.port()))
            .collect();
        format!("redis+cluster://{}/", seeds.join(","))
    }

    /// The primary serving `key`'s slot (index into [`Self::nodes`]).
    pub fn primary_of(&self, key: &str) -> anyhow::Result<usize> {
        let slot = self.slot_of(key)?;
        for (i, node) in self.nodes.iter().enumerate() {
            let repl = node.server.command("INFO replication").unwrap_or_default();
            if !repl.contains("role:master") {
                continue;
            }
            if self.owns(i, slot)? {
                return Ok(i);
            }
        }
        bail!("no primary serves slot {slot}")
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let reply = self.nodes[0]
            .server
            .command(&format!("CLUSTER KEYSLOT {key}"))?;
        reply
            .trim_start_matches(':')
            .parse()
            .with_context(|| format!("CLUSTER KEYSLOT answered {reply}"))
    }

    /// The node's cluster id.
    pub fn id_of(&self, node: usize) -> anyhow::Result<String> {
        self.nodes[node].server.command("CLUSTER MYID")
    }

    fn owns(&self, node: usize, slot: u16) -> anyhow::Result<bool> {
        // The node's own line of CLUSTER NODES lists its slot ranges from the ninth field.
        let nodes = redis_cli(self.nodes[node].server.port(), &["CLUSTER", "NODES"])?;
        for line in nodes.lines().filter(|l| l.contains("myself")) {
            for range in line.split_whitespace().skip(8) {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                    && (lo..=hi).contains(&slot)
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Moves `slot` from primary `from` to primary `to` the way `redis-cli --cluster reshard`
    /// does: IMPORTING/MIGRATING, `MIGRATE` of its keys in small batches (`pause` between
    /// batches, so that writes keep arriving mid-migration), then `SETSLOT NODE` everywhere.
    pub fn migrate_slot(
        &self,
        slot: u16,
        from: usize,
        to: usize,
        pause: Duration,
    ) -> anyhow::Result<usize> {
        let (from_port, to_port) = (self.nodes[from].server.port(), self.nodes[to].server.port());
        let (from_id, to_id) = (self.id_of(from)?, self.id_of(to)?);
        let slot_s = slot.to_string();
        expect_ok(redis_cli(
            to_port,
            &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id],
        )?)?;
        expect_ok(redis_cli(
            from_port,
            &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id],
        )?)?;
        let mut moved = 0;
        loop {
            let keys = redis_cli(from_port, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "2"])?;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1"];
            let to_port_s = to_port.to_string();
            args.extend([to_port_s.as_str(), "", "0", "5000", "KEYS"]);
            args.extend(&keys);
            let reply = redis_cli(from_port, &args)?;
            if !reply.contains("OK") && !reply.contains("NOKEY") {
                bail!("MIGRATE answered {reply}");
            }
            moved += keys.len();
            std::thread::sleep(pause);
        }
        // The target first, then the source (as redis-cli does), then the other primaries;
        // replicas refuse SETSLOT and learn the change through the cluster bus.
        for port in [to_port, from_port] {
            expect_ok(redis_cli(
                port,
                &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id],
            )?)?;
        }
        for node in &self.nodes {
            let port = node.server.port();
            if port != to_port && port != from_port {
                let _ = redis_cli(port, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id])?;
            }
        }
        Ok(moved)
    }
}

fn expect_ok(reply: String) -> anyhow::Result<()> {
    if reply.trim() == "OK" {
        Ok(())
    } else {
        bail!("expected OK, got {reply}")
    }
}

/// `redis-cli -p <port> <args>` (raw output), for commands whose replies are lists.
pub fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(redis_cli_path())
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn redis_cli_path() -> PathBuf {
    crate::which("redis-cli").unwrap_or_else(|| PathBuf::from("redis-cli"))
}
