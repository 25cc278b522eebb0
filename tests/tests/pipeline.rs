//! The `Pipeline` stream, end to end on a real 3-node cluster: its calls are answered as their
//! unary calls would be (outputs, module errors, and failures with their code and outcome, the
//! stream going on after each); thousands of calls sent at once, past the node's in-flight
//! bound, are all answered, and so are large calls past its bound in bytes; a message over the
//! size limit ends the stream with a status and nothing else; a client that walks away with
//! calls in flight leaves the replicas agreeing.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use tonic::Code;
use wraft_tests::api::module_error::Kind;
use wraft_tests::api::pipeline_request::Call;
use wraft_tests::api::pipeline_response::Answer;
use wraft_tests::api::{exec_response, query_response, Consistency, ExecRequest, QueryRequest};
use wraft_tests::cluster::{exec_request, ClusterOptions};
use wraft_tests::pipeline::Pipeline;
use wraft_tests::{json as parse, metric, Cluster, NodeId, QueryOutcome};

/// Open `Pipeline` streams on a node.
const STREAMS: &str = "wraft_pipeline_streams";
/// Pipelined commands a node answered (each also counted as its method, like a unary call).
const PIPELINED_EXECS: &str = "wraft_grpc_requests_total{code=\"Ok\",method=\"pipeline_exec\"}";

fn put(tenant: &str, key: &str, value: &str) -> Call {
    let command = json!({"op": "put", "key": key, "value": value}).to_string();
    Call::Exec(exec_request(tenant, command.into_bytes(), "", 0))
}

fn get(tenant: &str, key: &str, consistency: Consistency) -> Call {
    Call::Query(QueryRequest {
        tenant: tenant.into(),
        query: json!({"op": "get", "key": key}).to_string().into_bytes(),
        consistency: consistency as i32,
    })
}

/// The output of an `Exec` answer, as JSON; anything else fails the test.
fn exec_output(answer: &Answer, what: &str) -> serde_json::Value {
    match answer {
        Answer::Exec(resp) => match &resp.outcome {
            Some(exec_response::Outcome::Output(out)) => {
                assert!(resp.index > 0, "{what}: applied at index 0");
                parse(out)
            }
            other => panic!("{what}: expected an output, got {other:?}"),
        },
        other => panic!("{what}: expected an Exec answer, got {other:?}"),
    }
}

/// The output of a `Query` answer, as JSON; anything else fails the test.
fn query_output(answer: &Answer, what: &str) -> serde_json::Value {
    match answer {
        Answer::Query(resp) => match &resp.outcome {
            Some(query_response::Outcome::Output(out)) => parse(out),
            other => panic!("{what}: expected an output, got {other:?}"),
        },
        other => panic!("{what}: expected a Query answer, got {other:?}"),
    }
}

/// A failure answer must carry `code` and `outcome`, and say `words` in its message.
fn expect_failure(answer: &Answer, code: Code, outcome: &str, words: &str, what: &str) {
    match answer {
        Answer::Failure(f) => {
            assert_eq!(Code::from_i32(f.code), code, "{what}: wrong code in {f:?}");
            assert_eq!(f.outcome, outcome, "{what}: wrong outcome in {f:?}");
            assert!(
                f.message.contains(words),
                "{what}: the message {:?} does not say {words:?}",
                f.message
            );
        }
        other => panic!("{what}: expected a failure, got {other:?}"),
    }
}

fn follower_of(cluster: &Cluster, leader: NodeId) -> NodeId {
    cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a 3-node cluster has a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_calls_are_answered_as_their_unary_calls_are() {
    let cluster = Cluster::start_with(
        3,
        ClusterOptions {
            metrics: true,
            ..Default::default()
        },
    )
    .await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, "kv", "kv").await;
    let follower = follower_of(&cluster, leader);

    for via in [leader, follower] {
        let what = format!("a pipeline through node {via}");
        let mut pipe = Pipeline::open(&mut cluster.client(via), None, &what)
            .await
            .unwrap_or_else(|s| panic!("{what}: refused: {s:?}"));
        let key = format!("key-{via}");

        // A command: the module's own output, as the unary Exec gives it.
        let first = pipe.call(1, put("kv", &key, "one")).await;
        assert_eq!(exec_output(&first, &what), json!({"prev": null}));
        let second = pipe.call(2, put("kv", &key, "two")).await;
        assert_eq!(exec_output(&second, &what), json!({"prev": "one"}));

        // Reads at every level see it (linearizable and lease through the leader's
        // confirmation; stale because this stream's own write was applied here before its
        // answer came back).
        for (id, level) in [
            (3, Consistency::Linearizable),
            (4, Consistency::Lease),
            (5, Consistency::Stale),
        ] {
            let got = pipe.call(id, get("kv", &key, level)).await;
            assert_eq!(
                query_output(&got, &what),
                json!({"value": "two"}),
                "{what}: a {level:?} read"
            );
        }

        // A command the module rejects is applied (with no effect) and answered as such.
        let bad = json!({"op": "put", "key": key}).to_string().into_bytes();
        match pipe
            .call(6, Call::Exec(exec_request("kv", bad, "", 0)))
            .await
        {
            Answer::Exec(resp) => match resp.outcome {
                Some(exec_response::Outcome::Error(e)) => {
                    assert_eq!(e.kind(), Kind::Rejected, "{what}: {e:?}")
                }
                other => panic!("{what}: a malformed command gave {other:?}"),
            },
            other => panic!("{what}: a malformed command gave {other:?}"),
        }

        // Failures carry the unary call's code and outcome; each leaves the stream open.
        let unknown = pipe.call(7, put("nobody", "k", "v")).await;
        expect_failure(&unknown, Code::NotFound, "definite", "nobody", &what);
        let huge = "x".repeat((1 << 20) + 1);
        let oversized = pipe.call(8, put("kv", "k", &huge)).await;
        expect_failure(
            &oversized,
            Code::InvalidArgument,
            "definite",
            "the command",
            &what,
        );
        let mut level = QueryRequest {
            tenant: "kv".into(),
            query: b"{}".to_vec(),
            consistency: 0,
        };
        level.consistency = 99;
        let odd_level = pipe.call(9, Call::Query(level)).await;
        expect_failure(
            &odd_level,
            Code::InvalidArgument,
            "definite",
            "consistency",
            &what,
        );
        pipe.send(10, None);
        let (id, empty) = pipe.answer().await;
        assert_eq!(id, 10, "{what}");
        expect_failure(&empty, Code::InvalidArgument, "definite", "neither", &what);
        let bad_name = pipe.call(11, put("No Such/Name", "k", "v")).await;
        expect_failure(&bad_name, Code::InvalidArgument, "definite", "", &what);

        // The stream still serves after all that; the unary API agrees with it.
        let last = pipe
            .call(12, get("kv", &key, Consistency::Linearizable))
            .await;
        assert_eq!(query_output(&last, &what), json!({"value": "two"}));
        let unary = cluster
            .query(
                via,
                "kv",
                &json!({"op": "get", "key": key}),
                Consistency::Linearizable,
            )
            .await;
        match unary {
            QueryOutcome::Ok { output, .. } => {
                assert_eq!(parse(&output), json!({"value": "two"}), "{what}")
            }
            other => panic!("{what}: unary read gave {other}"),
        }
        let unknown_unary = cluster.exec(via, "nobody", &json!({"op": "get"})).await;
        assert_eq!(
            unknown_unary.code(),
            Some(Code::NotFound),
            "{unknown_unary}"
        );

        // The node counts the open stream, and its calls under their own method names.
        assert_eq!(
            metric(&cluster, via, STREAMS).await,
            1,
            "{what}: open streams"
        );
        let execs = metric(&cluster, via, PIPELINED_EXECS).await;
        assert!(
            execs >= 3,
            "{what}: {execs} pipelined execs counted, 3 answered"
        );

        // Closing our side ends the node's once everything is answered.
        pipe.close();
        match pipe.next().await {
            Ok(None) => {}
            other => panic!("{what}: after close, expected the end, got {other:?}"),
        }
        assert_eq!(
            metric(&cluster, via, STREAMS).await,
            0,
            "{what}: open streams"
        );
    }
    cluster.wait_digests_agree(&cluster.ids(), "kv", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_calls_in_flight_on_one_stream_are_all_answered() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, "kv", "kv").await;
    let follower = follower_of(&cluster, leader);

    // More than the node's in-flight bound (1,024) at once, through a follower (which serves
    // its commands through raft): the node stops reading past the bound and must pick up
    // again as calls finish, or this hangs.
    const CALLS: u64 = 3_000;
    let what = format!("{CALLS} calls through node {follower}");
    let mut pipe = Pipeline::open(&mut cluster.client(follower), None, &what)
        .await
        .unwrap_or_else(|s| panic!("{what}: refused: {s:?}"));
    for id in 0..CALLS {
        pipe.send(id, Some(put("kv", &format!("k{id}"), &format!("v{id}"))));
    }
    let mut indexes = BTreeMap::new();
    for _ in 0..CALLS {
        let (id, answer) = pipe.answer().await;
        assert_eq!(
            exec_output(&answer, &what),
            json!({"prev": null}),
            "{what}: call {id}"
        );
        let Answer::Exec(resp) = answer else {
            unreachable!("checked by exec_output")
        };
        assert!(
            indexes.insert(id, resp.index).is_none(),
            "{what}: call {id} answered twice"
        );
    }
    assert_eq!(
        indexes.keys().copied().collect::<BTreeSet<_>>(),
        (0..CALLS).collect(),
        "{what}: every call answered once"
    );
    // (Commands proposed together may share a log entry, so indexes need not differ.)
    let last = indexes.values().copied().max().unwrap_or(0);

    // And reads of all of it, pipelined the same way, at the leader.
    let mut reads = Pipeline::open(&mut cluster.client(leader), None, "reads")
        .await
        .unwrap_or_else(|s| panic!("reads: refused: {s:?}"));
    for id in 0..CALLS {
        reads.send(
            id,
            Some(get("kv", &format!("k{id}"), Consistency::Linearizable)),
        );
    }
    let mut seen = BTreeSet::new();
    for _ in 0..CALLS {
        let (id, answer) = reads.answer().await;
        assert_eq!(
            query_output(&answer, "a pipelined read"),
            json!({"value": format!("v{id}")}),
            "read {id}"
        );
        assert!(seen.insert(id), "read {id} answered twice");
    }
    cluster.wait_digests_agree(&cluster.ids(), "kv", last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_message_ends_its_stream_and_a_walked_away_client_harms_nothing() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, "kv", "kv").await;

    // Large calls sent at once: the node holds about 4 MiB of a stream's calls at a time, so
    // these go through a few at a time, and one larger than that whole budget (5 MiB, still
    // under the 9 MiB message limit) must be answered too, not wait for room forever.
    let what = "large pipelined calls";
    let mut pipe = Pipeline::open(&mut cluster.client(leader), None, what)
        .await
        .unwrap_or_else(|s| panic!("{what}: refused: {s:?}"));
    let big = "v".repeat(900 << 10);
    for id in 0..10 {
        pipe.send(id, Some(put("kv", &format!("big{id}"), &big)));
    }
    pipe.send(
        10,
        Some(Call::Exec(ExecRequest {
            tenant: "kv".into(),
            command: vec![b'x'; 5 << 20],
            client_id: String::new(),
            seq: 0,
        })),
    );
    let mut answered = BTreeSet::new();
    for _ in 0..=10 {
        let (id, answer) = pipe.answer().await;
        if id == 10 {
            expect_failure(
                &answer,
                Code::InvalidArgument,
                "definite",
                "the command",
                what,
            );
        } else {
            assert_eq!(
                exec_output(&answer, what),
                json!({"prev": null}),
                "{what}: {id}"
            );
        }
        assert!(answered.insert(id), "{what}: call {id} answered twice");
    }

    // A message over the node's gRPC message limit (9 MiB) cannot be decoded: the stream
    // ends with that status instead of an answer, and the node goes on serving.
    let what = "an oversized pipeline message";
    pipe.send(
        1,
        Some(Call::Exec(ExecRequest {
            tenant: "kv".into(),
            command: vec![b'x'; 10 << 20],
            client_id: String::new(),
            seq: 0,
        })),
    );
    match pipe.next().await {
        Err(status) => assert_eq!(
            status.code(),
            Code::OutOfRange,
            "{what}: ended with {status:?}"
        ),
        Ok(other) => panic!("{what}: expected the stream to end with a status, got {other:?}"),
    }
    cluster
        .exec_ok(
            leader,
            "kv",
            &json!({"op": "put", "key": "after", "value": "1"}),
        )
        .await;

    // A client that sends a burst of writes and goes away without reading an answer: the
    // node finishes or drops them, stays up, and its replicas agree on whatever was applied.
    let walked = Pipeline::open(&mut cluster.client(leader), None, "a walked-away client")
        .await
        .unwrap_or_else(|s| panic!("a walked-away client: refused: {s:?}"));
    for id in 0..500 {
        walked.send(id, Some(put("kv", &format!("gone{id}"), "v")));
    }
    drop(walked);
    let (index, _) = cluster
        .exec_ok(
            leader,
            "kv",
            &json!({"op": "put", "key": "later", "value": "2"}),
        )
        .await;
    cluster
        .wait_digests_agree(&cluster.ids(), "kv", index)
        .await;
}
