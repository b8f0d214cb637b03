//! DocumentStore contract: the same checks against the embedded SQLite store
//! (always) and MongoDB (FerretDB from scripts/services.sh, when MONGODB_URL is set).

use std::sync::Arc;

use chrono::{Duration, Utc};
use ragchat::stores::connect_documents;
use ragchat_actors::domain::Page;
use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::ports::{ChangeKind, DocumentChange, DocumentStore, StoreError};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::service_url;

async fn sqlite() -> Arc<dyn DocumentStore> {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    let url = format!(
        "sqlite:{}",
        dir.join(format!("knowledge-{}.db", Uuid::new_v4())).display()
    );
    connect_documents(None, "unused", &url).await.expect("sqlite store")
}

async fn mongo() -> Option<Arc<dyn DocumentStore>> {
    let url = service_url("MONGODB_URL")?;
    let db = format!("ragchat_test_{}", Uuid::new_v4().simple());
    Some(
        connect_documents(Some(&url), &db, "unused")
            .await
            .expect("mongodb store"),
    )
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[actix_web::test] async fn $name() { super::$name(super::sqlite().await).await; })*
        }
        mod mongodb_backend {
            $(#[actix_web::test] async fn $name() {
                if let Some(store) = super::mongo().await { super::$name(store).await; }
            })*
        }
    };
}

contract!(
    documents_and_chunks_round_trip,
    the_same_text_is_stored_once_per_owner_and_a_rejected_insert_leaves_nothing,
    listings_show_only_what_the_reader_may_see_newest_first,
    deleting_a_document_removes_its_chunks,
    replacing_chunks_swaps_the_whole_set_and_readers_never_see_a_mix,
    every_write_adds_one_numbered_entry_to_the_change_feed,
    many_documents_are_read_at_once_with_their_current_chunks,
);

fn document(owner: Owner, text: &str, age_s: i64) -> (Document, Vec<Chunk>) {
    let id = Uuid::new_v4();
    let chunks: Vec<Chunk> = text
        .split(". ")
        .enumerate()
        .map(|(i, part)| Chunk {
            id: Uuid::new_v4(),
            document_id: id,
            ordinal: i as u32,
            content: part.to_string(),
            embedding: (0..8).map(|k| (i * 8 + k) as f32 * 0.125 - 0.3).collect(),
        })
        .collect();
    let doc = Document {
        id,
        owner,
        title: format!("About {}", &text[..text.len().min(12)]),
        source: "test.txt".into(),
        origin: "upload:text".into(),
        content_hash: format!("{:x}", md5ish(text)),
        size_bytes: text.len() as u64,
        metadata: json!({"lang": "en", "year": 2024, "tags": ["a", "b"]})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        chunk_count: chunks.len() as u32,
        // Whole microseconds: what both stores keep.
        created_at: chrono::DateTime::from_timestamp_micros((Utc::now() - Duration::seconds(age_s)).timestamp_micros())
            .expect("time"),
    };
    (doc, chunks)
}

/// A stand-in content hash (the API uses SHA-256; the store only compares them).
fn md5ish(text: &str) -> u64 {
    text.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1099511628211)
    })
}

async fn documents_and_chunks_round_trip(store: Arc<dyn DocumentStore>) {
    store.ping().await.expect("ping");
    let owner = Owner::User(Uuid::new_v4());
    let (doc, chunks) = document(owner, "First sentence. Second one. Third and last", 0);
    store.insert_document(&doc, &chunks).await.expect("insert");
    assert_eq!(store.document(doc.id).await.expect("get"), Some(doc.clone()));
    assert_eq!(store.chunks(doc.id).await.expect("chunks"), chunks);
    assert_eq!(
        store
            .document_by_hash(&owner, &doc.content_hash)
            .await
            .expect("by hash"),
        Some(doc.clone())
    );
    assert_eq!(
        store
            .document_by_hash(&Owner::Global, &doc.content_hash)
            .await
            .expect("by hash"),
        None
    );
    assert_eq!(store.document(Uuid::new_v4()).await.expect("get"), None);
    assert_eq!(store.stored_bytes(&owner).await.expect("bytes"), doc.size_bytes);
    assert_eq!(store.document_ids(None).await.expect("ids"), vec![doc.id]);
}

async fn the_same_text_is_stored_once_per_owner_and_a_rejected_insert_leaves_nothing(store: Arc<dyn DocumentStore>) {
    let owner = Owner::User(Uuid::new_v4());
    let text = "Same text. Twice";
    let (first, chunks) = document(owner, text, 0);
    store.insert_document(&first, &chunks).await.expect("first");
    let (again, again_chunks) = document(owner, text, 0);
    match store.insert_document(&again, &again_chunks).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.document(again.id).await.expect("get"), None);
    assert!(
        store.chunks(again.id).await.expect("chunks").is_empty(),
        "no orphan chunks"
    );
    // Another owner may store the same text.
    let (other, other_chunks) = document(Owner::Global, text, 0);
    store.insert_document(&other, &other_chunks).await.expect("other owner");
    assert_eq!(store.stored_bytes(&owner).await.expect("bytes"), text.len() as u64);
}

async fn listings_show_only_what_the_reader_may_see_newest_first(store: Arc<dyn DocumentStore>) {
    let (alice, bob, org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let alice_r = Reader {
        user_id: alice,
        organization_id: Some(org_a),
    };
    let bob_r = Reader {
        user_id: bob,
        organization_id: Some(org_b),
    };
    let mut ids = std::collections::HashMap::new();
    for (name, owner, age) in [
        ("alice-own", Owner::User(alice), 50),
        ("org-a", Owner::Organization(org_a), 40),
        ("bob-own", Owner::User(bob), 30),
        ("org-b", Owner::Organization(org_b), 20),
        ("global", Owner::Global, 10),
    ] {
        let (d, c) = document(owner, &format!("{name} text. More"), age);
        store.insert_document(&d, &c).await.expect("insert");
        ids.insert(d.id, name);
    }
    let names = |docs: Vec<Document>| docs.iter().map(|d| ids[&d.id]).collect::<Vec<_>>();
    let all = Page { offset: 0, limit: 50 };
    let (docs, total) = store.list_documents(&alice_r, all).await.expect("list");
    assert_eq!((names(docs), total), (vec!["global", "org-a", "alice-own"], 3));
    let (docs, total) = store.list_documents(&bob_r, all).await.expect("list");
    assert_eq!((names(docs), total), (vec!["global", "org-b", "bob-own"], 3));
    let (docs, total) = store
        .list_documents(&alice_r, Page { offset: 1, limit: 1 })
        .await
        .expect("page");
    assert_eq!((names(docs), total), (vec!["org-a"], 3));
    let loner = Reader {
        user_id: Uuid::new_v4(),
        organization_id: None,
    };
    let (docs, _) = store.list_documents(&loner, all).await.expect("list");
    assert_eq!(names(docs), vec!["global"]);
}

async fn deleting_a_document_removes_its_chunks(store: Arc<dyn DocumentStore>) {
    let owner = Owner::Organization(Uuid::new_v4());
    let (doc, chunks) = document(owner, "To be removed. Soon", 0);
    let (keep, keep_chunks) = document(owner, "To be kept. Always", 0);
    store.insert_document(&doc, &chunks).await.expect("insert");
    store.insert_document(&keep, &keep_chunks).await.expect("insert");
    assert!(store.delete_document(doc.id).await.expect("delete"));
    assert!(!store.delete_document(doc.id).await.expect("delete again"));
    assert_eq!(store.document(doc.id).await.expect("get"), None);
    assert!(store.chunks(doc.id).await.expect("chunks").is_empty());
    assert_eq!(store.chunks(keep.id).await.expect("kept chunks").len(), 2);
    assert_eq!(store.stored_bytes(&owner).await.expect("bytes"), keep.size_bytes);
    assert_eq!(store.document_ids(None).await.expect("ids"), vec![keep.id]);
    assert_eq!(store.document_ids(Some(&owner)).await.expect("ids"), vec![keep.id]);
    assert!(store.document_ids(Some(&Owner::Global)).await.expect("ids").is_empty());
}

/// Chunks `n` of document `id`, tagged `tag` (to tell one set from another).
fn chunk_set(id: Uuid, tag: &str, n: usize) -> Vec<Chunk> {
    (0..n)
        .map(|i| Chunk {
            id: Uuid::new_v4(),
            document_id: id,
            ordinal: i as u32,
            content: format!("{tag} part {i}"),
            embedding: vec![i as f32; 8],
        })
        .collect()
}

async fn replacing_chunks_swaps_the_whole_set_and_readers_never_see_a_mix(store: Arc<dyn DocumentStore>) {
    let owner = Owner::User(Uuid::new_v4());
    let (doc, chunks) = document(owner, "Old one. Old two. Old three", 0);
    store.insert_document(&doc, &chunks).await.expect("insert");
    // Sets of different sizes, each replacing the last, while a reader reads.
    let sizes = [2usize, 5, 1, 4, 3, 6, 2, 5];
    let reader = {
        let store = store.clone();
        actix_web::rt::spawn(async move {
            let mut reads = 0;
            for _ in 0..200 {
                let got = store.chunks(doc.id).await.expect("chunks");
                let tags: std::collections::BTreeSet<&str> =
                    got.iter().map(|c| c.content.split(' ').next().unwrap_or("")).collect();
                assert_eq!(tags.len(), 1, "a mix of sets or none: {got:?}");
                let ordinals: Vec<u32> = got.iter().map(|c| c.ordinal).collect();
                assert_eq!(ordinals, (0..got.len() as u32).collect::<Vec<_>>(), "{got:?}");
                reads += 1;
            }
            reads
        })
    };
    let mut last = chunks;
    for (round, n) in sizes.iter().enumerate() {
        let next = chunk_set(doc.id, &format!("set{round}"), *n);
        assert!(store.replace_chunks(doc.id, &next).await.expect("replace"));
        last = next;
    }
    assert_eq!(reader.await.expect("reader"), 200);
    assert_eq!(store.chunks(doc.id).await.expect("chunks"), last);
    let stored = store.document(doc.id).await.expect("get").expect("doc");
    assert_eq!(stored.chunk_count as usize, last.len());
    assert_eq!(stored.size_bytes, doc.size_bytes);
    // Deleting removes the current set; a missing document is not written.
    assert!(store.delete_document(doc.id).await.expect("delete"));
    assert!(store.chunks(doc.id).await.expect("chunks").is_empty());
    assert!(!store
        .replace_chunks(doc.id, &chunk_set(doc.id, "late", 2))
        .await
        .expect("replace"));
    assert!(store.chunks(doc.id).await.expect("chunks").is_empty());
    assert_eq!(store.document(doc.id).await.expect("get"), None);
}

async fn every_write_adds_one_numbered_entry_to_the_change_feed(store: Arc<dyn DocumentStore>) {
    assert_eq!(store.last_change().await.expect("last"), 0);
    assert!(store.changes_after(0, 10).await.expect("read").is_empty());
    let owner = Owner::User(Uuid::new_v4());
    let (a, a_chunks) = document(owner, "Feed one. Two", 0);
    let (b, b_chunks) = document(owner, "Feed three. Four", 0);
    store.insert_document(&a, &a_chunks).await.expect("insert");
    store.insert_document(&b, &b_chunks).await.expect("insert");
    // A refused insert, a re-chunking of nothing and a delete of nothing add nothing.
    let (dup, dup_chunks) = document(owner, "Feed one. Two", 0);
    assert!(store.insert_document(&dup, &dup_chunks).await.is_err());
    assert!(!store.replace_chunks(Uuid::new_v4(), &[]).await.expect("replace"));
    assert!(!store.delete_document(Uuid::new_v4()).await.expect("delete"));
    assert!(store
        .replace_chunks(a.id, &chunk_set(a.id, "new", 3))
        .await
        .expect("replace"));
    assert!(store.delete_document(b.id).await.expect("delete"));

    let all = store.changes_after(0, 100).await.expect("read");
    let kinds: Vec<(Uuid, ChangeKind)> = all.iter().map(|c| (c.document_id, c.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (a.id, ChangeKind::Stored),
            (b.id, ChangeKind::Stored),
            (a.id, ChangeKind::Rechunked),
            (b.id, ChangeKind::Deleted),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
    let last = store.last_change().await.expect("last");
    assert_eq!(last, all[3].seq);
    // Read in pages from any number.
    let page: Vec<DocumentChange> = store.changes_after(all[0].seq, 2).await.expect("page");
    assert_eq!(page, all[1..3].to_vec());
    assert!(store.changes_after(last, 10).await.expect("after the last").is_empty());

    // Pruning drops what was written before the time given, and numbers go on.
    assert_eq!(
        store
            .prune_changes(Utc::now() - Duration::hours(1))
            .await
            .expect("prune none"),
        0
    );
    assert_eq!(
        store
            .prune_changes(Utc::now() + Duration::seconds(1))
            .await
            .expect("prune all"),
        4
    );
    assert!(store.changes_after(0, 10).await.expect("read").is_empty());
    assert_eq!(store.last_change().await.expect("last"), last);
    let (c, c_chunks) = document(owner, "Feed five. Six", 0);
    store.insert_document(&c, &c_chunks).await.expect("insert");
    let next = store.changes_after(0, 10).await.expect("read");
    assert_eq!(next.len(), 1);
    assert!(next[0].seq > last, "{next:?} after {last}");
}

async fn many_documents_are_read_at_once_with_their_current_chunks(store: Arc<dyn DocumentStore>) {
    let owner = Owner::User(Uuid::new_v4());
    let mut docs = Vec::new();
    for i in 0..6 {
        let text = (0..=i)
            .map(|k| format!("Doc {i} part {k}"))
            .collect::<Vec<_>>()
            .join(". ");
        let (doc, chunks) = document(owner, &text, i64::from(i));
        store.insert_document(&doc, &chunks).await.expect("insert");
        docs.push(doc);
    }
    // One re-indexed (its chunks live under a new set), one deleted.
    let (_, fresh) = document(owner, "Replaced first. Replaced second", 0);
    let fresh: Vec<Chunk> = fresh
        .into_iter()
        .map(|c| Chunk {
            document_id: docs[2].id,
            ..c
        })
        .collect();
    assert!(store.replace_chunks(docs[2].id, &fresh).await.expect("replace"));
    assert!(store.delete_document(docs[4].id).await.expect("delete"));
    let mut ids: Vec<Uuid> = docs.iter().map(|d| d.id).collect();
    ids.push(Uuid::new_v4());
    let mut read = store.documents_with_chunks(&ids).await.expect("bulk read");
    read.sort_by_key(|(d, _)| ids.iter().position(|id| *id == d.id));
    let expected: Vec<Uuid> = [0, 1, 2, 3, 5].iter().map(|&i| docs[i].id).collect();
    assert_eq!(read.iter().map(|(d, _)| d.id).collect::<Vec<_>>(), expected);
    for (doc, chunks) in &read {
        assert_eq!(Some(doc.clone()), store.document(doc.id).await.expect("get"));
        assert_eq!(chunks, &store.chunks(doc.id).await.expect("chunks"), "{}", doc.title);
        assert_eq!(chunks.len(), doc.chunk_count as usize);
    }
    assert_eq!(read[2].1, fresh);
    assert!(store.documents_with_chunks(&[]).await.expect("none").is_empty());
}
