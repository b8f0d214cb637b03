//! The in-process search index over every chunk: exact vector search (cosine on
//! unit-length embeddings) and BM25 over title and content with tantivy (English
//! stemming), fused by reciprocal rank for `hybrid`. Visibility and metadata
//! filters are applied to every route before ranking is cut to top_k.

use std::collections::HashMap;

use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tantivy::collector::TopDocs;
use tantivy::query::QueryParser;
use tantivy::schema::{IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value as _, FAST, INDEXED, STORED};
use tantivy::{doc, Index, IndexReader, IndexWriter, TantivyDocument, Term};
use uuid::Uuid;

/// Reciprocal rank fusion constant (Cormack et al.; the usual 60).
const RRF_K: f32 = 60.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Vector,
    Text,
    Hybrid,
    /// `text` for queries of one or two words (names, codes: exact terms matter
    /// most), `hybrid` otherwise.
    #[default]
    Auto,
}

impl Route {
    pub fn resolve(self, query: &str) -> Route {
        match self {
            Route::Auto if query.split_whitespace().count() <= 2 => Route::Text,
            Route::Auto => Route::Hybrid,
            r => r,
        }
    }
}

/// A metadata condition: a value (equality), {"in": [...]}, or a range with any
/// of gt, gte, lt, lte (numbers or strings).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Condition {
    Range(Box<Range>),
    In(In),
    Equals(Value),
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Range {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gt: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gte: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lt: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lte: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct In {
    #[serde(rename = "in")]
    values: Vec<Value>,
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Condition {
    /// A range needs at least one bound (an empty object would match everything).
    pub fn is_valid(&self) -> bool {
        match self {
            Condition::Range(r) => r.gt.is_some() || r.gte.is_some() || r.lt.is_some() || r.lte.is_some(),
            _ => true,
        }
    }

    pub fn matches(&self, v: Option<&Value>) -> bool {
        use std::cmp::Ordering::*;
        let Some(v) = v else { return false };
        match self {
            Condition::Equals(want) => v == want || matches!(v, Value::Array(items) if items.contains(want)),
            Condition::In(In { values }) => values.iter().any(|w| w == v),
            Condition::Range(r) => {
                let Range { gt, gte, lt, lte } = r.as_ref();
                let ok = |bound: &Option<Value>, allowed: &[std::cmp::Ordering]| {
                    bound
                        .as_ref()
                        .is_none_or(|b| compare(v, b).is_some_and(|o| allowed.contains(&o)))
                };
                ok(gt, &[Greater]) && ok(gte, &[Greater, Equal]) && ok(lt, &[Less]) && ok(lte, &[Less, Equal])
            }
        }
    }
}

pub type Filters = HashMap<String, Condition>;

struct Entry {
    chunk_id: Uuid,
    document_id: Uuid,
    owner: Owner,
    title: String,
    source: String,
    content: String,
    metadata: serde_json::Map<String, Value>,
    embedding: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Hit {
    pub document_id: Uuid,
    pub chunk_id: Uuid,
    pub title: String,
    pub content: String,
    pub score: f32,
    pub source: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, Value>,
}

pub struct SearchIndex {
    slots: Vec<Option<Entry>>,
    by_document: HashMap<Uuid, Vec<usize>>,
    writer: IndexWriter,
    reader: IndexReader,
    key: tantivy::schema::Field,
    title: tantivy::schema::Field,
    content: tantivy::schema::Field,
    parser: QueryParser,
    dirty: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("search index: {0}")]
pub struct IndexError(String);

fn index_error(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

impl SearchIndex {
    pub fn new() -> Result<Self, IndexError> {
        let mut sb = Schema::builder();
        let key = sb.add_u64_field("key", INDEXED | STORED | FAST);
        let text = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let title = sb.add_text_field("title", text.clone());
        let content = sb.add_text_field("content", text);
        let index = Index::create_in_ram(sb.build());
        let writer = index.writer_with_num_threads(1, 32 << 20).map_err(index_error)?;
        let reader = index.reader().map_err(index_error)?;
        let mut parser = QueryParser::for_index(&index, vec![title, content]);
        parser.set_field_boost(title, 0.5);
        Ok(SearchIndex {
            slots: Vec::new(),
            by_document: HashMap::new(),
            writer,
            reader,
            key,
            title,
            content,
            parser,
            dirty: false,
        })
    }

    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a document's chunks (replacing any it had). Call `commit` after a batch.
    pub fn add(&mut self, doc: &Document, chunks: &[Chunk]) -> Result<(), IndexError> {
        self.remove(doc.id);
        let (title, content) = (self.title, self.content);
        let mut slots = Vec::with_capacity(chunks.len());
        for c in chunks {
            let slot = self.slots.len();
            self.writer
                .add_document(doc!(self.key => slot as u64, title => doc.title.as_str(), content => c.content.as_str()))
                .map_err(index_error)?;
            self.slots.push(Some(Entry {
                chunk_id: c.id,
                document_id: doc.id,
                owner: doc.owner,
                title: doc.title.clone(),
                source: doc.source.clone(),
                content: c.content.clone(),
                metadata: doc.metadata.clone(),
                embedding: c.embedding.clone(),
            }));
            slots.push(slot);
        }
        self.by_document.insert(doc.id, slots);
        self.dirty = true;
        Ok(())
    }

    pub fn remove(&mut self, document_id: Uuid) {
        if let Some(slots) = self.by_document.remove(&document_id) {
            for s in slots {
                self.writer.delete_term(Term::from_field_u64(self.key, s as u64));
                self.slots[s] = None;
            }
            self.dirty = true;
        }
    }

    pub fn commit(&mut self) -> Result<(), IndexError> {
        if self.dirty {
            self.writer.commit().map_err(index_error)?;
            self.reader.reload().map_err(index_error)?;
            self.dirty = false;
        }
        Ok(())
    }

    fn allowed(&self, slot: usize, reader: &Reader, filters: &Filters) -> Option<&Entry> {
        let e = self.slots.get(slot)?.as_ref()?;
        (reader.may_see(&e.owner) && filters.iter().all(|(k, c)| c.matches(e.metadata.get(k)))).then_some(e)
    }

    /// Slots by cosine similarity (embeddings are unit length), best first.
    fn vector(&self, query: &[f32], reader: &Reader, filters: &Filters, n: usize) -> Vec<(usize, f32)> {
        let mut scored: Vec<(usize, f32)> = (0..self.slots.len())
            .filter_map(|s| {
                let e = self.allowed(s, reader, filters)?;
                Some((s, crate::inference::fast::dot(query, &e.embedding)))
            })
            .collect();
        top(&mut scored, n);
        scored
    }

    /// Slots by BM25, best first.
    fn text(&self, query: &str, reader: &Reader, filters: &Filters, n: usize) -> Result<Vec<(usize, f32)>, IndexError> {
        let (q, _) = self.parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        // Fetch more than asked: hits the reader may not see are dropped after.
        let want = (n * 4).max(100);
        let found = searcher
            .search(&q, &TopDocs::with_limit(want).order_by_score())
            .map_err(index_error)?;
        let mut out = Vec::with_capacity(n);
        for (score, addr) in found {
            let d: TantivyDocument = searcher.doc(addr).map_err(index_error)?;
            let Some(slot) = d.get_first(self.key).and_then(|v| v.as_u64()) else {
                continue;
            };
            let slot = slot as usize;
            if self.allowed(slot, reader, filters).is_some() {
                out.push((slot, score));
                if out.len() == n {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The `top_k` chunks for a query. `embedding` is needed for vector and hybrid.
    pub fn search(
        &self,
        query: &str,
        embedding: Option<&[f32]>,
        route: Route,
        reader: &Reader,
        filters: &Filters,
        top_k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let ranked = match (route.resolve(query), embedding) {
            (Route::Text, _) => self.text(query, reader, filters, top_k)?,
            (Route::Vector, Some(e)) => self.vector(e, reader, filters, top_k),
            (Route::Hybrid, Some(e)) => {
                let depth = (top_k * 10).max(100);
                let lists = [
                    self.vector(e, reader, filters, depth),
                    self.text(query, reader, filters, depth)?,
                ];
                let mut fused: HashMap<usize, f32> = HashMap::new();
                for list in &lists {
                    for (rank, (slot, _)) in list.iter().enumerate() {
                        *fused.entry(*slot).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
                    }
                }
                let mut v: Vec<(usize, f32)> = fused.into_iter().collect();
                top(&mut v, top_k);
                v
            }
            _ => return Err(IndexError("this route needs the query's embedding".into())),
        };
        Ok(ranked
            .into_iter()
            .filter_map(|(slot, score)| {
                let e = self.slots.get(slot)?.as_ref()?;
                Some(Hit {
                    document_id: e.document_id,
                    chunk_id: e.chunk_id,
                    title: e.title.clone(),
                    content: e.content.clone(),
                    score,
                    source: e.source.clone(),
                    metadata: e.metadata.clone(),
                })
            })
            .collect())
    }
}

/// Keeps the n best (highest score) in order; ties by slot for stable results.
fn top(v: &mut Vec<(usize, f32)>, n: usize) {
    let cmp = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > n && n > 0 {
        v.select_nth_unstable_by(n - 1, cmp);
        v.truncate(n);
    }
    v.sort_unstable_by(cmp);
    v.truncate(n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc_with(owner: Owner, title: &str, texts: &[(&str, Vec<f32>)], meta: Value) -> (Document, Vec<Chunk>) {
        let id = Uuid::new_v4();
        let chunks = texts
            .iter()
            .enumerate()
            .map(|(i, (t, e))| Chunk {
                id: Uuid::new_v4(),
                document_id: id,
                ordinal: i as u32,
                content: t.to_string(),
                embedding: e.clone(),
            })
            .collect::<Vec<_>>();
        let d = Document {
            id,
            owner,
            title: title.into(),
            source: "t".into(),
            content_hash: id.to_string(),
            size_bytes: 1,
            metadata: meta.as_object().cloned().unwrap_or_default(),
            chunk_count: chunks.len() as u32,
            created_at: chrono::Utc::now(),
        };
        (d, chunks)
    }

    #[test]
    fn routes_rank_visible_chunks_and_filters_apply() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = SearchIndex::new().expect("index");
        let (a, ac) = doc_with(
            Owner::Global,
            "Cats",
            &[
                ("Cats purr when they are content", vec![1.0, 0.0]),
                ("Kittens sleep a lot", vec![0.8, 0.6]),
            ],
            json!({"year": 2020, "lang": "en"}),
        );
        let (b, bc) = doc_with(
            Owner::User(me.user_id),
            "Dogs",
            &[("Dogs bark at strangers", vec![0.0, 1.0])],
            json!({"year": 2023, "lang": "de"}),
        );
        let (c, cc) = doc_with(
            Owner::User(Uuid::new_v4()),
            "Secret cats",
            &[("Cats purring secretly", vec![1.0, 0.0])],
            json!({}),
        );
        for (d, ch) in [(&a, &ac), (&b, &bc), (&c, &cc)] {
            ix.add(d, ch).expect("add");
        }
        ix.commit().expect("commit");
        let none = Filters::new();
        let hits = ix
            .search("purring cats", None, Route::Text, &me, &none, 5)
            .expect("text");
        assert_eq!(
            hits[0].content, "Cats purr when they are content",
            "stemming matches purr/purring"
        );
        assert!(
            hits.iter().all(|h| h.document_id != c.id),
            "another user's document is invisible"
        );
        let hits = ix
            .search("q", Some(&[0.0, 1.0]), Route::Vector, &me, &none, 2)
            .expect("vector");
        assert_eq!(hits[0].content, "Dogs bark at strangers");
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert_eq!(hits[1].content, "Kittens sleep a lot");
        let hits = ix
            .search("cats content", Some(&[1.0, 0.0]), Route::Hybrid, &me, &none, 3)
            .expect("hybrid");
        assert_eq!(hits[0].content, "Cats purr when they are content");
        // Filters: equality, in, range.
        let f: Filters = serde_json::from_value(json!({"year": {"gte": 2021}})).expect("filters");
        let hits = ix
            .search("q", Some(&[1.0, 0.0]), Route::Vector, &me, &f, 5)
            .expect("range");
        assert_eq!(hits.iter().map(|h| h.document_id).collect::<Vec<_>>(), vec![b.id]);
        let f: Filters = serde_json::from_value(json!({"lang": {"in": ["en", "fr"]}})).expect("filters");
        let hits = ix
            .search("q", Some(&[1.0, 0.0]), Route::Vector, &me, &f, 5)
            .expect("in");
        assert!(hits.iter().all(|h| h.document_id == a.id) && hits.len() == 2);
        let f: Filters = serde_json::from_value(json!({"lang": "de"})).expect("filters");
        assert_eq!(ix.search("dogs", None, Route::Text, &me, &f, 5).expect("eq").len(), 1);
        // Removal.
        ix.remove(a.id);
        ix.commit().expect("commit");
        assert!(ix
            .search("cats", None, Route::Text, &me, &none, 5)
            .expect("text")
            .is_empty());
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn auto_picks_text_for_short_queries() {
        assert_eq!(Route::Auto.resolve("BRCA1"), Route::Text);
        assert_eq!(Route::Auto.resolve("what lowers blood pressure"), Route::Hybrid);
        assert_eq!(Route::Vector.resolve("x"), Route::Vector);
    }
}
