//! The address book: every member's address and incarnation, as replicated through conf
//! changes (their context carries the added node's record) and snapshots (their descriptor
//! carries the whole book). The Raft loop is its only writer; the transport, the peer service
//! and the client API read it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use wraft_proto::peer::{PeerBook, PeerRecord};

/// Member id → its record.
pub type Book = BTreeMap<u64, PeerRecord>;
/// The book shared between threads.
pub type SharedMembers = Arc<RwLock<Book>>;

pub fn from_proto(book: &PeerBook) -> Book {
    book.peers.iter().map(|p| (p.id, p.clone())).collect()
}

pub fn to_proto(book: &Book) -> PeerBook {
    PeerBook {
        peers: book.values().cloned().collect(),
    }
}

/// The address of `id`, if it is a member.
pub fn addr_of(members: &SharedMembers, id: u64) -> Option<String> {
    members.read().ok()?.get(&id).map(|r| r.addr.clone())
}
