//! A client for the `Wraft` API that tries a list of endpoints in order, used by the CLI, the
//! benchmarks and the tests.
//!
//! An endpoint that cannot be reached is skipped; once one answers, its answer (success or
//! error) is final: a follower forwards to the leader itself, so trying another node would only
//! risk applying a command twice.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use wraft_proto::client::wraft_client::WraftClient;
use wraft_proto::client::*;

use crate::error::Outcome;
use crate::limits::{
    check_size, CLIENT_GRPC_MESSAGE_BYTES, MAX_COMMAND_BYTES, MAX_MODULE_BYTES, MAX_QUERY_BYTES,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoint answered ({endpoints}): {last}")]
    Unreachable { endpoints: String, last: String },
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// Refused before sending, with the same limits the node applies.
    #[error("{0}")]
    Invalid(crate::Error),
}

impl ClientError {
    /// Whether the failed call may have been applied. A status from a node says so itself; an
    /// unreachable cluster applied nothing; anything else after a write was sent is unknown.
    pub fn outcome(&self, write: bool) -> Outcome {
        match self {
            ClientError::Unreachable { .. } | ClientError::Invalid(_) => Outcome::Definite,
            ClientError::Status(s) => Outcome::of_status(s).unwrap_or(if write {
                Outcome::Indeterminate
            } else {
                Outcome::Definite
            }),
        }
    }
}

/// A connection to the first endpoint of a list that answers.
pub struct Client {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Client {
    /// `endpoints` are `HOST:PORT` (or full `http://` URLs).
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(15),
        }
    }

    /// Connects to one endpoint.
    pub async fn connect_one(
        endpoint: &str,
        connect_timeout: Duration,
    ) -> Result<WraftClient<Channel>, String> {
        let url = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(url)
            .map_err(|e| format!("{endpoint}: {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("{endpoint}: {}", error_chain(&e)))?;
        Ok(WraftClient::new(channel)
            .max_decoding_message_size(CLIENT_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_GRPC_MESSAGE_BYTES))
    }

    async fn connect(&self) -> Result<WraftClient<Channel>, ClientError> {
        let mut last = String::from("no endpoints given");
        for endpoint in &self.endpoints {
            match Self::connect_one(endpoint, self.connect_timeout).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(ClientError::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(body);
        req.set_timeout(self.request_timeout);
        req
    }

    pub async fn deploy(&self, tenant: &str, wasm: Vec<u8>) -> Result<DeployResponse, ClientError> {
        check_size("the module", wasm.len(), MAX_MODULE_BYTES).map_err(ClientError::Invalid)?;
        let mut c = self.connect().await?;
        let req = self.request(DeployRequest {
            tenant: tenant.into(),
            wasm,
        });
        c.deploy(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    pub async fn exec(
        &self,
        tenant: &str,
        command: Vec<u8>,
        session: Option<(String, u64)>,
    ) -> Result<ExecResponse, ClientError> {
        check_size("the command", command.len(), MAX_COMMAND_BYTES)
            .map_err(ClientError::Invalid)?;
        let mut c = self.connect().await?;
        let (client_id, seq) = session.unwrap_or_default();
        let req = self.request(ExecRequest {
            tenant: tenant.into(),
            command,
            client_id,
            seq,
        });
        c.exec(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    pub async fn query(
        &self,
        tenant: &str,
        query: Vec<u8>,
        consistency: Consistency,
    ) -> Result<QueryResponse, ClientError> {
        check_size("the query", query.len(), MAX_QUERY_BYTES).map_err(ClientError::Invalid)?;
        let mut c = self.connect().await?;
        let req = self.request(QueryRequest {
            tenant: tenant.into(),
            query,
            consistency: consistency as i32,
        });
        c.query(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// Status of one specific endpoint (no failover: the caller asked about that node).
    pub async fn status_of(endpoint: &str) -> Result<StatusResponse, ClientError> {
        let mut c = Self::connect_one(endpoint, Duration::from_secs(2))
            .await
            .map_err(|last| ClientError::Unreachable {
                endpoints: endpoint.into(),
                last,
            })?;
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(5));
        c.status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// Digest of a tenant on one specific endpoint.
    pub async fn digest_of(endpoint: &str, tenant: &str) -> Result<DigestResponse, ClientError> {
        let mut c = Self::connect_one(endpoint, Duration::from_secs(2))
            .await
            .map_err(|last| ClientError::Unreachable {
                endpoints: endpoint.into(),
                last,
            })?;
        let mut req = tonic::Request::new(DigestRequest {
            tenant: tenant.into(),
        });
        req.set_timeout(Duration::from_secs(15));
        c.digest(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
