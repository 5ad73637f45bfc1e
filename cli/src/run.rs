//! `trackgate run <pool.yaml>...`: whole `TrackerPortPool`s in one process, no cluster (one
//! file per pool: a Teltonika pool and a GT06 pool can share the process).
//!
//! The same pure functions as the operator decide the allocation (`plan_local`), and the shard
//! configs and allocation tables are written to a state directory just as the operator writes
//! them into ConfigMaps, so a restart keeps every device on its port. The pool file is watched:
//! an edit re-plans and rewrites the shard files, which the listener reloads without dropping
//! the devices that stay.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use trackgate_api::IdentificationMode;
use trackgate_api::pool::TrackerPortPool;
use trackgate_api::shard_config::SHARD_CONFIG_FILE;
use trackgate_listener::ShardSource;
use trackgate_operator::allocate::{self, ALLOCATION_TABLE_FILE, Previous};
use trackgate_operator::{desired, shared};

/// Arguments of `trackgate run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// YAML files, each holding one TrackerPortPool and the ConfigMaps its `devicesFrom` names.
    #[arg(required = true)]
    pools: Vec<PathBuf>,
    /// Where shard configs and allocation tables are kept across restarts.
    #[arg(long, default_value = ".trackgate")]
    state_dir: PathBuf,
    /// Address device ports are bound on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_addr: SocketAddr,
}

/// Plans the pools, writes their shard files, and serves them until SIGTERM or Ctrl-C.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    trackgate_telemetry::init_logging(trackgate_telemetry::LogFormat::from_env());
    let mut plans = Vec::new();
    for file in &args.pools {
        let plan = plan(file, &args.state_dir)?;
        // NB: a pool's name is its state directory and its Redis keys: two files of one name
        // would overwrite each other's allocation.
        if plans
            .iter()
            .any(|(_, p): &(PathBuf, Plan)| p.name == plan.name)
        {
            bail!("{}: pool {} is named twice", file.display(), plan.name);
        }
        plans.push((file.clone(), plan));
    }
    let sources = plans
        .iter()
        .flat_map(|(_, plan)| plan.shard_files.iter().cloned().map(ShardSource::File))
        .collect();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        for (file, plan) in plans {
            tokio::spawn(watch_pool(file, args.state_dir.clone(), plan.text));
        }
        trackgate_listener::serve(sources, args.admin_addr, Some(args.bind)).await
    })?;
    Ok(())
}

struct Plan {
    /// The pool's name.
    name: String,
    /// The pool file's text this plan was made from.
    text: String,
    shard_files: Vec<PathBuf>,
}

/// Reads the pool, allocates from the persisted tables, writes every shard's `shard.json` and
/// `allocation.txt`, and prints what it decided.
fn plan(pool_file: &Path, state_dir: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(pool_file)
        .with_context(|| format!("reading {}", pool_file.display()))?;
    let (pool, config_maps) =
        parse_documents(&text).with_context(|| format!("reading {}", pool_file.display()))?;
    let name = pool.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        bail!(
            "{}: the TrackerPortPool has no metadata.name",
            pool_file.display()
        );
    }
    let dir = state_dir.join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let previous = read_previous(&dir)?;
    let source = |config_map: &str, key: &str| {
        config_maps
            .get(config_map)
            .and_then(|data| data.get(key))
            .map(String::as_str)
    };
    // Shared pools: one listener config, every port, every device; no allocation.
    if pool.spec.mode == IdentificationMode::Shared {
        return plan_shared(&name, &pool.spec, source, &dir, text);
    }
    let (allocation, configs) = desired::plan_local(&name, &pool.spec, source, &previous)
        .with_context(|| format!("pool {name} is invalid"))?;

    let mut shard_files = Vec::new();
    for config in &configs {
        let shard_dir = dir.join(format!("shard-{}", config.shard));
        std::fs::create_dir_all(&shard_dir)?;
        let table = allocation
            .shards
            .get(&config.shard)
            .map(|entries| allocate::render_table(entries))
            .unwrap_or_default();
        write_if_changed(&shard_dir.join(ALLOCATION_TABLE_FILE), &table)?;
        let file = shard_dir.join(SHARD_CONFIG_FILE);
        write_if_changed(&file, &config.to_json())?;
        shard_files.push(file);
    }

    eprintln!(
        "pool {name}: {} devices allocated in {} shard(s), {} unallocated, {} ports free; state in {}",
        allocation.allocated(),
        configs.len(),
        allocation.unallocated.len(),
        allocation.free_ports,
        dir.display(),
    );
    for (imei, why) in &allocation.unallocated {
        eprintln!("  unallocated {imei}: {}", why.reason());
    }
    Ok(Plan {
        name,
        text,
        shard_files,
    })
}

/// Writes a shared pool's files as its pod would see them mounted: `shard-0/shard.json`, the
/// inline list and one file per `devicesFrom` ConfigMap. The listener reloads the lists when a
/// rewrite (rename, so a new inode) changes them.
fn plan_shared<'a>(
    name: &str,
    spec: &trackgate_api::TrackerPortPoolSpec,
    source: impl Fn(&str, &str) -> Option<&'a str> + Copy,
    dir: &Path,
    text: String,
) -> anyhow::Result<Plan> {
    let plan = shared::plan_local(name, spec, source)
        .with_context(|| format!("pool {name} is invalid"))?;
    let shard_dir = dir.join(format!("shard-{}", shared::SHARED_INDEX));
    for (path, contents) in &plan.files {
        let file = shard_dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_if_changed(&file, contents)?;
    }
    let file = shard_dir.join(SHARD_CONFIG_FILE);
    write_if_changed(&file, &plan.config.to_json())?;
    let ports: Vec<u16> = plan.config.ports.iter().map(|b| b.port).collect();
    eprintln!(
        "pool {name} (shared): {} devices admitted{} on ports {ports:?}; state in {}",
        plan.admitted,
        match spec.admission {
            trackgate_api::AdmissionMode::Open => " (admission: open, any IMEI)",
            trackgate_api::AdmissionMode::Listed => "",
        },
        dir.display(),
    );
    Ok(Plan {
        name: name.to_owned(),
        text,
        shard_files: vec![file],
    })
}

/// ConfigMap data by ConfigMap name, then key.
type ConfigMapData = HashMap<String, BTreeMap<String, String>>;

/// Splits a multi-document YAML file into its one TrackerPortPool and the data of its
/// ConfigMaps (by name). Other kinds (a Secret, a Namespace) are ignored.
fn parse_documents(text: &str) -> anyhow::Result<(TrackerPortPool, ConfigMapData)> {
    #[derive(Deserialize)]
    struct ConfigMapDoc {
        metadata: NameOnly,
        #[serde(default)]
        data: BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    struct NameOnly {
        name: String,
    }

    let mut pool = None;
    let mut config_maps = HashMap::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        match value.get("kind").and_then(serde_yaml::Value::as_str) {
            Some("TrackerPortPool") if pool.is_some() => bail!("more than one TrackerPortPool"),
            Some("TrackerPortPool") => pool = Some(serde_yaml::from_value(value)?),
            Some("ConfigMap") => {
                let cm: ConfigMapDoc = serde_yaml::from_value(value)?;
                config_maps.insert(cm.metadata.name, cm.data);
            }
            _ => {}
        }
    }
    let pool = pool.context("no TrackerPortPool in the file")?;
    Ok((pool, config_maps))
}

/// The allocation persisted by an earlier run: every `shard-*/allocation.txt` under `dir`.
fn read_previous(dir: &Path) -> anyhow::Result<Previous> {
    let mut previous = Previous::new();
    for entry in std::fs::read_dir(dir)? {
        let table = entry?.path().join(ALLOCATION_TABLE_FILE);
        if let Ok(text) = std::fs::read_to_string(&table) {
            allocate::parse_table(&text, &mut previous)
                .with_context(|| format!("reading {}", table.display()))?;
        }
    }
    Ok(previous)
}

/// Writes only on change, so the listener's reload sees no edit when nothing changed.
fn write_if_changed(path: &Path, contents: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    // Write then rename: the listener polls the file and must never read half of it.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Re-plans whenever the pool file changes. The listener reloads the shard files it serves;
/// a plan that needs a shard that did not exist at start is applied on the next restart.
async fn watch_pool(pool_file: PathBuf, state_dir: PathBuf, mut seen: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(text) = tokio::fs::read_to_string(&pool_file).await else {
            continue;
        };
        if text == seen {
            continue;
        }
        seen = text;
        match plan(&pool_file, &state_dir) {
            Ok(_) => {
                tracing::info!(pool_file = %pool_file.display(), "pool file changed: re-planned")
            }
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "pool file changed but cannot be used; keeping the last plan"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = r#"
apiVersion: trackgate.dev/v1alpha1
kind: TrackerPortPool
metadata: {name: laptop}
spec:
  mode: dedicated
  ports: {start: 7000, end: 7009}
  devices:
    - imei: "356307042441013"
      port: 7005
  devicesFrom:
    - configMap: fleet
      key: imeis
  sharding: {portsPerShard: 5, replicasPerShard: 1}
  redis: {urlSecretRef: {name: r, key: url}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: fleet}
data:
  imeis: |
    352093086403655
    123456789012345
"#;

    #[test]
    fn plans_from_the_file_and_keeps_ports_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let pool_file = dir.path().join("pool.yaml");
        std::fs::write(&pool_file, POOL).unwrap();
        let state = dir.path().join("state");

        let first = plan(&pool_file, &state).unwrap();
        let table = |shard: u32| {
            std::fs::read_to_string(state.join(format!("laptop/shard-{shard}/allocation.txt")))
                .unwrap_or_default()
        };
        let tables = format!("{}{}", table(0), table(1));
        assert!(tables.contains("356307042441013 7005"), "{tables}");
        assert!(tables.contains("352093086403655 ") && tables.contains("123456789012345 "));

        // A device removed from the ConfigMap frees its port; the others keep theirs.
        std::fs::write(&pool_file, POOL.replace("    123456789012345\n", "")).unwrap();
        let second = plan(&pool_file, &state).unwrap();
        let after = format!("{}{}", table(0), table(1));
        assert!(!after.contains("123456789012345"), "{after}");
        for line in after.lines() {
            assert!(
                tables.contains(line),
                "{line} moved: before {tables}, after {after}"
            );
        }
        assert!(!first.shard_files.is_empty() && !second.shard_files.is_empty());
        let config = std::fs::read_to_string(&second.shard_files[0]).unwrap();
        trackgate_api::ShardConfig::from_json(&config).unwrap();
    }

    /// A shared pool runs as one listener config with every port and every device, its
    /// `devicesFrom` lists written as the files a pod would mount; an edit rewrites them.
    #[test]
    fn a_shared_pool_is_one_config_with_every_port_and_device_file() {
        let dir = tempfile::tempdir().unwrap();
        let pool_file = dir.path().join("pool.yaml");
        let shared = POOL
            .replace("mode: dedicated", "mode: shared")
            .replace("{start: 7000, end: 7009}", "{start: 7000, end: 7002}");
        std::fs::write(&pool_file, &shared).unwrap();
        let state = dir.path().join("state");
        let planned = plan(&pool_file, &state).unwrap();
        assert_eq!(planned.shard_files.len(), 1);
        let config = trackgate_api::ShardConfig::from_json(
            &std::fs::read_to_string(&planned.shard_files[0]).unwrap(),
        )
        .unwrap();
        assert_eq!(config.ports.len(), 3);
        let base = planned.shard_files[0].parent().unwrap();
        let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap();
        assert_eq!(read(&config.device_files[0]), "356307042441013\n");
        assert!(read(&config.device_files[1]).contains("123456789012345"));

        std::fs::write(&pool_file, shared.replace("    123456789012345\n", "")).unwrap();
        plan(&pool_file, &state).unwrap();
        assert!(!read(&config.device_files[1]).contains("123456789012345"));
    }

    #[test]
    fn refuses_a_file_without_a_pool_or_with_a_missing_device_source() {
        let dir = tempfile::tempdir().unwrap();
        let pool_file = dir.path().join("pool.yaml");
        std::fs::write(
            &pool_file,
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .unwrap();
        let err = plan(&pool_file, dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("no TrackerPortPool"), "{err:#}");

        let without_cm = POOL.split("---").next().unwrap();
        std::fs::write(&pool_file, without_cm).unwrap();
        let err = plan(&pool_file, dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("fleet"), "{err:#}");
    }
}
