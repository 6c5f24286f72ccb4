//! Which shard a channel lives on, when `--redis-url` names several Redis instances.
//!
//! Jump consistent hash (Lamping and Veach, 2014) of a 64-bit FNV-1a hash of the
//! channel name. Every node computes the same shard for a channel without talking to
//! the others, and going from N to N+1 shards moves only ~1/(N+1) of the channels, all
//! of them to the new shard. The order of the `--redis-url` list therefore matters:
//! add shards at the end, never reorder or remove one in the middle.
//!
//! FNV-1a rather than the standard library's hasher: its output must never change
//! between Rust versions or nodes, or two nodes of one cluster would disagree.

/// The shard (0..`shards`) of `channel`. `shards` must be at least 1.
pub(super) fn shard_of(channel: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    jump(fnv1a(channel.as_bytes()), shards as i64) as usize
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The bucket of `key` among `buckets`, as published by Lamping and Veach.
fn jump(mut key: u64, buckets: i64) -> i64 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_takes_everything() {
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("", 1), 0);
    }

    #[test]
    fn channels_spread_evenly() {
        let mut counts = [0usize; 3];
        for i in 0..30_000 {
            counts[shard_of(&format!("room:{i}"), 3)] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn adding_a_shard_moves_about_one_in_n_and_only_to_it() {
        let total = 20_000;
        let mut moved = 0;
        for i in 0..total {
            let channel = format!("user:{i}");
            let (before, after) = (shard_of(&channel, 3), shard_of(&channel, 4));
            if before != after {
                assert_eq!(after, 3, "{channel} moved between old shards");
                moved += 1;
            }
        }
        // Expected: a quarter.
        assert!((4_500..5_500).contains(&moved), "{moved} of {total} moved");
    }

    #[test]
    fn the_mapping_is_stable() {
        // Pinned values (checked against an independent implementation of the
        // paper's algorithm): every node of every version must agree on them.
        let got: Vec<usize> = ["global", "chat:lobby", "room:1", "room:2", "a", "b"]
            .iter()
            .map(|c| shard_of(c, 3))
            .collect();
        assert_eq!(got, PINNED);
    }

    const PINNED: [usize; 6] = [1, 2, 2, 1, 2, 0];
}
