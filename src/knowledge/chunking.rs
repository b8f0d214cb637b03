//! Token-aware chunking: text-splitter cuts at the largest semantic boundary
//! (paragraph, sentence, word) that keeps a chunk within `chunk_tokens` tokens of
//! the embedding model's own tokenizer, with `chunk_overlap` tokens of overlap.

use text_splitter::{ChunkConfig, ChunkSizer, TextSplitter};
use tokenizers::Tokenizer;

/// Counts tokens the way the embedding model will (special tokens excluded).
struct TokenCount(Tokenizer);

impl ChunkSizer for TokenCount {
    fn size(&self, chunk: &str) -> usize {
        // A text the tokenizer cannot read counts by its bytes (an upper bound).
        self.0.encode(chunk, false).map_or(chunk.len(), |e| e.get_ids().len())
    }
}

pub struct Chunker {
    splitter: TextSplitter<TokenCount>,
}

impl Chunker {
    /// `tokenizer_json`: the embedding model's tokenizer.json.
    pub fn load(tokenizer_json: &std::path::Path, tokens: usize, overlap: usize) -> Result<Self, String> {
        let mut tok = Tokenizer::from_file(tokenizer_json).map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
        tok.with_truncation(None).map_err(|e| e.to_string())?;
        tok.with_padding(None);
        // Leave room for [CLS] and [SEP].
        let config = ChunkConfig::new(tokens.saturating_sub(2).max(8))
            .with_overlap(overlap.min(tokens / 2))
            .map_err(|e| e.to_string())?
            .with_sizer(TokenCount(tok));
        Ok(Chunker {
            splitter: TextSplitter::new(config),
        })
    }

    pub fn split(&self, text: &str) -> Vec<String> {
        self.splitter.chunks(text).map(str::to_string).collect()
    }
}

/// A chunk's sentences, trimmed, empty ones dropped, at most `max`: what the
/// sentence part of hybrid search embeds. Boundaries are Unicode's (UAX #29),
/// and also a full stop, `!` or `?` right before a capitalized word with no
/// space between ("disabilities.A line"): text extracted from PDFs and corpora
/// such as SciFact often joins sentences that way.
pub fn sentences(text: &str, max: usize) -> Vec<&str> {
    use unicode_segmentation::UnicodeSegmentation;
    text.unicode_sentences()
        .flat_map(joined_sentences)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(max)
        .collect()
}

/// Splits after `.`, `!` or `?` between a lower-case letter, digit or `)` and
/// an upper-case letter that starts a word ("A line", "To").
fn joined_sentences(text: &str) -> impl Iterator<Item = &str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut cuts: Vec<usize> = chars
        .windows(4)
        .filter(|w| {
            let [(_, a), (_, p), (_, b), (_, c)] = [w[0], w[1], w[2], w[3]];
            matches!(p, '.' | '!' | '?')
                && (a.is_lowercase() || a.is_ascii_digit() || a == ')')
                && b.is_uppercase()
                && (c.is_lowercase() || c.is_whitespace())
        })
        .map(|w| w[2].0)
        .collect();
    cuts.push(text.len());
    let mut start = 0;
    cuts.into_iter().map(move |end| {
        let piece = &text[start..end];
        start = end;
        piece
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_boundaries_and_are_bounded() {
        let text = "Aspirin lowers risk. It was tested in 2010 (n = 7).\n\nWhy? Nobody knows!  ";
        assert_eq!(
            sentences(text, 10),
            vec![
                "Aspirin lowers risk.",
                "It was tested in 2010 (n = 7).",
                "Why?",
                "Nobody knows!"
            ]
        );
        assert_eq!(sentences(text, 2).len(), 2);
        assert!(sentences("   \n ", 10).is_empty());
        // Sentences joined with no space, as in SciFact; abbreviations and decimals stay.
        assert_eq!(
            sentences("Matter in infants.A line scan (n = 7).To assess U.S. data, 2.5 mg.", 10),
            vec![
                "Matter in infants.",
                "A line scan (n = 7).",
                "To assess U.S. data, 2.5 mg."
            ]
        );
    }

    #[test]
    fn chunks_fit_the_budget_overlap_and_cover_the_text() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2/tokenizer.json");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        let chunker = Chunker::load(&path, 64, 16).expect("chunker");
        let text = (0..60)
            .map(|i| format!("Sentence number {i} talks about topic {} in some detail.", i % 7))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = chunker.split(&text);
        assert!(chunks.len() > 3, "{} chunks", chunks.len());
        let mut tok = Tokenizer::from_file(&path).expect("tokenizer");
        tok.with_padding(None);
        for c in &chunks {
            let n = tok.encode(c.as_str(), false).expect("encode").get_ids().len();
            assert!(n <= 62, "chunk of {n} tokens");
        }
        // Every sentence is somewhere, and neighbours share text (the overlap).
        for i in 0..60 {
            assert!(
                chunks.iter().any(|c| c.contains(&format!("number {i} "))),
                "sentence {i} lost"
            );
        }
        assert!(chunks.windows(2).any(|w| {
            let tail = &w[0][w[0].len().saturating_sub(20)..];
            w[1].contains(tail.trim())
        }));
        assert!(chunker.split("").is_empty());
    }
}
