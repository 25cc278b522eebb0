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

/// The most a tenant's limits may be raised to (`SetLimits`): past these one tenant could hold
/// the apply thread or the node's memory for too long.
pub const MAX_TENANT_FUEL_PER_CALL: u64 = 10_000_000_000;
pub const MAX_TENANT_FUEL_PER_SNAPSHOT: u64 = 100_000_000_000;
pub const MAX_TENANT_MEMORY_BYTES: u64 = 2 << 30;
pub const MAX_TENANT_RESULT_BYTES: u64 = 64 << 20;
/// The least memory a tenant may be given: one Wasm page.
pub const MIN_TENANT_MEMORY_BYTES: u64 = 64 << 10;

/// `current` with the non-zero fields of `change`, checked against the caps. The same function
/// runs on the leader (before proposing) and at apply, so every replica agrees.
pub fn merge_tenant_limits(
    current: &crate::wasm::Limits,
    change: &wraft_proto::log::TenantLimits,
) -> Result<crate::wasm::Limits, String> {
    let mut next = current.clone();
    let pick = |asked: u64, now: u64| if asked == 0 { now } else { asked };
    next.fuel_per_call = pick(change.fuel_per_call, next.fuel_per_call);
    next.fuel_per_snapshot = pick(change.fuel_per_snapshot, next.fuel_per_snapshot);
    next.memory_bytes = pick(change.memory_bytes, next.memory_bytes);
    next.max_result_bytes = pick(change.max_result_bytes, next.max_result_bytes);
    if change.stack_units != 0 {
        next.stack_units = change.stack_units;
    }
    let over = |what: &str, value: u64, cap: u64| {
        (value > cap).then(|| format!("{what} {value} is over the cap of {cap}"))
    };
    if let Some(err) = over(
        "fuel_per_call",
        next.fuel_per_call,
        MAX_TENANT_FUEL_PER_CALL,
    )
    .or_else(|| {
        over(
            "fuel_per_snapshot",
            next.fuel_per_snapshot,
            MAX_TENANT_FUEL_PER_SNAPSHOT,
        )
    })
    .or_else(|| over("memory_bytes", next.memory_bytes, MAX_TENANT_MEMORY_BYTES))
    .or_else(|| {
        over(
            "max_result_bytes",
            next.max_result_bytes,
            MAX_TENANT_RESULT_BYTES,
        )
    })
    .or_else(|| {
        over(
            "stack_units",
            u64::from(next.stack_units),
            u64::from(crate::wasm::MAX_STACK_UNITS),
        )
    }) {
        return Err(err);
    }
    if next.memory_bytes < MIN_TENANT_MEMORY_BYTES {
        return Err(format!(
            "memory_bytes {} is under the minimum of {MIN_TENANT_MEMORY_BYTES} (one Wasm page)",
            next.memory_bytes
        ));
    }
    Ok(next)
}

/// A tenant's limits as stored in its checkpoint.
pub fn to_stored(limits: &crate::wasm::Limits) -> wraft_proto::log::TenantLimits {
    wraft_proto::log::TenantLimits {
        fuel_per_call: limits.fuel_per_call,
        fuel_per_snapshot: limits.fuel_per_snapshot,
        memory_bytes: limits.memory_bytes,
        max_result_bytes: limits.max_result_bytes,
        stack_units: limits.stack_units,
    }
}

/// A checkpoint's limits (absent: the defaults).
pub fn from_stored(stored: Option<&wraft_proto::log::TenantLimits>) -> crate::wasm::Limits {
    let defaults = crate::wasm::Limits::default();
    match stored {
        None => defaults,
        Some(s) => crate::wasm::Limits {
            fuel_per_call: s.fuel_per_call,
            fuel_per_snapshot: s.fuel_per_snapshot,
            memory_bytes: s.memory_bytes,
            max_result_bytes: s.max_result_bytes,
            stack_units: s.stack_units,
            ..defaults
        },
    }
}
