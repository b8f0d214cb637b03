//! Text out of uploaded files: plain text and Markdown (UTF-8), HTML (rendered to
//! plain text), PDF (text layer) and JSON Lines (one document per line, the BEIR
//! corpus layout among others). Every failure is a `FormatError` the HTTP layer
//! turns into a 4xx; nothing here touches a store.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::pdf::{self, PdfLimits};

/// One document taken out of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub title: String,
    pub content: String,
    /// Where it came from: the file name, or a JSON line's `source` / `_id`.
    pub source: String,
    pub metadata: Map<String, Value>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    /// The file type is not one we read (415).
    #[error("{0}")]
    Unsupported(String),
    /// The file is of a known type but cannot be read (422).
    #[error("{0}")]
    Invalid(String),
    /// The file, or the text in it, is over a size limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The server cannot read it now (PDF readers all busy, or none installed: 503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<pdf::PdfError> for FormatError {
    fn from(e: pdf::PdfError) -> Self {
        match e {
            pdf::PdfError::Invalid(m) => FormatError::Invalid(m),
            pdf::PdfError::TooLarge(m) => FormatError::TooLarge(m),
            pdf::PdfError::Unavailable(m) => FormatError::Unavailable(m),
        }
    }
}

/// How much a file may hold (from `knowledge.*` in the configuration).
#[derive(Debug, Clone)]
pub struct FormatLimits {
    /// Text of one document: a text file, the text of an HTML page or a PDF.
    pub max_text_bytes: usize,
    /// An HTML file (parsing builds a tree several times its size).
    pub max_html_bytes: usize,
    /// Documents in one JSON Lines file.
    pub max_documents: usize,
    pub pdf: PdfLimits,
}

impl FormatLimits {
    /// Uploads: a JSON Lines file holds at most `max_upload_documents`.
    pub fn of(k: &crate::config::KnowledgeSettings) -> Self {
        FormatLimits {
            max_text_bytes: k.max_document_bytes,
            max_html_bytes: k.max_html_bytes,
            max_documents: k.max_upload_documents,
            pdf: PdfLimits {
                program: (!k.pdf_extractor.is_empty()).then(|| k.pdf_extractor.clone().into()),
                max_memory_bytes: k.pdf_max_memory_mb.saturating_mul(1 << 20),
                max_cpu_secs: k.pdf_max_cpu_secs,
                timeout: std::time::Duration::from_secs(k.pdf_timeout_secs),
                max_text_bytes: k.max_document_bytes,
                slots: pdf::Slots::process_wide(k.pdf_max_concurrent),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    JsonLines,
}

pub const SUPPORTED: &str = ".txt, .md, .html, .pdf, .jsonl";

impl Format {
    /// Its name in a document's origin (`upload:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::JsonLines => "jsonl",
        }
    }

    /// By file extension, then by the part's content type.
    pub fn detect(filename: &str, content_type: Option<&str>) -> Result<Format, FormatError> {
        let ext = Path::new(filename)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let by_ext = match ext.as_deref() {
            Some("txt" | "text") => Some(Format::Text),
            Some("md" | "markdown") => Some(Format::Markdown),
            Some("html" | "htm") => Some(Format::Html),
            Some("pdf") => Some(Format::Pdf),
            Some("jsonl" | "ndjson") => Some(Format::JsonLines),
            _ => None,
        };
        let mime = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
        by_ext
            .or(match mime.as_deref() {
                Some("text/plain") => Some(Format::Text),
                Some("text/markdown") => Some(Format::Markdown),
                Some("text/html") => Some(Format::Html),
                Some("application/pdf") => Some(Format::Pdf),
                Some("application/jsonl" | "application/x-ndjson" | "application/jsonlines") => Some(Format::JsonLines),
                _ => None,
            })
            .ok_or_else(|| {
                FormatError::Unsupported(format!(
                    "Unsupported file type for '{filename}': upload one of {SUPPORTED}"
                ))
            })
    }
}

/// Titles taken from a file are cut to the 500 characters a title may have.
fn clip(title: String) -> String {
    match title.char_indices().nth(500) {
        Some((cut, _)) => title[..cut].trim_end().to_string(),
        None => title,
    }
}

/// The file name without directories or extension, as a fallback title.
fn stem(filename: &str) -> String {
    Path::new(filename)
        .file_stem()
        .and_then(|s| s.to_str())
        .map(|s| s.replace(['_', '-'], " ").trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "Untitled".to_string())
}

fn utf8<'a>(filename: &str, bytes: &'a [u8]) -> Result<&'a str, FormatError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        FormatError::Invalid(format!(
            "'{filename}' is not UTF-8 text (invalid byte at offset {}); convert it to UTF-8",
            e.valid_up_to()
        ))
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

fn non_empty(filename: &str, text: String) -> Result<String, FormatError> {
    if text.trim().is_empty() {
        Err(FormatError::Invalid(format!("'{filename}' has no text")))
    } else {
        Ok(text)
    }
}

fn markdown_title(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .and_then(|l| l.strip_prefix("# "))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn html_title(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = start + lower[start..].find('>')? + 1;
    let close = open_end + lower[open_end..].find("</title")?;
    let raw = html[open_end..close].split_whitespace().collect::<Vec<_>>().join(" ");
    let raw = raw
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'");
    (!raw.is_empty()).then_some(raw)
}

fn too_large(filename: &str, what: &str, len: usize, max: usize) -> FormatError {
    FormatError::TooLarge(format!(
        "'{filename}' is {len} bytes: {what} may be at most {max} bytes"
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(rename = "_id", alias = "id", default)]
    id: Option<Value>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

/// JSON Lines: every non-blank line `{"title", "text" or "content", "source"?,
/// "metadata"?, "_id"?}`. One bad line fails the whole file.
/// More than `max_documents` lines fails at the first one too many.
fn json_lines(filename: &str, text: &str, max_documents: usize) -> Result<Vec<Extracted>, FormatError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if out.len() == max_documents {
            return Err(FormatError::Invalid(format!(
                "'{filename}' holds more than {max_documents} documents: at most {max_documents} per upload"
            )));
        }
        let bad = |why: String| FormatError::Invalid(format!("'{filename}' line {}: {why}", i + 1));
        let l: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let content = l
            .text
            .or(l.content)
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| bad("needs a non-empty \"text\" or \"content\"".into()))?;
        let id = l.id.map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        });
        let title = l
            .title
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| id.clone())
            .unwrap_or_else(|| format!("{} line {}", stem(filename), i + 1));
        out.push(Extracted {
            title: clip(title),
            content,
            source: l.source.or(id).unwrap_or_else(|| filename.to_string()),
            metadata: l.metadata.unwrap_or_default(),
        });
    }
    if out.is_empty() {
        return Err(FormatError::Invalid(format!("'{filename}' has no documents")));
    }
    Ok(out)
}

/// Reads a file into one or more documents (several only for JSON Lines).
/// Blocking (PDFs run in a child process): call it off the async workers.
pub fn extract(
    filename: &str,
    format: Format,
    bytes: &[u8],
    limits: &FormatLimits,
) -> Result<Vec<Extracted>, FormatError> {
    if bytes.is_empty() {
        return Err(FormatError::Invalid(format!("'{filename}' is empty")));
    }
    let text_limit = |what: &str| match bytes.len() > limits.max_text_bytes {
        true => Err(too_large(filename, what, bytes.len(), limits.max_text_bytes)),
        false => Ok(()),
    };
    let single = |title: Option<String>, content: String| {
        Ok(vec![Extracted {
            title: clip(title.unwrap_or_else(|| stem(filename))),
            content: non_empty(filename, content)?,
            source: filename.to_string(),
            metadata: Map::new(),
        }])
    };
    match format {
        Format::Text => {
            text_limit("a text file")?;
            single(None, utf8(filename, bytes)?.to_string())
        }
        Format::Markdown => {
            text_limit("a Markdown file")?;
            let text = utf8(filename, bytes)?;
            single(markdown_title(text), text.to_string())
        }
        Format::Html => {
            if bytes.len() > limits.max_html_bytes {
                return Err(too_large(filename, "an HTML file", bytes.len(), limits.max_html_bytes));
            }
            let html = utf8(filename, bytes)?;
            let text = html2text::config::plain_no_decorate()
                .raw_mode(true)
                .no_link_wrapping()
                .string_from_read(html.as_bytes(), 100_000)
                .map_err(|e| FormatError::Invalid(format!("'{filename}' is not readable HTML: {e}")))?;
            single(html_title(html), text)
        }
        Format::Pdf => {
            if !bytes.starts_with(b"%PDF-") {
                return Err(FormatError::Invalid(format!("'{filename}' is not a PDF file")));
            }
            let text = pdf::extract_text(filename, bytes, &limits.pdf)?;
            if text.trim().is_empty() {
                return Err(FormatError::Invalid(format!(
                    "'{filename}' has no text layer (a scanned PDF?)"
                )));
            }
            single(None, text)
        }
        Format::JsonLines => json_lines(filename, utf8(filename, bytes)?, limits.max_documents),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FormatLimits {
        FormatLimits {
            max_text_bytes: 100,
            max_html_bytes: 400,
            max_documents: 2,
            pdf: PdfLimits {
                // Unit tests have no ragchat binary: a PDF that gets as far as the
                // child finds none (tests/api/uploads.rs runs the real one).
                program: Some("/nonexistent/ragchat".into()),
                max_memory_bytes: 1 << 28,
                max_cpu_secs: 1,
                timeout: std::time::Duration::from_secs(1),
                max_text_bytes: 100,
                slots: pdf::Slots::new(1),
            },
        }
    }

    fn one(name: &str, bytes: &[u8]) -> Result<Extracted, FormatError> {
        let f = Format::detect(name, None)?;
        Ok(extract(name, f, bytes, &limits())?.remove(0))
    }

    #[test]
    fn detects_by_extension_then_content_type() {
        assert_eq!(Format::detect("a/b/Notes.MD", None), Ok(Format::Markdown));
        assert_eq!(Format::detect("upload", Some("application/pdf")), Ok(Format::Pdf));
        assert_eq!(Format::detect("x.html", Some("text/plain")), Ok(Format::Html));
        assert!(matches!(
            Format::detect("x.docx", None),
            Err(FormatError::Unsupported(_))
        ));
    }

    #[test]
    fn text_markdown_and_html() {
        let t = one("my_notes.txt", "\u{feff}hello world".as_bytes()).expect("txt");
        assert_eq!((t.title.as_str(), t.content.as_str()), ("my notes", "hello world"));
        let m = one("a.md", b"\n# Cell biology\n\nMitochondria make ATP.").expect("md");
        assert_eq!(m.title, "Cell biology");
        let h = one(
            "page.html",
            b"<html><head><title>A &amp; B</title><style>p{color:red}</style></head><body><h1>Head</h1><p>Para <b>one</b>.</p></body></html>",
        )
        .expect("html");
        assert_eq!(h.title, "A & B");
        assert!(h.content.contains("Para one."), "{:?}", h.content);
        assert!(!h.content.contains("color"), "{:?}", h.content);
    }

    #[test]
    fn bad_files_are_invalid() {
        for (name, bytes) in [
            ("e.txt", &b""[..]),
            ("blank.md", b"  \n\t "),
            ("latin1.txt", b"caf\xe9"),
            ("x.pdf", b"not a pdf at all"),
            ("z.jsonl", b"{\"title\": \"t\", \"text\": \"ok\"}\n{broken"),
            ("w.jsonl", b"{\"title\": \"t\"}"),
        ] {
            assert!(matches!(one(name, bytes), Err(FormatError::Invalid(_))), "{name}");
        }
    }

    #[test]
    fn json_lines_beir_layout() {
        let docs = extract(
            "corpus.jsonl",
            Format::JsonLines,
            b"{\"_id\": \"4983\", \"title\": \"Microstructural development\", \"text\": \"Alterations of the brain.\", \"metadata\": {}}\n\n{\"_id\": 7, \"text\": \"No title here.\", \"metadata\": {\"year\": 2001}}\n",
            &limits(),
        )
        .expect("jsonl");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].source, "4983");
        assert_eq!(docs[0].title, "Microstructural development");
        assert_eq!(docs[1].title, "7");
        assert_eq!(docs[1].metadata.get("year"), Some(&serde_json::json!(2001)));
    }

    #[test]
    fn sizes_are_bounded_before_parsing() {
        let long = "x".repeat(101);
        assert!(matches!(one("a.txt", long.as_bytes()), Err(FormatError::TooLarge(_))));
        assert!(matches!(one("a.md", long.as_bytes()), Err(FormatError::TooLarge(_))));
        assert!(one("a.txt", &long.as_bytes()[..100]).is_ok());
        let page = format!("<html><body><p>{}</p></body></html>", "y".repeat(400));
        let e = one("p.html", page.as_bytes()).expect_err("html over 400 bytes");
        assert!(
            matches!(&e, FormatError::TooLarge(m) if m.contains("at most 400 bytes")),
            "{e:?}"
        );
        // The third document is refused before it is parsed.
        let lines = "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n";
        let e = extract("c.jsonl", Format::JsonLines, lines.as_bytes(), &limits()).expect_err("3 > 2");
        assert!(
            matches!(&e, FormatError::Invalid(m) if m.contains("more than 2 documents")),
            "{e:?}"
        );
        // A PDF is never parsed in this process: without the extractor it is a 503.
        assert!(matches!(
            one("y.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage"),
            Err(FormatError::Unavailable(_))
        ));
    }
}
