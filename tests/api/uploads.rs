//! File uploads (multipart) in every supported format, bad files that must leave
//! nothing behind, the storage quota under concurrent uploads, and seeding: the
//! admin routes and `ragchat seed`.

use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{expect, model_settings, models_dir, TestApp};

pub async fn upload(
    app: &TestApp,
    token: &str,
    name: &str,
    bytes: Vec<u8>,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let mut form = Form::new().part("file", Part::bytes(bytes).file_name(name.to_string()));
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    app.client
        .post(app.url("/knowledge/documents"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .expect("request")
}

/// A one-page PDF with `text` in Helvetica (offsets computed, so it is valid).
fn pdf(text: &str) -> Vec<u8> {
    pdf_with_contents("", format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET").as_bytes())
}

/// A one-page PDF whose content stream is `content`, its dictionary extended by `filter`.
pub fn pdf_with_contents(filter: &str, content: &[u8]) -> Vec<u8> {
    let stream = |content: &[u8]| {
        let mut s = format!("<< /Length {}{filter} >>\nstream\n", content.len()).into_bytes();
        s.extend_from_slice(content);
        s.extend_from_slice(b"\nendstream");
        s
    };
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_string(),
        String::new(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_string(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        match i {
            3 => out.extend_from_slice(&stream(content)),
            _ => out.extend_from_slice(o.as_bytes()),
        }
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A zlib stream that inflates to `1 + 258 * matches` zero bytes: one literal, then
/// back-references of the longest length (fixed Huffman codes, 13 bits per 258 bytes).
fn zlib_zeros(matches: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        /// `n` bits of `v`, least significant first (header fields).
        fn put(&mut self, v: u32, n: u32) {
            for i in 0..n {
                self.acc |= ((v >> i) & 1) << self.n;
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    (self.acc, self.n) = (0, 0);
                }
            }
        }
        /// A Huffman code of `n` bits, most significant first.
        fn code(&mut self, v: u32, n: u32) {
            for i in (0..n).rev() {
                self.put((v >> i) & 1, 1);
            }
        }
    }
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // the final block
    b.put(1, 2); // fixed Huffman codes
    b.code(0b0011_0000, 8); // literal 0
    for _ in 0..matches {
        b.code(0b1100_0101, 8); // length 258 (code 285)
        b.code(0, 5); // distance 1
    }
    b.code(0, 7); // end of block
    if b.n > 0 {
        b.out.push(b.acc as u8);
    }
    // Adler-32 of n zero bytes: a = 1, b = n (mod 65521).
    let n = (1 + 258 * matches as u64) % 65521;
    b.out.extend_from_slice(&((n << 16 | 1) as u32).to_be_bytes());
    b.out
}

#[actix_web::test]
async fn a_pdf_bomb_is_stopped_by_the_readers_limits_and_the_server_reads_on() {
    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    settings.knowledge.pdf_max_memory_mb = 256;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("bomb@example.com").await;
    // 5 MB that inflate to 1 GB in the reader.
    let bomb = pdf_with_contents(" /Filter /FlateDecode", &zlib_zeros(4_000_000));
    assert!(bomb.len() < 8 << 20, "{}", bomb.len());
    let t = Instant::now();
    let v = expect(
        upload(&app, &token, "bomb.pdf", bomb, &[]).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("within the limits for a PDF")),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_eq!(total(&app, &token).await, 0);
    // A good PDF is read right after, by a fresh reader: this server runs without
    // models, so reading succeeds and storing then answers `model_not_loaded`.
    let v = expect(
        upload(&app, &token, "ok.pdf", pdf("Glaciers carve valleys."), &[]).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(v["code"], "model_not_loaded", "{v}");
}

#[actix_web::test]
async fn a_pdf_reader_that_runs_too_long_is_killed() {
    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    // No time at all: the reader is killed at once, the upload refused.
    settings.knowledge.pdf_timeout_secs = 0;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("slow-pdf@example.com").await;
    let v = expect(
        upload(&app, &token, "slow.pdf", pdf("Rivers meander."), &[]).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("within the limits for a PDF")),
        "{v}"
    );
    assert_eq!(total(&app, &token).await, 0);
}

async fn total(app: &TestApp, token: &str) -> u64 {
    expect(app.get("/knowledge/documents", Some(token)).await, StatusCode::OK).await["total"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

async fn top_title(app: &TestApp, token: &str, query: &str) -> String {
    top_hit(app, token, query).await["title"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The best hit of a hybrid search (null when there is none).
async fn top_hit(app: &TestApp, token: &str, query: &str) -> Value {
    let v = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": query, "route": "hybrid", "top_k": 1}),
            Some(token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    v["results"][0].clone()
}

#[actix_web::test]
async fn uploads_in_every_format_are_searchable_and_bad_files_store_nothing() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.max_document_bytes = 4096;
    settings.knowledge.max_upload_bytes = 16 << 10;
    let app = TestApp::spawn_with(settings).await;
    let (_, alice) = app.user("alice@example.com").await;

    let files: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "glaciers.txt",
            b"Glaciers carve U-shaped valleys as the ice grinds the bedrock.".to_vec(),
            "glaciers",
            "how do glaciers shape valleys",
        ),
        (
            "bees.md",
            b"# Honey bees\n\nBees communicate the direction of flowers with a waggle dance.".to_vec(),
            "Honey bees",
            "waggle dance of bees",
        ),
        (
            "comets.html",
            b"<html><head><title>Comets</title><script>var x = 1;</script></head><body><p>A comet's tail always points away from the Sun, pushed by the solar wind.</p></body></html>".to_vec(),
            "Comets",
            "why does a comet tail point away from the sun",
        ),
        (
            "coral.pdf",
            pdf("Coral reefs bleach when warm water drives out their symbiotic algae."),
            "coral",
            "coral reef bleaching warm water",
        ),
    ];
    for (name, bytes, title, _) in &files {
        let v = expect(
            upload(&app, &alice, name, bytes.clone(), &[]).await,
            StatusCode::CREATED,
        )
        .await;
        assert_eq!(
            (v["created"].as_u64(), v["duplicates"].as_u64()),
            (Some(1), Some(0)),
            "{name}: {v}"
        );
        assert_eq!(v["documents"][0]["title"], *title, "{name}");
        assert_eq!(v["documents"][0]["source"], *name);
        let format = match name.rsplit('.').next() {
            Some("md") => "markdown",
            Some("txt") => "text",
            Some(ext) => ext,
            None => "",
        };
        // Where it came from: an upload, and in which format.
        assert_eq!(v["documents"][0]["source_type"], format!("upload:{format}"), "{name}");
    }
    // JSON Lines: several documents, metadata and form fields kept.
    let jsonl = b"{\"_id\": \"d1\", \"title\": \"Penguins\", \"text\": \"Emperor penguins huddle to survive the Antarctic winter.\", \"metadata\": {\"year\": 2020}}\n{\"_id\": \"d2\", \"title\": \"Owls\", \"text\": \"Owls hunt at night with silent flight feathers.\"}\n";
    let v = expect(
        upload(
            &app,
            &alice,
            "birds.jsonl",
            jsonl.to_vec(),
            &[("metadata", "{\"topic\": \"birds\"}")],
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(v["created"], 2, "{v}");
    assert_eq!(v["documents"][0]["source"], "d1");
    assert_eq!(v["documents"][0]["metadata"], json!({"year": 2020, "topic": "birds"}));
    assert_eq!(v["documents"][0]["source_type"], "upload:jsonl");
    // The same file again: nothing new.
    let v = expect(
        upload(&app, &alice, "birds.jsonl", jsonl.to_vec(), &[]).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (v["created"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(2)),
        "{v}"
    );
    for (name, _, title, query) in &files {
        let hit = top_hit(&app, &alice, query).await;
        assert_eq!(hit["title"], *title, "{name}");
        assert!(
            hit["source_type"].as_str().is_some_and(|t| t.starts_with("upload:")),
            "{hit}"
        );
    }
    assert_eq!(
        top_title(&app, &alice, "penguins in the antarctic winter").await,
        "Penguins"
    );
    // The same text twice in one file: stored once, the second is its duplicate.
    let twice = b"{\"title\": \"A\", \"text\": \"Moss grows on the north side.\"}\n{\"title\": \"B\", \"text\": \"Moss grows on the north side.\"}\n";
    let v = expect(
        upload(&app, &alice, "twice.jsonl", twice.to_vec(), &[]).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        (v["created"].as_u64(), v["duplicates"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(v["documents"][0]["id"], v["documents"][1]["id"]);
    assert_eq!(v["documents"][1]["duplicate"], true);
    let stored = total(&app, &alice).await;
    assert_eq!(stored, 7);

    // Bad files: a clear 4xx each, and nothing stored.
    let mut corrupt = pdf("Half a file");
    corrupt.truncate(corrupt.len() / 2);
    let too_long_doc = "word ".repeat(1000);
    let cases: Vec<(&str, Vec<u8>, StatusCode)> = vec![
        ("empty.txt", Vec::new(), StatusCode::UNPROCESSABLE_ENTITY),
        (
            "latin1.txt",
            b"caf\xe9 au lait".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("broken.pdf", corrupt, StatusCode::UNPROCESSABLE_ENTITY),
        ("fake.pdf", b"just text".to_vec(), StatusCode::UNPROCESSABLE_ENTITY),
        (
            "slides.pptx",
            b"PK\x03\x04".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        ("huge.txt", vec![b'a'; 20 << 10], StatusCode::PAYLOAD_TOO_LARGE),
        ("long.txt", too_long_doc.into_bytes(), StatusCode::PAYLOAD_TOO_LARGE),
        (
            "half.jsonl",
            b"{\"title\": \"Fine\", \"text\": \"A valid first line.\"}\n{\"title\": \"Broken\"".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "notext.jsonl",
            b"{\"title\": \"Fine\", \"text\": \"A valid first line.\"}\n{\"title\": \"No text\"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (name, bytes, status) in cases {
        let v = expect(upload(&app, &alice, name, bytes, &[]).await, status).await;
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{name}: {v}");
    }
    // A form without a file, with an unknown field, or a bad visibility.
    let no_file = Form::new().text("title", "x");
    let resp = app
        .client
        .post(app.url("/knowledge/documents"))
        .bearer_auth(&alice)
        .multipart(no_file)
        .send()
        .await
        .expect("request");
    expect(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    let v = upload(
        &app,
        &alice,
        "a.txt",
        b"some text".to_vec(),
        &[("visibility", "everyone")],
    )
    .await;
    expect(v, StatusCode::UNPROCESSABLE_ENTITY).await;
    let v = upload(
        &app,
        &alice,
        "a.txt",
        b"some text".to_vec(),
        &[("visibility", "global")],
    )
    .await;
    expect(v, StatusCode::FORBIDDEN).await;
    assert_eq!(total(&app, &alice).await, stored, "a rejected upload stored something");
    expect(
        app.client
            .post(app.url("/knowledge/documents"))
            .multipart(Form::new().part("file", Part::bytes(b"x".to_vec()).file_name("a.txt")))
            .send()
            .await
            .expect("request"),
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[actix_web::test]
async fn the_storage_quota_holds_under_concurrent_uploads() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.max_document_bytes = 400 << 10;
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("admin@example.com").await;
    expect(
        app.client
            .put(app.url("/admin/settings/subscription_limits"))
            .bearer_auth(&admin)
            .json(&json!({"free": {"storage_mb": 1, "api_calls": 1000}}))
            .send()
            .await
            .expect("request"),
        StatusCode::OK,
    )
    .await;
    let (_, bob) = app.user("bob@example.com").await;
    // 300 KiB each (mostly blank, so cheap to embed): three fit in 1 MiB, four do not.
    let doc =
        |i: usize| json!({"title": format!("Doc {i}"), "content": format!("note {i}{}end", " ".repeat(300 << 10))});
    let requests = (0..6).map(|i| {
        let (app, bob, body) = (&app, &bob, doc(i));
        async move { app.post_json("/knowledge/documents", &body, Some(bob)).await.status() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::PAYLOAD_TOO_LARGE).count();
    assert_eq!((created, refused), (3, 3), "{statuses:?}");
    assert_eq!(total(&app, &bob).await, 3);
    // A small one still fits.
    let resp = app
        .post_json(
            "/knowledge/documents",
            &json!({"title": "Small", "content": "a small note"}),
            Some(&bob),
        )
        .await;
    expect(resp, StatusCode::CREATED).await;
    // Deleting frees room again.
    let first = expect(
        app.get("/knowledge/documents?limit=100", Some(&bob)).await,
        StatusCode::OK,
    )
    .await;
    let big = first["items"]
        .as_array()
        .and_then(|items| items.iter().find(|d| d["size_bytes"].as_u64() > Some(1000)))
        .and_then(|d| d["id"].as_str())
        .expect("a big document")
        .to_string();
    expect(
        app.delete(&format!("/knowledge/documents/{big}"), &bob).await,
        StatusCode::NO_CONTENT,
    )
    .await;
    let resp = app.post_json("/knowledge/documents", &doc(9), Some(&bob)).await;
    expect(resp, StatusCode::CREATED).await;
}

async fn wait_for_seed(app: &TestApp, admin: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = expect(app.get("/admin/seed-status", Some(admin)).await, StatusCode::OK).await;
        if s["state"] != "running" {
            return s;
        }
        assert!(Instant::now() < deadline, "seed still running: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn admins_seed_a_corpus_in_the_background_and_the_cli_seeds_the_store() {
    let Some(dir) = models_dir() else { return };
    let root = std::env::temp_dir().join(format!("ragchat-seed-{}", Uuid::new_v4()));
    let corpus = root.join("corpus");
    std::fs::create_dir_all(corpus.join("sub")).expect("dirs");
    std::fs::write(
        corpus.join("volcanoes.md"),
        "# Volcanoes\n\nMagma rises through cracks in the crust and erupts as lava.",
    )
    .expect("write");
    std::fs::write(
        corpus.join("sub/tides.txt"),
        "Tides follow the Moon's gravity on the rotating Earth.",
    )
    .expect("write");
    std::fs::write(corpus.join("sub/bad.txt"), b"\xff\xfe not utf-8").expect("write");
    std::fs::write(corpus.join("notes.docx"), b"ignored").expect("write");
    std::fs::write(corpus.join(".hidden.txt"), "hidden files are skipped").expect("write");
    std::fs::write(
        root.join("beir.jsonl"),
        "{\"_id\": \"1\", \"title\": \"Aqueducts\", \"text\": \"Roman aqueducts carried water by gravity.\"}\n{\"_id\": \"2\", \"title\": \"Bridges\", \"text\": \"Suspension bridges hang from cables.\"}\n",
    )
    .expect("write");

    let mut settings = model_settings(&dir);
    settings.knowledge.seed_root = root.display().to_string();
    let app = TestApp::spawn_with(settings.clone()).await;
    let admin = app.admin("admin@example.com").await;
    let (_, user) = app.user("user@example.com").await;

    // Only admins; only inside the seed root.
    expect(
        app.post_json("/admin/seed-enhanced", &json!({}), Some(&user)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    expect(
        app.post_json("/admin/seed-enhanced", &json!({"path": "../"}), Some(&admin))
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    expect(
        app.post_json("/admin/seed-enhanced", &json!({"path": "missing"}), Some(&admin))
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect(
        app.post_json("/admin/seed-enhanced", &json!({"dry_ran": true}), Some(&admin))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;

    // A dry run counts and stores nothing.
    let s = expect(
        app.post_json(
            "/admin/seed-enhanced",
            &json!({"path": "corpus", "dry_run": true, "background": false}),
            Some(&admin),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (s["state"].as_str(), s["dry_run"].as_bool()),
        (Some("completed"), Some(true)),
        "{s}"
    );
    assert_eq!(
        (s["documents_total"].as_u64(), s["documents_created"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    assert_eq!(s["documents_failed"], 1, "{s}");
    assert_eq!(total(&app, &user).await, 0);

    // In the background, then searchable by everybody.
    let s = expect(
        app.post_json("/admin/seed-enhanced", &json!({"path": "corpus"}), Some(&admin))
            .await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert!(s["state"] == "running" || s["state"] == "completed", "{s}");
    let s = wait_for_seed(&app, &admin).await;
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(
        (s["documents_created"].as_u64(), s["documents_failed"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    assert!(s["errors"][0].as_str().is_some_and(|e| e.contains("bad.txt")), "{s}");
    assert!(s["indexed_chunks"].as_u64() >= Some(2), "{s}");
    let hit = top_hit(&app, &user, "how does magma erupt").await;
    assert_eq!(
        (&hit["title"], &hit["source_type"]),
        (&json!("Volcanoes"), &json!("seed")),
        "{hit}"
    );
    // Again: all duplicates. With clear_existing and a BEIR file: replaced.
    let s = expect(
        app.post_json(
            "/admin/seed-enhanced",
            &json!({"path": "corpus", "background": false}),
            Some(&admin),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (s["documents_created"].as_u64(), s["documents_duplicate"].as_u64()),
        (Some(0), Some(2)),
        "{s}"
    );
    let s = expect(
        app.post_json(
            "/admin/seed-enhanced",
            &json!({"path": "beir.jsonl", "clear_existing": true, "background": false}),
            Some(&admin),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (s["documents_removed"].as_u64(), s["documents_created"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    assert_eq!(total(&app, &user).await, 2);
    assert_eq!(top_title(&app, &user, "roman water aqueducts").await, "Aqueducts");
    assert_ne!(top_title(&app, &user, "magma eruption").await, "Volcanoes");

    // The command line seeds the store; the server finds the documents at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragchat"))
        .args(["seed", &corpus.display().to_string()])
        .env("RAGCHAT_ENV", "test")
        .env("RAGCHAT__KNOWLEDGE__SQLITE_URL", &settings.knowledge.sqlite_url)
        .env("RAGCHAT__MODELS__EMBEDDING_DIR", &settings.models.embedding_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ragchat seed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 new"), "{stdout}");
    drop(app);
    let app = TestApp::spawn_with(settings).await;
    let user = app.login("user@example.com", "password-1234").await["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_eq!(total(&app, &user).await, 4);
    assert_eq!(top_title(&app, &user, "how does magma erupt").await, "Volcanoes");
    let _ = std::fs::remove_dir_all(&root);
}

#[actix_web::test]
async fn a_jsonl_upload_holds_at_most_the_configured_number_of_documents() {
    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    settings.knowledge.max_upload_documents = 2;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("many-docs@example.com").await;
    let line = |i: u32| format!("{{\"_id\": \"d{i}\", \"title\": \"T{i}\", \"text\": \"text {i}\"}}\n");
    let three: String = (0..3).map(line).collect();
    let resp = upload(&app, &token, "three.jsonl", three.into_bytes(), &[]).await;
    let body = expect(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("more than 2 documents") && d.contains("at most 2")),
        "{body}"
    );
    // Two pass this check (and go on to ingestion).
    let two: String = (0..2).map(line).collect();
    let resp = upload(&app, &token, "two.jsonl", two.into_bytes(), &[]).await;
    assert_ne!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

pub fn jsonl(prefix: &str, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            format!(
                "{{\"_id\": \"{prefix}{i}\", \"title\": \"{prefix} {i}\", \"text\": \"Document {i} of {prefix}: tides follow the moon, rivers carve canyons, item {i}.\"}}\n"
            )
        })
        .collect::<String>()
        .into_bytes()
}

pub async fn remaining(app: &TestApp, token: &str) -> (u64, u64) {
    let u = expect(app.get("/billing/usage", Some(token)).await, StatusCode::OK).await;
    let left = |r: &str| u["quota_remaining"][r].as_u64().unwrap_or(u64::MAX);
    (left("background_tasks"), left("api_calls"))
}

/// A 202 with a job: its body and id (the `Location` names the job).
pub async fn accepted_job(resp: reqwest::Response) -> (Value, String) {
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .map(str::to_string)
        .expect("Location");
    let job: Value = resp.json().await.expect("job");
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(location, format!("/knowledge/jobs/{id}"));
    (job, id)
}

pub async fn wait_for_job(app: &TestApp, token: &str, id: &str) -> Value {
    for _ in 0..600 {
        let v = expect(
            app.get(&format!("/knowledge/jobs/{id}"), Some(token)).await,
            StatusCode::OK,
        )
        .await;
        if !matches!(v["state"].as_str(), Some("queued" | "running")) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} did not finish");
}

#[actix_web::test]
async fn many_document_uploads_run_as_background_jobs_that_count_one_background_task() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.jobs_min_documents = 4;
    settings.knowledge.jobs_batch_documents = 2;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("jobs@example.com").await;
    let (_, other) = app.user("jobs-other@example.com").await;
    let before = remaining(&app, &token).await;

    // Three documents: stored at once, as before (one api call).
    let v = expect(
        upload(&app, &token, "small.jsonl", jsonl("small", 3), &[]).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(v["created"], 3, "{v}");

    // Five: a job. 202, Location, then progress to the end.
    let resp = upload(&app, &token, "five.jsonl", jsonl("five", 5), &[]).await;
    let (job, id) = accepted_job(resp).await;
    assert_eq!(
        (job["kind"].as_str(), job["documents_total"].as_u64()),
        (Some("upload"), Some(5))
    );
    let done = wait_for_job(&app, &token, &id).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(
        (done["documents_created"].as_u64(), done["documents_failed"].as_u64()),
        (Some(5), Some(0))
    );
    assert_eq!(total(&app, &token).await, 8);
    let listed = expect(app.get("/knowledge/jobs", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // Any upload can ask for the background; the same file again stores nothing
    // new: its unit is given back.
    let v = expect(
        upload(&app, &token, "again.jsonl", jsonl("five", 5), &[("background", "true")]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let again = wait_for_job(&app, &token, v["id"].as_str().expect("id")).await;
    assert_eq!(
        (again["state"].as_str(), again["documents_duplicate"].as_u64()),
        (Some("completed"), Some(5))
    );

    // Counted: one background task for the job that stored, one api call for the small upload.
    let after = remaining(&app, &token).await;
    assert_eq!(
        after,
        (before.0 - 1, before.1 - 1),
        "before {before:?}, after {after:?}"
    );

    // Another user cannot see or cancel it; a finished job cannot be cancelled.
    let v = expect(
        app.get(&format!("/knowledge/jobs/{id}"), Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(v["code"], "job_not_found");
    let cancel = |t: &str, id: &str| {
        let (client, url, t) = (
            app.client.clone(),
            app.url(&format!("/knowledge/jobs/{id}/cancel")),
            t.to_string(),
        );
        async move { client.post(url).bearer_auth(t).send().await.expect("cancel") }
    };
    assert_eq!(cancel(&other, &id).await.status(), StatusCode::NOT_FOUND);
    expect(cancel(&token, &id).await, StatusCode::CONFLICT).await;
    assert_eq!(
        cancel(&token, &Uuid::new_v4().to_string()).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get("/knowledge/jobs/not-a-uuid", Some(&token)).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        app.get("/knowledge/jobs", None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let v = expect(
        upload(&app, &token, "x.jsonl", jsonl("x", 1), &[("background", "maybe")]).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(v["detail"].as_str().is_some_and(|d| d.contains("background")), "{v}");
}

#[actix_web::test]
async fn a_queued_job_cancelled_gives_its_unit_back_and_unfinished_jobs_are_bounded() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.jobs_min_documents = 2;
    settings.knowledge.jobs_batch_documents = 1;
    settings.knowledge.jobs_max_running = 1;
    settings.knowledge.jobs_max_pending_per_user = 2;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("queue@example.com").await;
    let before = remaining(&app, &token).await;
    // The first job holds the only runner for a while (60 batches).
    let first = expect(
        upload(&app, &token, "long.jsonl", jsonl("long", 60), &[]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let second = expect(
        upload(&app, &token, "wait.jsonl", jsonl("wait", 2), &[]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    // A third unfinished job is one too many.
    let v = expect(
        upload(&app, &token, "third.jsonl", jsonl("third", 2), &[]).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(v["code"], "too_many_jobs", "{v}");
    // Cancel both: the queued one never runs, the running one stops between batches.
    for job in [&second, &first] {
        let id = job["id"].as_str().expect("id");
        let url = app.url(&format!("/knowledge/jobs/{id}/cancel"));
        let v = expect(
            app.client.post(url).bearer_auth(&token).send().await.expect("cancel"),
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(v["cancel_requested"], true);
    }
    let second = wait_for_job(&app, &token, second["id"].as_str().expect("id")).await;
    assert_eq!(
        (second["state"].as_str(), second["documents_created"].as_u64()),
        (Some("cancelled"), Some(0))
    );
    let first = wait_for_job(&app, &token, first["id"].as_str().expect("id")).await;
    assert_eq!(first["state"], "cancelled", "{first}");
    let stored = first["documents_created"].as_u64().expect("created");
    assert!(stored < 60, "{first}");
    assert_eq!(total(&app, &token).await, stored);
    // What the cancelled job stored counts (one unit); the job that stored nothing gave its unit back.
    let after = remaining(&app, &token).await;
    let used = if stored > 0 { 1 } else { 0 };
    assert_eq!(after, (before.0 - used, before.1), "before {before:?}, after {after:?}");
}

/// A JSON Lines corpus of `n` documents of about 120 words each (about 160
/// tokens: one chunk per document).
fn corpus_of(n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "river", "harbour", "glacier", "orchard", "granite", "lantern", "meadow", "copper", "falcon", "quarry",
        "thistle", "canyon", "beacon", "willow", "ember", "summit", "marsh", "pebble", "saffron", "tundra",
    ];
    (0..n)
        .map(|d| {
            let text: Vec<&str> = (0..120).map(|w| WORDS[(d * 7 + w * 3 + w / 5) % WORDS.len()]).collect();
            format!(
                "{{\"_id\": \"doc{d}\", \"title\": \"Document {d}\", \"text\": \"{} {d}.\"}}\n",
                text.join(" ")
            )
        })
        .collect::<String>()
        .into_bytes()
}

/// The embed worker's lanes, as /admin/actors shows them.
async fn lanes(app: &TestApp, admin: &str) -> Value {
    let tree = expect(app.get("/admin/actors", Some(admin)).await, StatusCode::OK).await;
    tree["supervisors"]
        .as_array()
        .and_then(|s| s.iter().find(|n| n["name"] == "embed-worker"))
        .map(|n| n["lanes"].clone())
        .expect("embed-worker node")
}

/// Issue 16: one large upload used to hold the only embedding thread, so search
/// waited for the whole upload (or answered 503). Now the upload is embedded
/// `models.embed_max_batch` texts per forward and a search's query vector goes
/// first: it waits for the one forward in flight. A second upload finding the
/// bulk lane full (`models.embed_bulk_queue`) waits `models.embed_bulk_wait_ms`
/// for a place, then answers 503 `model_overloaded`; the first one completes.
#[actix_web::test]
async fn a_search_during_a_large_upload_waits_for_one_bulk_forward_not_the_upload() {
    let Some(dir) = models_dir() else {
        return;
    };
    let mut settings = model_settings(&dir);
    settings.models.embed_max_batch = 4;
    settings.models.embed_bulk_queue = 1;
    settings.models.embed_bulk_wait_ms = 300;
    // Synchronous uploads: this measures the embedding lanes, not background jobs.
    settings.knowledge.jobs_min_documents = 10_000;
    settings.knowledge.jobs_min_upload_bytes = 64 << 20;
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("lanes-admin@example.com").await;
    let (_, user) = app.user("lanes-user@example.com").await;
    let embedder = app.state.embedder.clone().expect("embedder");
    let forwards = || embedder.stats.batches.load(std::sync::atomic::Ordering::SeqCst);

    // 120 documents: 30 forwards of 4.
    let large = {
        let (client, url, admin) = (app.client.clone(), app.url("/knowledge/documents"), admin.clone());
        actix_web::rt::spawn(async move {
            let form = Form::new().part("file", Part::bytes(corpus_of(120)).file_name("large.jsonl"));
            let resp = client.post(url).bearer_auth(admin).multipart(form).send().await;
            resp.expect("upload")
        })
    };
    let started = Instant::now();
    loop {
        let l = lanes(&app, &admin).await;
        if l["bulk"] == 1 && forwards() >= 1 {
            assert_eq!(l["enabled"], true, "{l}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the upload never started embedding: {l}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The bulk lane is full: another upload waits 300 ms for a place, then 503.
    let refused = upload(
        &app,
        &user,
        "small.txt",
        b"A small note about lighthouses.".to_vec(),
        &[],
    )
    .await;
    let body = expect(refused, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["code"], "model_overloaded", "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("bulk lane is full")),
        "{body}"
    );

    // A search (its query embedded) runs after at most the bulk forward in flight.
    let before = forwards();
    let found = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": "granite quarry near the harbour", "route": "hybrid"}),
            Some(&user),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let during = forwards() - before;
    assert!(found["results"].is_array(), "{found}");
    assert!(
        during <= 3,
        "{during} forwards ran while the search waited (the one in flight, the query's, at most one more)"
    );
    let l = lanes(&app, &admin).await;
    assert_eq!(l["bulk"], 1, "the upload is still embedding: {l}");
    assert!(l["bulk_pending_texts"].as_u64().is_some_and(|n| n > 0), "{l}");

    let done = expect(large.await.expect("join"), StatusCode::CREATED).await;
    assert_eq!(done["created"], 120, "the whole upload is stored");
    assert!(forwards() - before >= 25, "the upload's forwards ran after the search");
    let l = lanes(&app, &admin).await;
    assert_eq!(
        (l["interactive"].as_u64(), l["bulk"].as_u64()),
        (Some(0), Some(0)),
        "{l}"
    );

    // The lanes are in the metrics too.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for series in [
        "embed_lane_queued_requests{lane=\"interactive\"}",
        "embed_lane_queued_requests{lane=\"bulk\"}",
        "embed_bulk_waiting_requests",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
}
