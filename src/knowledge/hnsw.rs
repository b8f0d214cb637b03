//! Approximate nearest neighbours: a hierarchical navigable small world graph
//! (Malkov & Yashunin, 2018) over unit-length vectors, similarity = dot product.
//!
//! Layout for speed and memory: vectors in one flat array, layer-0 neighbour
//! lists in one flat array of fixed width (2·M), upper layers per node (few
//! nodes have any). Each edge keeps its similarity, so a full list takes a
//! better neighbour by replacing its worst without recomputing anything.
//!
//! Bulk inserts run in two phases: every new node searches the graph as it was
//! (in parallel, read-only) and picks its neighbours with the diversity
//! heuristic; then the edges are written in order, one node at a time.
//! Removal marks a node deleted: it still routes searches, it is never returned.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::inference::fast::dot;

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
pub struct HnswConfig {
    /// Neighbours per node on upper layers (2·M on layer 0).
    pub m: usize,
    pub ef_construction: usize,
    /// Candidate list size of a search (at least k).
    pub ef_search: usize,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
struct Scored(f32, u32);

impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

/// Min-heap order (the worst on top), for the bounded result set.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Worst(std::cmp::Reverse<Scored>);

/// Visited marks by generation, reused across searches of a thread.
struct Visited {
    marks: Vec<u32>,
    generation: u32,
}

impl Visited {
    fn start(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.generation = 1;
        }
    }

    /// True the first time a node is seen in this search.
    #[inline]
    fn first(&mut self, i: u32) -> bool {
        let m = &mut self.marks[i as usize];
        if *m == self.generation {
            false
        } else {
            *m = self.generation;
            true
        }
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = const { RefCell::new(Visited { marks: Vec::new(), generation: 0 }) };
}

/// Neighbours chosen for one node on each of its layers (layer 0 first).
type Links = Vec<Vec<(u32, f32)>>;

pub struct Hnsw {
    dim: usize,
    config: HnswConfig,
    vectors: Vec<f32>,
    levels: Vec<u8>,
    /// 2·M slots per node: (neighbour or NONE, similarity).
    layer0: Vec<(u32, f32)>,
    /// Per node: M slots per upper layer, layers 1..=level one after another.
    upper: Vec<Box<[(u32, f32)]>>,
    deleted: Vec<bool>,
    live: usize,
    entry: u32,
    max_level: usize,
    rng: u64,
}

impl Hnsw {
    pub fn new(dim: usize, config: HnswConfig) -> Hnsw {
        Hnsw {
            dim,
            config,
            vectors: Vec::new(),
            levels: Vec::new(),
            layer0: Vec::new(),
            upper: Vec::new(),
            deleted: Vec::new(),
            live: 0,
            entry: NONE,
            max_level: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Nodes, deleted ones included (ids are 0..len).
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// Nodes not deleted.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Bytes held (vectors, edges, per-node bookkeeping).
    pub fn memory_bytes(&self) -> usize {
        self.vectors.capacity() * 4
            + self.layer0.capacity() * 8
            + self.upper.iter().map(|u| u.len() * 8 + 16).sum::<usize>()
            + self.levels.capacity()
            + self.deleted.capacity()
    }

    fn m0(&self) -> usize {
        self.config.m * 2
    }

    /// Slots per list on a layer: the target size plus half again of slack, so
    /// a full list is pruned once per several new edges, not at each one.
    fn width(&self, layer: usize) -> usize {
        let m = if layer == 0 { self.m0() } else { self.config.m };
        m + m / 2
    }

    #[inline]
    pub fn vector(&self, i: u32) -> &[f32] {
        let s = i as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    fn links(&self, i: u32, layer: usize) -> &[(u32, f32)] {
        let w = self.width(layer);
        if layer == 0 {
            &self.layer0[i as usize * w..(i as usize + 1) * w]
        } else {
            &self.upper[i as usize][(layer - 1) * w..layer * w]
        }
    }

    fn links_mut(&mut self, i: u32, layer: usize) -> &mut [(u32, f32)] {
        let w = self.width(layer);
        if layer == 0 {
            &mut self.layer0[i as usize * w..(i as usize + 1) * w]
        } else {
            &mut self.upper[i as usize][(layer - 1) * w..layer * w]
        }
    }

    fn random_level(&mut self) -> usize {
        // xorshift64*: deterministic, so builds are reproducible.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let u = ((r >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let ml = 1.0 / (self.config.m as f64).ln();
        ((-u.ln() * ml) as usize).min(16)
    }

    /// Greedy descent on one layer (ef = 1).
    fn greedy(&self, q: &[f32], mut cur: u32, mut sim: f32, layer: usize) -> (u32, f32) {
        loop {
            let mut moved = false;
            for &(n, _) in self.links(cur, layer) {
                if n == NONE {
                    break;
                }
                let s = dot(q, self.vector(n));
                if s > sim {
                    (cur, sim, moved) = (n, s, true);
                }
            }
            if !moved {
                return (cur, sim);
            }
        }
    }

    /// Best-first search of one layer from `entries`; returns up to `ef` nodes
    /// best first. The walk stops on the ef best nodes seen; `accept` only
    /// decides which of them may be returned.
    fn search_layer(
        &self,
        q: &[f32],
        entries: &[(u32, f32)],
        ef: usize,
        layer: usize,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<(u32, f32)> {
        fn worst(h: &BinaryHeap<Worst>) -> f32 {
            h.peek().map_or(f32::NEG_INFINITY, |w| w.0 .0 .0)
        }
        fn bounded_push(h: &mut BinaryHeap<Worst>, s: f32, n: u32, ef: usize) {
            h.push(Worst(std::cmp::Reverse(Scored(s, n))));
            if h.len() > ef {
                h.pop();
            }
        }
        VISITED.with(|v| {
            let mut visited = v.borrow_mut();
            visited.start(self.len());
            let mut candidates: BinaryHeap<Scored> = BinaryHeap::new();
            let mut seen: BinaryHeap<Worst> = BinaryHeap::new();
            let mut results: BinaryHeap<Worst> = BinaryHeap::new();
            for &(e, s) in entries {
                if visited.first(e) {
                    candidates.push(Scored(s, e));
                    bounded_push(&mut seen, s, e, ef);
                    if accept(e) {
                        bounded_push(&mut results, s, e, ef);
                    }
                }
            }
            while let Some(Scored(s, c)) = candidates.pop() {
                if seen.len() >= ef && s < worst(&seen) {
                    break;
                }
                for &(n, _) in self.links(c, layer) {
                    if n == NONE {
                        break;
                    }
                    if !visited.first(n) {
                        continue;
                    }
                    let sn = dot(q, self.vector(n));
                    if seen.len() < ef || sn > worst(&seen) {
                        candidates.push(Scored(sn, n));
                        bounded_push(&mut seen, sn, n, ef);
                        if accept(n) {
                            bounded_push(&mut results, sn, n, ef);
                        }
                    }
                }
            }
            let mut out: Vec<(u32, f32)> = results.into_iter().map(|w| (w.0 .0 .1, w.0 .0 .0)).collect();
            out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            out
        })
    }

    /// The diversity heuristic: a candidate is kept unless it is closer to an
    /// already kept neighbour than to the node (keeps links in every direction).
    fn select(&self, candidates: &[(u32, f32)], m: usize) -> Vec<(u32, f32)> {
        let mut kept: Vec<(u32, f32)> = Vec::with_capacity(m);
        for &(c, s) in candidates {
            if kept.len() == m {
                break;
            }
            let v = self.vector(c);
            if kept.iter().all(|&(k, _)| dot(v, self.vector(k)) < s) {
                kept.push((c, s));
            }
        }
        // Fill up with the nearest skipped ones: a sparse list routes worse.
        if kept.len() < m {
            for &(c, s) in candidates {
                if kept.len() == m {
                    break;
                }
                if !kept.iter().any(|&(k, _)| k == c) {
                    kept.push((c, s));
                }
            }
        }
        kept
    }

    /// Finds the neighbours a new node with this vector and level would link to,
    /// in the graph as it is (read-only, so many run at once).
    fn plan(&self, q: &[f32], level: usize) -> Links {
        let mut links = vec![Vec::new(); level + 1];
        if self.entry == NONE {
            return links;
        }
        let mut cur = (self.entry, dot(q, self.vector(self.entry)));
        for layer in (level + 1..=self.max_level).rev() {
            cur = self.greedy(q, cur.0, cur.1, layer);
        }
        let mut entries = vec![cur];
        for layer in (0..=level.min(self.max_level)).rev() {
            let found = self.search_layer(q, &entries, self.config.ef_construction, layer, &|_| true);
            let m = if layer == 0 { self.m0() } else { self.config.m };
            links[layer] = self.select(&found, m);
            entries = found;
        }
        links
    }

    /// Adds one edge: into a free slot, or, when the list is full, the list and
    /// the new edge are pruned back to the target size with the heuristic.
    fn add_edge(&mut self, from: u32, to: u32, sim: f32, layer: usize) {
        let m = if layer == 0 { self.m0() } else { self.config.m };
        let list = self.links_mut(from, layer);
        if let Some(slot) = list.iter_mut().find(|e| e.0 == NONE) {
            *slot = (to, sim);
            return;
        }
        let mut all: Vec<(u32, f32)> = list.to_vec();
        all.push((to, sim));
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let kept = self.select(&all, m);
        let list = self.links_mut(from, layer);
        for (slot, e) in list.iter_mut().enumerate() {
            *e = kept.get(slot).copied().unwrap_or((NONE, 0.0));
        }
    }

    /// Writes a planned node's edges both ways and makes it the entry point if
    /// it is the highest.
    fn link(&mut self, id: u32, links: Links) {
        let level = self.levels[id as usize] as usize;
        for (layer, list) in links.into_iter().enumerate().take(level + 1) {
            for (slot, &(n, s)) in list.iter().enumerate() {
                self.links_mut(id, layer)[slot] = (n, s);
                if (self.levels[n as usize] as usize) >= layer {
                    self.add_edge(n, id, s, layer);
                }
            }
        }
        if self.entry == NONE || level > self.max_level {
            self.entry = id;
            self.max_level = level;
        }
    }

    fn push_node(&mut self, v: &[f32]) -> u32 {
        let id = self.levels.len() as u32;
        let level = self.random_level();
        self.vectors.extend_from_slice(v);
        self.levels.push(level as u8);
        self.layer0.extend(std::iter::repeat_n((NONE, 0.0), self.width(0)));
        self.upper
            .push(vec![(NONE, 0.0); level * self.width(1)].into_boxed_slice());
        self.deleted.push(false);
        self.live += 1;
        id
    }

    /// Inserts one vector (unit length, `dim` long); returns its id.
    pub fn insert(&mut self, v: &[f32]) -> u32 {
        let id = self.push_node(v);
        let links = self.plan(v, self.levels[id as usize] as usize);
        self.link(id, links);
        id
    }

    /// Inserts many vectors; ids are consecutive from the returned one. Nodes of
    /// one round plan against the graph without each other, so rounds are kept
    /// small next to the graph (a tenth of it, at most 4,096).
    pub fn insert_many(&mut self, vectors: &[Vec<f32>]) -> u32 {
        let first = self.len() as u32;
        let mut i = 0;
        while i < vectors.len() {
            let round = (self.len() / 10).clamp(1, 4096).min(vectors.len() - i);
            if round < 64 {
                self.insert(&vectors[i]);
                i += 1;
                continue;
            }
            let ids: Vec<u32> = vectors[i..i + round].iter().map(|v| self.push_node(v)).collect();
            let this = &*self;
            let plans: Vec<Links> = ids
                .par_iter()
                .map(|&id| this.plan(this.vector(id), this.levels[id as usize] as usize))
                .collect();
            for (id, links) in ids.into_iter().zip(plans) {
                self.link(id, links);
            }
            i += round;
        }
        first
    }

    pub fn remove(&mut self, id: u32) {
        if let Some(d) = self.deleted.get_mut(id as usize) {
            if !*d {
                *d = true;
                self.live -= 1;
            }
        }
    }

    /// The `k` most similar live nodes that `accept` lets through, best first,
    /// with a candidate list of `ef` (at least k; raise it for selective
    /// filters). Fewer than k when too few pass the filter near the query.
    pub fn search(&self, q: &[f32], k: usize, ef: usize, accept: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        if self.entry == NONE || k == 0 {
            return Vec::new();
        }
        let mut cur = (self.entry, dot(q, self.vector(self.entry)));
        for layer in (1..=self.max_level).rev() {
            cur = self.greedy(q, cur.0, cur.1, layer);
        }
        let ok = |i: u32| !self.deleted[i as usize] && accept(i);
        let mut found = self.search_layer(q, &[cur], ef.max(k), 0, &ok);
        found.truncate(k);
        found
    }

    pub fn config(&self) -> HnswConfig {
        self.config
    }

    /// Writes the graph in a little-endian binary layout (see `read_from`).
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let header = [
            FORMAT,
            self.dim as u64,
            self.config.m as u64,
            self.config.ef_construction as u64,
            self.config.ef_search as u64,
            self.len() as u64,
            u64::from(self.entry),
            self.max_level as u64,
            self.rng,
        ];
        for v in header {
            w.write_all(&v.to_le_bytes())?;
        }
        let mut buf = Vec::with_capacity(1 << 20);
        let flush = |buf: &mut Vec<u8>, w: &mut dyn std::io::Write| -> std::io::Result<()> {
            w.write_all(buf)?;
            buf.clear();
            Ok(())
        };
        for chunk in self.vectors.chunks(1 << 16) {
            chunk.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            flush(&mut buf, w)?;
        }
        buf.extend_from_slice(&self.levels);
        buf.extend(self.deleted.iter().map(|d| u8::from(*d)));
        flush(&mut buf, w)?;
        let edges = self.layer0.iter().chain(self.upper.iter().flat_map(|u| u.iter()));
        for (n, s) in edges {
            buf.extend_from_slice(&n.to_le_bytes());
            buf.extend_from_slice(&s.to_le_bytes());
            if buf.len() >= 1 << 20 {
                flush(&mut buf, w)?;
            }
        }
        flush(&mut buf, w)
    }

    /// Reads a graph written by `write_to`; None when the bytes are not one.
    pub fn read_from(r: &mut impl std::io::Read) -> std::io::Result<Option<Hnsw>> {
        let mut word = [0u8; 8];
        let mut header = [0u64; 9];
        for h in header.iter_mut() {
            r.read_exact(&mut word)?;
            *h = u64::from_le_bytes(word);
        }
        let [format, dim, m, ef_construction, ef_search, n, entry, max_level, rng] = header;
        // Bounds first: a corrupted header must not ask for absurd sizes.
        if format != FORMAT
            || !(1..=65_536).contains(&dim)
            || !(2..=256).contains(&m)
            || n > u64::from(u32::MAX)
            || max_level > 16
            || ef_construction > 100_000
            || ef_search > 100_000
        {
            return Ok(None);
        }
        let (dim, n) = (dim as usize, n as usize);
        let mut h = Hnsw::new(
            dim,
            HnswConfig {
                m: m as usize,
                ef_construction: ef_construction as usize,
                ef_search: ef_search as usize,
            },
        );
        let bytes = read_len(r, n * dim * 4)?;
        h.vectors = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let levels = read_len(r, n)?;
        if levels.iter().any(|l| u64::from(*l) > max_level) {
            return Ok(None);
        }
        let deleted = read_len(r, n)?;
        let upper_slots: usize = levels.iter().map(|l| *l as usize * h.width(1)).sum();
        let edges = read_len(r, (n * h.width(0) + upper_slots) * 8)?;
        let mut it = edges.chunks_exact(8).map(|b| {
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                f32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            )
        });
        h.layer0 = it.by_ref().take(n * h.width(0)).collect();
        let w1 = h.width(1);
        h.upper = levels
            .iter()
            .map(|l| {
                it.by_ref()
                    .take(*l as usize * w1)
                    .collect::<Vec<_>>()
                    .into_boxed_slice()
            })
            .collect();
        let bad_id = |e: &(u32, f32)| e.0 != NONE && e.0 as usize >= n;
        let entry_ok = if n == 0 {
            entry == u64::from(NONE)
        } else {
            (entry as usize) < n && u64::from(levels[entry as usize]) == max_level
        };
        if !entry_ok || h.layer0.iter().any(bad_id) || h.upper.iter().any(|u| u.iter().any(bad_id)) {
            return Ok(None);
        }
        h.deleted = deleted.iter().map(|d| *d != 0).collect();
        h.live = h.deleted.iter().filter(|d| !**d).count();
        h.levels = levels;
        h.entry = entry as u32;
        h.max_level = max_level as usize;
        h.rng = rng;
        Ok(Some(h))
    }
}

/// Exactly `len` bytes, read as they come (a truncated file fails before any
/// allocation of the size its header claims).
fn read_len(r: &mut impl std::io::Read, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    r.by_ref().take(len as u64).read_to_end(&mut out)?;
    if out.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "truncated graph",
        ));
    }
    Ok(out)
}

/// Version of the `write_to` layout.
const FORMAT: u64 = 0x5241_4748_4e53_5701;

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(mut v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    /// Clustered points, like sentence embeddings (50 topics, each point about
    /// 0.7 cosine from its topic); `seed` draws the spread, the topics are fixed.
    fn data(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let rng = |mut s: u64| {
            move || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            }
        };
        let mut topic = rng(1);
        let centers: Vec<Vec<f32>> = (0..50).map(|_| unit((0..dim).map(|_| topic()).collect())).collect();
        let mut next = rng(seed);
        let spread = 0.5 / (dim as f32 / 12.0).sqrt() * 2.0;
        (0..n)
            .map(|i| {
                unit(
                    centers[(i * 7 + seed as usize) % 50]
                        .iter()
                        .map(|c| c + spread * next())
                        .collect(),
                )
            })
            .collect()
    }

    fn exact(points: &[Vec<f32>], q: &[f32], k: usize, skip: &dyn Fn(usize) -> bool) -> Vec<u32> {
        let mut s: Vec<(u32, f32)> = points
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip(*i))
            .map(|(i, p)| (i as u32, dot(q, p)))
            .collect();
        s.sort_by(|a, b| b.1.total_cmp(&a.1));
        s.into_iter().take(k).map(|x| x.0).collect()
    }

    #[test]
    fn finds_the_true_neighbours_with_filters_and_deletions() {
        let (dim, n) = (32, 4000);
        let points = data(n, dim, 7);
        let mut h = Hnsw::new(dim, HnswConfig::default());
        // Half one by one, half in parallel rounds: both paths build one graph.
        for p in &points[..n / 2] {
            h.insert(p);
        }
        assert_eq!(h.insert_many(&points[n / 2..]), (n / 2) as u32);
        assert_eq!((h.len(), h.live()), (n, n));

        let queries = data(100, dim, 99);
        let recall = |h: &Hnsw, ef: usize, accept: &dyn Fn(u32) -> bool, skip: &dyn Fn(usize) -> bool| {
            let mut hit = 0;
            for q in &queries {
                let want = exact(&points, q, 10, skip);
                let got: Vec<u32> = h.search(q, 10, ef, accept).into_iter().map(|x| x.0).collect();
                assert!(got.iter().all(|i| !skip(*i as usize)), "a filtered node came back");
                hit += got.iter().filter(|i| want.contains(i)).count();
            }
            hit as f64 / (queries.len() * 10) as f64
        };
        let r = recall(&h, 64, &|_| true, &|_| false);
        assert!(r >= 0.95, "recall@10 {r}");
        // A filter that keeps half the points: twice the candidates.
        let r = recall(&h, 128, &|i| i % 2 == 0, &|i| i % 2 == 1);
        assert!(r >= 0.9, "filtered recall@10 {r}");
        // A very selective filter returns fewer, never wrong ones (callers then scan).
        let got = h.search(&queries[0], 10, 64, &|i| i == 17);
        assert!(got.len() <= 1 && got.iter().all(|x| x.0 == 17));
        // Deleted nodes never come back, and the rest is still found.
        for i in (0..n).step_by(3) {
            h.remove(i as u32);
        }
        assert_eq!(h.live(), n - n.div_ceil(3));
        let r = recall(&h, 96, &|_| true, &|i| i % 3 == 0);
        assert!(r >= 0.9, "recall@10 after deletions {r}");
        // Scores are the dot products, best first.
        let q = &queries[0];
        let got = h.search(q, 5, 64, &|_| true);
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!((got[0].1 - dot(q, &points[got[0].0 as usize])).abs() < 1e-6);
    }

    #[test]
    fn a_written_graph_reads_back_the_same() {
        let points = data(600, 16, 3);
        let mut h = Hnsw::new(16, HnswConfig::default());
        h.insert_many(&points);
        h.remove(5);
        let mut bytes = Vec::new();
        h.write_to(&mut bytes).expect("write");
        let back = Hnsw::read_from(&mut bytes.as_slice()).expect("read").expect("a graph");
        assert_eq!((back.len(), back.live(), back.dim()), (h.len(), h.live(), h.dim()));
        for q in data(20, 16, 4) {
            assert_eq!(back.search(&q, 10, 64, &|_| true), h.search(&q, 10, 64, &|_| true));
        }
        assert!(
            Hnsw::read_from(&mut &bytes[..bytes.len() - 9]).is_err(),
            "a truncated file is refused"
        );
        bytes[0] ^= 1;
        assert!(
            Hnsw::read_from(&mut bytes.as_slice()).expect("read").is_none(),
            "another format is refused"
        );
    }

    #[test]
    fn empty_and_tiny_graphs() {
        let mut h = Hnsw::new(4, HnswConfig::default());
        assert!(h.search(&[1.0, 0.0, 0.0, 0.0], 3, 10, &|_| true).is_empty());
        h.insert(&[1.0, 0.0, 0.0, 0.0]);
        h.insert(&[0.0, 1.0, 0.0, 0.0]);
        let got = h.search(&[0.9, 0.1, 0.0, 0.0], 3, 10, &|_| true);
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        h.remove(0);
        assert_eq!(h.search(&[1.0, 0.0, 0.0, 0.0], 3, 10, &|_| true).len(), 1);
    }
}
