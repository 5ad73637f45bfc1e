//! The allocation record: nothing is lost, nothing is rebuilt by guessing; drift is put back;
//! racing writes fail.

use super::*;

/// A stale leader (one that read the record before another leader rewrote it) must not
/// overwrite the record, nor delete a shard that changed since it read it.
#[tokio::test]
async fn a_stale_record_write_or_delete_fails_with_a_conflict() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(2).build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let stale = Children::fetch(&s.ctx.client, "trackers", &s.pool())
        .await
        .unwrap();
    s.edit(|p| {
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(100),
            port: None,
        })
    });
    s.reconcile().await; // another leader wrote the record meanwhile
    let (_, desired) = plan(&s.pool(), &BTreeMap::new(), &stale_previous(&stale), "img").unwrap();
    let mut changed = desired.clone();
    changed.record[0]
        .data
        .as_mut()
        .unwrap()
        .insert("x".into(), "y".into());
    let failures = stale
        .converge(&s.ctx, "trackers", &s.pool(), &changed, &[])
        .await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].message.contains("modified"), "{failures:?}");
    assert_eq!(failures[0].object, "ConfigMap fleet-allocation");

    // a delete carries the uid and resourceVersion read: a changed shard is not removed
    let stale = Children::fetch(&s.ctx.client, "trackers", &s.pool())
        .await
        .unwrap();
    let (_, mut none) = plan(
        &s.pool(),
        &BTreeMap::new(),
        &stale_previous(&stale),
        "trackgate:test",
    )
    .unwrap();
    none.config_maps.clear();
    s.fake.edit(&format!("{CMS}/fleet-shard-0"), |cm| {
        cm["metadata"]["labels"]["x"] = json!("y");
    });
    let failures = stale
        .converge(&s.ctx, "trackers", &s.pool(), &none, &[])
        .await;
    assert!(
        failures
            .iter()
            .any(|f| f.message.contains("Precondition failed")),
        "{failures:?}"
    );
    assert!(s.fake.get(&format!("{CMS}/fleet-shard-0")).is_some());
}

fn stale_previous(c: &Children) -> Previous {
    record::recover(Evidence {
        pool: "fleet",
        record: &c.record,
        shards: &c.config_maps,
        other_children: 0,
        allocated_in_status: 0,
        reallocate: false,
    })
    .unwrap()
    .previous
}

pub(super) fn table_of(s: &Scenario, name: &str) -> Previous {
    let cm: ConfigMap =
        serde_json::from_value(s.fake.get(&format!("{CMS}/{name}")).unwrap()).unwrap();
    let mut prev = Previous::new();
    crate::allocate::parse_table(
        &cm.data.unwrap()[crate::allocate::ALLOCATION_TABLE_FILE],
        &mut prev,
    )
    .unwrap();
    prev
}

/// A pool with history (devices added, one removed): a deleted or hand-edited shard ConfigMap
/// comes back from the record, and no device changes port (issue 8, case 1).
#[tokio::test]
async fn a_deleted_or_edited_shard_config_map_is_rebuilt_with_no_port_change() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(12)
        .build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    s.edit(|p| {
        p.spec.devices.remove(3);
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(200),
            port: None,
        });
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(201),
            port: None,
        });
    });
    s.reconcile().await;
    let before = table_of(&s, "fleet-allocation");
    let shard0 = s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap();

    s.fake.remove(&format!("{CMS}/fleet-shard-0"));
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        paths(&writes, Method::POST),
        vec![CMS.to_owned()],
        "recreated, create-only"
    );
    assert_eq!(table_of(&s, "fleet-allocation"), before, "no port changed");
    let again = s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap();
    assert_eq!(again["data"], shard0["data"]);

    // an edited shard.json (a port handed to another IMEI) is put back
    s.fake.edit(&format!("{CMS}/fleet-shard-0"), |cm| {
        cm["data"]["shard.json"] = json!("{}");
        cm["data"]["allocation.txt"] = json!(format!("{} 5000\n", imei(999)));
    });
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![format!("{CMS}/fleet-shard-0")]
    );
    assert_eq!(
        s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap()["data"],
        shard0["data"]
    );

    // an operator restart (a new context, nothing cached) keeps every port and writes nothing
    let (client, _server) = s.fake.client();
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let ctx = Arc::new(Context::new(client, metrics, "trackgate:test".into(), None));
    reconcile(Arc::new(s.pool()), ctx).await.unwrap();
    assert_eq!(s.fake.take_writes(), vec![]);
    assert_eq!(table_of(&s, "fleet-allocation"), before);
}

/// The record itself lost: nothing is changed, Degraded says what is missing and how to
/// restore it, one Warning Event; restoring it (even without the owner reference of this pool
/// object) or asking for a fresh allocation recovers.
#[tokio::test]
async fn a_lost_record_changes_nothing_until_restored_or_reallocation_is_asked_for() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let before = table_of(&s, "fleet-allocation");
    let record = s.fake.remove(&format!("{CMS}/fleet-allocation")).unwrap();
    s.fake.remove(&format!("{CMS}/fleet-shard-1"));
    s.edit(|p| {
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(300),
            port: None,
        })
    });

    let (action, writes) = s.reconcile().await;
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![format!("{POOL}/status")],
        "only the status"
    );
    assert!(paths(&writes, Method::POST).is_empty() && paths(&writes, Method::DELETE).is_empty());
    assert_eq!(events(&writes), 1, "one Warning");
    let st = s.status();
    assert_eq!(
        cond(&st, "Degraded"),
        ("True".into(), "AllocationRecordMissing".into())
    );
    let msg = &st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(
        msg.contains("fleet-allocation") && msg.contains("trackgate.dev/reallocate"),
        "{msg}"
    );
    assert_eq!(cond(&st, "PortsAllocated").0, "Unknown");
    assert_eq!(cond(&st, "Ready").0, "False");
    let (_, writes) = s.reconcile().await;
    assert_eq!(writes, vec![], "no event per retry");

    // restored from a backup that names an older pool object as owner
    let mut restored = record.clone();
    restored["metadata"]["ownerReferences"][0]["uid"] = json!("an-older-uid");
    s.fake.insert(&format!("{CMS}/fleet-allocation"), restored);
    s.reconcile().await;
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
    let after = table_of(&s, "fleet-allocation");
    for (imei, port) in &before {
        assert_eq!(after.get(imei), Some(port), "{imei} moved");
    }
    assert!(after.contains_key(&imei(300)));
    assert!(
        s.fake.get(&format!("{CMS}/fleet-shard-1")).is_some(),
        "shard rebuilt"
    );

    // lost again, then a fresh allocation on request: the annotation is consumed
    s.fake.remove(&format!("{CMS}/fleet-allocation"));
    s.reconcile().await;
    s.edit(|p| {
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert(REALLOCATE.into(), "true".into());
    });
    let (_, writes) = s.reconcile().await;
    assert!(s.fake.get(&format!("{CMS}/fleet-allocation")).is_some());
    assert!(
        paths(&writes, Method::PATCH).contains(&POOL.to_owned()),
        "annotation removed"
    );
    assert!(
        !s.pool()
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(REALLOCATE)
    );
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
    assert_eq!(
        table_of(&s, "fleet-allocation"),
        after,
        "the shards still named every port"
    );
}

/// A pool written by the version without a record (tables only in shard ConfigMaps) adopts
/// them into a record without moving anybody.
#[tokio::test]
async fn a_pool_from_the_previous_version_adopts_its_shard_tables() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);
    // the old layout, with an allocation no fresh run would make (reversed ports)
    for (shard, range) in [(0u32, 0u64..8), (1, 8..15)] {
        let table: String = range
            .clone()
            .map(|k| {
                format!(
                    "{} {}\n",
                    imei(k),
                    5000 + 10 * u64::from(shard) + (9 - (k % 10))
                )
            })
            .collect();
        s.fake.insert(
            &format!("{CMS}/fleet-shard-{shard}"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": format!("fleet-shard-{shard}"), "namespace": "trackers",
                                "labels": {"trackgate.dev/pool": "fleet"},
                                "annotations": {"trackgate.dev/applied-hash": "0123456789abcdef"},
                                "ownerReferences": [{"apiVersion": "trackgate.dev/v1alpha1", "kind": "TrackerPortPool",
                                    "name": "fleet", "uid": pool.metadata.uid.clone().unwrap(), "controller": true}]},
                   "data": {"allocation.txt": table, "shard.json": "{}"}}),
        );
    }
    let old: Previous = (0..2)
        .flat_map(|n| table_of(&s, &format!("fleet-shard-{n}")))
        .collect();
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        table_of(&s, "fleet-allocation"),
        old,
        "adopted, nobody moved"
    );
    assert!(events(&writes) >= 1);
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
}

/// `kubectl scale` or an edited Service is drift: put back within one reconcile.
#[tokio::test]
async fn a_scaled_deployment_and_an_edited_service_are_put_back() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(3).build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let dep = "/apis/apps/v1/namespaces/trackers/deployments/fleet-shard-0";
    let svc = "/api/v1/namespaces/trackers/services/fleet-shard-0";
    s.fake.edit(dep, |d| d["spec"]["replicas"] = json!(5));
    s.fake.edit(svc, |d| {
        d["spec"]["externalTrafficPolicy"] = json!("Cluster");
        d["metadata"]["annotations"]["someone-else"] = json!("kept");
    });
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![dep.to_owned(), svc.to_owned()]
    );
    assert_eq!(s.fake.get(dep).unwrap()["spec"]["replicas"], 2);
    let live = s.fake.get(svc).unwrap();
    assert_eq!(live["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        live["metadata"]["annotations"]["someone-else"], "kept",
        "apply merges"
    );
    let (_, writes) = s.reconcile().await;
    assert_eq!(writes, vec![]);
}
