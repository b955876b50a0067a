//! Dedupe on `(source, id)`: the first event with a key wins, later ones are retries.
//!
//! In: an event's key, payload fingerprint and event day. Out: whether it is the first,
//! an identical retry, or a conflicting one (same key, different payload). Keys are
//! forgotten only by [`DedupeSet::expire_before`], which the aggregator calls as event
//! time moves past the dedupe horizon.
//!
//! Memory is the constraint: a month of keys per partition must fit. Each key is held
//! in 16 bytes (80 bits of the 128-bit event fingerprint, the event day, 32 bits of
//! payload fingerprint) in an open-addressing table with one control byte per slot and
//! a load factor between 7/16 and 7/8, so a held key costs 17 to 39 bytes, never more
//! than 40 (58.3 for the moment the table doubles, old and new held at once). The truncation is safe: with 80 bits, the chance that any two of 100
//! million keys in one partition collide is about 4 in a billion; a 32-bit payload
//! fingerprint misses one conflicting retry in four billion, and misses only its report,
//! never its dedupe.

use hashbrown::HashTable;
use tally_schemas::ids::{EventKey, PayloadFingerprint};

/// One remembered event, 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DedupeEntry {
    key_high: u64,
    key_low: u16,
    /// Days since 1970-01-01 of the event's time, for expiry.
    day: u16,
    payload: u32,
}

impl DedupeEntry {
    pub(crate) fn new(key: EventKey, payload: PayloadFingerprint, day: u16) -> Self {
        DedupeEntry {
            key_high: (key.0 >> 64) as u64,
            key_low: key.0 as u16,
            day,
            payload: payload.0,
        }
    }

    /// Days since 1970-01-01 of the event's time.
    pub(crate) fn day(&self) -> u16 {
        self.day
    }

    fn same_key(&self, other: &DedupeEntry) -> bool {
        self.key_high == other.key_high && self.key_low == other.key_low
    }
}

/// Serialises entries as one byte string of 16 bytes each (little endian), not one
/// structure each: a snapshot holds millions, and the changelog writes and restores
/// them on the hot path of a commit.
pub(crate) mod entries_as_bytes {
    use super::DedupeEntry;
    use serde::{Deserializer, Serializer};

    const SIZE: usize = 16;

    pub fn serialize<S: Serializer>(
        entries: &[DedupeEntry],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(entries.len() * SIZE);
        for e in entries {
            bytes.extend_from_slice(&e.key_high.to_le_bytes());
            bytes.extend_from_slice(&e.key_low.to_le_bytes());
            bytes.extend_from_slice(&e.day.to_le_bytes());
            bytes.extend_from_slice(&e.payload.to_le_bytes());
        }
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<DedupeEntry>, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Vec<DedupeEntry>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "dedupe entries as a byte string of {SIZE} bytes each")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                if !bytes.len().is_multiple_of(SIZE) {
                    return Err(E::invalid_length(bytes.len(), &self));
                }
                Ok(bytes
                    .chunks_exact(SIZE)
                    .map(|b| {
                        let [k0, k1, k2, k3, k4, k5, k6, k7, l0, l1, d0, d1, p0, p1, p2, p3] =
                            b.try_into().unwrap_or([0; SIZE]);
                        DedupeEntry {
                            key_high: u64::from_le_bytes([k0, k1, k2, k3, k4, k5, k6, k7]),
                            key_low: u16::from_le_bytes([l0, l1]),
                            day: u16::from_le_bytes([d0, d1]),
                            payload: u32::from_le_bytes([p0, p1, p2, p3]),
                        }
                    })
                    .collect())
            }
            /// Formats without byte strings (JSON) write them as arrays of numbers.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(byte) = seq.next_element::<u8>()? {
                    bytes.push(byte);
                }
                self.visit_bytes(&bytes)
            }
        }
        deserializer.deserialize_bytes(Visit)
    }
}

/// What dedupe decided about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first event with this key: process it.
    First,
    /// Same key, same payload: a retry; drop it.
    Retry,
    /// Same key, different payload: drop it (the first one wins) and report it.
    Conflict,
}

/// The set of keys seen within the horizon.
#[derive(Debug, Clone, Default)]
pub struct DedupeSet {
    table: HashTable<DedupeEntry>,
}

impl DedupeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// A set with room for `keys` keys, so a batch of known size never rehashes.
    pub fn with_capacity(keys: usize) -> Self {
        DedupeSet {
            table: HashTable::with_capacity(keys),
        }
    }

    /// Records the event if its key is new, and says what it was.
    pub fn observe(&mut self, key: EventKey, payload: PayloadFingerprint, day: u16) -> Seen {
        let entry = DedupeEntry::new(key, payload, day);
        let hash = entry.key_high;
        match self
            .table
            .entry(hash, |e| e.same_key(&entry), |e| e.key_high)
        {
            hashbrown::hash_table::Entry::Occupied(held) => {
                if held.get().payload == entry.payload {
                    Seen::Retry
                } else {
                    Seen::Conflict
                }
            }
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(entry);
                Seen::First
            }
        }
    }

    /// Whether the set holds `key` with `payload` (an event with both would be a
    /// retry), without recording anything.
    pub fn holds(&self, key: EventKey, payload: PayloadFingerprint) -> bool {
        let probe = DedupeEntry::new(key, payload, 0);
        (self.table.find(probe.key_high, |e| e.same_key(&probe)))
            .is_some_and(|held| held.payload == probe.payload)
    }

    /// Forgets keys of events dated before `day`, returning how many, and gives the
    /// memory back so the per-key bound holds after expiry too.
    pub fn expire_before(&mut self, day: u16) -> usize {
        let before = self.table.len();
        self.table.retain(|e| e.day >= day);
        let removed = before - self.table.len();
        if removed > 0 {
            self.table.shrink_to_fit(|e| e.key_high);
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Bytes the table holds on the heap, for the memory benchmark.
    pub fn allocated_bytes(&self) -> usize {
        self.table.allocation_size()
    }

    /// The held entries, for tests comparing whole states.
    #[cfg(test)]
    pub fn entries(&self) -> impl Iterator<Item = &DedupeEntry> {
        self.table.iter()
    }

    /// Rebuilds a set from a snapshot's entries.
    #[cfg(test)]
    pub fn from_entries(entries: impl IntoIterator<Item = DedupeEntry>) -> Self {
        let mut set = DedupeSet::new();
        set.extend(entries);
        set
    }

    /// Adds entries from a snapshot or a changelog record; a key already held keeps
    /// its entry (the first event with a key wins).
    pub fn extend(&mut self, entries: impl IntoIterator<Item = DedupeEntry>) {
        for entry in entries {
            if let hashbrown::hash_table::Entry::Vacant(slot) =
                self.table
                    .entry(entry.key_high, |e| e.same_key(&entry), |e| e.key_high)
            {
                slot.insert(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u64) -> EventKey {
        EventKey::new("svc", &i.to_string())
    }

    #[test]
    fn first_wins_and_retries_are_told_from_conflicts() {
        let mut set = DedupeSet::new();
        assert_eq!(set.observe(key(1), PayloadFingerprint(7), 10), Seen::First);
        assert_eq!(set.observe(key(1), PayloadFingerprint(7), 10), Seen::Retry);
        assert_eq!(
            set.observe(key(1), PayloadFingerprint(8), 10),
            Seen::Conflict
        );
        assert_eq!(set.observe(key(2), PayloadFingerprint(7), 10), Seen::First);
        assert_eq!(set.len(), 2);
        assert!(set.holds(key(1), PayloadFingerprint(7)));
        assert!(!set.holds(key(1), PayloadFingerprint(8)));
        assert!(!set.holds(key(3), PayloadFingerprint(7)));
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Entries(#[serde(with = "entries_as_bytes")] Vec<DedupeEntry>);

    #[test]
    fn entries_travel_as_sixteen_bytes_each_and_come_back_equal() {
        let entries = Entries(
            (0..1000u64)
                .map(|i| DedupeEntry::new(key(i), PayloadFingerprint(i as u32 * 7919), i as u16))
                .collect(),
        );
        let packed = rmp_serde::to_vec(&entries).unwrap();
        // A MessagePack byte string: 3 bytes of header (bin 16), then the entries.
        assert_eq!(packed.len(), 3 + 16 * 1000);
        assert_eq!(rmp_serde::from_slice::<Entries>(&packed).unwrap(), entries);
        let json = serde_json::to_string(&entries).unwrap();
        assert_eq!(serde_json::from_str::<Entries>(&json).unwrap(), entries);
        // One byte short of whole entries: refused, not read as other entries.
        let mut cut = vec![0xc5, 0x3e, 0x7f]; // bin 16 of 15,999 bytes
        cut.extend_from_slice(&packed[3..packed.len() - 1]);
        let error = rmp_serde::from_slice::<Entries>(&cut).unwrap_err();
        assert!(error.to_string().contains("16 bytes each"), "{error}");
    }

    #[test]
    fn expiry_forgets_only_older_days() {
        let mut set = DedupeSet::new();
        set.observe(key(1), PayloadFingerprint(0), 10);
        set.observe(key(2), PayloadFingerprint(0), 11);
        assert_eq!(set.expire_before(11), 1);
        assert_eq!(set.observe(key(2), PayloadFingerprint(0), 11), Seen::Retry);
        assert_eq!(set.observe(key(1), PayloadFingerprint(0), 10), Seen::First);
    }

    #[test]
    fn a_held_key_costs_at_most_40_bytes_at_every_size() {
        let mut set = DedupeSet::new();
        for i in 0..300_000u64 {
            set.observe(key(i), PayloadFingerprint(0), 0);
            // Every size is checked, so the moments right after each growth (the worst
            // case, when the table is least full) are among them.
            if i >= 1000 {
                assert!(
                    set.allocated_bytes() <= 40 * set.len(),
                    "{} bytes for {} keys",
                    set.allocated_bytes(),
                    set.len()
                );
            }
        }
        // After expiry the table shrinks, so the bound still holds.
        set.expire_before(1);
        assert_eq!(set.allocated_bytes(), 0);
    }

    #[test]
    fn snapshot_round_trip_keeps_every_key() {
        let mut set = DedupeSet::new();
        for i in 0..1000 {
            set.observe(key(i), PayloadFingerprint(i as u32), 5);
        }
        let mut restored = DedupeSet::from_entries(set.entries().copied());
        for i in 0..1000 {
            assert_eq!(
                restored.observe(key(i), PayloadFingerprint(i as u32), 5),
                Seen::Retry
            );
        }
    }

    proptest! {
        /// Replaying and shuffling a stream never lets a key through twice: the first
        /// occurrence of each key passes, a later one with its payload is a retry and
        /// one with another payload a conflict, whatever the day it is seen on.
        #[test]
        fn dedupe_is_idempotent_under_replays_and_shuffles(
            events in proptest::collection::vec((0u64..50, 0u32..3, 0u16..3), 1..200),
            seed in any::<u64>(),
        ) {
            let mut set = DedupeSet::new();
            let mut first: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
            for &(i, payload, day) in events.iter().chain(events.iter()) {
                let seen = set.observe(key(i), PayloadFingerprint(payload), day);
                let expected = match first.get(&i) {
                    None => Seen::First,
                    Some(&p) if p == payload => Seen::Retry,
                    Some(_) => Seen::Conflict,
                };
                prop_assert_eq!(seen, expected, "event {} with payload {}", i, payload);
                first.entry(i).or_insert(payload);
            }

            // A shuffled replay of everything already seen passes nothing.
            let mut shuffled = events.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            for &(i, payload, day) in &shuffled {
                let seen = set.observe(key(i), PayloadFingerprint(payload), day);
                prop_assert_ne!(seen, Seen::First);
                prop_assert_eq!(seen == Seen::Retry, first[&i] == payload);
            }
        }
    }
}
