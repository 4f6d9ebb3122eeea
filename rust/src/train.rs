//! Byte-level BPE training.
//!
//! Texts arrive in chunks and are cut into pieces by the split pattern; only the count of each
//! distinct piece is kept, so input of any size streams through in bounded memory. Each
//! distinct piece becomes a "word" of token ids (initially its bytes; byte b has id b) weighted
//! by its count. Training then repeats one step: take the most frequent adjacent pair, give its
//! concatenation the next id, rewrite the words that contain it, and update the pair counts
//! only where those words changed.
//!
//! Tie-break (deterministic): the highest count wins; among equal counts, the pair with the
//! smallest (left id, right id). Should a pair concatenate to bytes that are already a token
//! (two merge paths to one string), it is merged into that token and no new id is spent, so
//! the vocabulary stays a set of distinct byte strings, as the tiktoken format requires.
use crate::pretokenize::Splitter;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// How often each distinct piece occurs in the texts seen so far.
pub struct PieceCounts {
    splitter: Splitter,
    counts: FxHashMap<String, u64>,
}

impl PieceCounts {
    pub fn new(pattern: &str) -> Result<PieceCounts, String> {
        Ok(PieceCounts {
            splitter: Splitter::new(pattern)?,
            counts: FxHashMap::default(),
        })
    }

    /// Count the pieces of a chunk of texts, in parallel on all cores.
    pub fn add<S: AsRef<str> + Sync>(&mut self, texts: &[S]) -> Result<(), String> {
        let splitter = &self.splitter;
        let per_thread = texts
            .len()
            .div_ceil(rayon::current_num_threads() * 4)
            .max(1);
        let local = texts
            .par_chunks(per_thread)
            .map(|docs| {
                let mut counts: FxHashMap<&str, u64> = FxHashMap::default();
                for doc in docs {
                    splitter.for_each(doc.as_ref(), |p| *counts.entry(p).or_default() += 1)?;
                }
                Ok::<_, String>(counts)
            })
            .try_reduce(FxHashMap::default, |mut a, mut b| {
                if a.len() < b.len() {
                    std::mem::swap(&mut a, &mut b);
                }
                for (piece, n) in b {
                    *a.entry(piece).or_default() += n;
                }
                Ok(a)
            })?;
        for (piece, n) in local {
            match self.counts.get_mut(piece) {
                Some(total) => *total += n,
                None => {
                    self.counts.insert(piece.to_owned(), n);
                }
            }
        }
        Ok(())
    }

    /// Number of distinct pieces.
    pub fn len(&self) -> usize {
        self.counts.len()
    }
}

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

pub struct Trainer {
    words: Vec<Vec<u32>>,
    weights: Vec<i64>,
    /// Pair -> total count over all words (weighted).
    pair_counts: FxHashMap<u64, i64>,
    /// Pair -> words that may contain it (a superset: entries are checked when used).
    where_: FxHashMap<u64, Vec<u32>>,
    /// Max-heap of (count, Reverse(pair)); an entry whose count is stale is re-pushed or
    /// dropped when it reaches the top.
    heap: BinaryHeap<(i64, Reverse<u64>)>,
    vocab: Vec<Vec<u8>>,
    ids: FxHashMap<Vec<u8>, u32>,
    /// Step number at which each word was last rewritten (dedupes where-lists).
    seen: Vec<u32>,
    steps: u32,
}

impl Trainer {
    pub fn new(counts: PieceCounts) -> Trainer {
        // Single-byte pieces have no pairs; sorting makes word order independent of hashing.
        let mut pieces: Vec<(String, u64)> = counts
            .counts
            .into_iter()
            .filter(|(p, _)| p.len() > 1)
            .collect();
        pieces.par_sort_unstable();
        let words: Vec<Vec<u32>> = pieces
            .iter()
            .map(|(p, _)| p.bytes().map(u32::from).collect())
            .collect();
        let weights: Vec<i64> = pieces.iter().map(|&(_, n)| n as i64).collect();
        drop(pieces);
        let mut pair_counts: FxHashMap<u64, i64> = FxHashMap::default();
        let mut where_: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
        for (w, word) in words.iter().enumerate() {
            for p in word.windows(2) {
                let k = key(p[0], p[1]);
                *pair_counts.entry(k).or_default() += weights[w];
                let list = where_.entry(k).or_default();
                if list.last() != Some(&(w as u32)) {
                    list.push(w as u32);
                }
            }
        }
        let heap = pair_counts.iter().map(|(&k, &n)| (n, Reverse(k))).collect();
        let vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let ids = vocab
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), i as u32))
            .collect();
        let seen = vec![u32::MAX; words.len()];
        Trainer {
            words,
            weights,
            pair_counts,
            where_,
            heap,
            vocab,
            ids,
            seen,
            steps: 0,
        }
    }

    /// The tokens so far, by id: the 256 bytes, then one per merge.
    pub fn vocab(&self) -> &[Vec<u8>] {
        &self.vocab
    }

    /// The most frequent pair, per the tie-break, or None when no pair is left.
    fn pop_best(&mut self) -> Option<u64> {
        while let Some((n, Reverse(k))) = self.heap.pop() {
            let current = self.pair_counts.get(&k).copied().unwrap_or(0);
            if current == n && n > 0 {
                return Some(k);
            }
            // Lower now: re-queue at the true count. Higher: a newer entry is queued already.
            if 0 < current && current < n {
                self.heap.push((current, Reverse(k)));
            }
        }
        None
    }

    /// Add up to `max_new` tokens; returns how many were added (fewer once no pair is left).
    pub fn step(&mut self, max_new: usize) -> usize {
        let mut added = 0;
        while added < max_new {
            let Some(k) = self.pop_best() else { break };
            let (a, b) = ((k >> 32) as u32, k as u32);
            let bytes = [&self.vocab[a as usize][..], &self.vocab[b as usize][..]].concat();
            let next_id = self.vocab.len() as u32;
            let new = *self.ids.entry(bytes.clone()).or_insert(next_id);
            if new == next_id {
                self.vocab.push(bytes);
                added += 1;
            }
            self.merge(a, b, new);
        }
        added
    }

    /// Rewrite every word containing (a, b) with `new`, updating counts where words changed.
    fn merge(&mut self, a: u32, b: u32, new: u32) {
        let step = self.steps;
        self.steps += 1;
        let words = self.where_.remove(&key(a, b)).unwrap_or_default();
        let mut raised: Vec<u64> = Vec::new();
        let (pair_counts, where_) = (&mut self.pair_counts, &mut self.where_);
        for w in words {
            if self.seen[w as usize] == step {
                continue;
            }
            self.seen[w as usize] = step;
            let weight = self.weights[w as usize];
            merge_word(&mut self.words[w as usize], a, b, new, |k, up| {
                let n = pair_counts.entry(k).or_default();
                if up {
                    *n += weight;
                    let list = where_.entry(k).or_default();
                    if list.last() != Some(&w) {
                        list.push(w);
                    }
                    raised.push(k);
                } else {
                    *n -= weight;
                }
            });
        }
        self.pair_counts.remove(&key(a, b));
        raised.sort_unstable();
        raised.dedup();
        for k in raised {
            let n = self.pair_counts[&k];
            if n > 0 {
                self.heap.push((n, Reverse(k)));
            }
        }
    }
}

/// Merge every (a, b) in `word`, left to right, reporting each pair that disappears
/// (`up` = false) or appears (`up` = true). Neighbours are read from the already-rewritten
/// word, so for `a b a b` the intermediate `(new, a)` is added and then removed again.
fn merge_word(word: &mut Vec<u32>, a: u32, b: u32, new: u32, mut change: impl FnMut(u64, bool)) {
    let mut i = 0;
    while i + 1 < word.len() {
        if word[i] == a && word[i + 1] == b {
            change(key(a, b), false);
            if i > 0 {
                change(key(word[i - 1], a), false);
                change(key(word[i - 1], new), true);
            }
            if i + 2 < word.len() {
                change(key(b, word[i + 2]), false);
                change(key(new, word[i + 2]), true);
            }
            word[i] = new;
            word.remove(i + 1);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(texts: &[&str], n: usize) -> Vec<Vec<u8>> {
        let mut counts = PieceCounts::new(r"\S+|\s+").unwrap();
        counts.add(texts).unwrap();
        let mut t = Trainer::new(counts);
        t.step(n);
        t.vocab()[256..].to_vec()
    }

    #[test]
    fn most_frequent_pair_first_then_smallest_ids() {
        assert_eq!(
            train(&["ab ab ab cd cd"], 2),
            vec![b"ab".to_vec(), b"cd".to_vec()]
        );
        // (c, d) and (a, b) tie at 2: (97, 98) is the smaller pair.
        assert_eq!(train(&["cd ab cd ab"], 1), vec![b"ab".to_vec()]);
    }

    #[test]
    fn overlapping_pairs_count_and_merge_left_to_right() {
        // (a, a) counts 3 + 2; then aaaa = [aa, aa] and aaa = [aa, a] tie at 1, and
        // (aa, a) = (256, 97) is the smaller pair.
        let v = train(&["aaaa aaa"], 3);
        assert_eq!(v, vec![b"aa".to_vec(), b"aaa".to_vec(), b"aaaa".to_vec()]);
    }

    #[test]
    fn stops_when_no_pairs_are_left() {
        assert_eq!(train(&["ab"], 10), vec![b"ab".to_vec()]);
    }

    #[test]
    fn incremental_counts_match_a_recount() {
        let text = "the theme then thesis; aaaa abab ba ab ababab the the the";
        let mut counts = PieceCounts::new(r"\S+|\s+").unwrap();
        counts.add(&[text]).unwrap();
        let mut t = Trainer::new(counts);
        for _ in 0..12 {
            t.step(1);
            let mut recount: FxHashMap<u64, i64> = FxHashMap::default();
            for (w, word) in t.words.iter().enumerate() {
                for p in word.windows(2) {
                    *recount.entry(key(p[0], p[1])).or_default() += t.weights[w];
                }
            }
            let live: FxHashMap<u64, i64> = t
                .pair_counts
                .iter()
                .filter(|(_, &n)| n != 0)
                .map(|(&k, &n)| (k, n))
                .collect();
            assert_eq!(live, recount);
        }
    }
}
