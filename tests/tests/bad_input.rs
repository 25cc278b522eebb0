//! Bad input gets a precise answer and changes nothing: invalid modules, unknown tenants,
//! oversized commands, commands the module rejects, and a cluster without a quorum.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use wraft_tests::api::module_error::Kind;
use wraft_tests::api::Consistency;
use wraft_tests::cluster::describe_statuses;
use wraft_tests::cluster::{exec_on, exec_request};
use wraft_tests::{run_cli, wait_until, within, Certainty, Cluster, ExecOutcome, QueryOutcome};

/// `(module (memory (export "memory") 1))`: valid wasm that exports nothing a plugin needs.
const MEMORY_ONLY_MODULE: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x05, 0x03, 0x01, 0x00, 0x01, // memory section: one memory, min 1 page, no max
    0x07, 0x0a, 0x01, 0x06, b'm', b'e', b'm', b'o', b'r', b'y', 0x02, 0x00, // export "memory"
];

/// How long a node without a quorum may take to answer.
const NO_QUORUM_ANSWER: Duration = Duration::from_secs(15);

/// An exec on node `via`, which has no quorum, must answer within [`NO_QUORUM_ANSWER`] with
/// UNAVAILABLE (definite) or, at worst, DEADLINE_EXCEEDED (indeterminate).
async fn expect_no_quorum_answer(cluster: &Cluster, via: u64, put: &serde_json::Value, when: &str) {
    let started = std::time::Instant::now();
    let what = format!("exec on node {via} without a quorum, {when}");
    let out = within(NO_QUORUM_ANSWER, &what, cluster.exec(via, "kv", put)).await;
    eprintln!("{what}: answered after {:?}: {out}", started.elapsed());
    match &out {
        ExecOutcome::Definite(s) if s.code() == Code::Unavailable => {}
        ExecOutcome::Indeterminate(s) if s.code() == Code::DeadlineExceeded => {}
        other => panic!(
            "{what}: expected UNAVAILABLE (definite) or DEADLINE_EXCEEDED (indeterminate), got {other}"
        ),
    }
}

fn assert_definite(status: &tonic::Status, code: Code, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert_eq!(
        Certainty::of(status),
        Certainty::Definite,
        "{what}: wraft-outcome of {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_precisely() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let (f, g) = (followers[0], followers[1]);

    // Invalid wasm bytes.
    let err = cluster
        .deploy_bytes(f, "garbage", b"this is not a wasm module".to_vec())
        .await
        .expect_err("deploying bytes that are not wasm");
    assert_definite(&err, Code::InvalidArgument, "deploy of non-wasm bytes");
    let message = err.message().to_lowercase();
    assert!(
        message.contains("wasm") || message.contains("magic") || message.contains("module"),
        "the error should name the problem with the module: {err:?}"
    );

    // Valid wasm without the exports a plugin must have.
    let err = cluster
        .deploy_bytes(leader, "noexports", MEMORY_ONLY_MODULE.to_vec())
        .await
        .expect_err("deploying a module without the plugin exports");
    assert_definite(
        &err,
        Code::InvalidArgument,
        "deploy of a module without exports",
    );
    assert!(
        err.message().to_lowercase().contains("export"),
        "the error should name the missing export: {err:?}"
    );

    // Nothing was deployed: once a later deploy is applied everywhere, no node lists either.
    let deployed = cluster.deploy(f, "kv", "kv").await;
    for id in cluster.ids() {
        let status = cluster.wait_applied(id, deployed.index).await;
        let names: Vec<&str> = status.tenants.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["kv"],
            "node {id}'s tenants after two refused deploys"
        );
    }

    // Unknown tenant, for exec and query, through a follower and the leader.
    for via in [f, leader] {
        let out = cluster
            .exec(via, "nope", &json!({"op": "put", "key": "k", "value": "v"}))
            .await;
        let status = out
            .status()
            .unwrap_or_else(|| panic!("exec on an unknown tenant through node {via}: {out}"));
        assert_definite(
            status,
            Code::NotFound,
            &format!("exec on an unknown tenant through node {via}"),
        );
    }
    for (via, consistency) in [
        (f, Consistency::Linearizable),
        (g, Consistency::Stale),
        (leader, Consistency::Linearizable),
    ] {
        match cluster.query(via, "nope", &json!({"op": "get", "key": "k"}), consistency).await {
            QueryOutcome::Error(s) => assert_eq!(s.code(), Code::NotFound, "{consistency:?} query on an unknown tenant through node {via}: {s:?}"),
            other => panic!("{consistency:?} query on an unknown tenant through node {via}: expected NOT_FOUND, got {other}"),
        }
    }

    // An oversized command (2 MiB): refused with the limit named, and not applied.
    let big = json!({"op": "put", "key": "big", "value": "x".repeat(2 << 20)});
    for via in [f, leader] {
        let out = cluster.exec(via, "kv", &big).await;
        let status = out
            .status()
            .unwrap_or_else(|| panic!("2 MiB command through node {via}: {out}"));
        assert_definite(
            status,
            Code::InvalidArgument,
            &format!("2 MiB command through node {via}"),
        );
        let message = status.message().to_lowercase();
        assert!(
            message.contains("limit") || message.contains("max") || message.contains("exceed"),
            "the error should name the size limit: {status:?}"
        );
    }
    let got = cluster
        .query(
            g,
            "kv",
            &json!({"op": "get", "key": "big"}),
            Consistency::Linearizable,
        )
        .await
        .expect_json("get of the refused big key");
    assert_eq!(got, json!({"value": null}), "the oversized put was applied");

    // A command the module rejects: a ModuleError, not a gRPC error; the CLI exits 3 with it.
    let request = exec_request("kv", b"{not json".to_vec(), "", 0);
    let out = exec_on(&mut cluster.client(g), request, "malformed kv command").await;
    let message = match out {
        ExecOutcome::ModuleError {
            kind: Kind::Rejected,
            message,
            ..
        } => message,
        other => panic!("malformed kv command: expected ModuleError REJECTED, got {other}"),
    };
    assert!(
        !message.trim().is_empty(),
        "a REJECTED module error without a message"
    );
    let endpoints = cluster.endpoints();
    let cli = run_cli(
        &[
            "exec",
            "--endpoints",
            endpoints.as_str(),
            "--tenant",
            "kv",
            "{not json",
        ],
        &[],
    )
    .await;
    cli.expect_code(3, "CLI exec of a malformed command");
    assert!(
        cli.stderr.contains(&message),
        "CLI stderr should carry the module's message {message:?}: {cli}"
    );

    // No quorum: kill the leader and one follower. The survivor answers within a bounded time,
    // first while it still believes in the dead leader, then once it knows there is none.
    cluster.kill(leader).await;
    cluster.kill(f).await;
    let put = json!({"op": "put", "key": "k", "value": "v"});
    expect_no_quorum_answer(&cluster, g, &put, "right after the crash").await;
    let c = &cluster;
    wait_until(
        Duration::from_secs(30),
        &format!("node {g} to report no leader (leader_id 0) without a quorum"),
        move || async move {
            let status = c.status(g).await?;
            if status.leader_id == 0 {
                Ok(())
            } else {
                Err(describe_statuses(&[status]))
            }
        },
    )
    .await;
    expect_no_quorum_answer(&cluster, g, &put, "with no leader known").await;
    let out = within(
        NO_QUORUM_ANSWER,
        "linearizable query on the only survivor (no quorum)",
        cluster.query(
            g,
            "kv",
            &json!({"op": "get", "key": "a"}),
            Consistency::Linearizable,
        ),
    )
    .await;
    assert!(
        matches!(out, QueryOutcome::Error(_)),
        "a linearizable read without a quorum must fail, got {out}"
    );
}
