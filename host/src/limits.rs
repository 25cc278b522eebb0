//! Size limits on every path into a node, in one place so that the client API, forwarding and
//! peer traffic agree. A request over a limit gets an error naming the limit, before anything
//! is proposed.

/// The largest module a tenant may deploy.
pub const MAX_MODULE_BYTES: usize = 8 << 20;
/// The largest command `Exec` accepts.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;
/// The largest query `Query` accepts.
pub const MAX_QUERY_BYTES: usize = 1 << 20;
/// The longest tenant name.
pub const MAX_TENANT_NAME: usize = 128;
/// The longest session client id.
pub const MAX_CLIENT_ID: usize = 128;

/// gRPC decode/encode limit of the client API: the largest request (a module) plus room for
/// the rest of the message. Set on the server and on every client, including forwarding.
pub const CLIENT_GRPC_MESSAGE_BYTES: usize = MAX_MODULE_BYTES + (1 << 20);

/// gRPC decode/encode limit of peer traffic. A batch is cut before this size by the sender; one
/// raft message can carry a whole entry, and the largest entry holds one module.
pub const PEER_GRPC_MESSAGE_BYTES: usize = 4 * MAX_MODULE_BYTES;

/// The sender closes a peer batch once it holds this many bytes.
pub const PEER_BATCH_BYTES: usize = 4 << 20;

/// The leader packs drained proposals into one log entry up to this many bytes.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;

/// Whether a tenant name is acceptable: 1 to [`MAX_TENANT_NAME`] characters from
/// `[A-Za-z0-9_.-]`, so names are safe in keys, paths and logs.
pub fn check_tenant_name(name: &str) -> Result<(), crate::Error> {
    if name.is_empty() || name.len() > MAX_TENANT_NAME {
        return Err(crate::Error::InvalidArgument(format!(
            "tenant name must be 1 to {MAX_TENANT_NAME} characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(crate::Error::InvalidArgument(format!(
            "tenant name `{name}` has the character {c:?}; allowed are A-Z a-z 0-9 _ . -"
        )));
    }
    Ok(())
}

/// Checks a payload against its limit.
pub fn check_size(what: &'static str, len: usize, limit: usize) -> Result<(), crate::Error> {
    if len > limit {
        return Err(crate::Error::TooLarge { what, len, limit });
    }
    Ok(())
}
