//! Access control, end to end: a 3-node cluster started with a cluster auth secret (made and
//! turned into tokens by `wraft auth`). Each tenant's token reaches its own tenant only, through
//! the leader and through a follower (which forwards the caller's token); a missing, garbage or
//! foreign token is UNAUTHENTICATED; only the admin token deletes and moves leadership; the CLI
//! reports refusals as definite failures (exit 3). Without a secret nothing changes: every
//! other test file runs its clusters without tokens.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tonic::Code;
use wraft_tests::api::pipeline_request::Call as PipelineCall;
use wraft_tests::api::pipeline_response::Answer;
use wraft_tests::api::{
    Consistency, DeleteTenantRequest, DeployRequest, DigestRequest, ExecRequest, QueryRequest,
    StatusRequest, TransferLeaderRequest,
};
use wraft_tests::cluster::{with_token, ClusterOptions};
use wraft_tests::pipeline::Pipeline;
use wraft_tests::{
    plugin_bytes, plugin_path, run_cli, within, Certainty, Cluster, NodeId, RPC_TIMEOUT,
};

/// The message a node gives a request without a token.
const MISSING: &str = "this cluster requires a token: pass --token or WRAFT_TOKEN";

/// A secret file and the tokens the tests use, all made with the CLI.
struct Keys {
    secret: PathBuf,
    admin: String,
    a: String,
    b: String,
}

async fn mint(secret: &Path, who: &[&str]) -> String {
    let secret = secret.display().to_string();
    let mut args = vec!["auth", "token", "--secret-file", secret.as_str()];
    args.extend_from_slice(who);
    let out = run_cli(&args, &[]).await;
    out.expect_code(0, "wraft auth token");
    out.stdout.trim().to_string()
}

async fn make_keys(dir: &Path) -> Keys {
    let secret = dir.join("auth.secret");
    let path = secret.display().to_string();
    run_cli(&["auth", "secret", "--out", &path], &[])
        .await
        .expect_code(0, "wraft auth secret");
    // A second run must not replace the secret a cluster runs with.
    let again = run_cli(&["auth", "secret", "--out", &path], &[]).await;
    again.expect_code(2, "wraft auth secret over an existing file");
    assert!(again.stderr.contains("not overwriting"), "{again}");
    Keys {
        admin: mint(&secret, &["--admin"]).await,
        a: mint(&secret, &["--tenant", "a"]).await,
        b: mint(&secret, &["--tenant", "b"]).await,
        secret,
    }
}

/// Starts `n` nodes that require tokens; the harness's own calls carry the admin token.
async fn start(n: usize, keys: &Keys) -> Cluster {
    let cluster = Cluster::launch_with(
        n,
        ClusterOptions {
            env: vec![(
                "WRAFT_AUTH_SECRET_FILE".into(),
                keys.secret.display().to_string(),
            )],
            ..Default::default()
        },
    )
    .with_token(&keys.admin);
    cluster.leader().await;
    cluster
}

fn follower_of(cluster: &Cluster, leader: NodeId) -> NodeId {
    cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower")
}

fn put(key: &str, value: &str) -> Vec<u8> {
    json!({"op": "put", "key": key, "value": value})
        .to_string()
        .into_bytes()
}

fn exec_body(tenant: &str, command: Vec<u8>) -> ExecRequest {
    ExecRequest {
        tenant: tenant.into(),
        command,
        client_id: String::new(),
        seq: 0,
    }
}

fn query_body(tenant: &str, consistency: Consistency) -> QueryRequest {
    QueryRequest {
        tenant: tenant.into(),
        query: get("k"),
        consistency: consistency as i32,
    }
}

fn get(key: &str) -> Vec<u8> {
    json!({"op": "get", "key": key}).to_string().into_bytes()
}

async fn exec(
    cluster: &Cluster,
    via: NodeId,
    token: Option<&str>,
    tenant: &str,
    command: Vec<u8>,
) -> Result<u64, tonic::Status> {
    let request = with_token(
        ExecRequest {
            tenant: tenant.into(),
            command,
            client_id: String::new(),
            seq: 0,
        },
        token,
    );
    let what = format!("Exec on {tenant} through node {via}");
    let response = within(RPC_TIMEOUT, &what, cluster.client(via).exec(request))
        .await?
        .into_inner();
    match response.outcome {
        Some(wraft_tests::api::exec_response::Outcome::Output(_)) => Ok(response.index),
        other => panic!("{what}: no output: {other:?}"),
    }
}

async fn query(
    cluster: &Cluster,
    via: NodeId,
    token: Option<&str>,
    tenant: &str,
    consistency: Consistency,
) -> Result<Value, tonic::Status> {
    let request = with_token(
        QueryRequest {
            tenant: tenant.into(),
            query: get("k"),
            consistency: consistency as i32,
        },
        token,
    );
    let what = format!("Query on {tenant} through node {via}");
    let response = within(RPC_TIMEOUT, &what, cluster.client(via).query(request)).await?;
    match response.into_inner().outcome {
        Some(wraft_tests::api::query_response::Outcome::Output(out)) => Ok(wraft_tests::json(&out)),
        other => panic!("{what}: no output: {other:?}"),
    }
}

async fn deploy(
    cluster: &Cluster,
    via: NodeId,
    token: Option<&str>,
    tenant: &str,
) -> Result<(), tonic::Status> {
    let request = with_token(
        DeployRequest {
            tenant: tenant.into(),
            wasm: plugin_bytes("kv"),
            rollback_to_version: 0,
        },
        token,
    );
    let what = format!("Deploy of {tenant} through node {via}");
    within(RPC_TIMEOUT, &what, cluster.client(via).deploy(request))
        .await
        .map(drop)
}

async fn digest(
    cluster: &Cluster,
    via: NodeId,
    token: Option<&str>,
    tenant: &str,
) -> Result<(), tonic::Status> {
    let request = with_token(
        DigestRequest {
            tenant: tenant.into(),
        },
        token,
    );
    let what = format!("Digest of {tenant} on node {via}");
    within(RPC_TIMEOUT, &what, cluster.client(via).digest(request))
        .await
        .map(drop)
}

async fn delete(
    cluster: &Cluster,
    via: NodeId,
    token: Option<&str>,
    tenant: &str,
) -> Result<(), tonic::Status> {
    let request = with_token(
        DeleteTenantRequest {
            tenant: tenant.into(),
        },
        token,
    );
    let what = format!("DeleteTenant of {tenant} through node {via}");
    within(
        RPC_TIMEOUT,
        &what,
        cluster.client(via).delete_tenant(request),
    )
    .await
    .map(drop)
}

/// Tenant names a node lists in its `Status` to the holder of `token`.
async fn listed(
    cluster: &Cluster,
    via: NodeId,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let request = with_token(StatusRequest {}, token);
    let what = format!("Status of node {via}");
    let status = within(RPC_TIMEOUT, &what, cluster.client(via).status(request)).await?;
    let mut names: Vec<String> = status
        .into_inner()
        .tenants
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Fails unless `result` is a definite refusal with `code` whose message contains `needle`.
fn refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    needle: &str,
    what: &str,
) {
    let status = match result {
        Ok(v) => panic!("{what}: expected {code:?}, got success {v:?}"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        code,
        "{what}: {:?} {}",
        status.code(),
        status.message()
    );
    assert!(
        status.message().contains(needle),
        "{what}: message {:?} should contain {needle:?}",
        status.message()
    );
    assert_eq!(
        Certainty::of(&status),
        Certainty::Definite,
        "{what}: a refusal is definite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_are_isolated_through_the_leader_and_a_follower() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let keys = make_keys(dir.path()).await;
    let cluster = start(3, &keys).await;
    let leader = cluster.leader().await;
    let follower = follower_of(&cluster, leader);
    let (a, b) = (Some(keys.a.as_str()), Some(keys.b.as_str()));

    // The admin creates tenant a; b's own token creates b, through a follower (which forwards
    // b's token to the leader, which checks it again and accepts it).
    cluster.deploy(leader, "a", "kv").await;
    deploy(&cluster, follower, b, "b")
        .await
        .expect("b's token deploys tenant b");
    let index = exec(&cluster, leader, a, "a", put("k", "a1"))
        .await
        .expect("a's token writes a");
    exec(&cluster, follower, b, "b", put("k", "b1"))
        .await
        .expect("b's token writes b through a follower");
    // Every replica has a's write, so stale reads below see it too.
    cluster.wait_digests_agree(&cluster.ids(), "a", index).await;

    for via in [leader, follower] {
        let on = format!("through node {via}");
        for consistency in [Consistency::Linearizable, Consistency::Stale] {
            let own = query(&cluster, via, a, "a", consistency)
                .await
                .unwrap_or_else(|s| panic!("a reads a ({consistency:?}) {on}: {s:?}"));
            assert_eq!(own, json!({"value": "a1"}), "{consistency:?} {on}");
            refused(
                query(&cluster, via, a, "b", consistency).await,
                Code::PermissionDenied,
                "tenant `b`",
                &format!("a's token queries b ({consistency:?}) {on}"),
            );
        }
        refused(
            exec(&cluster, via, a, "b", put("k", "stolen")).await,
            Code::PermissionDenied,
            "tenant `b`",
            &format!("a's token writes b {on}"),
        );
        refused(
            deploy(&cluster, via, a, "b").await,
            Code::PermissionDenied,
            "tenant `b`",
            &format!("a's token deploys b {on}"),
        );
        refused(
            digest(&cluster, via, a, "b").await,
            Code::PermissionDenied,
            "tenant `b`",
            &format!("a's token asks b's digest {on}"),
        );
        refused(
            exec(&cluster, via, b, "a", put("k", "stolen")).await,
            Code::PermissionDenied,
            "tenant `a`",
            &format!("b's token writes a {on}"),
        );
        digest(&cluster, via, a, "a")
            .await
            .unwrap_or_else(|s| panic!("a's token asks a's digest {on}: {s:?}"));

        // A pipeline stream carries one token, checked against every call's tenant; a stream
        // without a valid token is refused as it opens.
        let what = format!("a's pipeline {on}");
        let mut pipe = Pipeline::open(&mut cluster.client(via), a, &what)
            .await
            .unwrap_or_else(|s| panic!("{what}: refused: {s:?}"));
        let own = pipe
            .call(1, PipelineCall::Exec(exec_body("a", put("p", "a2"))))
            .await;
        assert!(
            matches!(&own, Answer::Exec(r) if r.index > 0),
            "{what}: a's write: {own:?}"
        );
        for (id, call) in [
            (2, PipelineCall::Exec(exec_body("b", put("k", "stolen")))),
            (
                3,
                PipelineCall::Query(query_body("b", Consistency::Linearizable)),
            ),
            (4, PipelineCall::Query(query_body("b", Consistency::Stale))),
        ] {
            match pipe.call(id, call).await {
                Answer::Failure(f) => {
                    assert_eq!(
                        Code::from_i32(f.code),
                        Code::PermissionDenied,
                        "{what}: {f:?}"
                    );
                    assert!(f.message.contains("tenant `b`"), "{what}: {f:?}");
                    assert_eq!(f.outcome, "definite", "{what}: {f:?}");
                }
                other => panic!("{what}: call {id} on b was answered {other:?}"),
            }
        }
        let again = pipe
            .call(
                5,
                PipelineCall::Query(query_body("a", Consistency::Linearizable)),
            )
            .await;
        assert!(
            matches!(again, Answer::Query(_)),
            "{what}: a's read after the refusals: {again:?}"
        );
        for (token, name) in [(None, "no token"), (Some("garbage"), "a garbage token")] {
            let what = format!("a pipeline with {name} {on}");
            match Pipeline::open(&mut cluster.client(via), token, &what).await {
                Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}"),
                Ok(_) => panic!("{what} was opened"),
            }
        }

        // A tenant's token sees only its own tenant in Status; the admin's sees all.
        assert_eq!(listed(&cluster, via, a).await.expect("status"), ["a"]);
        assert_eq!(listed(&cluster, via, b).await.expect("status"), ["b"]);
        assert_eq!(
            listed(&cluster, via, Some(&keys.admin))
                .await
                .expect("status"),
            ["a", "b"]
        );
    }

    // Nothing of a's reached b.
    let b_now = query(&cluster, follower, b, "b", Consistency::Linearizable)
        .await
        .expect("b reads b");
    assert_eq!(b_now, json!({"value": "b1"}));
    // And the admin token reaches every tenant.
    let admin = Some(keys.admin.as_str());
    let a_now = query(&cluster, follower, admin, "a", Consistency::Linearizable)
        .await
        .expect("the admin reads a");
    assert_eq!(a_now, json!({"value": "a1"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_admin_rights_and_the_cli() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let keys = make_keys(dir.path()).await;
    let cluster = start(3, &keys).await;
    let leader = cluster.leader().await;
    let follower = follower_of(&cluster, leader);
    let deployed = cluster.deploy(leader, "a", "kv").await;
    // The CLI below asks the follower, whose listing must already hold the tenant.
    cluster.wait_applied(follower, deployed.index).await;
    let a = Some(keys.a.as_str());

    // Another cluster's secret mints tokens of the same form that this one refuses.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("a directory");
    let foreign = make_keys(&other).await;

    for via in [leader, follower] {
        let on = format!("through node {via}");
        refused(
            exec(&cluster, via, None, "a", put("k", "v")).await,
            Code::Unauthenticated,
            MISSING,
            &format!("exec without a token {on}"),
        );
        refused(
            listed(&cluster, via, None).await,
            Code::Unauthenticated,
            MISSING,
            &format!("status without a token {on}"),
        );
        for (bad, what) in [
            ("garbage", "a garbage token"),
            (foreign.admin.as_str(), "another cluster's admin token"),
            (foreign.a.as_str(), "another cluster's token for a"),
            (&keys.a[..keys.a.len() - 1], "a truncated token"),
        ] {
            refused(
                exec(&cluster, via, Some(bad), "a", put("k", "v")).await,
                Code::Unauthenticated,
                "not valid",
                &format!("exec with {what} {on}"),
            );
        }
        // Only the admin deletes and moves leadership.
        refused(
            delete(&cluster, via, a, "a").await,
            Code::PermissionDenied,
            "admin",
            &format!("a's token deletes a {on}"),
        );
        let transfer = with_token(TransferLeaderRequest { to: 0 }, a);
        refused(
            within(
                RPC_TIMEOUT,
                "TransferLeader",
                cluster.client(via).transfer_leader(transfer),
            )
            .await,
            Code::PermissionDenied,
            "admin",
            &format!("a's token moves leadership {on}"),
        );
    }
    // The nodes are unharmed by all that.
    assert_eq!(cluster.leader().await, leader);

    // The CLI: a refusal is a definite failure (exit 3) with the node's message.
    let endpoint = cluster.endpoint(follower);
    let kv = plugin_path("kv").display().to_string();
    let put_cmd = r#"{"op":"put","key":"k","value":"cli"}"#;
    let out = run_cli(
        &["exec", "--endpoints", &endpoint, "--tenant", "a", put_cmd],
        &[],
    )
    .await;
    out.expect_code(3, "exec without a token");
    assert!(
        out.stderr.contains("Unauthenticated") && out.stderr.contains(MISSING),
        "{out}"
    );
    let out = run_cli(
        &["exec", "--endpoints", &endpoint, "--tenant", "a", put_cmd],
        &[("WRAFT_TOKEN", &keys.a)],
    )
    .await;
    out.expect_code(0, "exec with WRAFT_TOKEN");
    let out = run_cli(
        &[
            "deploy",
            "--endpoints",
            &endpoint,
            "--token",
            &keys.a,
            "--tenant",
            "b",
            &kv,
        ],
        &[],
    )
    .await;
    out.expect_code(3, "deploy of b with a's token");
    assert!(
        out.stderr.contains("PermissionDenied") && out.stderr.contains("tenant `b`"),
        "{out}"
    );
    let out = run_cli(
        &[
            "delete",
            "--endpoints",
            &endpoint,
            "--token",
            &keys.a,
            "--tenant",
            "a",
        ],
        &[],
    )
    .await;
    out.expect_code(3, "delete with a tenant token");
    assert!(out.stderr.contains("needs the admin token"), "{out}");
    let out = run_cli(
        &["tenants", "--endpoints", &endpoint, "--json"],
        &[("WRAFT_TOKEN", &keys.admin)],
    )
    .await;
    out.expect_code(0, "tenants with the admin token");
    assert_eq!(out.json()["name"], "a", "{out}");
    let out = run_cli(
        &[
            "query",
            "--endpoints",
            &endpoint,
            "--tenant",
            "a",
            r#"{"op":"get","key":"k"}"#,
        ],
        &[("WRAFT_TOKEN", &keys.admin)],
    )
    .await;
    out.expect_code(0, "query with the admin token");
    assert_eq!(out.json(), json!({"value": "cli"}), "{out}");
    let out = run_cli(
        &["delete", "--endpoints", &endpoint, "--tenant", "a"],
        &[("WRAFT_TOKEN", &keys.admin)],
    )
    .await;
    out.expect_code(0, "delete with the admin token");
    assert!(
        listed(&cluster, leader, Some(&keys.admin))
            .await
            .expect("status")
            .is_empty(),
        "the tenant is gone"
    );
}
