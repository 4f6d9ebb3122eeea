//! Encoding and decoding with a mergeable-ranks table, token for token as tiktoken does it.
//!
//! A token's id is its rank. Each pre-token piece is encoded on its own: if the whole piece is
//! a token, that token; otherwise start from single bytes and repeatedly merge the adjacent
//! pair whose concatenation has the lowest rank, leftmost first on ties, until no adjacent pair
//! concatenates to a token. Pairs are looked up by the ids of their two halves (a table built
//! from every way of cutting every token in two), so no byte strings are hashed while merging.
use crate::pretokenize::Splitter;
use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Pieces up to this many bytes merge by rescanning a small array (fast for short pieces);
/// longer ones through a heap, so 100k repeated characters stay O(n log n), not O(n^2).
const SHORT_PIECE: usize = 64;

const NO_RANK: u32 = u32::MAX;

/// The piece cache is cleared when it holds this many pieces.
const CACHE_PIECES: usize = 1 << 16;

/// Pieces that needed merging, and their tokens: a word that is not a token costs hundreds of
/// nanoseconds to merge and tends to recur. One cache per thread, for one encoder at a time.
#[derive(Default)]
struct PieceCache {
    owner: usize,
    pieces: FxHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
}

thread_local! {
    static CACHE: RefCell<PieceCache> = RefCell::new(PieceCache::default());
}

/// Gives each encoder an identity for the piece caches.
static ENCODERS: AtomicUsize = AtomicUsize::new(1);

#[inline(always)]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Up to 7 bytes packed into an integer, the length in the top byte (so "a" != "a\0").
#[inline(always)]
fn pack(bytes: &[u8]) -> Option<u64> {
    if bytes.len() > 7 {
        return None;
    }
    let mut buf = [0u8; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[7] = bytes.len() as u8;
    Some(u64::from_le_bytes(buf))
}

/// Special tokens found by one Aho-Corasick automaton, longest match first at each position.
pub struct SpecialMatcher {
    automaton: AhoCorasick,
    ids: Vec<u32>,
}

impl SpecialMatcher {
    fn new(specials: &[(String, u32)]) -> Option<SpecialMatcher> {
        if specials.is_empty() {
            return None;
        }
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(specials.iter().map(|(s, _)| s.as_str()))
            .expect("special tokens form a valid automaton");
        Some(SpecialMatcher {
            automaton,
            ids: specials.iter().map(|&(_, id)| id).collect(),
        })
    }
}

/// Which special tokens an `encode` call turns into their ids (the rest is ordinary text).
pub enum Allowed {
    None,
    All,
    Some(SpecialMatcher),
}

pub struct Encoder {
    /// Token bytes -> id, for the whole-piece lookup; tokens of up to 7 bytes are keyed by
    /// their bytes packed into an integer, which spares a pointer chase per lookup.
    ranks: FxHashMap<Vec<u8>, u32>,
    short_ranks: FxHashMap<u64, u32>,
    /// (left id, right id) -> id of their concatenation; the pairs of two single bytes, where
    /// every merge starts, in a dense 256 x 256 table (256 KiB, stays in cache).
    pairs: FxHashMap<u64, u32>,
    byte_pairs: Vec<u32>,
    byte_ids: [u32; 256],
    /// Bytes of every token (special tokens included), `bytes[start[id]..start[id + 1]]`.
    bytes: Vec<u8>,
    start: Vec<usize>,
    defined: Vec<bool>,
    specials: Vec<(String, u32)>,
    all_specials: Option<SpecialMatcher>,
    splitter: Splitter,
    uid: usize,
}

impl Encoder {
    /// Build from (token bytes, rank) pairs, special tokens and a split pattern, checking that
    /// ranks and bytes are unique, every single byte is a token, and specials don't collide.
    pub fn new(
        tokens: Vec<(Vec<u8>, u32)>,
        specials: Vec<(String, u32)>,
        pattern: &str,
    ) -> Result<Encoder, String> {
        let splitter = Splitter::new(pattern)?;
        let mut ranks = FxHashMap::with_capacity_and_hasher(tokens.len(), Default::default());
        let max_id = tokens
            .iter()
            .map(|t| t.1)
            .chain(specials.iter().map(|s| s.1))
            .max();
        let n_ids = max_id.map_or(0, |m| m as usize + 1);
        let mut by_id: Vec<Option<&[u8]>> = vec![None; n_ids];
        for (bytes, id) in &tokens {
            if bytes.is_empty() {
                return Err(format!("token {id} has no bytes"));
            }
            if by_id[*id as usize].replace(bytes.as_slice()).is_some() {
                return Err(format!("rank {id} is given to two tokens"));
            }
            if ranks.insert(bytes.clone(), *id).is_some() {
                return Err(format!("token {bytes:?} appears twice"));
            }
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *ranks.get(&[b as u8][..]).ok_or_else(|| {
                format!("byte 0x{b:02x} is not a token: every single byte must be one")
            })?;
        }
        let mut seen = std::collections::HashSet::new();
        for (s, id) in &specials {
            if !seen.insert(s.as_str()) {
                return Err(format!("special token {s:?} appears twice"));
            }
            if by_id[*id as usize].replace(s.as_bytes()).is_some() {
                return Err(format!(
                    "special token {s:?} has id {id}, which is already taken"
                ));
            }
        }
        let mut pairs = FxHashMap::default();
        for (bytes, &id) in &ranks {
            for cut in 1..bytes.len() {
                if let (Some(&a), Some(&b)) = (ranks.get(&bytes[..cut]), ranks.get(&bytes[cut..])) {
                    pairs.insert(pair_key(a, b), id);
                }
            }
        }
        let (mut flat, mut start, mut defined) = (Vec::new(), vec![0], Vec::with_capacity(n_ids));
        for t in &by_id {
            flat.extend_from_slice(t.unwrap_or_default());
            start.push(flat.len());
            defined.push(t.is_some());
        }
        let mut byte_pairs = vec![NO_RANK; 256 * 256];
        for (a, &id_a) in byte_ids.iter().enumerate() {
            for (b, &id_b) in byte_ids.iter().enumerate() {
                byte_pairs[(a << 8) | b] = *pairs.get(&pair_key(id_a, id_b)).unwrap_or(&NO_RANK);
            }
        }
        let short_ranks = ranks
            .iter()
            .filter_map(|(t, &id)| Some((pack(t)?, id)))
            .collect();
        let all_specials = SpecialMatcher::new(&specials);
        Ok(Encoder {
            ranks,
            short_ranks,
            pairs,
            byte_pairs,
            byte_ids,
            bytes: flat,
            start,
            defined,
            specials,
            all_specials,
            splitter,
            uid: ENCODERS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// One past the largest id.
    pub fn n_ids(&self) -> usize {
        self.defined.len()
    }

    /// The automaton for a subset of the special tokens (all of them if `names` is None).
    pub fn allowed(&self, names: Option<&[String]>) -> Result<Allowed, String> {
        let Some(names) = names else {
            return Ok(Allowed::All);
        };
        let mut chosen = Vec::new();
        for name in names {
            let found = self.specials.iter().find(|(s, _)| s == name);
            chosen.push(
                found
                    .cloned()
                    .ok_or_else(|| format!("{name:?} is not a special token"))?,
            );
        }
        Ok(SpecialMatcher::new(&chosen).map_or(Allowed::None, Allowed::Some))
    }

    #[inline(always)]
    fn pair(&self, a: u32, b: u32) -> u32 {
        *self.pairs.get(&pair_key(a, b)).unwrap_or(&NO_RANK)
    }

    /// The id of the token with exactly these bytes.
    #[inline(always)]
    fn rank_of(&self, bytes: &[u8]) -> Option<u32> {
        match pack(bytes) {
            Some(key) => self.short_ranks.get(&key).copied(),
            None => self.ranks.get(bytes).copied(),
        }
    }

    /// Append the tokens of one piece to `out`.
    #[inline]
    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>, cache: &mut PieceCache) {
        if piece.len() == 1 {
            out.push(self.byte_ids[piece[0] as usize]);
        } else if let Some(id) = self.rank_of(piece) {
            out.push(id);
        } else if piece.len() <= SHORT_PIECE {
            if let Some(&(start, end)) = cache.pieces.get(piece) {
                out.extend_from_slice(&cache.ids[start as usize..end as usize]);
                return;
            }
            let before = out.len();
            self.merge_short(piece, out);
            if cache.pieces.len() >= CACHE_PIECES {
                cache.pieces.clear();
                cache.ids.clear();
            }
            let start = cache.ids.len() as u32;
            cache.ids.extend_from_slice(&out[before..]);
            cache
                .pieces
                .insert(piece.into(), (start, cache.ids.len() as u32));
        } else {
            self.merge_long(piece, out);
        }
    }

    /// Rescan the pair ranks for the lowest after every merge: O(n^2), with n <= 64.
    fn merge_short(&self, piece: &[u8], out: &mut Vec<u32>) {
        let mut parts = [0u32; SHORT_PIECE];
        let mut ranks = [NO_RANK; SHORT_PIECE];
        let mut n = piece.len();
        for (p, &b) in parts.iter_mut().zip(piece) {
            *p = self.byte_ids[b as usize];
        }
        for i in 0..n - 1 {
            ranks[i] = self.byte_pairs[((piece[i] as usize) << 8) | piece[i + 1] as usize];
        }
        loop {
            let (mut best, mut at) = (NO_RANK, 0);
            for (i, &r) in ranks[..n - 1].iter().enumerate() {
                if r < best {
                    (best, at) = (r, i);
                }
            }
            if best == NO_RANK {
                break;
            }
            parts[at] = best;
            parts.copy_within(at + 2..n, at + 1);
            if at + 2 < n {
                ranks.copy_within(at + 2..n - 1, at + 1);
            }
            n -= 1;
            if at + 1 < n {
                ranks[at] = self.pair(parts[at], parts[at + 1]);
            }
            if at > 0 {
                ranks[at - 1] = self.pair(parts[at - 1], parts[at]);
            }
        }
        out.extend_from_slice(&parts[..n]);
    }

    /// The same merges through a min-heap of (rank, position) over a linked list of parts;
    /// entries made stale by a neighbour's merge are skipped when they surface.
    fn merge_long(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        let mut tok: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = (0..n - 1)
            .filter_map(|i| {
                let r = self.pair(tok[i], tok[i + 1]);
                (r != NO_RANK).then_some(Reverse((r, i)))
            })
            .collect();
        while let Some(Reverse((rank, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == n || self.pair(tok[i], tok[j]) != rank {
                continue;
            }
            tok[i] = rank;
            alive[j] = false;
            next[i] = next[j];
            if next[i] < n {
                prev[next[i]] = i;
                let r = self.pair(tok[i], tok[next[i]]);
                if r != NO_RANK {
                    heap.push(Reverse((r, i)));
                }
            }
            if prev[i] != usize::MAX {
                let r = self.pair(tok[prev[i]], tok[i]);
                if r != NO_RANK {
                    heap.push(Reverse((r, prev[i])));
                }
            }
        }
        let mut i = 0;
        while i < n {
            out.push(tok[i]);
            i = next[i];
        }
    }

    /// Append the tokens of `text`, special-token strings treated as ordinary text.
    pub fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        CACHE.with_borrow_mut(|cache| {
            if cache.owner != self.uid {
                *cache = PieceCache {
                    owner: self.uid,
                    ..PieceCache::default()
                };
            }
            self.splitter.for_each(text, |piece| {
                self.encode_piece(piece.as_bytes(), out, cache)
            })
        })
    }

    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 4);
        self.encode_ordinary_into(text, &mut out)?;
        Ok(out)
    }

    /// The first of the `which` special tokens that occurs in `text`, if any.
    pub fn find_special<'t>(&self, text: &'t str, which: &Allowed) -> Option<&'t str> {
        let matcher = match which {
            Allowed::None => return None,
            Allowed::All => self.all_specials.as_ref()?,
            Allowed::Some(m) => m,
        };
        matcher.automaton.find(text).map(|m| &text[m.range()])
    }

    /// Append the tokens of `text`, where the `allowed` special tokens become their ids. The
    /// text between them is split on its own, as tiktoken does (so `$` matches before them).
    pub fn encode_into(
        &self,
        text: &str,
        allowed: &Allowed,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        let matcher = match allowed {
            Allowed::None => None,
            Allowed::All => self.all_specials.as_ref(),
            Allowed::Some(m) => Some(m),
        };
        let Some(matcher) = matcher else {
            return self.encode_ordinary_into(text, out);
        };
        let mut last = 0;
        for m in matcher.automaton.find_iter(text) {
            self.encode_ordinary_into(&text[last..m.start()], out)?;
            out.push(matcher.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        self.encode_ordinary_into(&text[last..], out)
    }

    pub fn encode(&self, text: &str, allowed: &Allowed) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 4);
        self.encode_into(text, allowed, &mut out)?;
        Ok(out)
    }

    /// Encode many texts on `threads` threads (all cores if None).
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        allowed: &Allowed,
        threads: Option<usize>,
    ) -> Result<Vec<Vec<u32>>, String> {
        in_pool(threads, || {
            texts
                .par_iter()
                .map(|t| self.encode(t.as_ref(), allowed))
                .collect()
        })
    }

    /// Encode many texts into one flat array plus offsets: text i is `ids[off[i]..off[i+1]]`.
    pub fn encode_batch_flat<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        allowed: &Allowed,
        threads: Option<usize>,
    ) -> Result<(Vec<u32>, Vec<i64>), String> {
        let parts = self.encode_batch(texts, allowed, threads)?;
        let mut offsets = Vec::with_capacity(parts.len() + 1);
        offsets.push(0i64);
        let mut flat = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        for p in parts {
            flat.extend_from_slice(&p);
            offsets.push(flat.len() as i64);
        }
        Ok((flat, offsets))
    }

    /// The bytes of one token, if the id is defined.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        (id < self.defined.len() && self.defined[id])
            .then(|| &self.bytes[self.start[id]..self.start[id + 1]])
    }

    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self
                .token_bytes(id)
                .ok_or_else(|| format!("{id} is not a token id"))?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

/// Run `f` on a rayon pool of `threads` threads, or on the global pool (all cores) if None.
/// Pools are kept per size: starting threads on every call would cost more than small batches.
pub fn in_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> T {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let Some(n) = threads.map(|n| n.max(1)) else {
        return f();
    };
    let pool = {
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        match pools.iter().find(|(size, _)| *size == n) {
            Some((_, pool)) => pool.clone(),
            None => {
                let pool = Arc::new(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(n)
                        .build()
                        .expect("a thread pool can be started"),
                );
                pools.push((n, pool.clone()));
                pool
            }
        }
    };
    pool.install(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes, plus merges that build "ab", "abc", "bc" and "aa" in that order.
    fn toy() -> Encoder {
        let mut tokens: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        for (i, t) in ["ab", "bc", "abc", "aa", "aaaa"].iter().enumerate() {
            tokens.push((t.as_bytes().to_vec(), 256 + i as u32));
        }
        Encoder::new(tokens, vec![("<|bos|>".into(), 300)], r"\S+|\s+").unwrap()
    }

    /// tiktoken's merge loop, written plainly: the reference for both fast paths.
    fn reference(enc: &Encoder, piece: &[u8]) -> Vec<u32> {
        let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    enc.ranks
                        .get(&[&parts[i][..], &parts[i + 1][..]].concat())
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].extend(right);
        }
        parts.iter().map(|p| enc.ranks[p]).collect()
    }

    #[test]
    fn short_and_long_merges_agree_with_the_plain_loop() {
        let enc = toy();
        let mut state = 7u64;
        for len in [2, 3, 5, 17, 64, 65, 200, 1000] {
            for _ in 0..50 {
                let piece: Vec<u8> = (0..len)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        b"abcx"[(state >> 62) as usize]
                    })
                    .collect();
                let (mut short, mut long) = (Vec::new(), Vec::new());
                if len <= SHORT_PIECE {
                    enc.merge_short(&piece, &mut short);
                } else {
                    short = reference(&enc, &piece);
                }
                enc.merge_long(&piece, &mut long);
                assert_eq!(short, reference(&enc, &piece));
                assert_eq!(long, short);
            }
        }
    }

    #[test]
    fn specials_only_when_allowed_and_decode_round_trips() {
        let enc = toy();
        let text = "abc<|bos|>aaaaa";
        let with = enc.encode(text, &Allowed::All).unwrap();
        assert!(with.contains(&300));
        assert!(!enc.encode(text, &Allowed::None).unwrap().contains(&300));
        assert_eq!(enc.decode_bytes(&with).unwrap(), text.as_bytes());
        assert!(enc.decode_bytes(&[299]).is_err());
        assert!(enc.allowed(Some(&["<|nope|>".to_string()])).is_err());
    }

    #[test]
    fn invalid_tables_are_rejected() {
        let bytes = |n: u32| (0..n).map(|b| (vec![b as u8], b)).collect::<Vec<_>>();
        let err = |r: Result<Encoder, String>| r.err().expect("an invalid table is rejected");
        assert!(err(Encoder::new(bytes(255), vec![], "cl100k")).contains("0xff"));
        let mut dup = bytes(256);
        dup.push((vec![0], 256));
        assert!(err(Encoder::new(dup, vec![], "cl100k")).contains("twice"));
        assert!(Encoder::new(bytes(256), vec![("<|x|>".into(), 5)], "cl100k").is_err());
        assert!(Encoder::new(bytes(256), vec![], "(").is_err());
    }
}
