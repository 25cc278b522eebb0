//! The deterministic call context: where in the log the current call runs, the leader's
//! timestamp for it, and a seed for deterministic pseudo-randomness.
//!
//! Everything here comes from the log (the host's `wraft::context` import), so every replica
//! sees the same values for the same command: use it instead of a clock or an RNG, which a
//! state machine must never touch.
//!
//! ```
//! use wraft_guest_sdk::{context, Context};
//!
//! // Inside `apply` (natively, outside any call, every field is zero).
//! let ctx: Context = context();
//! let created_at_ms = ctx.timestamp_ms;
//! let lottery = ctx.rng().next_below(6) + 1; // a die throw every replica agrees on
//! assert!((1..=6).contains(&lottery));
//! # let _ = created_at_ms;
//! ```

/// Size of the record the host's `context` import writes.
pub const CONTEXT_BYTES: usize = 64;

/// Bit of [`Context::flags`]: set inside `apply`, `restore` and `migrate` (a call whose storage
/// writes count), clear inside `query` and `snapshot`.
pub const FLAG_IN_APPLY: u32 = 1;

/// What the host tells a call about where it runs; see [`context()`].
///
/// The 64-byte record, all integers little-endian: `[0..8)` [`index`](Self::index), `[8..16)`
/// [`term`](Self::term), `[16..24)` [`timestamp_ms`](Self::timestamp_ms), `[24..28)`
/// [`position`](Self::position), `[28..32)` [`flags`](Self::flags), `[32..64)`
/// [`seed`](Self::seed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Context {
    /// In `apply`: the log index of the entry being applied. In `query`: the replica's applied
    /// index (so a query on a lagging follower shows how far it is).
    pub index: u64,
    /// In `apply`: the term of the entry. In `query`: 0.
    pub term: u64,
    /// Milliseconds since the Unix epoch, stamped into the entry by the leader that proposed
    /// it; never below the previous entry's for this tenant (it may repeat). In `query`: the
    /// tenant's last timestamp. A wall clock only to the leader's accuracy: fine for "created
    /// at" and expiry, not for ordering (use [`index`](Self::index) for that).
    pub timestamp_ms: u64,
    /// The command's position within its log entry (entries may carry several commands); with
    /// [`index`](Self::index) it identifies the command.
    pub position: u32,
    /// Bit 0 ([`FLAG_IN_APPLY`]): inside `apply`/`restore`/`migrate`. Other bits are reserved:
    /// ignore them.
    pub flags: u32,
    /// 32 bytes derived by the host from (index, position): the same on every replica,
    /// different for every command. All zero outside `apply`.
    pub seed: [u8; 32],
}

impl Context {
    /// Decodes the host's 64-byte record (layout on [`Context`]).
    pub fn from_bytes(bytes: &[u8; CONTEXT_BYTES]) -> Context {
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let u32_at = |at: usize| {
            let mut word = [0u8; 4];
            word.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(word)
        };
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[32..64]);
        Context {
            index: u64_at(0),
            term: u64_at(8),
            timestamp_ms: u64_at(16),
            position: u32_at(24),
            flags: u32_at(28),
            seed,
        }
    }

    /// Encodes the 64-byte record, as the host writes it.
    pub fn to_bytes(&self) -> [u8; CONTEXT_BYTES] {
        let mut out = [0u8; CONTEXT_BYTES];
        out[0..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..16].copy_from_slice(&self.term.to_le_bytes());
        out[16..24].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        out[24..28].copy_from_slice(&self.position.to_le_bytes());
        out[28..32].copy_from_slice(&self.flags.to_le_bytes());
        out[32..64].copy_from_slice(&self.seed);
        out
    }

    /// Whether this call is an `apply` (or `restore`/`migrate`): bit 0 of
    /// [`flags`](Self::flags).
    pub fn in_apply(&self) -> bool {
        self.flags & FLAG_IN_APPLY != 0
    }

    /// The first 8 bytes of the seed as a little-endian `u64`: one deterministic random number
    /// per command (0 outside `apply`).
    pub fn seed_u64(&self) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.seed[..8]);
        u64::from_le_bytes(word)
    }

    /// A deterministic pseudo-random generator seeded with the whole seed, for when one number
    /// is not enough. Every replica draws the same sequence for the same command.
    pub fn rng(&self) -> SeedRng {
        SeedRng::from_seed(&self.seed)
    }
}

/// A small deterministic PRNG (xoshiro256\*\*), seeded from a [`Context`] seed.
///
/// Not cryptographic: the seed is derived from public log positions, so anyone can predict it.
/// Good for sampling, shuffling, jitter and simulations; never for secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedRng {
    state: [u64; 4],
}

impl SeedRng {
    /// A generator from 32 seed bytes. Each word goes through SplitMix64 first, so an all-zero
    /// seed (outside `apply`) still gives a usable, fixed sequence.
    pub fn from_seed(seed: &[u8; 32]) -> SeedRng {
        let mut state = [0u64; 4];
        for (i, word) in state.iter_mut().enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&seed[i * 8..i * 8 + 8]);
            *word = splitmix64(u64::from_le_bytes(bytes) ^ (i as u64).wrapping_mul(GOLDEN));
        }
        SeedRng { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniformly distributed number in `0..bound` (without modulo bias); 0 if `bound` is 0.
    pub fn next_below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // Reject the top partial range so every residue is equally likely.
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let x = self.next_u64();
            if x >= threshold {
                return x % bound;
            }
        }
    }
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function: a bijective 64-bit mixer.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The context of the current call.
///
/// On wasm32 this calls the host's `wraft::context` import (allowed for both models; a module
/// that never calls this function does not import it). Natively it returns what
/// [`crate::testing::Harness`] or [`crate::testing::StoreHarness`] set for the call in
/// progress, and `Context::default()` (all zero) outside one.
pub fn context() -> Context {
    Context::from_bytes(&crate::host::raw_context())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_round_trips() {
        let ctx = Context {
            index: 0x0102_0304_0506_0708,
            term: 9,
            timestamp_ms: 1_767_225_600_000,
            position: 3,
            flags: FLAG_IN_APPLY,
            seed: core::array::from_fn(|i| i as u8),
        };
        let bytes = ctx.to_bytes();
        assert_eq!(&bytes[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[8..16], &9u64.to_le_bytes());
        assert_eq!(&bytes[24..28], &[3, 0, 0, 0]);
        assert_eq!(&bytes[28..32], &[1, 0, 0, 0]);
        assert_eq!(bytes[32], 0);
        assert_eq!(bytes[63], 31);
        assert_eq!(Context::from_bytes(&bytes), ctx);
        assert!(ctx.in_apply());
        assert_eq!(ctx.seed_u64(), u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]));
        // Reserved flag bits do not count.
        let query = Context {
            flags: 0b110,
            ..ctx
        };
        assert!(!query.in_apply());
    }

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let ctx = Context {
            seed: [7; 32],
            ..Context::default()
        };
        let a: Vec<u64> = (0..8).scan(ctx.rng(), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..8).scan(ctx.rng(), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0] != w[1]));
        // A zero seed still produces a varied sequence.
        let mut zero = Context::default().rng();
        let (x, y) = (zero.next_u64(), zero.next_u64());
        assert!(x != 0 && x != y);
        let mut rng = ctx.rng();
        let mut seen = [false; 6];
        for _ in 0..200 {
            let v = rng.next_below(6);
            seen[v as usize] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "every value of 0..6 comes up in 200 draws"
        );
        assert_eq!(rng.next_below(0), 0);
        assert_eq!(rng.next_below(1), 0);
    }

    #[test]
    fn outside_a_call_the_context_is_zero() {
        assert_eq!(context(), Context::default());
    }
}
