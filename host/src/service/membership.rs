//! Membership changes through the client API (`ChangeMembers`): forwarded to the leader,
//! proposed there as one ConfChangeV2 (see `raft_loop::RaftLoop::change_members` for the
//! checks), and answered once raft has applied it, or with a clear error: another change in
//! progress, an unknown node, a change that would leave no voter.

use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use wraft_proto::client::{ChangeMembersRequest, ChangeMembersResponse, Member};

use super::{is_forwarded, request_id_of, ClientService, Route};
use crate::raft_loop::RaftInput;
use crate::Error;

/// Most changes one request may carry.
const MAX_CHANGES: usize = 16;

impl ClientService {
    pub(super) async fn change_members_inner(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ChangeMembersResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let rid = request_id_of(&request);
        let req = request.into_inner();
        if req.changes.is_empty() || req.changes.len() > MAX_CHANGES {
            return Err(Error::InvalidArgument(format!(
                "a membership request carries 1 to {MAX_CHANGES} changes, not {}",
                req.changes.len()
            ))
            .into());
        }
        for change in &req.changes {
            if change.addr.len() > 256 {
                return Err(Error::InvalidArgument(format!(
                    "node {}: address longer than 256 bytes",
                    change.id
                ))
                .into());
            }
        }
        match self.route(forwarded).await? {
            Route::Forward(leader) => {
                let mut client = self.leader_client(leader)?;
                return client
                    .change_members(self.forward_request("change_members", req, &rid))
                    .await
                    .map_err(|s| self.forward_failed(leader, s, true));
            }
            Route::Local => {}
        }
        let (reply, answer) = oneshot::channel();
        self.ctx
            .raft
            .try_send(RaftInput::ChangeMembers {
                changes: req.changes,
                reply,
            })
            .map_err(|_| Error::Busy("the raft inbox is full"))?;
        let deadline = Instant::now() + self.ctx.request_timeout;
        let changed = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(Error::ShuttingDown.into()),
            Err(_) => return Err(Error::Timeout(self.ctx.request_timeout).into()),
        };
        let mut members: Vec<Member> = changed
            .voters
            .iter()
            .map(|id| (*id, true))
            .chain(changed.learners.iter().map(|id| (*id, false)))
            .map(|(id, voter)| Member {
                id,
                addr: crate::members::addr_of(&self.ctx.members, id).unwrap_or_default(),
                voter,
            })
            .collect();
        members.sort_by_key(|m| m.id);
        Ok(Response::new(ChangeMembersResponse {
            index: changed.index,
            members,
            cluster_id: format!("{:016x}", self.ctx.cluster_id),
        }))
    }
}
